"""compress() rejects a num_threads above 1024 at once, before any calibration pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from obc_native.torch import compress


def test_compress_rejects_too_many_threads_before_calibrating():
    calls = []
    model = nn.Sequential(nn.Linear(8, 4))
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"num_threads: expected an integer in \[0, 1024\]"):
        compress(model, [torch.randn(16, 8)], {"prune": "unstructured", "sparsity": 0.5}, num_threads=10**6)
    assert calls == []
