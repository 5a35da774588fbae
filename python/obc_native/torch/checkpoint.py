"""Layer checkpoints: finished layers written to a directory, so a crashed run resumes without
redoing them.

One file per finished layer (its new weight, bias and LayerReport), written atomically
(temporary file in the same directory, fsync, rename), for budget runs ``levels.json`` (the level
database, written once built: a rerun does not build it again), plus ``run.json`` naming the run it
belongs to: a fingerprint of the recipe, the calibration mode, the layers' names and shapes and
the dense weights of the layers to compress. A directory written by another run (another
recipe, model or mode) is refused with a ValueError, never mixed in.

``run.json`` format 2 fingerprints the ``token_mask`` option too, its default ``"auto"``
included. Format 1 was written before that option existed, when every token of a padded batch
counted (as ``token_mask=None`` does now): it resumes under ``token_mask=None`` only; under any
other mask the layers still to do could see other Hessians than the finished ones, so it is
refused with a ValueError that says so.

Resuming: the model given to the rerun is the dense one; each checkpointed layer's weights are
written back into it, in the run's layer order, and its solve is skipped. Calibration still runs
(dense mode: one pass; sequential mode: the passes of the layers not yet done, on the model with
its earlier layers restored from the checkpoint, so they see the same inputs as in the first run).

Layer files are pickles: resume only from directories you wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._files import path_str, write_file_atomically
from .layers import LayerInfo
from .report import LayerReport

__all__ = ["LayerCheckpoint", "NoCheckpoint", "as_checkpoint", "run_fingerprint"]

_RUN_FILE = "run.json"
_DATABASE_FILE = "levels.json"  # budget runs: the level database, written once it is built
_FORMAT = 2  # 1: before the token_mask option (its runs counted every token: token_mask=None)


def run_fingerprint(description: Mapping[str, Any], infos: Mapping[str, LayerInfo]) -> str:
    """SHA-256 of ``description`` (JSON-able: recipe, mode, ...) and of the layers' names, shapes
    and dense weights."""
    digest = hashlib.sha256(json.dumps(description, sort_keys=True, default=repr).encode())
    for name in sorted(infos):
        weight = infos[name].module.weight.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(weight.shape)}:{weight.dtype}".encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes() if weight.numel() else b"")
    return digest.hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    write_file_atomically(path, data)  # flushed to disk, then renamed into place


class NoCheckpoint:
    """No checkpoint directory: nothing is done, nothing is saved."""

    def done(self, name: str) -> bool:
        """Whether layer ``name`` is already finished."""
        return False

    def restore(self, info: LayerInfo, save: Callable[..., None]) -> LayerReport:
        """Write layer ``info``'s checkpointed weights into the model; returns its report."""
        raise KeyError(info.name)

    def save(self, info: LayerInfo, report: LayerReport) -> None:
        """Record layer ``info`` (already written into the model) as finished."""

    def load_database(self) -> Any:
        """Budget runs: the level database the interrupted run built (a LevelDatabase), or None."""
        return None

    def save_database(self, database: Any) -> None:
        """Budget runs: keep the level database just built, so a rerun does not build it again."""


class LayerCheckpoint(NoCheckpoint):
    """Finished layers of one run in ``directory`` (created if missing).

    Args:
        directory: where the files go.
        fingerprint: the run's :func:`run_fingerprint`; a directory holding another run's files
            raises ValueError.
    """

    def __init__(self, directory: str | bytes | os.PathLike, fingerprint: str, *,
                 before_token_mask: Callable[[], str] | None = None, token_mask: Any = None):
        """``before_token_mask``: the fingerprint a format-1 checkpoint of this run holds (computed
        only when one is found); ``token_mask``: the run's token_mask, as in its description."""
        self.directory = path_str(directory, "checkpoint")
        os.makedirs(self.directory, exist_ok=True)
        run_path = os.path.join(self.directory, _RUN_FILE)
        if os.path.exists(run_path):
            with open(run_path, encoding="utf-8") as handle:
                try:
                    found = json.load(handle)
                except json.JSONDecodeError as err:
                    raise ValueError(f"checkpoint: {run_path} is not a checkpoint description ({err})") from None
            old = (isinstance(found, dict) and found.get("format") == 1 and before_token_mask is not None
                   and found.get("fingerprint") != fingerprint and found.get("fingerprint") == before_token_mask())
            if old and token_mask is not None:
                # its layers were solved on Hessians of every token; a masked run's later layers
                # would be solved on others, and the mix matches neither run
                raise ValueError(
                    f"checkpoint: {self.directory} was written before the token_mask option existed, when every "
                    "token of a padded batch counted; this run's token_mask "
                    f"({'the default' if token_mask == 'auto' else repr(token_mask)}) could give the layers still "
                    "to do other Hessians. Resume it with token_mask=None (as it was run), or use an empty directory"
                )
            if not old and (not isinstance(found, dict) or found.get("fingerprint") != fingerprint):
                raise ValueError(
                    f"checkpoint: {self.directory} holds layers of another run (other model weights, recipe or "
                    "mode); use an empty directory or remove it"
                )
        else:
            payload = {"format": _FORMAT, "fingerprint": fingerprint}
            _atomic_write(run_path, json.dumps(payload).encode())
        self._done: dict[str, str] = {}
        for entry in sorted(os.listdir(self.directory)):
            if entry.startswith("layer-") and entry.endswith(".pkl"):
                path = os.path.join(self.directory, entry)
                with open(path, "rb") as handle:
                    name = pickle.load(handle)["name"]
                self._done[name] = path

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, f"layer-{hashlib.sha256(name.encode()).hexdigest()[:24]}.pkl")

    def __len__(self) -> int:
        return len(self._done)

    def done(self, name: str) -> bool:
        return name in self._done

    def restore(self, info: LayerInfo, save: Callable[..., None]) -> LayerReport:
        with open(self._done[info.name], "rb") as handle:
            record = pickle.load(handle)
        module = info.module
        bias = getattr(module, "bias", None)
        save(module.weight, bias)
        with torch.no_grad():
            module.weight.copy_(_from_record(record["weight"]).to(module.weight.dtype))
            if record["bias"] is not None and isinstance(bias, torch.Tensor):
                bias.copy_(_from_record(record["bias"]).to(bias.dtype))
        return record["report"]

    def save(self, info: LayerInfo, report: LayerReport) -> None:
        module = info.module
        bias = getattr(module, "bias", None)
        record = {
            "name": info.name,
            "weight": _to_record(module.weight),
            "bias": _to_record(bias) if isinstance(bias, torch.Tensor) else None,
            "report": report,
        }
        path = self._path(info.name)
        _atomic_write(path, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
        self._done[info.name] = path


    def load_database(self) -> Any:
        from ..level_database import LevelDatabase

        path = os.path.join(self.directory, _DATABASE_FILE)
        return LevelDatabase.load(path) if os.path.exists(path) else None

    def save_database(self, database: Any) -> None:
        database.save(os.path.join(self.directory, _DATABASE_FILE))  # atomic (LevelDatabase.save)


def _to_record(tensor: torch.Tensor) -> Any:
    """A tensor as a numpy array for the layer file, bit for bit. numpy has no bfloat16, so a
    bfloat16 tensor is kept as its bits (int16) in a dict; other dtypes as plain arrays (the
    form files written before bfloat16 support hold, still read by :func:`_from_record`)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return {"bfloat16_bits": tensor.view(torch.int16).numpy().copy()}
    return tensor.numpy().copy()


def _from_record(value: Any) -> torch.Tensor:
    """The tensor :func:`_to_record` stored."""
    if isinstance(value, dict):
        return torch.from_numpy(value["bfloat16_bits"]).view(torch.bfloat16)
    return torch.from_numpy(value)


def as_checkpoint(
    directory: str | bytes | os.PathLike | None, description: Mapping[str, Any], infos: Mapping[str, LayerInfo]
) -> NoCheckpoint:
    """A LayerCheckpoint in ``directory`` for this run, or a NoCheckpoint when None."""
    if directory is None:
        return NoCheckpoint()
    path_str(directory, "checkpoint")  # TypeError before the fingerprint is computed
    # format 1 fingerprinted the description without its token_mask entry
    before = {key: value for key, value in description.items() if key != "token_mask"}
    return LayerCheckpoint(directory, run_fingerprint(description, infos),
                           before_token_mask=lambda: run_fingerprint(before, infos),
                           token_mask=description.get("token_mask"))
