"""What the demo's 4-bit / 3-bit comparison (quantize()'s default against round-to-nearest) can resolve.

For each setting (calibration mode: one pass over the dense model or sequential; statistics
correction: BatchNorm re-estimation or none; grid: MSE or min-max; calibration images) and each
quantizer (the default "auto" + refine, plain GPTQ, RTN), compresses the demo's digits CNN as the
demo does (asymmetric, one grid per output channel, first convolution dense) and prints test
accuracy, test loss, KL(dense) KL(ref), the KL divergence from the dense model with the
same statistics correction (so that it measures what quantization changed, not what the
re-estimation of BatchNorm alone changed), and the summed layer loss, with the standard error of the per-image
test-loss difference to RTN of the same setting (paired over the 500 test images: what the test
set resolves). Reference rows: the dense model, and the dense model with its BatchNorm
statistics re-estimated on the calibration images (what every compressed row also gets).

``--seeds 1 2 3`` adds models trained with other seeds (``train_model``, a few seconds each), so
that a difference between quantizers can be checked across models, not only across test images.
A program, not a test.  Run: .venv/bin/python benchmarks/demo_quant_study.py [--seeds 1 2 3 4]
"""

from __future__ import annotations

import _threads  # noqa: F401  (thread variables before torch)

import argparse
import copy
import itertools
import math
import sys

import torch

from obc_native.demo import RECIPES, SKIP
from obc_native.demo.model import load_data, load_pretrained, train_model
from obc_native.torch import LayerConfig, Recipe, compress
from obc_native.torch.correction import recalibrate_batchnorm

# label -> LayerConfig keywords beyond the recipe's (the default first)
QUANTIZERS = {"auto": dict(), "gptq": dict(quant_method="gptq", refine=False), "rtn": dict(method="rtn")}


def per_image(model, images, labels, dense_log_probs):
    """(accuracy %, per-image cross-entropy (n,), per-image KL(dense || model) (n,)), eval mode."""
    model.eval()
    with torch.no_grad():
        logits = model(images)
    log_probs = torch.log_softmax(logits.double(), dim=1)
    loss = torch.nn.functional.nll_loss(log_probs, labels, reduction="none")
    kl = (dense_log_probs.exp() * (dense_log_probs - log_probs)).sum(dim=1)
    return 100.0 * float((logits.argmax(1) == labels).double().mean()), loss, kl


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    """Standard error of mean(a - b) over the images."""
    diff = a - b
    return float(diff.std() / math.sqrt(len(diff)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="extra models trained with these seeds")
    parser.add_argument("--bits", type=int, nargs="*", default=[4, 3])
    parser.add_argument("--calibration", type=int, nargs="*", default=[256, 1297])
    parser.add_argument("--modes", nargs="*", default=["one pass", "sequential"], choices=["one pass", "sequential"])
    parser.add_argument("--corrections", nargs="*", default=["bn", "none"], choices=["bn", "none"])
    parser.add_argument("--grids", nargs="*", default=["mse", "minmax"], choices=["mse", "minmax"])
    parser.add_argument("--threads", type=int, default=2, help="read by _threads before torch is imported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data()
    models = {"shipped": load_pretrained()}
    for seed in args.seeds:
        models[f"seed {seed}"] = train_model(data, seed=seed)
    header = (f"{'model':8s} {'bits':>4s} {'calib':>5s} {'mode':10s} {'corr':4s} {'grid':6s} {'quantizer':9s} "
              f"{'acc':>6s} {'test loss':>9s} {'d vs RTN':>8s} {'+-se':>7s} {'KL(dense)':>9s} {'+-se':>7s} "
              f"{'KL(ref)':>8s} {'+-se':>7s} {'layer loss':>10s}")
    print(header)
    summary = {}
    for model_name, dense in models.items():
        dense.eval()
        with torch.no_grad():
            dense_log_probs = torch.log_softmax(dense(data.test_x).double(), dim=1)
        acc, loss, _ = per_image(dense, data.test_x, data.test_y, dense_log_probs)
        print(f"{model_name:8s} {'-':>4s} {'-':>5s} {'dense':10s} {'-':4s} {'-':6s} {'-':9s} {acc:5.1f}% "
              f"{float(loss.mean()):9.4f}")
        for size in args.calibration:
            calibration = data.calibration(size)
            model = copy.deepcopy(dense)
            recalibrate_batchnorm(model, calibration)
            model.eval()
            with torch.no_grad():
                bn_log_probs = torch.log_softmax(model(data.test_x).double(), dim=1)
            acc, loss, kl = per_image(model, data.test_x, data.test_y, dense_log_probs)
            print(f"{model_name:8s} {'-':>4s} {size:5d} {'dense':10s} {'bn':4s} {'-':6s} {'-':9s} {acc:5.1f}% "
                  f"{float(loss.mean()):9.4f} {'':8s} {'':7s} {float(kl.mean()):9.4f}")
            for bits, mode, corr, grid in itertools.product(args.bits, args.modes, args.corrections, args.grids):
                sequential, correction = mode == "sequential", "batchnorm" if corr == "bn" else None
                reference = bn_log_probs if correction else dense_log_probs
                rows = {}
                for label, extra in QUANTIZERS.items():
                    config = LayerConfig(**{**RECIPES[f"{bits}-bit"], **extra, "grid": grid})
                    model = copy.deepcopy(dense)
                    report = compress(model, calibration, Recipe(default=config, skip=SKIP), sequential=sequential,
                                      correction=correction, baseline=False, quiet=True)
                    rows[label] = (*per_image(model, data.test_x, data.test_y, dense_log_probs), report.total_loss,
                                   per_image(model, data.test_x, data.test_y, reference)[2])
                _, rtn_loss, rtn_kl, _, rtn_kl_ref = rows["rtn"]
                for label, (acc, loss, kl, layer_loss, kl_ref) in rows.items():
                    delta = float((loss - rtn_loss).mean())
                    summary.setdefault((bits, size, mode, corr, grid, label), []).append(
                        (acc - rows["rtn"][0], delta, float((kl_ref - rtn_kl_ref).mean())))
                    print(f"{model_name:8s} {bits:4d} {size:5d} {'sequential' if sequential else 'one pass':10s} "
                          f"{'bn' if correction else 'none':4s} {grid:6s} {label:9s} {acc:5.1f}% "
                          f"{float(loss.mean()):9.4f} {delta:+8.4f} {paired_se(loss, rtn_loss):7.4f} "
                          f"{float(kl.mean()):9.4f} {paired_se(kl, rtn_kl):7.4f} {float(kl_ref.mean()):8.4f} "
                          f"{paired_se(kl_ref, rtn_kl_ref):7.4f} {layer_loss:10.4f}", flush=True)
    if len(models) > 1:
        print(f"\nacross the {len(models)} models: mean difference to RTN of the same setting (+- standard error "
              f"across models), and on how many models the quantizer is better (accuracy: strictly)")
        print(f"{'bits':>4s} {'calib':>5s} {'mode':10s} {'corr':4s} {'grid':6s} {'quantizer':9s} {'d acc':>6s} "
              f"{'better':>6s} {'d test loss':>11s} {'+-se':>7s} {'better':>6s} {'d KL(ref)':>9s} {'better':>6s}")
        for (bits, size, mode, corr, grid, label), values in summary.items():
            if label == "rtn":
                continue
            accs, losses, kls = (torch.tensor(column, dtype=torch.float64) for column in zip(*values))
            n = len(values)
            print(f"{bits:4d} {size:5d} {mode:10s} {corr:4s} {grid:6s} {label:9s} {float(accs.mean()):+6.2f} "
                  f"{int((accs > 0).sum()):>3d}/{n:<2d} {float(losses.mean()):+11.4f} "
                  f"{float(losses.std() / math.sqrt(n)):7.4f} {int((losses < 0).sum()):>3d}/{n:<2d} "
                  f"{float(kls.mean()):+9.4f} {int((kls < 0).sum()):>3d}/{n:<2d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
