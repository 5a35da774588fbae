"""Importing obc_native (and its CLI module) never imports torch; obc_native.torch does."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.torch


def _imports_torch(statement: str) -> bool:
    code = f"import sys; {statement}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip() == "True"


def test_core_and_cli_do_not_import_torch():
    assert not _imports_torch("import obc_native, obc_native.cli, obc_native.demo")


def test_torch_subpackage_imports_torch():
    assert _imports_torch("import obc_native.torch")
