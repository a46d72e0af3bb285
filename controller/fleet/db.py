"""Database engine and sessions for the fleet tables (controller.fleet.models).

SQLite with WAL by default (embedded mode), PostgreSQL by URL (cluster mode). Used by
ControllerCore, the ingest, the reconcilers, the OTA publisher and the API.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from controller.fleet import enroll, lease, models, windows  # noqa: F401  (registers the tables)

log = logging.getLogger(__name__)


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """Engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys; tables created."""
    kwargs: dict[str, Any] = {"echo": echo}
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _rec: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    SQLModel.metadata.create_all(engine)
    add_missing_columns(engine)
    add_missing_indexes(engine)
    return engine


def add_missing_columns(engine: Engine) -> list[str]:
    """Add columns that newer models have and an existing database lacks (additive only).

    ``create_all`` creates missing tables but never alters existing ones; columns added to a
    table later (e.g. DeviceRollout.chunk_size) get ``ALTER TABLE ... ADD COLUMN`` with their
    scalar default. Returns "table.column" for each column added.
    """
    insp = inspect(engine)
    added: list[str] = []
    existing_tables = set(insp.get_table_names())
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name in have or column.primary_key:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {column.name} " \
                  f"{column.type.compile(dialect=engine.dialect)}"
            default = getattr(column.default, "arg", None)
            if isinstance(default, enum.Enum):
                default = default.name          # SQLAlchemy's Enum type stores names
            if isinstance(default, bool):
                ddl += f" DEFAULT {'TRUE' if default else 'FALSE'}"
            elif isinstance(default, (int, float)):
                ddl += f" DEFAULT {default}"
            elif isinstance(default, str):
                ddl += " DEFAULT '" + default.replace("'", "''") + "'"
            with engine.begin() as conn:
                conn.execute(text(ddl))
            added.append(f"{table.name}.{column.name}")
            log.info("database: added column %s.%s", table.name, column.name)
    return added


def add_missing_indexes(engine: Engine) -> list[str]:
    """Create the indexes that newer models declare and an existing database lacks.

    ``create_all`` creates a new table with its indexes but never adds an index to a table
    that exists (e.g. one declared with ``index=True`` later); each missing one is created
    here by name (``CREATE INDEX``, idempotent: an index that exists is left alone).
    Returns the names of the indexes created.
    """
    insp = inspect(engine)
    created: list[str] = []
    existing_tables = set(insp.get_table_names())
    for table in SQLModel.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue
        have = {ix["name"] for ix in insp.get_indexes(table.name)}
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
            if index.name in have:
                continue
            with engine.begin() as conn:
                index.create(conn, checkfirst=True)
            created.append(str(index.name))
            log.info("database: created index %s on %s", index.name, table.name)
    return created


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
