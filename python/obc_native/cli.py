"""The ``obc-native`` command line: ``compress``, ``report``, ``export``, ``shrink`` and ``demo``.

``obc-native compress`` loads a model, compresses it with a recipe file, or non-uniformly within a
budget, and saves it in the obc_native format (see ``obc_native.torch.serialize``; load it with
``load_compressed``). With ``--hf`` the folder is also a Hugging Face checkpoint (``config.json``,
``model.safetensors`` with the dequantized weights, the source's tokenizer files) that
``from_pretrained`` loads; it is loaded back and compared before the command succeeds (see
``obc_native.torch.hf_checkpoint``)::

    obc-native compress --model weights.safetensors --arch mypkg.models:Net \\
        --calibration calib.pt --recipe recipe.yaml --out compressed/
    obc-native compress --hf path/to/hf_model_dir --calibration ids.pt --recipe r.yaml --out out/
    obc-native compress --model w.safetensors --arch mypkg.models:Net --calibration calib.pt \\
        --budget flops=2x --database levels.json --out compressed/

``--ray [ADDRESS]`` runs the calibration shards and layer solves on a Ray cluster (results
bit-identical to a local run; see ``obc_native.torch.executors``); ``--checkpoint DIR`` writes each
finished layer to DIR, and rerunning the same command resumes there.

``--budget`` (``flops=2x``, ``params=2x``, ``bits=4.5``, ...) picks one level per layer with the
DP over a level database (see ``obc_native.torch.nonuniform``); ``--database PATH`` reuses the
database saved at PATH, or saves the one built there; ``--recipe`` then only selects the layers.

``obc-native export DIR --out model.onnx --example x.pt`` rebuilds the saved model
(architecture recorded in the manifest, or ``--arch``) and writes ONNX with the stored codes (see
``obc_native.torch.export_onnx``).

``obc-native shrink DIR --out small.onnx --example x.pt`` removes the channels that structured
pruning zeroed, with the layers producing them (``obc_native.torch.shrink_structured``), and
writes the smaller model as ONNX or as a ``torch.export`` program (``.pt2``): files that run
without the model's class, which no longer fits the shrunk shapes.

Models: a state dict (``.safetensors``, or a torch file read with ``weights_only=True``) plus
``--arch module:Class`` (and ``--arch-kwargs`` JSON) to build the architecture; a whole module
saved with ``torch.save(model)`` only with ``--trust-pickle`` (unpickling runs code from the
file: never for untrusted files); or a Hugging Face model directory with ``--hf``.

Calibration file: a tensor, or a dict of tensors passed as keyword arguments (e.g.
``input_ids``), split along dimension 0 into batches of ``--batch-size``; ``.safetensors``,
``.npy`` or a torch file (``weights_only=True``).

torch is imported only by the commands that need it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from ._arrays import MAX_THREADS
from ._files import output_file_problem, write_file_atomically

__all__ = ["main", "build_parser"]

logger = logging.getLogger("obc_native.cli")


# Weight files transformers' from_pretrained looks for in a directory.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


class CliError(Exception):
    """A user error reported as one line on stderr with exit status 1."""


def _thread_count(text: str) -> int:
    """--threads: an integer in 0..MAX_THREADS, 0 = all (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_THREADS}, got {text!r}") from None
    if not 0 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{MAX_THREADS}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="obc-native", description="Optimal Brain Compression of PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress a model with a recipe and save it")
    source = compress.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="state dict (.safetensors/.pt) or, with --trust-pickle, a saved module")
    source.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (needs transformers)")
    compress.add_argument("--arch", help="architecture as 'package.module:Class' (for state dicts)")
    compress.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments for --arch")
    compress.add_argument("--trust-pickle", action="store_true", help="allow unpickling a whole saved module")
    compress.add_argument("--calibration", required=True, help="calibration tensor file (.pt, .safetensors, .npy)")
    compress.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    compress.add_argument(
        "--token-mask", default="auto", metavar="KEY",
        help="the padding mask of a calibration dict: its padding positions are left out of the statistics "
        "(default auto: 'attention_mask' when present; none: every position counts)",
    )
    compress.add_argument("--recipe", help="recipe file (.yaml, .yml or .json); with --budget it only selects layers")
    compress.add_argument(
        "--budget",
        help="non-uniform compression within a total cost: e.g. flops=2x (2x fewer FLOPs), params=2x, "
        "bits=4.5 (bits per weight) or an absolute flops=1e6",
    )
    compress.add_argument(
        "--database", metavar="PATH", help="level database (JSON): reused if PATH exists, else built and saved there"
    )
    compress.add_argument(
        "--levels", metavar="JSON", help='levels to build, e.g. \'{"sparsities": [0.5, 0.7], "nm": []}\''
    )
    compress.add_argument("--stitch", action="store_true", help="also measure each level's model loss when building")
    compress.add_argument(
        "--objective", default="auto", choices=["auto", "layer", "normalized", "model"], help="what the DP minimizes"
    )
    compress.add_argument("--out", required=True, help="output directory")
    compress.add_argument("--sequential", action="store_true", help="calibrate each layer on compressed inputs")
    compress.add_argument(
        "--cache-outputs",
        action="store_true",
        help="with --sequential: look up the cached outputs of finished modules instead of recomputing them",
    )
    compress.add_argument(
        "--hessian-memory", default="auto", metavar="SIZE",
        help="most memory the Hessians may take at once, e.g. 8GiB or 500MB (default auto: 75%% of the available "
        "memory); dense calibration beyond it runs in groups of layers, one pass each",
    )
    compress.add_argument(
        "--correction", default="auto", choices=["auto", "batchnorm", "bias", "none"], help="statistics correction"
    )
    compress.add_argument(
        "--threads", type=_thread_count, default=None, help=f"solver threads, 0..{MAX_THREADS} (default or 0: all)"
    )
    compress.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    compress.add_argument(
        "--ray", nargs="?", const="", default=None, metavar="ADDRESS",
        help="run calibration and solves on a Ray cluster (host:port, ray://host:port or auto; "
        "no ADDRESS: a local Ray instance); needs obc_native[ray]",
    )
    compress.add_argument(
        "--checkpoint", metavar="DIR",
        help="write finished layers to DIR; rerunning the same command resumes without redoing them",
    )

    report = commands.add_parser("report", help="print the manifest of a saved compressed model")
    report.add_argument("directory")
    report.add_argument("--json", action="store_true", help="print the whole manifest as JSON")

    export = commands.add_parser("export", help="export a saved compressed model for a runtime (ONNX)")
    export.add_argument("directory", help="folder written by 'obc-native compress' (or save_compressed)")
    export.add_argument("--format", default="onnx", help="output format: onnx (the default and only one)")
    export.add_argument("--out", required=True, help="output file, e.g. model.onnx")
    export.add_argument(
        "--example", required=True, help="inputs to trace the model with: a tensor file (or a dict of keyword inputs)"
    )
    export.add_argument("--arch", help="architecture 'package.module:Class' (default: the one recorded when saving)")
    export.add_argument("--arch-kwargs", default=None, help="JSON keyword arguments for --arch (default: as recorded)")
    export.add_argument(
        "--dense", nargs="*", default=[], metavar="PATTERN", help="quantized layers to export with float weights"
    )
    export.add_argument(
        "--no-matmul-nbits", action="store_true",
        help="DequantizeLinear + MatMul / Gather instead of com.microsoft MatMulNBits / GatherBlockQuantized",
    )
    export.add_argument(
        "--accuracy-level", type=int, default=0, choices=range(5), help="MatMulNBits accuracy_level (default 0)"
    )
    export.add_argument(
        "--external-data", choices=["auto", "yes", "no"], default="auto",
        help="weights in FILE.data next to the .onnx: yes, no, or auto (the default: only when one file would "
        "pass protobuf's 2 GiB limit)",
    )
    export.add_argument("--quiet", action="store_true", help="print nothing on success")

    shrink = commands.add_parser(
        "shrink", help="remove structurally pruned channels: write a physically smaller model (ONNX or .pt2)"
    )
    shrink.add_argument("directory", help="folder written by 'obc-native compress' (or save_compressed)")
    shrink.add_argument("--out", required=True, help="output file: .onnx (onnxruntime) or .pt2 (torch.export.load)")
    shrink.add_argument(
        "--format", choices=["onnx", "pt2"], default=None, help="output format (default: from --out's extension)"
    )
    shrink.add_argument(
        "--example", required=True, help="inputs to trace the model with: a tensor file (or a dict of keyword inputs)"
    )
    shrink.add_argument("--arch", help="architecture 'package.module:Class' (default: the one recorded when saving)")
    shrink.add_argument("--arch-kwargs", default=None, help="JSON keyword arguments for --arch (default: as recorded)")
    shrink.add_argument(
        "--chains", metavar="JSON",
        help='producer -> consumer chains, e.g. \'[["fc1", "fc2"], ["conv", "bn", "classifier"]]\' '
        "(default: found with torch.fx; for a model saved with --hf, the feed-forward blocks and the attention "
        "heads pruned whole)",
    )
    shrink.add_argument(
        "--fold-batchnorm", action="store_true",
        help="also fold each BatchNorm that directly follows a conv into that conv (one layer instead of two in "
        "a .pt2 program; ONNX export folds them anyway)",
    )
    shrink.add_argument("--quiet", action="store_true", help="print nothing on success")

    demo = commands.add_parser("demo", help="compress a small digits CNN with several recipes (offline)")
    demo.add_argument("--recipes", nargs="*", default=None, help="subset of recipe names to run")
    demo.add_argument("--progress", action="store_true", help="show progress bars")
    return parser


def _import_arch(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--arch must look like 'package.module:Class', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise CliError(f"--arch: cannot import {module_name!r}: {err}") from err
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CliError(f"--arch: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target


def _arch_kwargs(text: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise CliError(f"--arch-kwargs: not valid JSON ({err})") from err
    if not isinstance(kwargs, dict):
        raise CliError(f"--arch-kwargs: expected a JSON object, got {text!r}")
    return kwargs


def _probe_writable(directory: str, flag: str, path: str) -> None:
    """CliError unless a file can be created in ``directory`` (tried, not guessed from permissions)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot write in {directory} ({err.strerror or err})") from err


def _prepare_out(path: str) -> list[str]:
    """Create the ``--out`` directory and check it is writable, before any work.

    Returns the directories created (deepest last), to remove again if the command fails.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"--out {path}: exists and is not a directory")
    # Weights that transformers would load from the folder instead of failing (see serialize.TENSORS_NAME)
    stale = [name for name in HF_WEIGHT_FILES if os.path.exists(os.path.join(path, name))]
    if stale:
        raise CliError(
            f"--out {path}: holds {', '.join(stale)} (a Hugging Face checkpoint, e.g. an earlier --hf output) "
            "that from_pretrained would load instead of the compressed model; choose another directory"
        )
    missing = []
    head = os.path.abspath(path)
    while not os.path.exists(head):
        missing.append(head)
        head = os.path.dirname(head)
    if not os.path.isdir(head):
        raise CliError(f"--out {path}: {head} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise CliError(f"--out {path}: cannot create the directory ({err})") from err
    created = missing[::-1]
    try:
        _probe_writable(path, "--out", path)
    except CliError:
        _remove_empty(created)
        raise
    return created


def _remove_empty(directories: list[str]) -> None:
    """Remove the directories this command created, deepest first, where still empty."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            return


def _check_paths(args: argparse.Namespace) -> None:
    """Inputs exist and outputs can be written, checked before the (long) compression."""
    if args.recipe is not None and not os.path.isfile(args.recipe):
        what = "is a directory, not a recipe file" if os.path.isdir(args.recipe) else "no such file"
        raise CliError(f"--recipe {args.recipe}: {what}")
    for flag, path in (("--model", args.model), ("--calibration", args.calibration)):
        if path is not None and not os.path.isfile(path):
            raise CliError(f"{flag} {path}: {'is a directory, not a file' if os.path.isdir(path) else 'no such file'}")
    if args.hf is not None:
        if not os.path.isdir(args.hf):
            raise CliError(f"--hf {args.hf}: no such directory (a local Hugging Face model directory is expected)")
        if not os.path.isfile(os.path.join(args.hf, "config.json")):
            raise CliError(f"--hf {args.hf}: no config.json; not a Hugging Face model directory")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.checkpoint is not None and os.path.exists(args.checkpoint) and not os.path.isdir(args.checkpoint):
        raise CliError(f"--checkpoint {args.checkpoint}: is a file; give a directory")
    if args.database is not None and not os.path.isfile(args.database):
        # to be built and saved there: checked as every other output file is (a FIFO, a directory,
        # a missing or read-only folder), before the build
        problem = output_file_problem(args.database)
        if problem is not None:
            raise CliError(f"--database {problem}")


def _load_tensor_file(path: str) -> Any:
    """Tensors from .safetensors / .npy / torch files, never unpickling arbitrary objects."""
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as err:
            raise CliError(f"{path}: not a readable safetensors file ({err})") from err
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as err:  # truncated, not .npy, or an object array
            raise CliError(f"{path}: not a readable .npy array ({_reason(err)})") from err
        try:
            return torch.from_numpy(array)
        except TypeError as err:  # a dtype torch has no tensor for (strings, ...)
            raise CliError(f"{path}: a .npy array of dtype {array.dtype} is not a tensor ({_reason(err)})") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError / RuntimeError for non-tensor content
        raise CliError(f"{path}: not a plain tensor file readable with weights_only=True ({_reason(err)})") from err


def _reason(err: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty (an
    empty file gives torch.load an EOFError without one)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_model(args: argparse.Namespace):
    import torch

    if args.hf:
        try:
            import transformers
        except ImportError as err:
            raise CliError("--hf needs the transformers package") from err
        try:  # local files only: a mistyped directory must not turn into a Hub download
            config = transformers.AutoConfig.from_pretrained(args.hf, local_files_only=True)
            names = getattr(config, "architectures", None) or []
            cls = getattr(transformers, names[0], None) if names else None
            model = (cls or transformers.AutoModel).from_pretrained(args.hf, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CliError(f"--hf {args.hf}: cannot load the Hugging Face model ({reason})") from err
        return model.eval(), {"source": "huggingface", "class": type(model).__name__}

    kwargs = _arch_kwargs(args.arch_kwargs)
    metadata: dict[str, Any] = {"source": "state_dict", "arch": args.arch, "arch_kwargs": kwargs}
    if args.trust_pickle and not args.arch:
        if args.model.endswith(".safetensors"):
            raise CliError("a .safetensors file holds a state dict: pass --arch")
        try:
            model = torch.load(args.model, map_location="cpu", weights_only=False)
        except Exception as err:  # unpickling raises whatever the file's content leads to
            raise CliError(f"{args.model}: cannot be loaded as a saved module ({type(err).__name__}: {err})") from err
        if not isinstance(model, torch.nn.Module):
            raise CliError(f"{args.model}: holds a {type(model).__name__}, not an nn.Module; pass --arch")
        return model.eval(), {"source": "pickled_module", "class": type(model).__qualname__}
    if not args.arch:
        raise CliError("--model needs --arch 'package.module:Class' (or --trust-pickle for a saved module)")
    state = _load_tensor_file(args.model)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CliError(f"{args.model}: expected a state dict of tensors")
    try:
        model = _import_arch(args.arch)(**metadata["arch_kwargs"])
    except TypeError as err:
        raise CliError(f"--arch {args.arch} with --arch-kwargs {args.arch_kwargs}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        details = " ".join(str(err).split())  # torch's message spans lines and tabs
        raise CliError(f"{args.model} does not fit {args.arch}: {details}") from err
    return model.eval(), metadata


def _forward_keywords(model: Any) -> set[str]:
    """Names that ``model.forward`` accepts as keyword arguments (empty when unknown)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _calibration_batches(path: str, batch_size: int, model: Any = None) -> list[Any]:
    """Batches of the calibration file: a tensor is split along dimension 0; a list is taken
    batch by batch; a dict of tensors is passed as keyword arguments. A dict of ONE tensor is
    passed by keyword when its key names an argument of ``model.forward`` (``input_ids`` for a
    Hugging Face model), else positionally (``model(x)``), so that a ``.safetensors`` file, which
    always holds a dict, can feed a model with one unnamed input."""
    import torch

    if batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {batch_size}")
    data = _load_tensor_file(path)
    if isinstance(data, dict) and len(data) == 1 and next(iter(data)) not in _forward_keywords(model):
        data = next(iter(data.values()))
    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise CliError(f"{path}: calibration tensor of shape {tuple(data.shape)} has no samples")
        return list(data.split(batch_size))
    if isinstance(data, (list, tuple)) and all(isinstance(b, torch.Tensor) for b in data):
        return list(data)
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()):
        sizes = {v.shape[0] if v.dim() else None for v in data.values()}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            raise CliError(f"{path}: the tensors of a calibration dict must share a non-empty dimension 0")
        n = sizes.pop()
        return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    raise CliError(f"{path}: expected a tensor, a list of tensors or a dict of tensors")


# the library's words for its token_mask option, and the flag's (no callable on the command line)
_TOKEN_MASK_WORDS = (
    (", a callable token_mask(batch), or token_mask=None", ", or --token-mask none"),
    ("token_mask: expected 'auto', a batch key, a callable or None",
     "--token-mask: expected auto, a batch key or none"),
    ("token_mask=None", "--token-mask none"),
    ("token_mask=", "--token-mask "),
    ("token_mask (the default)", "--token-mask (the default, auto)"),
    ("token_mask (", "--token-mask ("),
    ("the token_mask option", "the --token-mask option"),
)


def _token_mask_flag(message: str) -> str:
    """A library message about ``token_mask`` in the words of ``--token-mask``, the flag the
    command line user gave (the library's own advice, e.g. ``pass token_mask=None``, names an
    argument they cannot pass)."""
    for words, flag in _TOKEN_MASK_WORDS:
        message = message.replace(words, flag)
    return message


def _budget_options(args: argparse.Namespace) -> dict[str, Any]:
    """compress() keyword arguments of --budget, --database, --levels, --stitch, --objective."""
    if not args.budget:
        given = [flag for flag, value in (("--database", args.database), ("--levels", args.levels),
                                          ("--stitch", args.stitch)) if value]
        if given:
            raise CliError(f"{', '.join(given)} need --budget")
        if args.objective != "auto":
            raise CliError("--objective needs --budget")
        return {}
    options: dict[str, Any] = {"budget": args.budget, "objective": args.objective, "stitch": args.stitch}
    if args.levels:
        try:
            options["levels"] = json.loads(args.levels)
        except json.JSONDecodeError as err:
            raise CliError(f"--levels: not valid JSON ({err})") from err
        if not isinstance(options["levels"], dict):
            raise CliError(f"--levels: expected a JSON object, got {args.levels!r}")
        from obc_native.torch import LevelSpec

        try:
            options["levels"] = LevelSpec.from_dict(options["levels"])
        except (TypeError, ValueError) as err:
            raise CliError(f"--levels: {err}") from err
    if args.database and os.path.isfile(args.database):
        from obc_native.budget import LevelDatabase

        if args.levels or args.stitch:
            raise CliError(f"--levels and --stitch apply when building a database, but {args.database} exists")
        options["database"] = LevelDatabase.load(args.database)
    return options


def _cmd_compress(args: argparse.Namespace) -> int:
    from obc_native.torch import load_recipe

    if not args.recipe and not args.budget:
        raise CliError("give --recipe (uniform compression) or --budget (non-uniform compression)")
    _check_paths(args)
    options = _budget_options(args)
    if options and args.sequential:
        raise CliError("--sequential is not supported with --budget")
    if args.cache_outputs and not args.sequential:
        raise CliError("--cache-outputs applies to sequential calibration: add --sequential")
    from obc_native.torch.hessian_memory import parse_memory

    try:  # a bad size is one line before the model is loaded
        args.hessian_memory = parse_memory(args.hessian_memory, "--hessian-memory")
    except ValueError as err:
        raise CliError(str(err)) from None
    recipe = load_recipe(args.recipe) if args.recipe else None
    args.executor = _start_executor(args)
    created = _prepare_out(args.out)
    try:
        return _compress_and_save(args, recipe, options)
    except BaseException:
        _remove_empty(created)
        raise


def _start_executor(args: argparse.Namespace) -> Any:
    """"local", or a started RayExecutor for --ray (a missing package or an unreachable cluster
    is one error line, before the model is loaded)."""
    if args.ray is None:
        return "local"
    from obc_native.torch.ray_executor import RayExecutor, RayUnavailableError

    try:
        executor = RayExecutor(args.ray or None)
        executor.start(quiet=args.quiet)
    except (RayUnavailableError, ValueError) as err:
        raise CliError(f"--ray {args.ray}: {err}".replace("--ray : ", "--ray: ")) from None
    return executor


def _compress_and_save(args: argparse.Namespace, recipe: Any, options: dict[str, Any]) -> int:
    from obc_native.torch import compress, save_compressed

    model, metadata = _load_model(args)
    batches = _calibration_batches(args.calibration, args.batch_size, model)
    try:
        report = compress(
            model,
            batches,
            recipe,
            sequential=args.sequential,
            cache_outputs=args.cache_outputs,
            token_mask=None if args.token_mask == "none" else args.token_mask,
            correction=None if args.correction == "none" else args.correction,
            num_threads=args.threads,
            quiet=args.quiet,
            executor=getattr(args, "executor", "local"),
            checkpoint=args.checkpoint,
            hessian_memory=args.hessian_memory,
            **options,
        )
    except ValueError as err:  # CalibrationError, a checkpoint of another mask, ...
        if "token_mask" not in str(err):
            raise
        raise CliError(_token_mask_flag(str(err))) from err
    save_compressed(model, args.out, report, metadata=metadata)
    if args.hf:
        from obc_native.torch.hf_checkpoint import save_hf_checkpoint

        save_hf_checkpoint(model, args.out, source=args.hf)
    if args.database and "database" not in options:
        report.database.save(args.database)
    if not args.quiet:
        print(report.table())
        if args.database and "database" not in options:
            print(f"level database saved to {args.database}")
        print(f"saved to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from obc_native.torch import read_manifest

    manifest = read_manifest(args.directory)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    try:
        _print_report(args.directory, manifest)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise CliError(f"{args.directory}: malformed manifest ({type(err).__name__}: {err})") from err
    return 0


def _print_report(directory: str, manifest: dict[str, Any]) -> None:
    """Print the compression report's table and each stored layer's storage of a manifest."""
    from obc_native.torch.report import CompressionReport

    if manifest.get("report"):
        print(CompressionReport.from_dict(manifest["report"]).table())
    path = os.path.join(directory, manifest["tensors"])
    size = f"{os.path.getsize(path)} bytes" if os.path.isfile(path) else "MISSING"
    print(f"\n{len(manifest['layers'])} stored layer(s); {manifest['tensors']}: {size}")
    levels = {layer.get("name"): layer.get("level") for layer in (manifest.get("report") or {}).get("layers", [])}
    for name, entry in manifest["layers"].items():
        bits = f", {entry['bits']}-bit codes" if "bits" in entry else ""
        level = entry.get("level") or levels.get(name)
        level = f", level {level}" if level else ""
        stored = f"{entry['storage']}{bits}, {entry['nonzeros']} non-zeros of {entry['weight_shape']}{level}"
        if entry.get("stored_as_values"):  # a quantized layer the file holds as plain values
            stored += f"; stored as values, not codes: {entry['stored_as_values']}"
        print(f"  {name or '(model)'}: {stored}")


def _saved_architecture(args: argparse.Namespace, manifest: dict[str, Any]):
    """An empty model of the saved folder's architecture (from --arch or the manifest's metadata)."""
    metadata = manifest.get("metadata") or {}
    if args.arch is None and metadata.get("source") == "huggingface":
        try:
            import transformers
        except ImportError as err:
            raise CliError("a model saved with --hf needs the transformers package") from err
        config_path = os.path.join(args.directory, "config.json")
        if not os.path.isfile(config_path):
            raise CliError(f"{args.directory}: no config.json to rebuild the Hugging Face model; pass --arch")
        config = transformers.AutoConfig.from_pretrained(args.directory, local_files_only=True)
        cls = getattr(transformers, str(metadata.get("class")), None) or transformers.AutoModel
        return cls.from_config(config) if cls is transformers.AutoModel else cls(config)
    arch = args.arch or metadata.get("arch")
    if not arch:
        raise CliError(f"{args.directory}: the manifest does not record the architecture; pass --arch")
    kwargs = _arch_kwargs(args.arch_kwargs) if args.arch_kwargs is not None else metadata.get("arch_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CliError(f"{args.directory}: recorded arch_kwargs is not an object; pass --arch-kwargs")
    try:
        return _import_arch(arch)(**kwargs)
    except TypeError as err:
        raise CliError(f"--arch {arch} with keyword arguments {kwargs}: {err}") from err


def _example_inputs(path: str, model: Any) -> tuple[tuple, dict | None]:
    """``(args, kwargs)`` to trace ``model`` with, from the ``--example`` file: a tensor (one
    positional input) or a dict of tensors (keyword inputs). A dict of one tensor goes by keyword
    when its key names an argument of ``model.forward`` (``input_ids``), else positionally, as
    for ``--calibration``."""
    import torch

    example = _load_tensor_file(path)
    if isinstance(example, dict) and len(example) == 1 and next(iter(example)) not in _forward_keywords(model):
        example = next(iter(example.values()))
    if isinstance(example, torch.Tensor):
        return (example,), None
    if isinstance(example, dict) and all(isinstance(v, torch.Tensor) for v in example.values()):
        return (), example
    raise CliError(f"--example {path}: expected a tensor or a dict of tensors")


def _load_for_export(args: argparse.Namespace):
    """The saved folder's manifest and its model with the compressed weights loaded, for export
    and shrink; --out and --example are checked first (before any work)."""
    from obc_native.torch import load_compressed, read_manifest
    from obc_native.torch.export_onnx import ExportError, _check_output_path

    try:
        _check_output_path(args.out)
    except ExportError as err:
        raise CliError(str(err).replace("path ", "--out ", 1)) from err
    if not os.path.isfile(args.example):
        raise CliError(f"--example {args.example}: no such file")
    manifest = read_manifest(args.directory)
    model = _saved_architecture(args, manifest)
    # the architecture is built in float32; a float16 / bfloat16 save (e.g. an --hf model whose
    # config says float16) is widened exactly, quantized layers to their float32 grid values,
    # which the ONNX export needs
    load_compressed(model, args.directory, widen=True)
    return manifest, model


def _cmd_export(args: argparse.Namespace) -> int:
    from obc_native.torch import export_onnx

    # checked before any work; GGUF needs the in-memory compression report, so it is not a format here
    gguf = "; GGUF files are written from Python: obc_native.torch.save_gguf(model, report, path)"
    if args.format.lower() != "onnx":
        raise CliError(f"--format {args.format}: unknown format; export writes onnx"
                       f"{gguf if args.format.lower() == 'gguf' else ''}")
    if os.path.splitext(args.out)[1].lower() == ".gguf":
        raise CliError(f"--out {args.out}: export writes ONNX (give a .onnx file){gguf}")
    manifest, model = _load_for_export(args)
    example_args, example_kwargs = _example_inputs(args.example, model)
    result = export_onnx(
        model.eval(),
        example_args,
        args.out,
        report=args.directory,
        example_kwargs=example_kwargs,
        dense=args.dense,
        matmul_nbits=not args.no_matmul_nbits,
        accuracy_level=args.accuracy_level,
        external_data={"auto": None, "yes": True, "no": False}[args.external_data],
    )
    if not args.quiet:
        print(result.table())  # ends with one line per file written, with its size
    return 0


def _shrink_chains(args: argparse.Namespace, manifest: dict[str, Any], model: Any) -> list | None:
    """The chains of --chains, hf_ffn_chains for a Hugging Face model, else None (traced)."""
    from obc_native.torch import hf_ffn_chains

    if args.chains is None:
        return hf_ffn_chains(model) if _is_hf_folder(args, manifest) else None
    try:
        chains = json.loads(args.chains)
    except json.JSONDecodeError as err:
        raise CliError(f"--chains: not valid JSON ({err})") from err
    if not isinstance(chains, list) or not all(
        isinstance(c, list) and len(c) >= 2 and all(isinstance(n, str) for n in c) for c in chains
    ):
        raise CliError(f"--chains: expected a JSON list of lists of module names, e.g. [[\"fc1\", \"fc2\"]], "
                       f"got {args.chains!r}")
    return chains


def _is_hf_folder(args: argparse.Namespace, manifest: dict[str, Any]) -> bool:
    """A folder saved with --hf, rebuilt as its transformers class (no --arch given)."""
    return (manifest.get("metadata") or {}).get("source") == "huggingface" and not args.arch


def _shrink_hf_heads(model: Any) -> Any:
    """The HeadShrinkReport of shrink_attention_heads over hf_attention_heads, one attention module
    at a time: a module whose output projection was not pruned in whole heads stays as it is and
    is listed in ``skipped`` with the reason (the recipe field to use)."""
    from obc_native.torch import HeadShrinkReport, hf_attention_heads, shrink_attention_heads
    from obc_native.torch.shrink import ShrinkError

    count = lambda: sum(p.numel() for p in model.parameters())  # noqa: E731
    report = HeadShrinkReport(parameters_before=count())
    with _library_warnings_only():  # one log line per attention module is noise here
        for pair in hf_attention_heads(model):
            try:
                one = shrink_attention_heads(model, [pair])
            except ShrinkError as err:
                report.skipped[pair[0]] = str(err)
                continue
            report.attentions += one.attentions
            report.skipped.update(one.skipped)
    report.parameters_after = count()
    return report


@contextlib.contextmanager
def _library_warnings_only():
    """The library's logger ("obc_native.torch") passes warnings only meanwhile, for calls whose
    INFO summary a command prints itself (restored after: main() also runs inside other programs)."""
    library_logger = logging.getLogger("obc_native.torch")
    level = library_logger.level
    library_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        library_logger.setLevel(level)


def _output_tensors(value: Any) -> list[Any]:
    """The tensors of a model output (a tensor, or tuples / lists / dicts such as a ModelOutput of them)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _output_tensors(item)]
    return []


def _cmd_shrink(args: argparse.Namespace) -> int:
    import copy

    import torch

    from obc_native.torch import export_onnx, shrink_structured

    extension = os.path.splitext(args.out)[1].lower()
    fmt = args.format or {".onnx": "onnx", ".pt2": "pt2"}.get(extension)
    if fmt is None:
        raise CliError(f"--out {args.out}: give a .onnx or .pt2 file, or --format onnx|pt2")
    manifest, model = _load_for_export(args)
    model.eval()
    chains = _shrink_chains(args, manifest, model)
    example_args, example_kwargs = _example_inputs(args.example, model)
    masked = copy.deepcopy(model)
    heads = _shrink_hf_heads(model) if args.chains is None and _is_hf_folder(args, manifest) else None
    # ShrinkError (a ValueError): one error line. Its INFO summary ("shrink_structured: N channel(s)
    # removed ...", "fold_batchnorm: ...") said again what the table printed below says
    with _library_warnings_only():
        # the example checks each chain (--chains are otherwise unchecked for models fx cannot trace)
        report = shrink_structured(model, chains, fold_batchnorm=args.fold_batchnorm,
                                   example_inputs=example_args, example_kwargs=example_kwargs)
    heads_removed = heads is not None and any(a.removed for a in heads.attentions)
    if not any(chain.removed for chain in report.chains) and not heads_removed:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in report.skipped.items())
        # layers the folder says were pruned structurally but that end no chain: say so, or the
        # message reads as if the folder had no structured pruning (e.g. a Llama's down_proj)
        ends = {chain.consumer for chain in report.chains} | set(report.skipped)
        unreached = [name for name, entry in manifest.get("layers", {}).items()
                     if isinstance(entry, dict) and (entry.get("config") or {}).get("prune") == "structured"
                     and name not in ends]
        found = ""
        if unreached:
            listed = ", ".join(unreached[:3]) + (f" and {len(unreached) - 3} more" if len(unreached) > 3 else "")
            how = ("only BERT-like intermediate.dense -> output.dense blocks are found in a Hugging Face model, "
                   "not GPT-2's Conv1D ones, and a gated MLP such as Llama's (two producers) cannot be shrunk; "
                   "otherwise " if chains is not None and args.chains is None else "")
            found = f"; no producer -> consumer chain ends in the structurally pruned {listed}: {how}give --chains"
        raise CliError(f"{args.directory}: no channel can be removed (structured pruning: "
                       f"LayerConfig(prune='structured')){'; skipped ' + reasons if reasons else ''}{found}")
    with torch.no_grad():
        expected = _output_tensors(masked(*example_args, **(example_kwargs or {})))
        actual = _output_tensors(model(*example_args, **(example_kwargs or {})))
    difference = max((float((a - e).abs().max()) for a, e in zip(actual, expected) if a.numel()), default=0.0)
    data_note = ""
    if fmt == "onnx":
        written = export_onnx(model, example_args, args.out, example_kwargs=example_kwargs)
        if written.data_path is not None:  # above 2 GiB: the weights are in a file of their own
            data_note = f"; weights in {written.data_path}, {written.data_size} bytes"
    else:
        _save_exported_program(model, example_args, example_kwargs, args.out)
    if not args.quiet:
        if heads is not None and (heads_removed or heads.skipped):
            print(heads.table())
        print(report.table())
        print(f"max |shrunk - masked| on --example: {difference:.3g}")
        print(f"wrote {args.out} ({fmt}, {os.path.getsize(args.out)} bytes{data_note}; weights as float, quantized "
              "layers dequantized)")
    return 0


def _save_exported_program(model: Any, example_args: tuple, example_kwargs: dict | None, path: str) -> None:
    """``torch.export`` the model (dimension 0 of each input dynamic where the model allows) into
    ``path``; ``torch.export.load(path).module()`` runs it without the model's class."""
    import torch

    auto = torch.export.Dim.AUTO
    shapes_args = tuple({0: auto} if a.dim() else None for a in example_args)
    shapes_kwargs = {k: ({0: auto} if v.dim() else None) for k, v in (example_kwargs or {}).items()}
    dynamic = shapes_args if not example_kwargs else {**shapes_kwargs}
    try:
        program = torch.export.export(model, example_args, kwargs=example_kwargs, dynamic_shapes=dynamic)
    except Exception as err:  # torch.export raises UserError, Unsupported, ... on dynamic Python code
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CliError(f"torch.export cannot export this model ({type(err).__name__}: {message}); "
                       "try --format onnx") from err
    # a temporary file renamed into place: an interrupted save leaves a previous file as it was
    write_file_atomically(path, lambda temp: torch.export.save(program, temp), error=CliError)


def _cmd_demo(args: argparse.Namespace) -> int:
    from obc_native.demo import BUDGETS, DESCRIPTION, RECIPES, format_results, run_demo

    logging.getLogger("obc_native.torch").setLevel(logging.WARNING)  # one summary line per run is noise here
    unknown = [r for r in args.recipes or [] if r not in RECIPES and r not in BUDGETS]
    if unknown:
        raise CliError(f"unknown demo recipe(s) {unknown}; choose from {[*RECIPES, *BUDGETS]}")
    print(DESCRIPTION + "\n")
    results = run_demo(args.recipes or None, quiet=not args.progress)
    print(format_results(results))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``obc-native`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO, format="%(message)s")
    # "the model is unchanged / restored" concerns the in-memory model; nothing is saved on failure.
    # Restored on return: main() also runs inside other programs (and tests).
    failure_logger = logging.getLogger("obc_native.torch.failure")
    failure_level = failure_logger.level
    failure_logger.setLevel(logging.CRITICAL)
    try:
        return _run(args)
    finally:
        failure_logger.setLevel(failure_level)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; user errors become one line on stderr and exit status 1."""
    handlers = {"compress": _cmd_compress, "report": _cmd_report, "export": _cmd_export, "shrink": _cmd_shrink,
                "demo": _cmd_demo}
    try:
        status = handlers[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return status
    except KeyboardInterrupt:
        print("obc-native: error: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it
    except BrokenPipeError:
        # the reader stopped early (`obc-native report --json | head`): stop quietly, as command-line tools do
        _silence_stdout()
        return 1
    except CliError as err:
        print(f"obc-native: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a file that cannot be read or written; the message names it
        print(f"obc-native: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:  # RecipeError, CalibrationError, CompressionError, ...
        if isinstance(err, RuntimeError) and type(err).__name__ != "CompressionError":
            raise
        print(f"obc-native: error: {err}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
