"""The layers keep to their imports, read from the source with ``ast``:

- ``gateway/`` reaches ``publisher/`` only through public modules (no ``publisher._*``);
- ``publisher/`` never imports the gateway or a web framework (workers import it alone);
- ``publisher/protocol.py``, the contract both packages share, does no I/O: the standard
  library less its I/O modules, and orjson;
- no module imports another module's private names, and a private module is imported only
  from inside its own package;
- the defaults of the settings both packages share are written once, in the protocol module.

Each rule is also run on a small source that breaks it, so a rule that stopped matching
anything would fail here rather than pass in silence.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "publisher")
PROTOCOL = "publisher.protocol"
NOT_FOR_PUBLISHER = frozenset({"gateway", "starlette", "uvicorn"})
"""What a worker importing ``publisher`` must never pull in."""
IO_MODULES = frozenset({
    "asyncio", "concurrent", "http", "io", "logging", "multiprocessing", "os", "pathlib",
    "select", "selectors", "shutil", "signal", "socket", "ssl", "subprocess", "threading",
    "time", "urllib",
})  # fmt: skip
"""Standard-library modules that do I/O, wait, or read the clock."""
PROTOCOL_THIRD_PARTY = frozenset({"orjson"})


@dataclass(frozen=True)
class Import:
    module: str
    """The absolute module named by the import."""
    names: tuple[str, ...]
    """The names taken from it (``from m import a, b``); empty for ``import m``."""
    line: int


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


MODULES = project_modules()


def _is_package(module: str) -> bool:
    path = MODULES.get(module)
    return path is not None and path.name == "__init__.py"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _in_project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def imports_of(tree: ast.AST, module: str) -> list[Import]:
    """Every import of a module, those inside functions and ``TYPE_CHECKING`` blocks too."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append(Import(base, tuple(a.name for a in node.names), node.lineno))
    return found


def _module_names(tree: ast.AST) -> dict[str, str]:
    """Local names bound to a module of the project, and the module each names."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _in_project(alias.name):
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and _in_project(node.module):
            for alias in node.names:
                if f"{node.module}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _private_attributes(tree: ast.AST) -> list[tuple[str, int]]:
    """``module._name`` reached through a name bound to a project module."""
    bound = _module_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = [node.attr]
        value = node.value
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        path = [bound[value.id], *reversed(chain)]
        if any(_is_private(part) for part in path[1:]):
            found.append((".".join(path), node.lineno))
    return found


def violations(module: str, source: str) -> list[str]:
    """What ``module`` (whose text is ``source``) does against the layering rules."""
    tree = ast.parse(source)
    found = []
    for imp in imports_of(tree, module):
        where = f"{module}:{imp.line}"
        parts = imp.module.split(".")
        top = parts[0]
        layer = module.split(".")[0]
        if layer == "gateway" and top == "publisher" and any(map(_is_private, parts[1:])):
            found.append(f"{where}: gateway imports the private module {imp.module}")
        if layer == "publisher" and top in NOT_FOR_PUBLISHER:
            found.append(f"{where}: publisher imports {imp.module}")
        if module == PROTOCOL:
            if _in_project(imp.module):
                found.append(f"{where}: the protocol module imports {imp.module}")
            elif top in IO_MODULES or (
                top not in sys.stdlib_module_names and top not in PROTOCOL_THIRD_PARTY
            ):
                found.append(f"{where}: the protocol module imports {imp.module} (I/O)")
        if not _in_project(imp.module):
            continue
        for index, part in enumerate(parts[1:], start=1):
            owner = ".".join(parts[:index])
            if _is_private(part) and not (module == owner or module.startswith(owner + ".")):
                found.append(f"{where}: {imp.module} is private to {owner}")
                break
        private = [name for name in imp.names if _is_private(name)]
        if private and imp.module != module:
            found.append(f"{where}: imports the private {', '.join(private)} of {imp.module}")
    for path, line in _private_attributes(tree):
        found.append(f"{module}:{line}: reaches the private {path}")
    return found


SHARED_SETTINGS = frozenset({"prefix", "max_events", "max_age", "idempotency_ttl"})
"""Settings whose defaults ``publisher.protocol`` holds (``DEFAULT_PREFIX``, ...)."""


def spelled_defaults(module: str, source: str) -> list[str]:
    """Parameters and fields named for a shared setting whose default is written as a value
    (``prefix: str = "sse"``, ``_opt(2000, ...)``) instead of the protocol's constant. Zero
    is allowed: it means "off", not a default of the setting."""

    def literal(node: ast.expr | None) -> bool:
        if isinstance(node, ast.Call) and node.args:  # a Settings field: _opt(default, help)
            node = node.args[0]
        return isinstance(node, ast.Constant) and node.value not in (0, None)

    found = []
    for node in ast.walk(ast.parse(source)):
        pairs: list[tuple[str, ast.expr | None]] = []
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            pairs.append((node.target.id, node.value))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            with_defaults = positional[len(positional) - len(args.defaults) :]
            pairs += [(a.arg, d) for a, d in zip(with_defaults, args.defaults, strict=True)]
            pairs += [(a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
        for name, default in pairs:
            if name in SHARED_SETTINGS and literal(default):
                line = getattr(node, "lineno", 0)
                found.append(f"{module}:{line}: {name} defaults to a value, not a name")
    return found


def test_shared_defaults_have_one_source() -> None:
    found = [
        line
        for name, path in MODULES.items()
        if name != PROTOCOL
        for line in spelled_defaults(name, path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize(
    "source",
    [
        'class S:\n    prefix: str = _opt("sse", "help")',
        "class S:\n    max_events: int = 2000",
        "def f(a, idempotency_ttl: float = 300.0): ...",
        "async def f(*, max_age=3600.0): ...",
    ],
)
def test_a_default_spelled_as_a_value_is_caught(source: str) -> None:
    assert spelled_defaults("gateway.x", source) != []


def test_a_default_spelled_by_name_or_off_is_not() -> None:
    source = "class S:\n    prefix: str = _opt(DEFAULT_PREFIX, 'h')\ndef f(max_age=0.0): ..."
    assert spelled_defaults("gateway.x", source) == []


def test_every_module_keeps_to_its_layer() -> None:
    assert {"gateway.app", "publisher", PROTOCOL, "publisher.redis_transport"} <= set(MODULES)
    found = [v for name, path in MODULES.items() for v in violations(name, path.read_text())]
    assert found == []


def test_the_gateway_imports_no_private_module_of_the_publisher() -> None:
    """Acceptance 2 of issue 14, on its own: the twelve ``publisher._*`` imports are gone."""
    for name, path in MODULES.items():
        if name.startswith("gateway"):
            modules = [imp.module for imp in imports_of(ast.parse(path.read_text()), name)]
            assert [m for m in modules if m.startswith("publisher._")] == [], name


@pytest.mark.parametrize(
    ("module", "source", "complaint"),
    [
        ("gateway.app", "from publisher._redis import NotReplicated", "private module"),
        ("gateway.hub", "import publisher._frames", "private module"),
        ("gateway.stream", "def f():\n    from publisher._schema import id_key", "private"),
        ("publisher.subscriber", "from gateway.app import Gateway", "publisher imports gateway"),
        ("publisher._http", "import starlette.responses", "publisher imports starlette"),
        ("publisher.protocol", "import asyncio", "(I/O)"),
        ("publisher.protocol", "from socket import socket", "(I/O)"),
        ("publisher.protocol", "import redis", "(I/O)"),
        ("publisher.protocol", "import httpx", "(I/O)"),
        ("publisher.protocol", "from publisher._retry import Backoff", "protocol module imports"),
        ("gateway.app", "from gateway.auth import _glob", "private _glob of gateway.auth"),
        ("publisher", "from publisher._job import _secret", "private _secret"),
        ("gateway.cli", "from gateway import pg_bridge\npg_bridge._run()", "pg_bridge._run"),
        ("gateway.cli", "import gateway.auth\ngateway.auth._x", "gateway.auth._x"),
        ("gateway.app", "from . import _private", "private _private of gateway"),
    ],
)
def test_each_rule_catches_what_it_forbids(module: str, source: str, complaint: str) -> None:
    found = violations(module, source)
    assert len(found) >= 1
    assert any(complaint in line for line in found), found


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("publisher.redis_transport", "from publisher._retry import Backoff"),
        ("publisher", "from publisher._job import Job"),
        ("gateway.app", "from publisher.protocol import Keys\nfrom publisher import Publisher"),
        ("gateway.engines.redis", "from publisher.redis_transport import connect_async"),
        ("publisher.protocol", "import re\nimport orjson\nfrom dataclasses import dataclass"),
        ("gateway.app", "self._ready = True\nobj.__class__"),
    ],
)
def test_what_the_rules_allow(module: str, source: str) -> None:
    assert violations(module, source) == []
