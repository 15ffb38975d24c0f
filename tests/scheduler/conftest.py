"""The store every scheduler test runs on: SQLite, and PostgreSQL on a throwaway cluster
(skipped only where the PostgreSQL server binaries are not installed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bios.server.store import Store
from postgres_server import PostgresServer, find_bindir
from store_fixture import open_store

NO_PG = find_bindir() is None


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    if NO_PG:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    server = PostgresServer().start()
    print(f"throwaway PostgreSQL up in {server.startup_s:.2f}s at {server.url}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=[
    pytest.mark.postgres, pytest.mark.skipif(NO_PG, reason="no PostgreSQL binaries")])])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    else:
        s = open_store(request.getfixturevalue("pg").url)
    yield s
    s.close()
