"""Start-up checks of a data dir: refuse to serve from a damaged one, with a clear message.

Run before the server loads models (`bios serve` exits with the message; `BiosService.start`
raises it): a corrupted SQLite file (`PRAGMA quick_check`), a zero-length `bios.db` (an empty
server would start silently and every run would be gone), and an unreadable archive-URL
secret. Also makes `bios.db` (every tenant's training data) private: mode 0600.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from bios.server.archives import ArchiveSigner
from bios.server.config import ServerConfig

ALLOW_EMPTY_FLAG = "--allow-empty-database"
APPLICATION_ID = 0x42696F73  # "Bios", in the header of a bios.db this module created


class DataDirError(RuntimeError):
    """The data dir cannot be served from; the message says why and what to do."""


def sqlite_path(config: ServerConfig) -> Path | None:
    """The SQLite file the server uses, or None for another database (PostgreSQL)."""
    if config.database_url is None:
        return config.data_dir / "bios.db"
    url = config.database_url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        return Path(url.removeprefix("sqlite:///").split("?", 1)[0])
    return None


def check_data_dir(config: ServerConfig) -> None:
    """Raise DataDirError if the data dir's database or archive secret is unusable."""
    db = sqlite_path(config)
    if db is not None:
        check_sqlite_file(db, allow_empty=config.allow_empty_database)
    try:
        ArchiveSigner(config.archive_secret_path).load()
    except (OSError, RuntimeError, ValueError) as e:
        raise DataDirError(f"the archive URL secret is unusable: {e}") from e


def check_sqlite_file(path: Path, allow_empty: bool = False) -> None:
    """Create `path` with mode 0600 if absent; else make it 0600 and check it.

    A zero-length file is refused unless `allow_empty` (a truncated or wrongly restored
    database would otherwise start as an empty server); a file that fails
    `PRAGMA quick_check` is refused.
    """
    name = path.name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass  # another process made it; checked below like any existing file
        else:
            # Write SQLite's header now (setting the application id does), so the new file
            # is never a zero-length one that the next start would refuse.
            conn = sqlite3.connect(path)
            try:
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.commit()
            finally:
                conn.close()
            return
    _make_private(path)
    if path.stat().st_size == 0:
        if allow_empty:
            return
        raise DataDirError(
            f"{name} in the data dir is empty (0 bytes): it holds no runs, so this looks like "
            f"a truncated or badly restored database. Restore it from a backup, or, to start "
            f"a fresh server here on purpose, delete it or pass {ALLOW_EMPTY_FLAG}.")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        raise DataDirError(f"{name} in the data dir is not a readable SQLite database ({e}); "
                           "restore it from a backup") from e
    if rows != ["ok"]:
        raise DataDirError(f"{name} in the data dir is corrupted (PRAGMA quick_check: "
                           f"{'; '.join(map(str, rows))}); restore it from a backup, or "
                           "recover what SQLite can with `sqlite3 bios.db .recover`")


def _make_private(db: Path) -> None:
    """chmod 0600 the database and its WAL files (older servers made them 0644)."""
    for p in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if p.stat().st_mode & 0o077:
                p.chmod(0o600)
