"""A PostgreSQL server for the session (skipped with a reason where none is installed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import INSTALL_HINT, bin_dir, postgres_server


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    if bin_dir() is None:
        pytest.skip(INSTALL_HINT)
    pytest.importorskip("psycopg", reason="psycopg is needed: pip install -e '.[pg]'")
    with postgres_server() as dsn:
        yield dsn
