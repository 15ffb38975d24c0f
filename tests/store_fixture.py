"""A store with a clean schema for tests (importable: `conftest` names clash across dirs)."""

from __future__ import annotations

import time

from bios.server.store import Base, SessionRow, Store


def open_store(url: str) -> Store:
    """A store with a clean schema and the session "s" the test helpers' runs belong to
    (PostgreSQL checks that foreign key)."""
    s = Store(url)
    Base.metadata.drop_all(s.engine)
    Base.metadata.create_all(s.engine)
    with s.tx() as tx:
        tx.add(SessionRow(id="s", owner="local", created_at=time.time(),
                          last_heartbeat=time.time()))
    return s
