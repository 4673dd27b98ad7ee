"""A throwaway PostgreSQL (Debian's ``postgresql``): initdb in a temp dir, on a free loopback
port, run as the ``postgres`` user when the tests run as root (postgres refuses root)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

from tests.support.ports import free_port
from tests.support.waiting import WaitTimeout, wait_until

INSTALL_HINT = "PostgreSQL is needed: install Debian's postgresql (apt-get install postgresql)"


def bin_dir() -> str | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return os.path.dirname(found[-1]) if found else None


def _as_user(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    return ["runuser", "-u", "postgres", "--", *args]


@contextlib.contextmanager
def postgres_server(deadline: float = 30.0) -> Iterator[str]:
    """Start a server and yield its DSN (user ``postgres``, database ``postgres``); stop it and
    remove its data directory afterwards."""
    bins = bin_dir()
    if bins is None:
        raise FileNotFoundError(INSTALL_HINT)
    root = tempfile.mkdtemp(prefix="sse-gateway-pg-")
    data = os.path.join(root, "data")
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(root, entry.pw_uid, entry.pw_gid)
    port = free_port()
    process: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            _as_user([f"{bins}/initdb", "-D", data, "-U", "postgres", "-A", "trust", "-N"]),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
        process = subprocess.Popen(
            _as_user([
                f"{bins}/postgres", "-D", data, "-p", str(port), "-h", "127.0.0.1",
                "-k", root, "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off", "-c", "max_connections=50",
            ]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        ready = time.monotonic() + deadline
        started = process

        def answers() -> bool:
            check = subprocess.run(
                [f"{bins}/pg_isready", "-h", "127.0.0.1", "-p", str(port), "-t", "1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5,
            )  # fmt: skip
            return check.returncode == 0 or started.poll() is not None

        try:
            wait_until(answers, "postgres to answer", max(0.0, ready - time.monotonic()))
        except WaitTimeout:
            raise RuntimeError("postgres did not start") from None
        if process.poll() is not None:
            raise RuntimeError(f"postgres did not start (exit {process.poll()})")
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5"
    finally:
        if process is not None and process.poll() is None:
            process.terminate()  # smart shutdown; fast enough with no clients left
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def own_database(server_dsn: str) -> Iterator[str]:
    """A fresh database on the server for one test; yield its DSN, drop it (and end its
    sessions) afterwards."""
    import psycopg  # optional (the ``pg`` extra): imported only by tests that need it

    name = "t" + uuid.uuid4().hex[:10]
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{server_dsn} dbname={name}"
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
