"""The project keeps its promises about itself: the README's commands are the ones CI runs,
every setting is documented, and the code passes ruff and mypy --strict."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _command_after(heading: str) -> str:
    section = README.split(heading, 1)[1]
    match = re.search(r"```(?:sh|bash)\n(.+?)\n```", section, re.S)
    assert match, f"no command block after {heading!r}"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command() -> None:
    command = _command_after("## Running the tests")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci


def test_readme_quick_start_installs_and_serves_with_one_command() -> None:
    command = _command_after("## Quick start")
    assert command.splitlines()[0] == "pip install -e . && sse-gateway serve --demo"


def test_every_setting_is_documented_with_its_flag_and_variable() -> None:
    for field in dataclasses.fields(Settings):
        flag = "--" + field.name.replace("_", "-")
        assert f"`{flag}`" in README, flag
        assert f"`{ENV_PREFIX}{field.name.upper()}`" in README, field.name


LINTED = ["gateway", "publisher", "tests", "examples", "bench", "deploy"]
"""Everything Python that the project ships or runs; the README's Python examples too."""


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", *LINTED],
        ["ruff", "format", "--check", *LINTED, "README.md"],
        ["mypy", "--strict", "gateway", "publisher", "tests"],
    ],
    ids=["ruff-check", "ruff-format", "mypy-strict"],
)
def test_code_quality(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
