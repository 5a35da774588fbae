"""Installing the torch extra keeps a user's torch, and the documented installs never resolve an
unpinned torch (issue 16, item 5): the extras ask only a lower bound; the README and
scripts/test.sh install the pinned torch before any extra."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIN = '"torch==2.13.0"'

if not (ROOT / "pyproject.toml").exists():  # pragma: no cover - tests run outside a checkout
    pytest.skip("needs the source tree", allow_module_level=True)


def _extra(name: str) -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf"^{name} = \[(.*)\]$", text, flags=re.MULTILINE)
    assert match, f"pyproject.toml: no extra {name!r}"
    return re.findall(r'"([^"]+)"', match.group(1))


@pytest.mark.parametrize("extra", ["torch", "bench"])
def test_extras_ask_a_lower_bound_on_torch_not_a_pin(extra):
    torch_requirements = [r for r in _extra(extra) if re.match(r"torch\b", r)]
    assert torch_requirements == ["torch>=2.0"], torch_requirements


def _pip_installs(text: str) -> list[str]:
    """The pip install commands of a shell text, in order (one per `pip install`)."""
    return [m.group(0) for m in re.finditer(r"pip install[^\n&]*", text)]


@pytest.mark.parametrize("path", ["README.md", "scripts/test.sh"])
def test_pinned_torch_is_installed_before_any_extra(path):
    installs = _pip_installs((ROOT / path).read_text().replace("\\\n", " "))
    extras = [i for i, cmd in enumerate(installs) if re.search(r"\.\[[^\]]*(torch|bench)", cmd)]
    pins = [i for i, cmd in enumerate(installs) if PIN in cmd]
    assert extras, f"{path}: no install of the torch extra found in {installs}"
    for i in extras:
        assert any(p < i for p in pins), f"{path}: {installs[i]!r} runs before {PIN} is installed"
