"""Fixtures for the obc_native.torch tests (models and calibration batches)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from obc_torch_helpers import MLP, TinyCNN  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Tiny tensors: one intra-op thread is fastest, and far faster on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP()


@pytest.fixture
def mlp_batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(32, 16, generator=generator) for _ in range(4)]


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    model = TinyCNN()
    # non-trivial BatchNorm statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    return model.eval()


@pytest.fixture
def cnn_batches():
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(16, 1, 8, 8, generator=generator) for _ in range(4)]
