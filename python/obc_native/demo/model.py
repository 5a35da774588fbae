"""The demo's model and data: a small CNN on scikit-learn's 8x8 handwritten digits (no download).

Data: ``sklearn.datasets.load_digits`` (1797 grey 8x8 images, pixel values 0..16, shipped with
scikit-learn), scaled to [0, 1], shuffled with a fixed seed and split into 1297 training and
500 test images. The calibration set is the first ``calibration_size`` training images.

Model (:class:`DigitsCNN`, 15.2k weights in its Conv2d and Linear layers)::

    features.0  Conv2d(1, 16, 3, padding=1)            -> BN -> ReLU   16 x 8 x 8
    features.3  Conv2d(16, 32, 3, stride=2, padding=1) -> BN -> ReLU   32 x 4 x 4
    features.6  Conv2d(32, 32, 3, stride=2, padding=1) -> BN -> ReLU   32 x 2 x 2
    classifier  Linear(128, 10)

The shipped weights (``digits_cnn.safetensors``) are produced by ``scripts/train_demo_model.py``
with :func:`train_model`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "DigitsCNN", "DigitsData", "load_data", "train_model", "load_pretrained", "accuracy", "evaluate", "WEIGHTS_PATH"
]

logger = logging.getLogger("obc_native.demo")

WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_cnn.safetensors")
TEST_SIZE = 500


class DigitsCNN(nn.Module):
    """Three Conv-BN-ReLU stages and a linear classifier for 1 x 8 x 8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 1, 8, 8) float in [0, 1]; returns (B, 10) logits."""
        return self.classifier(self.features(x).flatten(1))


@dataclass
class DigitsData:
    """Train / test tensors: images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def calibration(self, size: int = 256, batch_size: int = 64) -> list[torch.Tensor]:
        """The first ``size`` training images in batches (what the compressors see)."""
        return list(self.train_x[:size].split(batch_size))


def load_data(seed: int = 0) -> DigitsData:
    """The digits split used by the demo (fixed shuffle ``seed``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    images, labels = images[order], labels[order]
    train = len(labels) - TEST_SIZE
    return DigitsData(images[:train], labels[:train], images[train:], labels[train:])


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy in percent, mean cross-entropy in nats), model in eval mode."""
    training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(images)
    model.train(training)
    correct = (logits.argmax(dim=1) == labels).sum().item()
    return 100.0 * correct / len(labels), float(nn.functional.cross_entropy(logits, labels))


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent, model in eval mode."""
    return evaluate(model, images, labels)[0]


def train_model(data: DigitsData | None = None, *, epochs: int = 40, seed: int = 0) -> DigitsCNN:
    """Train :class:`DigitsCNN` with Adam (a few seconds on a CPU); deterministic for a seed."""
    data = data or load_data()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for batch in order.split(64):
            x = data.train_x[batch]
            # one-pixel random shifts as light augmentation
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            optimizer.zero_grad()
            loss_fn(model(x), data.train_y[batch]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def _cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "obc_native", "digits_cnn.safetensors")


def load_pretrained(path: str = WEIGHTS_PATH) -> DigitsCNN:
    """The shipped trained model (safetensors; no pickle).

    Should the shipped file be missing (e.g. a trimmed install), the model is trained once with
    :func:`train_model` and cached under ``$XDG_CACHE_HOME/obc_native`` (``~/.cache``).
    """
    from safetensors.torch import load_file, save_file

    if not os.path.isfile(path):
        path = _cache_path()
        if not os.path.isfile(path):
            logger.warning("demo weights not found; training the digits CNN once (cached in %s)", path)
            model = train_model()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
            return model
    model = DigitsCNN()
    model.load_state_dict(load_file(path))
    return model.eval()
