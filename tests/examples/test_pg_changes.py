"""Issue 12, pg_changes: a row updated in PostgreSQL appears on the project's page, and a
project's page sees only its own project's changes (embedded engine, and Redis behind a
balancer)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.examples.conftest import Launch, screenshot
from tests.support.postgres import INSTALL_HINT, bin_dir, own_database, postgres_server

psycopg = pytest.importorskip("psycopg", reason="psycopg is needed: pip install -e '.[pg]'")

WAIT_MS = 15_000


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    if bin_dir() is None:
        pytest.skip(INSTALL_HINT)
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture
def dsn(postgres: str) -> Iterator[str]:
    with own_database(postgres) as own:
        yield own


def test_a_row_update_in_postgres_appears_on_the_project_page(
    browser: Any, launch: Launch, dsn: str
) -> None:
    example = launch("pg_changes", env={"PG_DSN": dsn})
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(example.url + "projects/apollo")
        page.locator("#conn").filter(has_text="open").wait_for(timeout=WAIT_MS)
        source = page.locator("#sources li", has_text="docs.example.com").locator(".status")
        assert source.text_content() == "crawling"

        with psycopg.connect(dsn) as conn:
            conn.execute("UPDATE sources SET status = 'ready' WHERE name = 'docs.example.com'")
            conn.execute("UPDATE jobs SET progress = 80 WHERE name = 'embed'")
            conn.execute(
                "INSERT INTO proposals (project_id, title) VALUES ('apollo', 'Add a changelog')"
            )
            conn.execute("UPDATE sources SET status = 'failed' WHERE project_id = 'zeus'")
            with conn.transaction(force_rollback=True):
                conn.execute("UPDATE jobs SET progress = 99 WHERE name = 'embed'")
        source.filter(has_text="ready").wait_for(timeout=WAIT_MS)
        page.locator("#jobs li", has_text="embed 80 %").wait_for(timeout=WAIT_MS)
        page.locator("#proposals li", has_text="Add a changelog").wait_for(timeout=WAIT_MS)
        # Another project's change and the rolled-back one never reach this page (the
        # proposal committed after them, and arrived, so they would have arrived before).
        assert page.locator("#sources li").count() == 2
        assert "99" not in (page.locator("#jobs").text_content() or "")
        screenshot(page, f"example-pg_changes-{launch.mode}")  # type: ignore[attr-defined]
    finally:
        context.close()
