"""deploy/Dockerfile installs what the README installs, runs as a non-root user, and its
HEALTHCHECK asks a real node's /healthz (these machines have no Docker engine: the file is
read, and its commands run, here)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from gateway.cli import build_parser
from gateway.config import Settings, settings_from
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def instruction(name: str) -> list[str]:
    return [rest for word, rest in dockerfile_instructions() if word == name]


def exec_form(text: str) -> list[str]:
    """An instruction's JSON (exec) form, which runs without a shell."""
    value = json.loads(text)
    assert isinstance(value, list), text
    assert all(isinstance(v, str) for v in value), text
    return value


def pip_installs(command: str) -> list[list[str]]:
    """The arguments of each ``pip install`` in a shell command line (options included)."""
    installs = []
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        for index in range(len(words) - 1):
            if words[index] == "pip" and words[index + 1] == "install":
                installs.append(words[index + 2 :])
    return installs


def package_specs(arguments: list[str]) -> list[tuple[str, frozenset[str]]]:
    """What an install names (path or project, with extras); ``-e`` is how, not what."""
    specs = []
    for word in arguments:
        if word.startswith("-"):
            continue
        match = re.fullmatch(r"([^\[\]]+)(?:\[([^\]]*)\])?", word)
        assert match, f"not a package spec: {word!r}"
        extras = frozenset(e.strip() for e in (match.group(2) or "").split(",") if e.strip())
        specs.append((match.group(1), extras))
    return specs


def readme_install() -> list[tuple[str, frozenset[str]]]:
    """The README's install command: the first ``pip install`` of its Quick start."""
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```(?:sh|bash)\n(.+?)\n```", section, re.S):
        for line in block.splitlines():
            if installs := pip_installs(line):
                return package_specs(installs[0])
    raise AssertionError("the README's Quick start installs nothing with pip")


def test_the_image_installs_exactly_what_the_readme_installs() -> None:
    runs = [args for text in instruction("RUN") for args in pip_installs(text)]
    assert len(runs) == 1, f"one pip install in the Dockerfile, not {runs}"
    assert package_specs(runs[0]) == readme_install() == [(".", frozenset())]
    # `.` is the project: the build context's pyproject and packages are copied next to it.
    copied = " ".join(instruction("COPY"))
    for needed in ("pyproject.toml", "README.md", "gateway", "publisher"):
        assert needed in copied, needed


def test_uvloop_and_httptools_come_with_the_install() -> None:
    """No extra install: the project's uvicorn[standard] dependency brings both."""
    uvicorn = [
        Requirement(text)
        for text in PYPROJECT["project"]["dependencies"]
        if Requirement(text).name == "uvicorn"
    ]
    assert uvicorn
    assert "standard" in uvicorn[0].extras
    standard = {
        Requirement(text).name
        for text in importlib.metadata.requires("uvicorn") or []
        if "extra == 'standard'" in text
    }
    assert {"uvloop", "httptools"} <= standard


def test_base_image_is_a_slim_python_that_the_project_supports() -> None:
    (base,) = instruction("FROM")
    match = re.fullmatch(r"python:(3\.\d+)-slim(?:-\w+)?", base)
    assert match, f"a slim Python base with a pinned minor version, not {base!r}"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(match.group(1) + ".0")


def test_it_runs_as_a_numeric_non_root_user_that_it_creates() -> None:
    users = instruction("USER")
    assert users, "no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"a numeric uid, not {users[-1]!r}"
    assert int(uid) != 0, "uid 0 is root"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert any(f"--uid {uid}" in text for text in instruction("RUN")), "the uid is not created"


def test_the_command_is_a_valid_serve_on_all_interfaces() -> None:
    (entrypoint,) = instruction("ENTRYPOINT")
    (cmd,) = instruction("CMD")
    command = exec_form(entrypoint) + exec_form(cmd)
    assert command[:2] == ["sse-gateway", "serve"]
    args = build_parser().parse_args(command[1:])
    settings = settings_from(args, environ={"SSE_GATEWAY_ALLOW_ANONYMOUS": "1"})
    assert settings.host == "0.0.0.0"
    assert instruction("EXPOSE") == [str(settings.port)] == [str(Settings.port)]


def healthcheck_command() -> list[str]:
    (text,) = instruction("HEALTHCHECK")
    options, _, command = text.partition("CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    return exec_form(command)


def test_healthcheck_asks_healthz_without_curl() -> None:
    command = healthcheck_command()
    assert command[0] == "python", "slim has no curl: the check uses Python"
    assert "/healthz" in " ".join(command)


def test_healthcheck_passes_on_a_live_node_and_fails_without_one() -> None:
    """The HEALTHCHECK's own command, run here against a real node on the port it is told
    (``SSE_GATEWAY_PORT``), then against a port where nothing listens."""
    command = [sys.executable, *healthcheck_command()[1:]]
    node = GatewayProcess().start()
    try:
        env = {**os.environ, "SSE_GATEWAY_PORT": str(node.port)}
        assert subprocess.run(command, env=env, timeout=30).returncode == 0
    finally:
        node.close()
    env = {**os.environ, "SSE_GATEWAY_PORT": str(free_port())}
    failed = subprocess.run(command, env=env, timeout=30, capture_output=True)
    assert failed.returncode != 0


@pytest.mark.parametrize("path", ["LICENSE", "README.md", "pyproject.toml"])
def test_files_the_build_copies_exist(path: str) -> None:
    assert (ROOT / path).is_file()
    assert path in " ".join(instruction("COPY"))


def test_license_is_the_one_pyproject_declares() -> None:
    assert PYPROJECT["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c)" in text
    assert "the sse-gateway authors" in text
