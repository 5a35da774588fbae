"""shrink_structured checks given chains: on example inputs (the shrunk model's output must be the
masked model's), else against the torch.fx graph when the model traces. A chain whose channels
also reach a residual add or a non-element-wise op used to be cut silently."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from obc_native.torch import ShrinkError, shrink_structured

pytestmark = pytest.mark.torch


class Blocks(nn.Module):
    """fc1 -> relu -> fc2 (a true chain); fc3 -> softmax over features -> fc4 (softmax mixes the
    channels); fc5 -> (+ its input, a residual add) -> fc6."""

    def __init__(self, dynamic=False):
        super().__init__()
        self.dynamic = dynamic
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.fc3, self.fc4 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.fc5, self.fc6 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        if self.dynamic and x.sum() > 1e9:  # control flow on a value: torch.fx cannot trace it
            x = -x
        x = self.fc2(torch.relu(self.fc1(x)))
        x = self.fc4(torch.softmax(self.fc3(x), dim=-1))
        return self.fc6(self.fc5(x) + x)


def masked_blocks(dynamic=False):
    torch.manual_seed(0)
    model = Blocks(dynamic).eval()
    with torch.no_grad():
        for name in ("fc2", "fc4", "fc6"):
            getattr(model, name).weight[:, :3] = 0  # structured pruning: 3 zero input channels each
    return model


def state_of(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_unchanged(model, before):
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert model.fc1.out_features == 12 and model.fc3.out_features == 12 and model.fc5.out_features == 8


X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_true_chain_shrinks_with_the_example_check(dynamic):
    model = masked_blocks(dynamic)
    masked = copy.deepcopy(model)
    report = shrink_structured(model, [("fc1", "fc2")], example_inputs=X)
    assert [c.kept for c in report.chains] == [9]
    torch.testing.assert_close(model(X), masked(X))


@pytest.mark.parametrize("chain, index, cause", [
    (("fc3", "fc4"), 1, "more than float rounding"),  # softmax over the cut channels: silently wrong
    (("fc5", "fc6"), 1, "the model does not run on them after"),  # the residual add no longer fits
])
@pytest.mark.parametrize("dynamic", [False, True])
def test_a_broken_chain_is_named_on_the_example_and_the_model_restored(chain, index, cause, dynamic):
    model = masked_blocks(dynamic)
    before = state_of(model)
    with pytest.raises(ShrinkError, match=rf"chains\[{index}\] \({chain[0]} -> {chain[1]}\): .*{cause}.*"
                                          "the model is unchanged"):
        shrink_structured(model, [("fc1", "fc2"), chain], example_inputs=(X,))
    assert_unchanged(model, before)
    assert model.fc2.in_features == 12  # the good chain before it was put back too


@pytest.mark.parametrize("chain, why", [(("fc3", "fc4"), "call_function softmax"),
                                        (("fc5", "fc6"), "call_function add")])
def test_without_an_example_a_traceable_model_checks_chains_on_its_graph(chain, why):
    model = masked_blocks()
    before = state_of(model)
    with pytest.raises(ShrinkError, match=rf"chains\[0\] \({chain[0]} -> {chain[1]}\): the torch.fx graph does not "
                                          rf"show this chain \(.*{why}.*\).*example_inputs="):
        shrink_structured(model, [chain])
    assert_unchanged(model, before)
    assert shrink_structured(model, [("fc1", "fc2")]).chains[0].kept == 9


def test_without_an_example_an_untraceable_model_takes_the_chain_unchecked():
    """What the docstring says: nothing to check it against (the softmax chain is cut)."""
    model = masked_blocks(dynamic=True)
    assert shrink_structured(model, [("fc3", "fc4")]).chains[0].kept == 9


def test_example_arguments_are_checked():
    model = masked_blocks()
    with pytest.raises(TypeError, match="example_inputs: expected a tensor or a tuple"):
        shrink_structured(model, [("fc1", "fc2")], example_inputs=[X])
    with pytest.raises(TypeError, match="example_kwargs: expected a dict"):
        shrink_structured(model, [("fc1", "fc2")], example_inputs=X, example_kwargs=[("x", X)])
    with pytest.raises(ShrinkError, match="example_inputs: the model does not run on them before any change"):
        shrink_structured(model, [("fc1", "fc2")], example_inputs=torch.randn(2, 5))
    assert model.fc1.out_features == 12


def test_the_example_runs_in_eval_mode_and_training_flags_are_restored():
    model = masked_blocks()
    model.train()
    model.fc2.eval()
    shrink_structured(model, [("fc1", "fc2")], example_inputs=X)
    assert model.training and model.fc1.training and not model.fc2.training
