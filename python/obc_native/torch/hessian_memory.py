"""How much memory dense calibration's Hessians take, how much there is, and groups of layers that fit.

A layer's Hessian is ``groups * cols^2`` float64 values (:func:`hessian_bytes`). While the
calibration pass accumulates it, it takes twice that (:data:`ACCUMULATION_COPIES`): the running
total and the current batch's partial sum, which starts from zero so that shards merge bit for
bit (see ``LayerHessian``). Dense calibration holds every layer's Hessian at once (layers reading
one input share one); the ``hessian_memory`` option bounds that, and ``compress`` then runs the
dense pass in groups of layers (see ``compress.py``).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from .layers import LayerInfo

__all__ = [
    "ACCUMULATION_COPIES",
    "AUTO_FRACTION",
    "HessianBudget",
    "HessianMemoryError",
    "available_memory",
    "format_bytes",
    "hessian_bytes",
    "parse_memory",
    "resolve_budget",
    "split_in_groups",
]

#: Copies of a Hessian alive while it is accumulated: the running total and one batch's partial sum.
ACCUMULATION_COPIES = 2

#: ``hessian_memory="auto"``: this fraction of the memory available when the run starts (the rest is
#: for the activations of the forward pass, the solver's temporaries and other processes).
AUTO_FRACTION = 0.75

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-z]*)\s*$", re.IGNORECASE)


class HessianMemoryError(ValueError):
    """The Hessians a run must hold at once do not fit in ``hessian_memory`` (raised before any pass)."""


def hessian_bytes(info: LayerInfo) -> int:
    """Bytes of layer ``info``'s float64 Hessian: ``groups * cols^2 * 8`` (one ``cols x cols``
    block per unit)."""
    return info.groups * info.cols * info.cols * 8


def format_bytes(count: int | float) -> str:
    """``count`` bytes for people: "512 B", "1.5 KiB", "45.2 GiB" (powers of 1024)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_memory(value: Any, name: str = "hessian_memory") -> int | str:
    """The checked memory option ``value``: "auto", or a positive byte count from an int (or an
    integral float such as ``8e9``) or a string: a number with an optional unit, B, kB/MB/GB/TB
    (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024), case-insensitive, e.g. "8GiB",
    "500 MB", "1e9". TypeError for another type, ValueError (naming ``name``) for a value that
    is not positive or a string that does not parse."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        match = _SIZE.match(value)
        unit = match.group(3).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{name}: expected 'auto', a byte count or a size such as '8GiB' or '500MB' "
                f"(units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}"
            )
        exponent = int(match.group(2) or 0)
        # exact (no float rounding: "1.1e3" is 1100 bytes); a larger exponent is no memory size
        count = math.floor(Fraction(match.group(1)) * 10**exponent * _UNITS[unit]) if exponent <= 30 else None
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            count = int(value)
        else:
            number = float(value)
            if not (math.isfinite(number) and number.is_integer()):
                raise ValueError(f"{name}: expected a whole number of bytes, got {value!r}")
            count = int(number)
    else:
        raise TypeError(
            f"{name}: expected 'auto', a byte count (int) or a size string such as '8GiB', got {type(value).__name__}"
        )
    if count is None or count < 1:
        raise ValueError(f"{name}: expected a positive size (at least 1 byte), got {value!r}")
    return count


def available_memory(device: torch.device | str = "cpu", *, meminfo: str = "/proc/meminfo") -> int | None:
    """Bytes of memory available for new allocations on ``device``, or None when unknown.

    CPU: Linux's ``MemAvailable`` (``meminfo``: the file to read it from), else the free physical
    pages (``os.sysconf``); CUDA: the free memory ``torch.cuda.mem_get_info`` reports (the
    Hessians are accumulated on the inputs' device); other devices: None."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    fields = line.split()  # "MemAvailable:   12345678 kB"
                    unit = fields[2].lower() if len(fields) > 2 else "b"
                    if unit in ("b", "kb"):
                        return int(fields[1]) * (1024 if unit == "kb" else 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


@dataclass(frozen=True)
class HessianBudget:
    """How many bytes of Hessians (counting :data:`ACCUMULATION_COPIES`) a run may hold at once.

    Attributes:
        limit: the bytes, or None: no limit (``"auto"`` where the available memory is unknown).
        origin: where the limit comes from, for messages (e.g. ``"hessian_memory=8.0 GiB"``).
    """

    limit: int | None
    origin: str


def resolve_budget(hessian_memory: Any, device: torch.device | str = "cpu", *, available: Any = None) -> HessianBudget:
    """The budget of option ``hessian_memory`` (checked by :func:`parse_memory`) on ``device``:
    a byte count as given, or for "auto" :data:`AUTO_FRACTION` of :func:`available_memory`
    (``available``: a function ``available(device)`` to use instead, for tests)."""
    value = parse_memory(hessian_memory)
    if value != "auto":
        return HessianBudget(value, f"hessian_memory={format_bytes(value)}")
    free = (available or available_memory)(torch.device(device))
    if free is None:
        return HessianBudget(None, f"hessian_memory='auto' (the memory available on {device} is unknown)")
    limit = max(1, int(free * AUTO_FRACTION))
    return HessianBudget(
        limit,
        f"hessian_memory='auto' ({format_bytes(limit)}: {AUTO_FRACTION:.0%} of the {format_bytes(free)} "
        f"available on {torch.device(device)})",
    )


def split_in_groups(units: Iterable[tuple[str, int]], limit: int) -> list[list[str]]:
    """Consecutive groups of ``units`` (``(name, bytes)`` in the order given), each as large as
    fits in ``limit`` bytes (a unit larger than ``limit`` alone in its group: the caller refuses
    it first)."""
    groups: list[list[str]] = []
    used = 0
    for name, size in units:
        if not groups or used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups
