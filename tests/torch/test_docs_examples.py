"""The ```python blocks of docs/torch.md run, in order, in one namespace: the docs cannot rot.

Each block is compiled as the file docs/torch.md, padded to its line there, so a failure's
traceback shows the page's own line. The blocks run in a temporary working directory (they write
recipe files and a saved model) with printing silenced.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "torch.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, source)`` of every ```python block of ``text``, in order."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in FENCE.finditer(text)]


def test_extraction_finds_the_blocks():
    text = "intro\n```python\na = 1\n```\n```text\nnot code\n```\n```python\nb = 2\nc = 3\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = 2\nc = 3\n")]


def test_torch_md_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 15, "docs/torch.md lost its examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_torch_md"}
    for line, source in blocks:
        # pad with newlines so that tracebacks give the line number in docs/torch.md
        code = compile("\n" * (line - 1) + source, str(DOC), "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)


def test_cli_md_names_every_command_and_option():
    """docs/cli.md documents every command and option the parser has (a new option needs docs)."""
    import argparse

    from obc_native.cli import build_parser

    text = (DOC.parent / "cli.md").read_text(encoding="utf-8")
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(commands.choices) == ["compress", "demo", "export", "report", "shrink"]
    missing = []
    for name, parser in commands.choices.items():
        if f"## `obc-native {name}`" not in text:
            missing.append(f"section for {name}")
        for action in parser._actions:
            missing += [f"{name} {flag}" for flag in action.option_strings if flag.startswith("--")
                        and flag != "--help" and f"`{flag}" not in text]
    assert not missing, f"docs/cli.md does not document: {missing}"
