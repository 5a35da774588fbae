"""Layer Hessians H = 2/n sum x x^T from forward hooks, accumulated as float64 sums per batch.

``n`` counts samples, not batches: every row of a linear layer's input (all leading dimensions,
e.g. every token of a (B, T, C) input; only the real tokens of a padded batch, see
``calibration.py``) and every unfolded patch of a convolution (one per output position per
image). Scaling conventions matter only for the absolute value of the reported losses, which are
then per sample: loss = ||(W - W_hat) X||_F^2 / n.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Hashable, Mapping
from typing import NamedTuple

import numpy as np
import torch

from ._hook_set import HookSet
from .layers import LayerInfo, _conv_padding, input_samples, output_channel_sum

__all__ = ["CalibrationError", "LayerHessian", "OutputMeanAccumulator", "LayerHooks", "sample_signature"]

# Rows of unfolded samples accumulated at a time (bounds the temporary memory of the float64
# conversion on the torch path; the CPU path widens 2048 rows at a time in the core).
_CHUNK_ROWS = 1 << 16

# CPU samples go through the core's symmetric Gram update (False: torch's float64 baddbmm, as
# on other devices; only for benchmarks/bench_whole_model.py's side-by-side comparison).
_CORE_GRAM = True


class CalibrationError(ValueError):
    """Calibration data that cannot be used: wrong shape or dtype, NaN/Inf, nothing seen."""


class _StopForward(BaseException):
    """Raised by a hook once everything needed from a forward pass has been captured.

    A control-flow signal that stops the forward pass, not an error: it derives from
    BaseException (like KeyboardInterrupt and GeneratorExit) so that a model whose forward wraps
    its layers in ``try: ... except Exception:`` cannot swallow it and run on with the rest of
    the pass. Only :func:`~obc_native.torch.calibration.run_calibration` catches it.
    """


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite. A finite sum proves it (a NaN or Inf makes the
    sum NaN or Inf) without the bool tensor of ``isfinite``; only a non-finite sum (NaN/Inf in
    ``x``, or finite values whose sum overflows) needs the exact check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _first_tensor(name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """The module's input tensor (first positional argument, or the only tensor keyword)."""
    if args:
        x = args[0]
    else:
        tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        x = tensors[0] if len(tensors) == 1 else None
    if not isinstance(x, torch.Tensor):
        raise CalibrationError(f"layer {name!r}: could not find the input tensor of the forward call")
    return x


def sample_signature(info: LayerInfo) -> Hashable:
    """What :func:`layers.input_samples` depends on besides the input: two layers with equal
    signatures turn the same input tensor into the same samples, hence the same Hessian.

    Linear and HF Conv1D layers: the input width (both take every row of ``x.reshape(-1, in)``);
    convolutions: the width, kernel, groups, stride, padding (and its mode) and dilation.
    """
    if not info.is_conv:
        return ("rows", info.in_per_group)
    module = info.module
    return (
        info.kind, info.in_per_group, info.kernel, info.groups, tuple(module.stride),
        tuple(_conv_padding(module, info.kernel)), module.padding_mode, tuple(module.dilation),
    )


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference-mode tensors, which have none:
    their inputs are never shared)."""
    try:
        return x._version
    except RuntimeError:
        return None


class _Token(NamedTuple):
    """One input of one call: call ``call`` (counted over the whole run) of layer ``layer``."""

    layer: str
    call: int


class _SeenInput(NamedTuple):
    """An input tensor already accumulated in this forward pass, and by whom."""

    tensor: weakref.ref  # a weak reference: the id of a freed tensor may be reused
    version: int  # the tensor's in-place version counter when accumulated
    token: _Token


class LayerHessian:
    """Hessian of one layer, one ``cols x cols`` block per unit (conv group), as float64 sums
    kept per calibration batch.

    Accumulates with torch on the inputs' device (CPU or GPU) straight from module inputs; the
    numpy-level ``obc_native.HessianAccumulator`` is the counterpart for unfolded (n, cols)
    activations on the CPU and for Hessian files.

    Summation order (fixed, so that shards merge exactly): the samples of one batch (all the
    layer's calls during one forward pass, in call order, in chunks of ``_CHUNK_ROWS`` rows) are
    summed into a batch partial sum ``S_b = sum x x^T`` that starts from zero; at the end of the
    batch (:meth:`end_batch`, called by :meth:`LayerHooks.begin_batch` and before reading) it is
    added to the running total, ``S = (..((S_0 + S_1) + S_2)..)``, in batch order. A worker that
    runs batches of its own returns their partial sums (:meth:`batch_partials`), and
    :meth:`merge_partials` adds them in batch order: the total is then bit-identical to one
    process running every batch, whatever the split (see ``torch/executors.py``).
    A Hessian shared by layers reading the same inputs (``LayerHooks(share_inputs=True)``) is
    one object that received exactly the samples, batches and order each layer would have alone:
    the same bits as separate accumulation, and as the Ray shards (which do not share).

    Arithmetic: on the CPU each chunk's ``X^T X`` is the core's symmetric Gram update
    (``_core.accumulate_gram``: the lower triangle in tiles of 256 columns, 2048 rows widened to
    float64 at a time, mirrored; half the flops of a full product, bit-identical for any thread
    count); on other devices it is torch's float64 ``baddbmm``. The two differ by float64
    rounding (another summation order): CPU Hessians changed in the last bits when the core's
    update replaced ``baddbmm`` (whose result could also depend on the BLAS thread count).

    Attributes:
        info: the layer.
        n: samples seen so far (finished batches and the current one).
        total: ``(groups, cols, cols)`` float64 ``sum x x^T`` of the finished batches (None before);
            ``hessian`` is ``2/n`` times it.
        input_sum: ``(groups, cols)`` float64, the sum of the samples (for bias correction),
            summed in the same batch order.
    """

    def __init__(self, info: LayerInfo, *, keep_partials: bool = False):
        self.info = info
        self.n = 0
        self.total: torch.Tensor | None = None
        self.input_sum: torch.Tensor | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor, int] | None = None  # (sum xx^T, sum x, samples)
        # Workers keep each batch's partial sums instead of adding them up (see batch_partials).
        self._keep_partials = keep_partials
        self._partials: list[tuple[torch.Tensor, torch.Tensor, int] | None] = []
        # every sum so far came from the core's update, which is exactly symmetric (then
        # symmetrizing, 0.5 (H + H^T) = H bit for bit, is skipped: a transposed pass over H)
        self._exactly_symmetric = True

    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add the samples of one forward input ``x`` (see :func:`layers.input_samples`), without
        the padding positions of ``token_mask`` (``(B, T)`` bool, or None)."""
        name = self.info.name
        if not torch.is_floating_point(x):
            raise CalibrationError(f"layer {name!r}: input dtype {x.dtype} is not a floating point type")
        try:
            samples = input_samples(self.info, x.detach(), token_mask)
        except ValueError as err:
            raise CalibrationError(str(err)) from None
        native = samples.device.type == "cpu" and _CORE_GRAM
        if native and samples.dtype not in (torch.float32, torch.float64):
            samples = samples.float()  # float16 / bfloat16: exact in float32
        for start in range(0, samples.shape[1], _CHUNK_ROWS):
            chunk = samples[:, start : start + _CHUNK_ROWS]
            self._add_chunk(chunk if native else chunk.double(), native=native)

    def _add_chunk(self, chunk: torch.Tensor, *, native: bool) -> None:
        """Add one chunk of samples ``(groups, rows, cols)``: float64 (torch path, any device)
        or, with ``native``, float32/float64 on the CPU (the core's symmetric Gram update)."""
        count = chunk.shape[1]
        if count == 0:
            return
        if not native and not _all_finite(chunk):  # (the core checks its input itself)
            raise CalibrationError(f"layer {self.info.name!r}: calibration input contains NaN or Inf")
        if self._batch is None:
            groups, cols = chunk.shape[0], chunk.shape[2]
            gram = torch.zeros(groups, cols, cols, dtype=torch.float64, device=chunk.device)
            self._batch = (gram, torch.zeros(groups, cols, dtype=torch.float64, device=chunk.device), 0)
        gram, sums, seen = self._batch
        if native:
            # X^T X computed once per element pair (half of baddbmm's flops), widened to float64
            # in the core 2048 rows at a time, bit-identical for any thread count
            from .. import _core  # lazily, like _solvers.get_core: this module imports without it

            threads = torch.get_num_threads()
            for unit in range(chunk.shape[0]):
                samples = chunk[unit]
                if samples.shape[1] > 1 and samples.stride(1) != 1:
                    samples = samples.contiguous()
                try:
                    _core.accumulate_gram(gram[unit].numpy(), samples.numpy(), threads)
                except ValueError as err:  # NaN/Inf in X (the total is unchanged)
                    if "finite" not in str(err):
                        raise
                    raise CalibrationError(
                        f"layer {self.info.name!r}: calibration input contains NaN or Inf"
                    ) from None
            # summed in float64 as the float64 copy would be (the same values, the same order)
            sums.add_(chunk.sum(dim=1, dtype=torch.float64))
        else:
            gram.baddbmm_(chunk.transpose(1, 2), chunk)
            sums.add_(chunk.sum(dim=1))
            self._exactly_symmetric = False
        self._batch = (gram, sums, seen + count)
        self.n += count

    def end_batch(self) -> None:
        """Close the current batch: add its partial sums to the total (or keep them apart)."""
        batch, self._batch = self._batch, None
        if self._keep_partials:
            self._partials.append(batch)
        elif batch is not None:
            self._add_partial(batch)

    def _add_partial(self, batch: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        gram, sums, _ = batch
        # out of place: the batch may have run under torch.inference_mode and this call not
        # (an inference tensor cannot be updated in place outside it)
        if self.total is None:
            self.total, self.input_sum = gram, sums
        else:
            self.total = self.total + gram
            self.input_sum = self.input_sum + sums

    def batch_partials(self) -> list[tuple[np.ndarray, np.ndarray, int] | None]:
        """The finished batches' ``(sum x x^T (groups, cols, cols), sum x (groups, cols),
        samples)`` as float64 numpy arrays, in batch order (None for a batch in which the layer
        saw no samples). Only with ``keep_partials=True``."""
        self.end_batch()
        return [None if p is None else (p[0].cpu().numpy(), p[1].cpu().numpy(), p[2]) for p in self._partials]

    def merge_partials(self, partials: list[tuple[np.ndarray, np.ndarray, int] | None]) -> None:
        """Add batches' partial sums (from :meth:`batch_partials`, in batch order) to the total,
        exactly as if they had been accumulated here."""
        self.end_batch()
        for part in partials:
            if part is None:
                continue
            gram, sums, count = part
            self._exactly_symmetric = False  # made elsewhere: symmetrized when read
            self._add_partial((torch.from_numpy(np.array(gram)), torch.from_numpy(np.array(sums)), count))
            self.n += count

    def _finished_total(self) -> torch.Tensor:
        self.end_batch()
        if self.total is None:
            raise CalibrationError(f"layer {self.info.name!r}: saw no calibration samples")
        return self.total

    @property
    def hessian(self) -> torch.Tensor | None:
        """``(groups, cols, cols)`` float64 ``2/n sum x x^T`` on the inputs' device (None before
        the first sample); not symmetrized (see :meth:`hessians`)."""
        self.end_batch()
        return None if self.total is None else self.total * (2.0 / self.n)

    def hessians(self) -> list[np.ndarray]:
        """One float64 ``cols x cols`` array per unit, ``H = 2/n sum x x^T`` (exactly symmetric)."""
        total = self._finished_total()
        hessian = total * (2.0 / self.n)
        sym = hessian if self._exactly_symmetric else 0.5 * (hessian + hessian.transpose(1, 2))
        return [h.cpu().numpy() for h in sym]

    def input_mean(self) -> np.ndarray:
        """``(groups, cols)`` float64 mean of the samples."""
        self._finished_total()
        return (self.input_sum / self.n).cpu().numpy()


class OutputMeanAccumulator:
    """Mean of a layer's output per output channel over all samples (float64)."""

    def __init__(self, info: LayerInfo):
        self.info = info
        self.n = 0
        self.total: torch.Tensor | None = None

    def add(self, y: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Add one output ``y`` of the layer, without the padding positions of ``token_mask``."""
        sums, count = output_channel_sum(self.info, y.detach(), token_mask)
        self.total = sums if self.total is None else self.total + sums
        self.n += count

    def mean(self) -> np.ndarray:
        if self.total is None or self.n == 0:
            raise CalibrationError(f"layer {self.info.name!r}: saw no calibration samples")
        return (self.total / self.n).cpu().numpy()


class LayerHooks(HookSet):
    """Context manager: forward hooks on some layers, always removed on exit (also on error).

    Args:
        layers: the layers to watch, by name.
        hessians: accumulate a :class:`LayerHessian` per layer (``.hessians[name]``).
        output_means: accumulate an :class:`OutputMeanAccumulator` per layer (``.outputs``).
        stop_after: ``{name: calls}``; once every listed layer has been called that many times
            in the current forward pass the pass is aborted (the runner catches it), which saves
            computing the rest of the model. Call :meth:`begin_batch` before each pass.
        record_order: record the order and count of first calls (``.order``, ``.calls``).
        share_inputs: recognise layers that read the same inputs (e.g. the query, key and value
            projections of an attention block): a call whose input tensor is the very object
            (unchanged since: same in-place version) another layer with the same
            :func:`sample_signature` read earlier in the same forward pass is not accumulated
            again. After the passes, :meth:`share_hessians` gives every layer that read only
            such inputs the other layer's Hessian object. The Hessians are bit for bit those of
            separate accumulation (the same samples added in the same order); only the work of
            accumulating and checking them is saved.
        keep_partials: keep each batch's Hessian partial sums apart (calibration workers; see
            :meth:`LayerHessian.batch_partials`).

    The hooks check that inputs are floating point and finite, raising :class:`CalibrationError`
    naming the layer. ``hessian_seconds`` is the time spent accumulating Hessians. The padding
    mask of the current batch (given to :meth:`begin_batch`) applies to the Hessians and output
    means alike (see ``calibration.py``).
    """

    def __init__(
        self,
        layers: Mapping[str, LayerInfo],
        *,
        hessians: bool = True,
        output_means: bool = False,
        stop_after: Mapping[str, int] | None = None,
        record_order: bool = False,
        share_inputs: bool = False,
        keep_partials: bool = False,
    ):
        self.layers = dict(layers)
        self.hessians = (
            {name: LayerHessian(info, keep_partials=keep_partials) for name, info in self.layers.items()}
            if hessians
            else {}
        )
        self.outputs = {name: OutputMeanAccumulator(info) for name, info in self.layers.items()} if output_means else {}
        self.stop_after = dict(stop_after or {})
        self.record_order = record_order
        self.share_inputs = share_inputs
        self.order: list[str] = []
        self.calls: dict[str, int] = {name: 0 for name in self.layers}
        # most calls of a layer in one forward pass (sharing in sequential mode needs 1)
        self.most_calls: dict[str, int] = {name: 0 for name in self.layers}
        self.hessian_seconds = 0.0
        self._signatures = {name: sample_signature(info) for name, info in self.layers.items()} if share_inputs else {}
        self._inputs: dict[str, list[_Token]] = {name: [] for name in self.layers}
        self._seen: dict[tuple[int, Hashable], _SeenInput] = {}  # by (id, sample signature)
        self.token_mask: torch.Tensor | None = None

    def begin_batch(self, token_mask: torch.Tensor | None = None) -> None:
        """Close the previous batch's Hessian partial sums and reset the per-forward-pass call
        counters (and the inputs seen in the pass); ``token_mask``: the next batch's ``(B, T)``
        bool padding mask, or None (see :func:`~obc_native.torch.calibration.batch_token_mask`)."""
        for stats in {id(stats): stats for stats in self.hessians.values()}.values():  # shared: once
            stats.end_batch()
        self.calls = {name: 0 for name in self.layers}
        self._seen.clear()
        self.token_mask = token_mask

    def install(self) -> None:
        for name, info in self.layers.items():
            self.add(info.module.register_forward_pre_hook(self._make_pre_hook(name), with_kwargs=True))
            if self.outputs:
                self.add(info.module.register_forward_hook(self._make_post_hook(name)))

    def __exit__(self, *exc) -> None:
        self.remove_hooks()
        self._seen.clear()

    def _seen_by(self, name: str, x: torch.Tensor) -> _Token | None:
        """The earlier call of this pass that read the same unchanged tensor ``x`` into the same
        samples, or None."""
        seen = self._seen.get((id(x), self._signatures[name]))
        if seen is None or seen.tensor() is not x or seen.version != _version(x):
            return None
        return seen.token

    def _remember(self, name: str, x: torch.Tensor, token: _Token) -> None:
        version = _version(x)
        try:
            ref = weakref.ref(x)
        except TypeError:  # a tensor type without weak references: not shared
            return
        if version is not None:
            self._seen[(id(x), self._signatures[name])] = _SeenInput(ref, version, token)

    def _make_pre_hook(self, name: str):
        def hook(module, args, kwargs):
            x = _first_tensor(name, args, kwargs)
            if self.record_order and name not in self.order:
                self.order.append(name)
            token = self._seen_by(name, x) if self.share_inputs else None
            if token is None:  # a new input: checked, accumulated, remembered
                token = _Token(name, len(self._inputs[name]))
                if name in self.hessians:
                    start = time.perf_counter()
                    self.hessians[name].add(x, self.token_mask)
                    self.hessian_seconds += time.perf_counter() - start
                elif not torch.is_floating_point(x):
                    raise CalibrationError(f"layer {name!r}: input dtype {x.dtype} is not a floating point type")
                elif not _all_finite(x):
                    raise CalibrationError(f"layer {name!r}: calibration input contains NaN or Inf")
                if self.share_inputs:
                    self._remember(name, x, token)
            self._inputs[name].append(token)
            self.calls[name] += 1
            self.most_calls[name] = max(self.most_calls[name], self.calls[name])
            if not self.outputs:
                self._maybe_stop()
            return None

        return hook

    def _make_post_hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self.outputs[name].add(output, self.token_mask)
            self._maybe_stop()
            return None

        return hook

    def _maybe_stop(self) -> None:
        if self.stop_after and all(self.calls[n] >= k for n, k in self.stop_after.items()):
            raise _StopForward()

    def calls_total(self, name: str) -> int:
        """Calls of layer ``name`` over all passes so far."""
        return len(self._inputs[name])

    def input_owners(self) -> tuple[dict[str, str], list[str]]:
        """Which layer's accumulation each layer's inputs are, after the passes (``share_inputs``).

        Returns ``(owner, mixed)``: ``owner[name]`` is ``name`` itself, or the layer whose inputs
        ``name`` read in every one of its calls, one for one (then their Hessians are equal);
        ``mixed`` lists the layers that read some but not all of their inputs from other layers
        (their own Hessian is incomplete: calibrate them again without sharing). Layers never
        called own themselves.
        """
        owner: dict[str, str] = {}
        mixed: list[str] = []
        for name, tokens in self._inputs.items():
            layers = {token.layer for token in tokens}
            if not tokens or layers == {name}:
                owner[name] = name
                continue
            (other,) = layers if len(layers) == 1 else (None,)
            if other is not None and self._inputs[other] == tokens:
                owner[name] = other
            else:
                mixed.append(name)
        return owner, mixed

    def share_hessians(self) -> tuple[dict[str, str], list[str]]:
        """:meth:`input_owners`, and every layer owned by another gets that layer's
        :class:`LayerHessian` object in ``.hessians`` (read-only: shared)."""
        owner, mixed = self.input_owners()
        for name, other in owner.items():
            if other != name and name in self.hessians:
                self.hessians[name] = self.hessians[other]
        return owner, mixed
