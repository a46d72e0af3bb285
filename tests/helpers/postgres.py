"""A throwaway PostgreSQL server for tests (fixture ``postgres_url``).

``initdb`` a fresh cluster in a temporary folder, start it with ``pg_ctl`` on a free loopback
port (unix socket in the same folder), create a database, yield a SQLAlchemy URL
(``postgresql+psycopg://...``) and stop the server. PostgreSQL refuses to run as root, so
when the tests run as root the server runs as the ``postgres`` user (``runuser``) in a folder
under the system temp dir that this user owns (pytest's tmp_path is private to root).
Skipped with the reason when the server binaries or psycopg are missing.

Used by tests/integration/test_controller_postgres.py; import the fixture into a test module
with ``from tests.helpers.postgres import postgres_url  # noqa: F401``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.broker import free_port, wait_port
from tests.helpers.components import missing

BIN_DIRS = [Path(p) for p in sorted(
    (str(x) for x in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)]


def pg_bin(name: str) -> Path | None:
    """Path of a PostgreSQL server program (newest /usr/lib/postgresql/N/bin first)."""
    for d in BIN_DIRS:
        if (d / name).is_file():
            return d / name
    found = shutil.which(name)
    return Path(found) if found else None


def _runner() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) to run the server as a non-root user."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable("running as root and there is no 'postgres' user to run "
                                  "PostgreSQL as") from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid
    return ["su", "postgres", "-s", "/bin/sh", "-c"], pw.pw_uid, pw.pw_gid


def _run(prefix: list[str], argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    if prefix and prefix[0] == "su":
        import shlex

        cmd = prefix + [" ".join(shlex.quote(a) for a in argv)]
    else:
        cmd = prefix + argv
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,  # type: ignore[call-overload]
                          **kw)


class PostgresUnavailable(Exception):
    """The server binaries or psycopg are missing (the fixture skips; benchmarks say so)."""


@contextmanager
def throwaway_postgres(*, max_connections: int = 50) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database on a throwaway PostgreSQL server (stopped after);
    used by the fixture and by benchmarks (bench/fleet_scale.py)."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    try:
        import psycopg
    except ImportError:
        raise PostgresUnavailable("psycopg is not installed (pip install 'psycopg[binary]')"
                                  ) from None
    prefix, uid, gid = _runner()
    root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    data, sock, logf = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if uid is not None and gid is not None:
        for p in (root, sock):
            os.chown(p, uid, gid)
    port = free_port()
    started = False
    try:
        r = _run(prefix, [str(initdb), "-D", str(data), "-U", "edgefleet", "-A", "trust",
                          "-E", "UTF8", "--no-sync"])
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr or r.stdout}")
        opts = (f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off "
                f"-c max_connections={max_connections}")
        r = _run(prefix, [str(pg_ctl), "-D", str(data), "-l", str(logf), "-o", opts,
                          "-w", "-t", "60", "start"])
        if r.returncode != 0:
            log = logf.read_text(errors="replace") if logf.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr or r.stdout}\n{log[-2000:]}")
        started = True
        wait_port(port, timeout_s=30)
        with psycopg.connect(host="127.0.0.1", port=port, user="edgefleet", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE edgefleet")
        yield f"postgresql+psycopg://edgefleet@127.0.0.1:{port}/edgefleet"
    finally:
        if started:
            _run(prefix, [str(pg_ctl), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def postgres_or_missing() -> Iterator[str]:
    """:func:`throwaway_postgres` for fixtures (``yield from``): a missing server skips the
    test, or fails it under CI=true; a server that will not start fails it."""
    try:
        cm = throwaway_postgres()
        url = cm.__enter__()
    except PostgresUnavailable as e:
        missing(str(e))
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh database on a throwaway PostgreSQL server."""
    yield from postgres_or_missing()
