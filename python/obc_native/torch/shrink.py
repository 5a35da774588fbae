"""Physically smaller models from structured pruning: remove pruned channels and what produces them.

Structured pruning (``LayerConfig(prune="structured")``) zeroes whole input channels of a layer:
columns of a Linear weight, all ``kh*kw`` columns of a conv input channel. The zeros alone save
nothing at run time. :func:`shrink_structured` removes those input channels from the consumer
layer together with the output channels of the layer that produces them (its weight rows and
bias) and of everything channel-wise in between (BatchNorm statistics and affine parameters;
ReLU / GELU / Dropout and other element-wise ops have no parameters to cut)::

    producer (Linear/Conv) -> [BatchNorm] -> [ReLU, GELU, Dropout, ...] -> consumer (Linear/Conv)
    producer (Conv) -> [BatchNorm] -> [ReLU, ..., MaxPool, AvgPool, ...] -> flatten -> [Dropout] -> Linear

In the second form (a CNN's classifier) each conv output channel is a block of ``h*w``
consecutive Linear input columns (``flatten(1)`` of an NCHW tensor); a channel is removed when
its whole block is zero, i.e. the Linear was pruned with
``LayerConfig(prune="structured", structured_group=h*w)``. ``h*w`` is the Linear's input
width divided by the conv's output channels.

Removing a producer channel is exact even when that channel is not zero itself (a bias through
a nonlinearity): its only reader is a consumer column that is all zeros, so it never reached
the output. The shrunk model computes what the masked model computes, up to float rounding
(fewer terms in each sum).

Chains are found with ``torch.fx`` symbolic tracing where the model traces; for models it cannot
trace (e.g. Hugging Face BERT) give the chains explicitly, e.g. :func:`hf_ffn_chains` for the
feed-forward blocks of BERT-like encoders. The model is changed in place: the same module
classes with fewer channels, an ordinary ``nn.Module`` that any runtime (``torch.onnx.export``,
TorchScript, ...) runs as a smaller dense model.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .fold import fold_batchnorm as _fold_batchnorm
from .fold import foldable_pairs

__all__ = ["shrink_structured", "hf_ffn_chains", "ShrinkReport", "ShrunkChain", "ShrinkError"]

logger = logging.getLogger("obc_native.torch")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules applied to each element on its own (or a channel-independent copy): channels pass through
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.tanh, torch.sigmoid, F.relu, F.relu6, F.gelu, F.silu, F.tanh, F.sigmoid, F.leaky_relu,
    F.elu, F.selu, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.dropout, torch.nn.functional.relu_,
    operator.neg,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "tanh_", "sigmoid_", "contiguous", "clone"}


class ShrinkError(ValueError):
    """A chain given to :func:`shrink_structured` that does not exist or cannot be shrunk."""


@dataclass
class ShrunkChain:
    """One producer -> consumer chain and the channels it kept.

    ``between``: the BatchNorm layers shrunk with it (element-wise ops are not listed).
    ``channels``: channels before; ``kept``: channels after (``channels - kept`` were removed).
    ``columns_per_channel``: consumer input columns per channel: 1, or ``h*w`` for a conv
    flattened into a Linear.
    """

    producer: str
    consumer: str
    between: list[str]
    channels: int
    kept: int
    columns_per_channel: int = 1

    @property
    def removed(self) -> int:
        return self.channels - self.kept


@dataclass
class ShrinkReport:
    """What :func:`shrink_structured` did.

    ``chains``: the chains shrunk (including those where no channel was zero: ``removed == 0``).
    ``skipped``: ``{consumer name: reason}`` for layers with zero input channels that were left
    as they were. ``parameters_before`` / ``parameters_after``: parameter counts of the model.
    ``folded``: ``(conv, batchnorm)`` pairs folded with ``fold_batchnorm=True``.
    """

    chains: list[ShrunkChain] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    parameters_before: int = 0
    parameters_after: int = 0
    folded: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chains": [dict(vars(c), removed=c.removed) for c in self.chains],
            "skipped": dict(self.skipped),
            "folded": [list(pair) for pair in self.folded],
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
        }

    def table(self) -> str:
        """One line per chain and per skipped layer, then the parameter counts."""
        width = max([32] + [len(name) for c in self.chains for name in (c.producer, c.consumer)])  # aligned columns
        lines = [f"{'producer':<{width}} {'consumer':<{width}} {'channels':>9} {'kept':>6}"]
        for c in self.chains:
            lines.append(f"{c.producer:<{width}} {c.consumer:<{width}} {c.channels:>9} {c.kept:>6}")
        for name, reason in self.skipped.items():
            lines.append(f"skipped {name}: {reason}")
        for conv, norm in self.folded:
            lines.append(f"folded {norm} into {conv}")
        lines.append(f"parameters: {self.parameters_before} -> {self.parameters_after}")
        return "\n".join(lines)


def hf_ffn_chains(model: nn.Module) -> list[tuple[str, str]]:
    """``(intermediate.dense, output.dense)`` of every BERT-like feed-forward block in ``model``.

    Hugging Face BERT, RoBERTa, ELECTRA, ... layers hold ``intermediate.dense`` (Linear, hidden ->
    intermediate, then an element-wise activation) and ``output.dense`` (Linear, intermediate ->
    hidden); the intermediate width is what structured pruning of ``output.dense`` shrinks. Pass
    the result as ``chains`` to :func:`shrink_structured` (torch.fx cannot trace these models).
    """
    chains = []
    for name, module in model.named_modules():
        intermediate = getattr(module, "intermediate", None)
        output = getattr(module, "output", None)
        first = getattr(intermediate, "dense", None)
        second = getattr(output, "dense", None)
        if isinstance(first, nn.Linear) and isinstance(second, nn.Linear):
            prefix = f"{name}." if name else ""
            chains.append((f"{prefix}intermediate.dense", f"{prefix}output.dense"))
    return chains


def shrink_structured(
    model: nn.Module, chains: Sequence[Sequence[str]] | None = None, *, concrete_args: dict[str, Any] | None = None,
    fold_batchnorm: bool = False, example_inputs: Any = None, example_kwargs: dict[str, Any] | None = None,
) -> ShrinkReport:
    """Remove the zero input channels of layers and the producing channels, in place.

    Args:
        model: a model after structured pruning (its layers' zero input channels are removed).
        chains: None to find producer -> consumer chains with ``torch.fx.symbolic_trace``; or the
            chains as sequences of module names ``(producer, consumer)`` or ``(producer, norm...,
            consumer)``, for models fx cannot trace. A given chain promises that each channel of the
            producer's output reaches only the same channel of the consumer's input, through the
            listed BatchNorm layers and parameter-free element-wise ops. Checked with
            ``example_inputs`` (below); without them, against the ``torch.fx`` graph when the model
            traces (the chain must be the one the trace finds ending in its consumer); not at all
            when it does not (e.g. Hugging Face BERT: give ``example_inputs``). Producer and
            consumer: ``nn.Linear`` or ``nn.Conv1d/2d/3d``; a conv producer with a Linear consumer
            means conv -> ... -> ``flatten(1)`` -> Linear (each conv channel a block of
            ``in_features / out_channels`` columns).
        concrete_args: passed to ``torch.fx.symbolic_trace`` (e.g. to fix an optional argument).
        fold_batchnorm: after shrinking, fold every BatchNorm that directly follows a conv into
            that conv (:func:`obc_native.torch.fold_batchnorm`; the BatchNorm becomes
            ``nn.Identity``): one layer instead of two in PyTorch eager and in ``torch.export``
            programs (``torch.onnx.export`` folds them by itself in eval mode). Needs a model
            ``torch.fx`` can trace. Outputs equal the eval-mode model's up to float rounding.
        example_inputs, example_kwargs: an input of the model (a tensor or a tuple of positional
            arguments, and keyword arguments), e.g. one calibration batch: the model's output on
            it is computed before any change and again after each chain that removes channels, in
            eval mode (each module's training flag is restored after); a chain after which an
            output tensor differs by more than ``sqrt(eps)`` of its dtype times its largest
            magnitude (3.5e-4 relative in float32: removing exact zeros only changes the order of
            the sums), or after which the model fails to run, raises ShrinkError naming the chain.

    Returns:
        a :class:`ShrinkReport`. Layers with zero input channels and no removable producer
        (e.g. the first layer, a channel read by two layers, a residual add, a reshape other
        than ``flatten(1)``, an ``x.view(-1, 400)`` whose width is a number in the code rather than
        read from the Linear) are listed in ``report.skipped`` and stay masked; so is a traced
        Linear after a flatten whose zero columns do not form whole channel blocks (also
        logged as a warning: prune it with ``structured_group = h*w``).

    Raises:
        ShrinkError: a given chain names a missing module or one of the wrong type or width; a
            given conv -> Linear chain whose Linear zero columns do not form whole channel blocks
            (chains cut before it are restored: the model is unchanged);
            a conv -> flatten -> Linear chain whose Linear width is not a multiple of the conv's
            channels (the spatial size cannot be inferred); or ``chains`` is None and the model
            cannot be traced.
            With ``fold_batchnorm``, also a model ``torch.fx`` cannot trace, or a BatchNorm to fold
            in training mode (call ``model.eval()`` first); both checked before any change.
            A given chain that the traced graph contradicts (without ``example_inputs``), or one
            after which the output on ``example_inputs`` changes (the model is then restored
            as it was); a model that does not run on ``example_inputs`` (before any change).
        TypeError: ``model`` is not an ``nn.Module``; ``fold_batchnorm`` is not a bool;
            ``example_inputs`` not a tensor or tuple, ``example_kwargs`` not a dict.

    Grouped convolutions: channels are removed only if every group loses the same number (the
    smallest count of zero channels of any group, so some zero channels may stay). At least one
    channel is always kept. The model's outputs equal the masked model's up to float rounding.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(fold_batchnorm, bool):
        raise TypeError(f"fold_batchnorm: expected a bool, got {type(fold_batchnorm).__name__}")
    example = _as_example(example_inputs, example_kwargs)
    report = ShrinkReport(parameters_before=_parameter_count(model))
    modules = dict(model.named_modules())
    if fold_batchnorm:
        # folding traces the model and needs eval-mode BatchNorm: find out now, not after the
        # channels are cut (chains are given mostly for models fx cannot trace). Cutting channels
        # changes no pair, so the pairs found now are the ones folded then.
        try:
            foldable_pairs(model, concrete_args)
        except ValueError as err:
            reason = str(err).removeprefix("fold_batchnorm: ")
            raise ShrinkError(f"fold_batchnorm=True: {reason}; nothing was changed (shrink with "
                              "fold_batchnorm=False to leave BatchNorm as it is)") from err
    if chains is None:
        found, skipped = _trace_chains(model, modules, concrete_args)
        report.skipped.update(skipped)
    else:
        found = [_check_chain(tuple(chain), modules, index) for index, chain in enumerate(chains)]
        # a layer may end one chain and start the next; any other repeat would cut channels twice
        roles = [f"producer {c[0]}" for c in found] + [f"consumer {c[-1]}" for c in found]
        roles += [f"norm {name}" for c in found for name in c[1:-1]]
        repeated = sorted({role for role in roles if roles.count(role) > 1})
        if repeated:
            raise ShrinkError(f"chains: {', '.join(repeated)} in more than one chain")
        if example is None:  # with an example, the outputs are compared instead (below)
            _check_given_chains(model, modules, concrete_args, found)
    labels = [f"chains[{i}] ({' -> '.join(c)})" if chains is not None else f"chain {' -> '.join(c)}"
              for i, c in enumerate(found)]
    expected = None if example is None else _example_outputs(model, example, "before any change")
    shared = _shared_parameter_owners(model)
    # a later given chain can still raise (zero Linear columns that are not whole channel blocks):
    # the chains cut before it are put back, so that an error leaves the model as it was
    saved = [_module_state(modules[name]) for name in sorted({name for chain in found for name in chain})]
    try:
        with torch.no_grad():
            for chain, label in zip(found, labels):
                tied = [name for name in chain if name in shared]
                if tied:
                    report.skipped[chain[-1]] = f"{tied[0]} shares a parameter with another module (tied weights)"
                    continue
                result = _shrink_chain(chain, modules)
                if isinstance(result, str):
                    report.skipped[chain[-1]] = result
                    continue
                report.chains.append(result)
                if expected is not None and result.removed:
                    _compare_outputs(model, example, expected, label)
    except BaseException:
        for state in saved:
            _restore_module_state(*state)
        raise
    if fold_batchnorm:
        try:
            report.folded = _fold_batchnorm(model, concrete_args=concrete_args)
        except ValueError as err:
            raise ShrinkError(f"{err}; the channels were removed, but no BatchNorm was folded "
                              "(shrink with fold_batchnorm=False)") from err
    report.parameters_after = _parameter_count(model)
    removed = sum(c.removed for c in report.chains)
    logger.info("shrink_structured: %d channel(s) removed in %d chain(s); %d -> %d parameters", removed,
                len(report.chains), report.parameters_before, report.parameters_after)
    return report


_WIDTHS = ("in_features", "out_features", "in_channels", "out_channels", "num_features")


def _as_example(example_inputs: Any, example_kwargs: Any) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` to call the model with, or None when no example is given."""
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs: expected a dict of keyword arguments or None, got "
                        f"{type(example_kwargs).__name__}")
    if example_inputs is None:
        return None if not example_kwargs else ((), dict(example_kwargs))
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs: expected a tensor or a tuple of positional arguments, got "
                        f"{type(example_inputs).__name__}")
    return example_inputs, dict(example_kwargs or {})


def _example_outputs(model: nn.Module, example: tuple[tuple, dict], when: str) -> list[torch.Tensor]:
    """The tensors of the model's output on ``example``, in eval mode (no dropout, no BatchNorm
    statistics update; every module's training flag restored after)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return _output_tensors(model(*example[0], **example[1]))
    except Exception as err:
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ShrinkError(f"example_inputs: the model does not run on them {when} "
                          f"({type(err).__name__}: {first_line})") from err
    finally:
        for module, training in modes:
            module.training = training


def _output_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples / lists / dicts such as a Hugging Face
    ModelOutput of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _output_tensors(item)]
    return []


def _compare_outputs(model: nn.Module, example: tuple[tuple, dict], expected: list[torch.Tensor], label: str) -> None:
    """ShrinkError naming the chain ``label`` when the model's output on ``example`` is no longer
    ``expected`` up to float rounding (see :func:`shrink_structured`)."""
    cause = ("its channels also reach something other than the consumer, through the listed BatchNorm "
             "layers and element-wise ops: a residual add, another layer, a normalization over channels, ...")
    try:
        actual = _example_outputs(model, example, f"after {label} was shrunk")
    except ShrinkError as err:
        raise ShrinkError(f"{label}: {err}; {cause}; the model is unchanged") from err
    problem = None
    if len(actual) != len(expected):
        problem = f"{len(actual)} output tensors instead of {len(expected)}"
    for index, (new, old) in enumerate(zip(actual, expected)):
        if problem is not None:
            break
        if new.shape != old.shape or new.dtype != old.dtype:
            problem = f"output {index}: {new.dtype} {tuple(new.shape)} instead of {old.dtype} {tuple(old.shape)}"
        elif not old.is_floating_point():
            if not torch.equal(new, old):
                problem = f"output {index}: other values"
        else:
            finite = old[torch.isfinite(old)]
            scale = float(finite.abs().max()) if finite.numel() else 0.0
            tolerance = torch.finfo(old.dtype).eps ** 0.5 * scale
            same = torch.isclose(new, old, rtol=0.0, atol=tolerance, equal_nan=True)
            if not bool(same.all()):
                difference = float((new.double() - old.double()).abs().nan_to_num(float("inf")).max())
                problem = (f"output {index}: differs by up to {difference:.3g}, more than float rounding "
                           f"({tolerance:.3g}: sqrt(eps) x the largest magnitude {scale:.3g})")
    if problem is not None:
        raise ShrinkError(f"{label}: the shrunk model's output on example_inputs is not the masked model's "
                          f"({problem}); {cause}; the model is unchanged")


def _check_given_chains(model: nn.Module, modules: dict[str, nn.Module], concrete_args,
                        chains: list[tuple[str, ...]]) -> None:
    """ShrinkError naming the first given chain that the ``torch.fx`` graph contradicts: its
    consumer's input does not come from its producer through its listed BatchNorm layers and
    element-wise ops only (what :func:`_walk_back` accepts). Nothing when the model does not
    trace (a given chain is then unchecked without example inputs)."""
    try:
        graph, calls = _traced_graph(model, concrete_args)
    except ShrinkError:
        return
    nodes = {node.target: node for node in graph.nodes if node.op == "call_module"}
    for index, chain in enumerate(chains):
        node = nodes.get(chain[-1])
        traced = "the consumer is not called in the traced graph" if node is None else _walk_back(node, modules, calls)
        if isinstance(traced, str) or tuple(traced) != tuple(chain):
            why = traced if isinstance(traced, str) else f"the graph's chain is {' -> '.join(traced)}"
            raise ShrinkError(f"chains[{index}] ({' -> '.join(chain)}): the torch.fx graph does not show this chain "
                              f"({why}); removing its channels could change what the model computes (nothing was "
                              "changed). If the chain is right, pass example_inputs= to check it on an input instead")


def _module_state(module: nn.Module) -> tuple:
    """What cutting channels replaces in ``module``: its parameter and buffer entries (the tensors
    themselves are never changed in place, see :func:`_replace`) and its width attributes."""
    widths = {name: getattr(module, name) for name in _WIDTHS if hasattr(module, name)}
    return module, dict(module._parameters), dict(module._buffers), widths


def _restore_module_state(module: nn.Module, parameters: dict, buffers: dict, widths: dict) -> None:
    module._parameters.clear()
    module._parameters.update(parameters)
    module._buffers.clear()
    module._buffers.update(buffers)
    for name, value in widths.items():
        setattr(module, name, value)


def _shared_parameter_owners(model: nn.Module) -> set[str]:
    """Names of modules holding a parameter that another module holds too (tied weights)."""
    owners: dict[int, set[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), set()).add(module_name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, _CONVS):
        return f"conv{len(module.kernel_size)}d"
    return None


def _check_chain(chain: tuple, modules: dict[str, nn.Module], index: int) -> tuple[str, ...]:
    """A user-given chain, validated: names exist, types and widths fit."""
    if len(chain) < 2 or not all(isinstance(name, str) for name in chain):
        raise ShrinkError(f"chains[{index}]: expected module names (producer, [norm, ...], consumer), got {chain!r}")
    missing = [name for name in chain if name not in modules]
    if missing:
        raise ShrinkError(f"chains[{index}]: the model has no module {missing[0]!r}")
    producer, consumer = modules[chain[0]], modules[chain[-1]]
    for role, name, module in (("producer", chain[0], producer), ("consumer", chain[-1], consumer)):
        if _kind(module) is None:
            raise ShrinkError(f"chains[{index}]: {role} {name!r} is a {type(module).__name__}; "
                              "expected nn.Linear or nn.Conv1d/2d/3d")
    if isinstance(producer, _CONVS) and isinstance(consumer, nn.Linear):
        return _check_flatten_chain(chain, modules, index)
    if _kind(producer) != _kind(consumer):
        raise ShrinkError(f"chains[{index}]: producer {chain[0]!r} ({type(producer).__name__}) and consumer "
                          f"{chain[-1]!r} ({type(consumer).__name__}) must be both Linear or both Conv of one rank")
    width = _out_channels(producer)
    if width != _in_channels(consumer):
        raise ShrinkError(f"chains[{index}]: producer {chain[0]!r} has {width} output channels but consumer "
                          f"{chain[-1]!r} has {_in_channels(consumer)} input channels")
    for name in chain[1:-1]:
        norm = modules[name]
        if not isinstance(norm, _NORMS):
            raise ShrinkError(f"chains[{index}]: {name!r} is a {type(norm).__name__}; between producer and consumer "
                              "only BatchNorm layers are listed (element-wise ops need no entry)")
        if norm.num_features != width:
            raise ShrinkError(f"chains[{index}]: {name!r} has {norm.num_features} features, expected {width}")
    return chain


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _trace_chains(model: nn.Module, modules: dict[str, nn.Module], concrete_args) -> tuple[list, dict[str, str]]:
    """Chains found in the fx graph, and the reasons for layers with zero input channels left alone."""
    graph, calls = _traced_graph(model, concrete_args)
    chains, skipped = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or _kind(modules[node.target]) is None:
            continue
        consumer = node.target
        if not _zero_input_channels(modules[consumer]).any():
            continue
        found = _walk_back(node, modules, calls)
        if isinstance(found, str):
            skipped[consumer] = found
        else:
            chains.append(found)
    viewed = [chain for chain in chains if isinstance(chain, FlattenChain) and chain.width_node is not None]
    for chain in _fixed_widths(model, modules, concrete_args, viewed) if viewed else []:
        chains.remove(chain)
        skipped[chain[-1]] = (f"the flatten before it, view/reshape(-1, {modules[chain[-1]].in_features}), fixes the "
                              "width in the code (removing channels would break the model); write x.flatten(1) or "
                              "x.view(x.size(0), -1), or read the width from the layer (self.fc.in_features)")
    return chains, skipped


def _traced_graph(model: nn.Module, concrete_args) -> tuple[Any, dict[str, int]]:
    """The model's ``torch.fx`` graph and how often each module is called (a module whose tensors
    are read directly counts twice: its shape must not change); ShrinkError if it does not trace."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model, concrete_args=concrete_args).graph
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ... on dynamic code
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ShrinkError(
            f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {first_line}); "
            "pass chains=[(producer, [norm, ...], consumer), ...] (for Hugging Face BERT-like models: "
            "chains=hf_ffn_chains(model))"
        ) from err
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":  # a layer's tensors read directly: its shape must not change
            owner = node.target.rsplit(".", 1)[0] if "." in node.target else ""
            calls[owner] = calls.get(owner, 0) + 2
    return graph, calls


def _walk_back(node, modules: dict[str, nn.Module], calls: dict[str, int]) -> tuple[str, ...] | str:
    """The chain ending at consumer ``node``, or why there is none."""
    import torch.fx

    consumer = node.target
    if calls[consumer] > 1:
        return "the layer is called more than once (or its tensors are read directly)"
    between: list[str] = []
    current = node.args[0] if node.args else None
    while True:
        if not isinstance(current, torch.fx.Node):
            return "its input is not produced by a layer in the graph"
        if len(current.users) != 1:
            return f"its input channels are also read elsewhere ({current.name} has {len(current.users)} users)"
        if isinstance(modules[consumer], nn.Linear) and _is_flatten(current, modules):
            return _walk_back_from_flatten(current, consumer, modules, calls)
        if current.op == "call_module":
            module = modules[current.target]
            if calls[current.target] > 1:
                return f"{current.target} is called more than once (or its tensors are read directly)"
            if _kind(module) is not None:
                if _kind(module) != _kind(modules[consumer]):
                    return (f"its producer {current.target} is a {type(module).__name__}, "
                            f"not a {type(modules[consumer]).__name__}")
                return (current.target, *reversed(between), consumer)
            if isinstance(module, _NORMS):
                if _kind(modules[consumer]) == "linear":  # BatchNorm1d normalizes dim 1, not a Linear's features
                    return f"BatchNorm {current.target} between Linear layers"
                between.append(current.target)
            elif not isinstance(module, _ELEMENTWISE_MODULES):
                return f"{current.target} ({type(module).__name__}) between it and the producer is not element-wise"
        elif current.op == "call_function" and current.target in _ELEMENTWISE_FUNCTIONS:
            pass
        elif current.op == "call_method" and current.target in _ELEMENTWISE_METHODS:
            pass
        else:
            return f"{current.op} {getattr(current.target, '__name__', current.target)} between it and the producer"
        tensors = [a for a in (*current.args, *current.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if len(tensors) != 1:
            return f"{current.name} combines several tensors"
        current = tensors[0]


def _zero_input_channels(module: nn.Module) -> torch.Tensor:
    """Bool (in_channels,): input channels whose weights are all exactly zero."""
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        return (weight == 0).all(dim=0)
    # conv weight (out, in/groups, *kernel): channel g*per_group + j is read by group g's rows, column j
    groups = module.groups
    per_group = weight.shape[1]
    zero = (weight == 0).flatten(2).all(dim=2)  # (out, in/groups)
    zero = zero.view(groups, weight.shape[0] // groups, per_group).all(dim=1)  # (groups, per_group)
    return zero.reshape(-1)


def _equal_per_group(remove: torch.Tensor, groups: int) -> torch.Tensor:
    """``remove`` reduced so that each of ``groups`` equal slices removes the same count (the smallest)."""
    if groups == 1:
        return remove
    slices = remove.view(groups, -1)
    count = int(slices.sum(dim=1).min())
    reduced = torch.zeros_like(slices)
    for g in range(groups):
        reduced[g, torch.nonzero(slices[g]).flatten()[:count]] = True
    return reduced.reshape(-1)


def _shrink_chain(chain: tuple[str, ...], modules: dict[str, nn.Module]) -> ShrunkChain | str:
    """Cut the zero input channels of the chain's consumer; a reason string if none can be cut."""
    if isinstance(chain, FlattenChain):
        return _shrink_flatten_chain(chain, modules)
    producer, consumer = modules[chain[0]], modules[chain[-1]]
    channels = _in_channels(consumer)
    remove = _zero_input_channels(consumer)
    if isinstance(consumer, _CONVS):
        remove = _equal_per_group(remove, consumer.groups)
    if isinstance(producer, _CONVS):
        remove = _equal_per_group(remove, producer.groups)
        # the consumer's grouping must still hold after the producer's reduction
        if isinstance(consumer, _CONVS) and consumer.groups > 1:
            counts = remove.view(consumer.groups, -1).sum(dim=1)
            if bool((counts != counts[0]).any()):
                return "no channel set is removable equally from every group of both grouped convolutions"
    if bool(remove.all()):  # keep a channel: zero-width layers are not portable
        if any(isinstance(m, _CONVS) and m.groups > 1 for m in (producer, consumer)):
            return "all input channels are zero in a grouped convolution (a zero-width layer is not portable)"
        remove[0] = False
    keep = torch.nonzero(~remove).flatten()
    if len(keep) < channels:
        _cut_outputs(producer, keep)
        for name in chain[1:-1]:
            _cut_norm(modules[name], keep)
        _cut_inputs(consumer, keep)
    return ShrunkChain(chain[0], chain[-1], list(chain[1:-1]), channels, len(keep))


def _replace(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Set parameter or buffer ``name`` of ``module`` to ``value`` (same kind, requires_grad kept)."""
    old = getattr(module, name)
    if old is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous().clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.contiguous().clone())


def _cut_outputs(module: nn.Module, keep: torch.Tensor) -> None:
    _replace(module, "weight", module.weight.index_select(0, keep))
    if module.bias is not None:
        _replace(module, "bias", module.bias.index_select(0, keep))
    if isinstance(module, nn.Linear):
        module.out_features = len(keep)
    else:
        module.out_channels = len(keep)


def _cut_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    if isinstance(module, nn.Linear):
        _replace(module, "weight", module.weight.index_select(1, keep))
        module.in_features = len(keep)
        return
    groups = module.groups
    per_group = module.in_channels // groups
    # a channel's column within its group; every group keeps the same count (see _equal_per_group)
    columns = (keep % per_group).view(groups, -1)
    out_per_group = module.out_channels // groups
    weight = module.weight.view(groups, out_per_group, per_group, *module.weight.shape[2:])
    cut = torch.stack([weight[g].index_select(1, columns[g]) for g in range(groups)])
    _replace(module, "weight", cut.flatten(0, 1))
    module.in_channels = len(keep)


def _cut_norm(norm: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(norm, name, None)
        if value is not None:
            _replace(norm, name, value.index_select(0, keep))
    norm.num_features = len(keep)


# --- conv -> [BatchNorm, element-wise ops, pooling] -> flatten -> Linear ---------------------------------------

# Modules and functions that pool each channel on its own: channels pass through, the spatial size changes
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.LPPool1d, nn.LPPool2d,
)
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.lp_pool1d, F.lp_pool2d,
}


class FlattenChain(tuple):
    """A chain ``(conv, [norm, ...], linear)`` through a ``flatten(1)``: module names as in any chain,
    plus ``spatial``, the Linear input columns per conv output channel (``h*w``), ``given``:
    the user named it (misaligned zero columns are then an error, not a skipped layer), and
    ``width_node``: the name of a traced ``x.view(-1, width)`` / ``x.reshape(-1, width)`` flatten
    (its width must follow the Linear's ``in_features``, see :func:`_fixed_widths`), else None."""

    spatial: int
    given: bool
    width_node: str | None

    def __new__(cls, names, spatial: int, given: bool, width_node: str | None = None):
        chain = super().__new__(cls, names)
        chain.spatial, chain.given, chain.width_node = spatial, given, width_node
        return chain


def _view_width(node) -> int | None:
    """``width`` of a traced ``x.view(-1, width)`` / ``x.reshape(-1, width)``, else None."""
    if node is None or node.op != "call_method" or node.target not in ("view", "reshape") or node.kwargs:
        return None
    args = list(node.args[1:])
    shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if len(shape) == 2 and shape[0] == -1 and isinstance(shape[1], int):
        return shape[1]
    return None


def _fixed_widths(model: nn.Module, modules: dict[str, nn.Module], concrete_args,
                  chains: list[FlattenChain]) -> list[FlattenChain]:
    """The chains whose ``x.view(-1, width)`` flatten has a width that does not follow the Linear.

    fx records ``x.view(-1, 400)`` and ``x.view(-1, self.fc.in_features)`` alike, as the number.
    Only the second still runs once channels are removed (the first, as in the PyTorch tutorial's
    LeNet, then fails with a shape error; so does a view that folds channels into the batch,
    ``x.view(-1, h*w)``). Traced again with each Linear's ``in_features`` one larger (only the
    attribute: tracing runs no layer), a width read from the Linear follows; any other does not.
    """
    consumers = {chain[-1]: modules[chain[-1]] for chain in chains}
    widths = {name: module.in_features for name, module in consumers.items()}
    import torch.fx

    try:
        for module in consumers.values():
            module.in_features += 1
        nodes = {node.name: node for node in torch.fx.symbolic_trace(model, concrete_args=concrete_args).graph.nodes}
    except Exception:  # traced once already; if it no longer does, nothing is proven
        nodes = {}
    finally:
        for name, module in consumers.items():
            module.in_features = widths[name]
    return [chain for chain in chains if _view_width(nodes.get(chain.width_node)) != widths[chain[-1]] + 1]


def _flatten_spatial(conv_name: str, conv: nn.Module, linear_name: str, linear: nn.Linear) -> int:
    """Linear input columns per conv output channel; ShrinkError naming both if it is not a whole number."""
    channels = conv.out_channels
    if linear.in_features % channels:
        raise ShrinkError(
            f"cannot infer the spatial size of the flatten between conv {conv_name!r} and Linear {linear_name!r}: "
            f"{linear.in_features} input features are not a multiple of the conv's {channels} output channels "
            "(a chain conv -> flatten -> Linear needs flatten(1) of the conv's (N, C, ...) output)"
        )
    return linear.in_features // channels


def _check_flatten_chain(chain: tuple, modules: dict[str, nn.Module], index: int) -> FlattenChain:
    """A user-given chain ``(conv, [norm, ...], linear)``: widths fit a flatten(1) between them."""
    spatial = _flatten_spatial(chain[0], modules[chain[0]], chain[-1], modules[chain[-1]])
    width = modules[chain[0]].out_channels
    for name in chain[1:-1]:
        norm = modules[name]
        if not isinstance(norm, _NORMS) or norm.num_features != width:
            raise ShrinkError(f"chains[{index}]: {name!r} between conv {chain[0]!r} and the flatten must be a "
                              f"BatchNorm with {width} features, got {norm}")
    return FlattenChain(chain, spatial, given=True)


def _is_flatten(node, modules: dict[str, nn.Module]) -> bool:
    """``node`` flattens all but the batch dimension: ``nn.Flatten()``, ``torch.flatten(x, 1)``,
    ``x.flatten(1)``, ``x.view(n, -1)`` / ``x.reshape(n, -1)``, ``x.view(-1, width)``."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    args = list(node.args[1:])
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        # (n, -1), or (-1, width): the width must then be the Linear's (else the model would not run)
        return len(shape) == 2 and not node.kwargs and (
            shape[1] == -1 or (shape[0] == -1 and isinstance(shape[1], int)))
    return False


def _is_size_query(node) -> bool:
    """``x.size(...)`` / ``x.shape``: reads no channel values (e.g. the batch size of ``x.view(x.size(0), -1)``)."""
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",))


def _walk_back_from_flatten(flatten, consumer: str, modules: dict[str, nn.Module],
                            calls: dict[str, int]) -> FlattenChain | str:
    """The chain ``(conv, [norm, ...], consumer)`` ending in a flatten that feeds Linear ``consumer``,
    or why there is none. Between the conv and the flatten: BatchNorm, element-wise ops and
    per-channel pooling, which keep the channels in dimension 1."""
    import torch.fx

    between: list[str] = []
    current = flatten.args[0] if flatten.args else None
    while True:
        if not isinstance(current, torch.fx.Node):
            return "the flatten before it reads no layer output in the graph"
        readers = [user for user in current.users if not _is_size_query(user)]
        if len(readers) != 1:
            return f"its input channels are also read elsewhere ({current.name} has {len(readers)} users)"
        if current.op == "call_module":
            module = modules[current.target]
            if calls[current.target] > 1:
                return f"{current.target} is called more than once (or its tensors are read directly)"
            if isinstance(module, _CONVS):
                spatial = _flatten_spatial(current.target, module, consumer, modules[consumer])
                width_node = flatten.name if _view_width(flatten) is not None else None
                return FlattenChain((current.target, *reversed(between), consumer), spatial, given=False,
                                    width_node=width_node)
            if isinstance(module, _NORMS):
                between.append(current.target)
            elif not isinstance(module, (*_ELEMENTWISE_MODULES, *_POOL_MODULES)):
                return (f"{current.target} ({type(module).__name__}) before the flatten is not element-wise, "
                        "per-channel pooling or a convolution")
        elif current.op == "call_function" and (current.target in _ELEMENTWISE_FUNCTIONS
                                                or current.target in _POOL_FUNCTIONS):
            pass
        elif current.op == "call_method" and current.target in _ELEMENTWISE_METHODS:
            pass
        else:
            return f"{current.op} {getattr(current.target, '__name__', current.target)} before the flatten"
        tensors = [a for a in (*current.args, *current.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if len(tensors) != 1:
            return f"{current.name} combines several tensors"
        current = tensors[0]


def _shrink_flatten_chain(chain: FlattenChain, modules: dict[str, nn.Module]) -> ShrunkChain | str:
    """Cut the conv output channels whose block of ``chain.spatial`` Linear columns is all zero."""
    producer, consumer = modules[chain[0]], modules[chain[-1]]
    channels, spatial = producer.out_channels, chain.spatial
    zero = _zero_input_channels(consumer).view(channels, spatial)
    remove = zero.all(dim=1)
    stray = zero & ~remove[:, None]
    if bool(stray.any()):
        columns = torch.nonzero(stray.flatten()).flatten()[:5].tolist()
        reason = (f"Linear {chain[-1]!r}: its zero input columns (e.g. {columns}) do not form whole blocks of "
                  f"{spatial} columns, one per output channel of conv {chain[0]!r}; prune it with "
                  f"LayerConfig(prune='structured', structured_group={spatial})")
        if chain.given:
            raise ShrinkError(reason)
        logger.warning("shrink_structured: %s", reason)
        return reason
    remove = _equal_per_group(remove, producer.groups)
    if bool(remove.all()):  # keep a channel: zero-width layers are not portable
        if producer.groups > 1:
            return "all input channels are zero after a grouped convolution (a zero-width layer is not portable)"
        remove[0] = False
    keep = torch.nonzero(~remove).flatten()
    if len(keep) < channels:
        _cut_outputs(producer, keep)
        for name in chain[1:-1]:
            _cut_norm(modules[name], keep)
        columns = (keep[:, None] * spatial + torch.arange(spatial)).flatten()
        _replace(consumer, "weight", consumer.weight.index_select(1, columns))
        consumer.in_features = len(columns)
    return ShrunkChain(chain[0], chain[-1], list(chain[1:-1]), channels, len(keep), columns_per_channel=spatial)
