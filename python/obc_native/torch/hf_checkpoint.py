"""Hugging Face checkpoints of compressed models: a folder that ``from_pretrained`` loads as is.

:func:`save_hf_checkpoint` writes a compressed ``transformers`` model with its own
``save_pretrained`` (``config.json``, ``model.safetensors`` with the dequantized weights: pruned
entries are zeros, quantized entries their grid values in the weight dtype), copies the tokenizer
and preprocessor files of the source folder, then loads the folder back with ``from_pretrained``
and checks that no key is missing, unexpected or of another shape and that every tensor is
bit-identical to the in-memory model's. A folder that would load with randomly initialised
weights is never left behind: the weight files are removed and :class:`HFCheckpointError` raised.

The weights are stored dense (sparsity and low-bit codes are not a ``transformers`` format); the
same folder may also hold the obc_native format (``manifest.json`` + ``compressed.safetensors``,
see ``serialize``), which ``from_pretrained`` ignores.
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import shutil

import torch
from torch import nn

from .._files import make_output_folder, make_staging_folder, output_file_problem, path_str, write_file_atomically

__all__ = ["save_hf_checkpoint", "HFCheckpointError", "HF_SIDE_FILES"]

logger = logging.getLogger("obc_native.torch")

# Files of a model folder that describe its inputs, copied from the source folder when present
HF_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "preprocessor_config.json", "chat_template.jinja", "generation_config.json",
)
_WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")
# What save_pretrained writes in a folder (one weight file for the small models this is used for)
_REPLACED_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


class HFCheckpointError(ValueError):
    """The model cannot be written as a checkpoint that ``from_pretrained`` loads faithfully."""


def save_hf_checkpoint(model: nn.Module, directory: str | bytes | os.PathLike, *,
                       source: str | bytes | os.PathLike | None = None,
                       verify: bool = True) -> list[str]:
    """Write ``model`` (a ``transformers.PreTrainedModel``) as a Hugging Face folder with its weights.

    Args:
        model: a ``transformers`` model after compression (plain modules: save before
            ``quantize_activations``, whose wrappers rename parameters).
        directory: the output folder (str, bytes or os.PathLike; created if missing); existing
            weight files there are replaced, each file through a temporary file renamed into place
            (a failed save leaves the previous files whole; a replaced file keeps its permission
            bits).
        source: the folder the model was loaded from; its tokenizer / preprocessor files
            (``HF_SIDE_FILES``) are copied unless ``directory`` already has them.
        verify: load the folder back with ``from_pretrained`` and compare every tensor.

    Returns:
        the names of the files written or copied into ``directory``.

    Raises:
        TypeError: ``model`` is not a ``transformers.PreTrainedModel``.
        HFCheckpointError: ``directory`` is a file, or cannot be created or written, or holds a
            FIFO, device or folder named ``config.json`` / ``model.safetensors`` / ... (before
            anything is saved).
        HFCheckpointError: the loaded folder misses keys, has unexpected or resized ones, or a
            tensor differs from the model's (the weight files are removed first).
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as err:  # pragma: no cover - transformers is in the hf and test extras
        raise ImportError("save_hf_checkpoint needs transformers: pip install 'obc_native[hf]'") from err
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers.PreTrainedModel, got {type(model).__name__}")
    directory = path_str(directory, "directory")
    source = None if source is None else path_str(source, "source")
    problem = make_output_folder(directory)
    for name in _REPLACED_FILES:  # a FIFO or folder there: refused now, not after save_pretrained
        problem = problem or output_file_problem(os.path.join(directory, name))
    if problem is not None:
        raise HFCheckpointError(problem)
    # save_pretrained writes its files in place, one after the other: it writes into a hidden
    # folder here instead, whose files are then renamed into place one by one (each file a previous
    # save left there stays whole until its replacement is complete, and keeps its mode). The
    # folder's name carries our pid: one that a killed save left is removed here (once its process
    # is gone) before the new one is made.
    staging = make_staging_folder(directory)
    try:
        model.save_pretrained(staging)
        saved = sorted(os.listdir(staging))
        weights = {name for name in saved if any(fnmatch.fnmatchcase(name, p) for p in _WEIGHT_PATTERNS)}
        for name in saved:
            _install(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for pattern in _WEIGHT_PATTERNS:  # a previous save's other shards, which from_pretrained might read
        for path in glob.glob(os.path.join(glob.escape(directory), pattern)):
            if os.path.basename(path) not in weights:
                os.remove(path)
    copied = []
    if source is not None:
        for name in HF_SIDE_FILES:
            origin, target = os.path.join(source, name), os.path.join(directory, name)
            if os.path.isfile(origin) and not os.path.exists(target):
                write_file_atomically(target, lambda temp, origin=origin: shutil.copyfile(origin, temp),
                                      error=HFCheckpointError)
                copied.append(name)
    written = sorted(set(saved) | set(copied))
    if verify:
        try:
            _verify(model, directory)
        except HFCheckpointError:
            _remove_weights(directory)
            raise
    logger.info("Hugging Face checkpoint written to %s (%s)", directory, ", ".join(written))
    return written


def _install(staged: str, target: str) -> None:
    """Rename the staged file (or, recursively, folder) ``staged`` onto ``target``, each file
    through ``write_file_atomically`` (a replaced file keeps its mode; a new one gets open()'s
    rather than safetensors' 0600)."""
    if os.path.isdir(staged) and not os.path.islink(staged):
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir(staged)):
            _install(os.path.join(staged, name), os.path.join(target, name))
        return
    write_file_atomically(target, lambda temp: os.replace(staged, temp), error=HFCheckpointError)


def _remove_weights(directory: str) -> None:
    for pattern in _WEIGHT_PATTERNS:
        for path in glob.glob(os.path.join(glob.escape(directory), pattern)):
            os.remove(path)


def _verify(model: nn.Module, directory: str) -> None:
    """HFCheckpointError unless ``from_pretrained(directory)`` gives exactly ``model``'s tensors."""
    import transformers

    # the keyword was torch_dtype before transformers 4.56
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_keyword = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    loaded, info = type(model).from_pretrained(directory, output_loading_info=True, local_files_only=True,
                                               **{dtype_keyword: _dtype(model)})
    problems = []
    for field in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        values = info.get(field) or []
        if values:
            problems.append(f"{field.replace('_', ' ')}: {sorted(map(str, values))[:5]}")
    if problems:
        raise HFCheckpointError(f"{directory}: from_pretrained would not load the compressed weights faithfully "
                                f"({'; '.join(problems)})")
    state = loaded.state_dict()
    for key, value in model.state_dict().items():
        if key not in state:
            raise HFCheckpointError(f"{directory}: from_pretrained gives no {key!r}")
        if state[key].shape != value.shape or not torch.equal(state[key].to(value.device), value):
            raise HFCheckpointError(f"{directory}: {key!r} loads differently from the compressed model's")


def _dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32
