"""A project page that follows PostgreSQL rows: sources' status, jobs' progress and new
proposals, written to the outbox by triggers in the same transaction as the change and
published by ``sse-gateway pg-bridge``.

Run: ``python examples/pg_changes/app.py`` (``PG_DSN`` to use an existing database; without it
a throwaway PostgreSQL is started in a temp dir).
"""

from __future__ import annotations

import contextlib
import glob
import html
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from _launch import ROOT, Example, run_example
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
PAGE = (HERE / "page.html").read_text(encoding="utf-8")

SCHEMA = """
CREATE TABLE IF NOT EXISTS sources (
    id serial PRIMARY KEY, project_id text NOT NULL, name text NOT NULL,
    status text NOT NULL DEFAULT 'pending');
CREATE TABLE IF NOT EXISTS jobs (
    id serial PRIMARY KEY, project_id text NOT NULL, name text NOT NULL,
    progress int NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS proposals (
    id serial PRIMARY KEY, project_id text NOT NULL, title text NOT NULL);
CREATE OR REPLACE TRIGGER sources_sse AFTER INSERT OR UPDATE OR DELETE ON sources
    FOR EACH ROW EXECUTE FUNCTION sse_row_change('source', 'project:{project_id}');
CREATE OR REPLACE TRIGGER jobs_sse AFTER INSERT OR UPDATE OR DELETE ON jobs
    FOR EACH ROW EXECUTE FUNCTION sse_row_change('job', 'project:{project_id}');
CREATE OR REPLACE TRIGGER proposals_sse AFTER INSERT OR UPDATE OR DELETE ON proposals
    FOR EACH ROW EXECUTE FUNCTION sse_row_change('proposal', 'project:{project_id}');
"""
SEED = """
INSERT INTO sources (project_id, name, status) VALUES
    ('apollo', 'docs.example.com', 'crawling'), ('apollo', 'wiki.example.com', 'ready'),
    ('zeus', 'shop.example.com', 'pending');
INSERT INTO jobs (project_id, name, progress) VALUES ('apollo', 'embed', 30), ('zeus', 'index', 0);
INSERT INTO proposals (project_id, title) VALUES ('apollo', 'Split the docs index');
"""


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Debian's PostgreSQL in a temp dir on a free loopback port (as ``postgres`` under root)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise SystemExit("PostgreSQL is needed: apt-get install postgresql, or set PG_DSN")
    bins = os.path.dirname(found[-1])
    root = tempfile.mkdtemp(prefix="pg-changes-")
    as_user: list[str] = []
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = f"{root}/data"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "timeout": 60}
    try:
        subprocess.run([*as_user, f"{bins}/initdb", "-D", data, "-U", "postgres", "-A", "trust",
                        "-N"], check=True, **quiet)  # fmt: skip
        options = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off"
        subprocess.run([*as_user, f"{bins}/pg_ctl", "-D", data, "-o", options, "-w", "-t", "30",
                        "-l", f"{root}/log", "start"], check=True, **quiet)  # fmt: skip
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5"
    finally:
        subprocess.run([*as_user, f"{bins}/pg_ctl", "-D", data, "-m", "fast", "-w", "-t", "30",
                        "stop"], **quiet)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def snapshot(dsn: str, project: str) -> dict[str, list[dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        out: dict[str, list[dict[str, Any]]] = {}
        for table in ("sources", "jobs", "proposals"):
            cur = conn.execute(
                f"SELECT to_jsonb(t) FROM {table} t WHERE project_id = %s ORDER BY id", (project,)
            )
            out[table] = [row[0] for row in cur]
        return out


def build(example: Example, dsn: str, stack: contextlib.ExitStack) -> Starlette:
    with psycopg.connect(dsn, autocommit=True) as conn:
        fresh = conn.execute("SELECT to_regclass('sources') IS NULL").fetchone() == (True,)
    bridge = [sys.executable, "-m", "gateway.cli", "pg-bridge"]
    subprocess.run([*bridge, "install", "--dsn", dsn], cwd=ROOT, check=True, timeout=60)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        if fresh:
            conn.execute(SEED)
    app_token = example.token("pg-changes", subscribe=["project:*"], publish=["project:*"],
                              ttl=7 * 86400)  # fmt: skip
    process = subprocess.Popen(
        [*bridge, "run", "--dsn", dsn, "--url", example.publisher_url(), "--token", app_token,
         "--poll-interval", "1"], cwd=ROOT,
    )  # fmt: skip
    stack.callback(lambda: (process.terminate(), process.wait(10)))
    pub = stack.enter_context(example.publisher(app_token))

    def page(request: Request) -> HTMLResponse:
        """The snapshot: first the stream position, then the rows, so a change committed in
        between is replayed by the stream."""
        project = request.path_params["project"]
        position = pub.position(f"project:{project}")
        config = {"gateway": example.gateway_url, "project": project, "position": position,
                  "rows": snapshot(dsn, project)}  # fmt: skip
        body = PAGE.replace("{{project}}", html.escape(project)).replace(
            "{{config}}", json.dumps(config).replace("<", "\\u003c")
        )
        return HTMLResponse(body, headers={"cache-control": "no-store"})

    def token(request: Request) -> PlainTextResponse:
        """Per-project access: a token that reads this project's topic only. A real app checks
        here that the logged-in user belongs to the project."""
        project = request.path_params["project"]
        tok = example.token(f"viewer-{project}", subscribe=[f"project:{project}"], ttl=300)
        return PlainTextResponse(tok, headers={"cache-control": "no-store"})

    print(f"postgres: {dsn}", flush=True)
    return Starlette(
        routes=[
            Route("/", lambda request: RedirectResponse("/projects/apollo")),
            Route("/projects/{project}", page),
            Route("/projects/{project}/token", token),
        ],
        lifespan=lambda app: lifespan(stack),
    )


@contextlib.asynccontextmanager
async def lifespan(stack: contextlib.ExitStack) -> AsyncIterator[None]:
    yield
    stack.close()


def main() -> None:
    with contextlib.ExitStack() as stack:
        dsn = os.environ.get("PG_DSN") or stack.enter_context(throwaway_postgres())
        run_example(lambda example: build(example, dsn, stack), jwt=True)


if __name__ == "__main__":
    main()
