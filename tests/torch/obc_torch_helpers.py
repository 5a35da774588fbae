"""Models and brute-force references shared by the obc_native.torch tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

nn = torch.nn


def reference_patches(x: np.ndarray, module) -> np.ndarray:
    """Unfolded conv input by explicit loops: ``(groups, n, C*K)``, columns ``c*K + k``.

    ``x`` is ``(B, C_in, *spatial)`` float64; handles stride, padding (ints, 'same', 'valid'
    with any padding_mode), dilation and groups, independently of F.unfold.
    """
    kernel = tuple(module.kernel_size)
    dims = len(kernel)
    stride, dilation = tuple(module.stride), tuple(module.dilation)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = [(0, 0)] * dims
        else:
            pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in module.padding]
    mode = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}[module.padding_mode]
    x = np.pad(x, [(0, 0), (0, 0)] + pads, mode=mode)
    batch, channels = x.shape[:2]
    out_sizes = [
        (x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(dims)
    ]
    groups = module.groups
    per_group = channels // groups
    result = [[] for _ in range(groups)]
    for b in range(batch):
        for position in np.ndindex(*out_sizes):
            for g in range(groups):
                patch = []
                for c in range(g * per_group, (g + 1) * per_group):
                    for offset in np.ndindex(*kernel):
                        index = tuple(position[i] * stride[i] + offset[i] * dilation[i] for i in range(dims))
                        patch.append(x[(b, c) + index])
                result[g].append(patch)
    return np.array(result, dtype=np.float64)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU x2 + Linear head on 1x8x8 inputs (like the demo, smaller)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, sizes=(16, 32, 32, 8), bias=True):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def tiny_gpt2(seed: int = 0, layers: int = 1):
    """A randomly initialised GPT-2 (no download) with HF Conv1D layers."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        n_embd=16,
        n_layer=layers,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def write_manifest(directory, manifest: dict) -> None:
    """Write ``manifest`` as the model directory's manifest.json, with a matching manifest_sha256
    (computed here as documented: SHA-256 of the canonical JSON of the other fields), so a test
    can edit a field and reach the checks behind the manifest checksum."""
    import hashlib
    import json
    import os

    rest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    full = dict(rest, manifest_sha256=hashlib.sha256(canonical.encode("utf-8")).hexdigest())
    with open(os.path.join(os.fspath(directory), "manifest.json"), "w", encoding="utf-8") as handle:
        json.dump(full, handle)


def quantized_mlp():
    """(model, report): a small MLP compressed to 4 bits in groups of 32 (no correction, no
    baseline), for tests of what is written from a report."""
    from obc_native.torch import LayerConfig, compress

    torch.manual_seed(0)
    model = MLP(sizes=(64, 32))
    report = compress(model, [torch.randn(16, 64)], LayerConfig(bits=4, group_size=32), correction=None,
                      baseline=False, quiet=True)
    return model, report
