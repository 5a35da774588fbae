"""Layer losses of the demo's 4-bit and 3-bit recipes: quantize's default against RTN.

``obc-native demo`` reports test accuracy and loss of the digits CNN; this program compresses the
same model with the same recipes (asymmetric, one grid per output channel, first convolution
dense, 256 calibration images) and prints, per layer, the layer loss ||(W - W_hat) X||^2 / n of
quantize()'s default (method="auto" + refinement) and of round-to-nearest on the same grid
(compress(..., baseline=True) computes both on the same calibration inputs). Then, per recipe and
quantizer (LayerConfig(quant_method=..., refine=...)), the model's test accuracy and loss after
BatchNorm re-estimation and the summed layer loss. A program, not a test.
Run: .venv/bin/python benchmarks/demo_quant_losses.py
"""

from __future__ import annotations

import copy
import sys

from obc_native.demo import RECIPES, SKIP
from obc_native.demo.model import evaluate, load_data, load_pretrained
from obc_native.torch import LayerConfig, Recipe, compress


# (quant_method, refine): the default first, then each quantizer alone.
QUANTIZERS = [("auto", True), ("obq", False), ("gptq", False), ("gptq", True), ("rtn", False)]


def main() -> int:
    data = load_data()
    dense = load_pretrained()
    calibration = data.calibration(256)
    print(f"{'recipe':8s} {'layer':12s} {'default loss':>13s} {'RTN loss':>11s} {'ratio':>7s}")
    for name in ("4-bit", "3-bit"):
        model = copy.deepcopy(dense)
        report = compress(model, calibration, Recipe(default=LayerConfig(**RECIPES[name]), skip=SKIP),
                          baseline=True, quiet=True)
        total = total_rtn = 0.0
        for layer in report.compressed:
            total += layer.loss
            total_rtn += layer.baseline_loss
            print(f"{name:8s} {layer.name:12s} {layer.loss:13.5g} {layer.baseline_loss:11.5g} "
                  f"{layer.loss / layer.baseline_loss:7.3f}")
        print(f"{name:8s} {'(sum)':12s} {total:13.5g} {total_rtn:11.5g} {total / total_rtn:7.3f}")
    print(f"\n{'recipe':8s} {'quantizer':14s} {'test acc':>8s} {'test loss':>10s} {'layer loss':>11s}")
    for name in ("4-bit", "3-bit"):
        for method, refine in QUANTIZERS:
            model = copy.deepcopy(dense)
            config = LayerConfig(**RECIPES[name], quant_method=method, refine=refine)
            report = compress(model, calibration, Recipe(default=config, skip=SKIP), baseline=False,
                              quiet=True)
            accuracy, test_loss = evaluate(model, data.test_x, data.test_y)
            label = method + (" + refine" if refine else "")
            print(f"{name:8s} {label:14s} {accuracy:7.1f}% {test_loss:10.4f} "
                  f"{report.total_loss:11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
