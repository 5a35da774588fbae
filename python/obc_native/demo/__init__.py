"""``obc-native demo``: compress a small digits CNN with ExactOBS / quantize() and with the baselines.

Runs offline on the embedded model and data (see :mod:`obc_native.demo.model`): for each recipe
(50% and 75% unstructured, 2:4, 4-bit, 3-bit, 2:4 + 4-bit; the first convolution, which has one
input channel and 144 weights, stays dense) it compresses a fresh copy of the trained model with
ExactOBS pruning / quantize()'s default ("auto": OBQ and GPTQ, refined, best per row) and with
magnitude pruning / round-to-nearest, re-estimates BatchNorm statistics on
the same 256 calibration images, and reports test accuracy, the size of the saved file, the FLOPs
per image of the four layers and the compression time.

Then, for each FLOP budget (2x and 3x fewer FLOPs than the dense model), non-uniform against
uniform sparsity: one level database of all four layers (unstructured sparsities 5%, 10%, .., 95%
and dense, with stitched model losses) is built once; the DP picks one sparsity per layer within
the budget (``compress(budget="flops=2x")``); the uniform row prunes every layer to the one
sparsity that meets the same budget (``uniform_sparsity``). Both with ExactOBS and BatchNorm
re-estimation.

Two references make the differences readable: a "BN re-estimated" row (the dense model after the
same BatchNorm re-estimation, without compression: what every compressed row starts from), and,
under the table, each recipe's test-loss difference to its baseline paired over the test images
with its standard error (:func:`paired_difference`) and each row's KL divergence from the
reference: with 500 test images, test-loss differences of a few thousandths of a nat are within
the standard error (``benchmarks/demo_quant_study.py`` measures the 4-bit and
3-bit comparison across settings and models trained with other seeds).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for the annotation only: this module imports torch inside its functions
    import torch

__all__ = ["DemoResult", "RECIPES", "BUDGETS", "run_demo", "format_results", "expectations", "method_label",
           "paired_difference", "DESCRIPTION"]

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
# name -> FLOP reduction factor of the non-uniform rows ("flops=<f>x")
BUDGETS: dict[str, float] = {"2x fewer FLOPs": 2.0, "3x fewer FLOPs": 3.0}
BUDGET_SPARSITIES = tuple(round(0.05 * i, 2) for i in range(1, 20))

DESCRIPTION = (
    "Digits CNN (scikit-learn's 8x8 handwritten digits; 1297 train / 500 test images), 15.2k weights in\n"
    "3 Conv2d + 1 Linear. Each recipe compresses every layer but the first conv, calibrated on 256\n"
    "training images, followed by BatchNorm re-estimation. 'file' is the saved safetensors size, 'FLOPs' those\n"
    "of the 4 layers per image. FLOP budgets: a sparsity per layer (all 4) chosen by the DP over a level\n"
    "database with stitched model losses (time includes building it), against one sparsity for every layer.\n"
    "KL(dense): mean KL divergence of the test predictions from the dense model's (nats). 'BN re-estimated':\n"
    "the dense model after the same BatchNorm re-estimation, without compression (what every row starts from).\n"
    "Methods: ExactOBS / magnitude prune; 'auto' quantizes with quantize()'s default (OBQ and GPTQ, each\n"
    "refined with scale refit, the best per row), RTN rounds to nearest on the fitted grid."
)


@dataclass
class DemoResult:
    """One row of the demo: ``method`` is "dense", "dense-bn" (the dense model after the
    BatchNorm re-estimation every compressed row gets), "obc", "baseline", "nonuniform" or "uniform".

    ``accuracy`` in percent and ``test_loss`` (mean cross-entropy, nats) on the 500 test images;
    ``file_bytes``: size of the saved tensor file; ``seconds``: compression wall time; ``flops``:
    FLOPs per image of the four layers, counted on the compressed weights (2 per non-zero weight
    application); ``budget``: the FLOP budget of the row (None for recipes); ``detail``: the
    sparsity of each layer for budget rows; ``kl_dense``: mean KL(dense || row) of the softmax
    outputs on the test images (nats), how far the compressed model's predictions moved from the
    dense model's, which layer-wise compression minimizes by proxy and which, unlike accuracy on
    500 images, resolves small differences (0 for the dense row); ``kl_reference``: the same
    from the "dense-bn" row's predictions (what compression changed, without the shift of the
    BatchNorm re-estimation, which every compressed row also gets); ``image_losses``: the
    cross-entropy of each test image (500,), float64, for paired comparisons between rows.
    """

    recipe: str
    method: str
    accuracy: float
    test_loss: float
    file_bytes: int
    seconds: float
    flops: float = 0.0
    budget: float | None = None
    detail: str = ""
    kl_dense: float = 0.0
    kl_reference: float = 0.0
    image_losses: torch.Tensor | None = field(default=None, repr=False, compare=False)


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
    import torch

    from obc_native.torch import LayerConfig, Recipe, compress, flops_per_weight, measure_costs
    from obc_native.torch.correction import recalibrate_batchnorm

    from .model import evaluate, load_data, load_pretrained

    data = load_data()
    dense = load_pretrained()
    calibration = data.calibration(calibration_size)
    applications = flops_per_weight(dense, calibration)
    dense_log_probs = _log_probs(dense, data.test_x)
    # The reference of the compressed rows: the dense model with the BatchNorm statistics
    # re-estimated on the calibration images, which alone moves its predictions (the shipped
    # statistics are running averages over augmented training batches).
    reestimated = copy.deepcopy(dense)
    start = time.perf_counter()
    recalibrate_batchnorm(reestimated, calibration)
    reestimate_seconds = time.perf_counter() - start
    reference_log_probs = _log_probs(reestimated, data.test_x)

    def kl_from(target, log_probs):
        return float(torch.nn.functional.kl_div(log_probs, target, log_target=True, reduction="batchmean"))

    def row(name, method, model, report, seconds, **extra):
        flops = measure_costs(model, applications)["flops"]
        scores = evaluate(model, data.test_x, data.test_y)
        log_probs = _log_probs(model, data.test_x)
        losses = torch.nn.functional.nll_loss(log_probs.double(), data.test_y, reduction="none")
        return DemoResult(name, method, *scores, _file_size(model, report), seconds, flops,
                          kl_dense=kl_from(dense_log_probs, log_probs),
                          kl_reference=kl_from(reference_log_probs, log_probs), image_losses=losses, **extra)

    results = [row("dense", "dense", dense, None, 0.0),
               row("dense", "dense-bn", reestimated, None, reestimate_seconds)]
    names = recipes or [*RECIPES, *BUDGETS]
    for name in [n for n in names if n in RECIPES]:
        for method in ("obc", "baseline"):
            config = LayerConfig(**RECIPES[name], method="obc" if method == "obc" else "magnitude")
            model = copy.deepcopy(dense)
            start = time.perf_counter()
            report = compress(model, calibration, Recipe(default=config, skip=SKIP), baseline=False, quiet=quiet)
            results.append(row(name, method, model, report, time.perf_counter() - start))
    budgets = [n for n in names if n in BUDGETS]
    if budgets:
        results += _budget_rows(budgets, dense, calibration, row, quiet)
    return results


def _log_probs(model, images):
    """log softmax of the model's outputs on `images` (n, classes), in eval mode."""
    import torch

    training = model.training
    model.eval()
    with torch.no_grad():
        out = torch.log_softmax(model(images), dim=1)
    model.train(training)
    return out


def _sparsities(model) -> str:
    from obc_native.torch import find_layers
    from obc_native.torch.layers import weight_matrix

    return "/".join(f"{float((weight_matrix(info) == 0).float().mean()):.0%}" for info in find_layers(model).values())


def _budget_rows(names: list[str], dense, calibration, row, quiet: bool) -> list[DemoResult]:
    """Non-uniform (DP over a shared level database) and uniform rows at each FLOP budget."""
    from obc_native.torch import LayerConfig, LevelSpec, Recipe, build_database, compress, uniform_sparsity

    start = time.perf_counter()
    database = build_database(dense, calibration, LevelSpec(sparsities=BUDGET_SPARSITIES, nm=()), stitch=True,
                              quiet=quiet)
    build_seconds = time.perf_counter() - start
    rows = []
    for name in names:
        spec = f"flops={BUDGETS[name]!r}x"
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = compress(model, calibration, budget=spec, database=database, baseline=False, quiet=quiet)
        seconds = build_seconds + time.perf_counter() - start
        budget = report.budget["budget"]
        rows.append(row(name, "nonuniform", model, report, seconds, budget=budget, detail=_sparsities(model)))

        sparsity = uniform_sparsity(database, spec)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = compress(model, calibration, LayerConfig(prune="unstructured", sparsity=sparsity), baseline=False,
                          quiet=quiet)
        rows.append(row(name, "uniform", model, report, time.perf_counter() - start, budget=budget,
                        detail=_sparsities(model)))
    return rows


def method_label(recipe: str, method: str) -> str:
    """The table's name of what a row ran: for recipe rows, the pruner and/or quantizer of its
    LayerConfig (ExactOBS prunes; "auto" quantizes = quantize()'s default: OBQ and GPTQ, each
    refined with scale refit, the best per row; the baseline is magnitude pruning and/or
    round-to-nearest); budget and dense rows by their kind."""
    config = RECIPES.get(recipe)
    if config is None or method not in ("obc", "baseline"):
        return {"dense": "dense", "dense-bn": "BN re-estimated", "nonuniform": "non-uniform DP",
                "uniform": "uniform"}.get(method, method)
    prunes, quantizes = "prune" in config, config.get("bits") is not None
    pruner, quantizer = ("ExactOBS", "auto") if method == "obc" else ("magnitude", "RTN")
    return " + ".join(name for name, used in ((pruner, prunes), (quantizer, quantizes)) if used)


def expectations(results: list[DemoResult]) -> dict[str, bool]:
    """The demo's claims, checked on ``results`` (claims whose recipes did not run are left out)."""
    dense = results[0]
    rows = {(r.recipe, r.method): r for r in results[1:]}
    checks = {}
    for recipe in ("unstructured 50%", "4-bit"):
        if (recipe, "obc") in rows:
            checks[f"{method_label(recipe, 'obc')} within 1 point of dense at {recipe}"] = (
                rows[recipe, "obc"].accuracy >= dense.accuracy - 1.0
            )
    for recipe in ("unstructured 75%", "3-bit"):
        if (recipe, "obc") in rows:
            checks[f"{method_label(recipe, 'obc')} beats {method_label(recipe, 'baseline')} at {recipe}"] = (
                rows[recipe, "obc"].accuracy > rows[recipe, "baseline"].accuracy
            )
    # KL from the BatchNorm re-estimated dense model, not from the dense model: the re-estimation
    # alone accounts for most of a 4-bit row's KL(dense), and it can cancel part of a row's own
    # change (benchmarks/README.md, "What the 4-bit and 3-bit rows can resolve").
    for recipe in ("4-bit", "3-bit"):
        if (recipe, "obc") in rows:
            checks[f"{method_label(recipe, 'obc')} closer than {method_label(recipe, 'baseline')} to the BN "
                   f"re-estimated dense model (KL) at {recipe}"] = (
                rows[recipe, "obc"].kl_reference < rows[recipe, "baseline"].kl_reference
            )
    for name in BUDGETS:
        if (name, "nonuniform") in rows:
            ours, uniform = rows[name, "nonuniform"], rows[name, "uniform"]
            checks[f"both allocations within the budget at {name}"] = (
                ours.flops <= ours.budget and uniform.flops <= uniform.budget
            )
            checks[f"non-uniform (DP) at least as accurate as uniform at {name}"] = ours.accuracy >= uniform.accuracy
    return checks


def paired_difference(ours: DemoResult, other: DemoResult) -> tuple[float, float]:
    """(mean, standard error) of the per-image test-loss difference ``ours - other`` (nats),
    paired over the same test images: how well the test set resolves the two rows' test losses."""
    diff = ours.image_losses - other.image_losses
    return float(diff.mean()), float(diff.std()) / math.sqrt(len(diff))


def format_results(results: list[DemoResult]) -> str:
    """A text table (recipe, method, test accuracy and loss, file size and ratio to dense,
    FLOPs per image, compression time, per-layer sparsities of budget rows), the test-loss
    difference of each recipe's obc row to its baseline with its standard error, then the
    checked claims."""
    dense_bytes = results[0].file_bytes
    lines = [
        f"{'recipe':<18}{'method':<21}{'test acc':>9}{'test loss':>10}{'KL(dense)':>10}{'file':>10}{'ratio':>7}{'FLOPs':>9}{'time':>8}"
        "  layer sparsity"
    ]
    for r in results:
        lines.append(
            f"{r.recipe:<18}{method_label(r.recipe, r.method):<21}{r.accuracy:>8.1f}%{r.test_loss:>10.4f}{r.kl_dense:>10.4f}{r.file_bytes / 1024:>8.1f}kB"
            f"{r.file_bytes / dense_bytes:>7.2f}{r.flops / 1000:>8.1f}k{r.seconds:>7.2f}s  {r.detail}".rstrip()
        )
    rows = {(r.recipe, r.method): r for r in results}
    pairs = [(name, rows[name, "obc"], rows[name, "baseline"]) for name in RECIPES
             if (name, "obc") in rows and (name, "baseline") in rows]
    if pairs and all(r.image_losses is not None for _, *both in pairs for r in both):
        lines += ["", f"test loss difference to the baseline, paired over the {len(pairs[0][1].image_losses)} "
                      "test images (+- one standard error);",
                  "KL(ref): mean KL divergence of each from the BN re-estimated dense model:"]
        for name, ours, baseline in pairs:
            mean, error = paired_difference(ours, baseline)
            label = f"{method_label(name, 'obc')} - {method_label(name, 'baseline')}:"
            lines.append(f"  {name:<18}{label:<36}{mean:+.4f} +- {error:.4f}   "
                         f"KL(ref) {ours.kl_reference:.4f} vs {baseline.kl_reference:.4f}")
    checks = expectations(results)
    if checks:
        lines.append("")
        lines += [f"[{'ok' if passed else 'FAILED'}] {claim}" for claim, passed in checks.items()]
    return "\n".join(lines)
