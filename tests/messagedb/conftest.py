"""Fixtures for the Message DB compatibility tests.

Each test gets its own database, created on the local Postgres server, with every
migration of migrations/postgres applied in lexical order, each file in one transaction
(as sqlx applies them). The database is dropped afterwards, so tests are independent and
can run in parallel (e.g. with pytest-xdist).

The admin connection string defaults to postgresql://postgres@127.0.0.1:5432/postgres
(trust auth) and can be overridden with COLLOQUY_TEST_PG_ADMIN_URL.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

ADMIN_URL = os.environ.get(
    "COLLOQUY_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations" / "postgres"


def migration_files() -> list[Path]:
    files = sorted(MIGRATIONS_DIR.glob("*.sql"), key=lambda p: p.name)
    assert files, f"no migrations found in {MIGRATIONS_DIR}"
    return files


def _drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def db_url() -> str:
    """A fresh, migrated database; yields its connection string."""
    name = f"colloquy_mdb_{uuid.uuid4().hex}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_conninfo(ADMIN_URL, dbname=name)
    try:
        for path in migration_files():
            # One connection and one transaction per file; commit on success.
            with psycopg.connect(url) as conn:
                conn.execute(path.read_text())
        yield url
    finally:
        _drop_database(name)


@pytest.fixture
def conn(db_url: str):
    """An autocommit connection to the test database (a new session, so it sees the
    database-level search_path set by the migration)."""
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c
