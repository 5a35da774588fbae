"""``obc-native demo``: compress a small digits CNN with ExactOBS / OBQ and with the baselines.

Runs offline on the embedded model and data (see :mod:`obc_native.demo.model`): for each recipe
(50% and 75% unstructured, 2:4, 4-bit, 3-bit, 2:4 + 4-bit; the first convolution, which has one
input channel and 144 weights, stays dense) it compresses a fresh copy of the trained model with
ExactOBS / OBQ and with magnitude pruning / round-to-nearest, re-estimates BatchNorm statistics on
the same 256 calibration images, and reports test accuracy, the size of the saved file and the
compression time.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass

__all__ = ["DemoResult", "RECIPES", "run_demo", "format_results", "expectations", "DESCRIPTION"]

# name -> LayerConfig keyword arguments (quantization: asymmetric, one grid per output channel)
RECIPES: dict[str, dict] = {
    "unstructured 50%": dict(prune="unstructured", sparsity=0.5),
    "unstructured 75%": dict(prune="unstructured", sparsity=0.75),
    "2:4": dict(prune="nm", n=2, m=4),
    "4-bit": dict(bits=4, sym=False),
    "3-bit": dict(bits=3, sym=False),
    "2:4 + 4-bit": dict(prune="nm", n=2, m=4, bits=4, sym=False),
}
SKIP = ["features.0"]

DESCRIPTION = (
    "Digits CNN (scikit-learn's 8x8 handwritten digits; 1297 train / 500 test images), 15.2k weights in\n"
    "3 Conv2d + 1 Linear. Each recipe compresses every layer but the first conv, calibrated on 256\n"
    "training images, followed by BatchNorm re-estimation. 'file' is the saved safetensors size."
)


@dataclass
class DemoResult:
    """One row of the demo: ``method`` is "dense", "obc" or "baseline".

    ``accuracy`` in percent and ``test_loss`` (mean cross-entropy, nats) on the 500 test images;
    ``file_bytes``: size of the saved tensor file; ``seconds``: compression wall time.
    """

    recipe: str
    method: str
    accuracy: float
    test_loss: float
    file_bytes: int
    seconds: float


def _file_size(model, report) -> int:
    from obc_native.torch import save_compressed
    from obc_native.torch.serialize import TENSORS_NAME

    with tempfile.TemporaryDirectory() as directory:
        save_compressed(model, directory, report)
        return os.path.getsize(os.path.join(directory, TENSORS_NAME))


def run_demo(recipes: list[str] | None = None, *, calibration_size: int = 256, quiet: bool = True) -> list[DemoResult]:
    """Run the demo; returns the dense row first, then (obc, baseline) rows per recipe.

    PyTorch runs single-threaded meanwhile (restored afterwards): the model is tiny, and extra
    intra-op threads only cost time, a lot of it on a busy machine.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(recipes, calibration_size, quiet)
    finally:
        torch.set_num_threads(threads)


def _run(recipes: list[str] | None, calibration_size: int, quiet: bool) -> list[DemoResult]:
    from obc_native.torch import LayerConfig, Recipe, compress

    from .model import evaluate, load_data, load_pretrained

    data = load_data()
    dense = load_pretrained()
    calibration = data.calibration(calibration_size)
    results = [DemoResult("dense", "dense", *evaluate(dense, data.test_x, data.test_y), _file_size(dense, None), 0.0)]
    for name in recipes or list(RECIPES):
        for method in ("obc", "baseline"):
            config = LayerConfig(**RECIPES[name], method="obc" if method == "obc" else "magnitude")
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = compress(model, calibration, Recipe(default=config, skip=SKIP), baseline=False, quiet=quiet)
            seconds = time.perf_counter() - start
            results.append(
                DemoResult(name, method, *evaluate(model, data.test_x, data.test_y), _file_size(model, report), seconds)
            )
    return results


def expectations(results: list[DemoResult]) -> dict[str, bool]:
    """The demo's claims, checked on ``results`` (claims whose recipes did not run are left out)."""
    dense = results[0]
    rows = {(r.recipe, r.method): r for r in results[1:]}
    checks = {}
    for recipe in ("unstructured 50%", "4-bit"):
        if (recipe, "obc") in rows:
            checks[f"ExactOBS/OBQ within 1 point of dense at {recipe}"] = (
                rows[recipe, "obc"].accuracy >= dense.accuracy - 1.0
            )
    for recipe in ("unstructured 75%", "3-bit"):
        if (recipe, "obc") in rows:
            checks[f"ExactOBS/OBQ beats magnitude/RTN at {recipe}"] = (
                rows[recipe, "obc"].accuracy > rows[recipe, "baseline"].accuracy
            )
    return checks


def format_results(results: list[DemoResult]) -> str:
    """A text table (recipe, method, test accuracy and loss, file size and ratio to dense,
    compression time) followed by the checked claims."""
    dense_bytes = results[0].file_bytes
    names = {"dense": "dense", "obc": "ExactOBS/OBQ", "baseline": "magnitude/RTN"}
    lines = [f"{'recipe':<18}{'method':<15}{'test acc':>9}{'test loss':>10}{'file':>10}{'ratio':>7}{'time':>8}"]
    for r in results:
        lines.append(
            f"{r.recipe:<18}{names[r.method]:<15}{r.accuracy:>8.1f}%{r.test_loss:>10.4f}{r.file_bytes / 1024:>8.1f}kB"
            f"{r.file_bytes / dense_bytes:>7.2f}{r.seconds:>7.2f}s"
        )
    checks = expectations(results)
    if checks:
        lines.append("")
        lines += [f"[{'ok' if passed else 'FAILED'}] {claim}" for claim, passed in checks.items()]
    return "\n".join(lines)
