"""Every Python example in the README compiles as pasted (issue 11: the Publisher API example
had a top-level ``async with``, a SyntaxError in a module)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
    text = README.read_text("utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize(("line", "code"), python_blocks(), ids=lambda v: str(v)[:12])
def test_each_python_example_compiles_as_a_module(line: int, code: str) -> None:
    """Issue 11: each ```python block of the README compiles as a module (no top-level
    ``await`` or ``async with``)."""
    try:
        # compile(), not ast.parse(): only the compiler refuses async code outside a function
        compile(code, f"README.md:{line}", "exec", dont_inherit=True)
    except SyntaxError as exc:
        pytest.fail(f"the example at README.md line {line} does not compile: {exc}")
