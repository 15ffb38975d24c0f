"""Start a throwaway PostgreSQL cluster on loopback for store tests.

`PostgresServer().start()` runs initdb into a fresh temp dir, starts the server on a free
127.0.0.1 port (unix sockets in the temp dir, durability off for speed), creates a database and
exposes `url` (a SQLAlchemy URL with trust auth). `stop()` shuts it down and removes the dir.

PostgreSQL refuses to run as root, so when the tests run as root the server processes run as
the `postgres` system user (created temporarily, and removed again, if the image lacks it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bios.local_server import free_port

_TEMP_USER = "bios_pgtest"


def find_bindir() -> Path | None:
    """The directory with initdb/pg_ctl: $BIOS_PG_BINDIR, Debian's layout, or PATH."""
    env = os.environ.get("BIOS_PG_BINDIR")
    candidates = [env] if env else []

    def version(p: str) -> float:
        try:
            return float(Path(p).parent.name)
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for c in candidates:
        d = Path(c)
        if all((d / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres", "createdb")):
            return d
    return None


class PostgresServer:
    """One throwaway cluster. Use as a context manager or call start()/stop()."""

    def __init__(self, dbname: str = "bios_test", bindir: Path | None = None):
        found = bindir or find_bindir()
        if found is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = found
        self.dbname = dbname
        self.port = 0
        self.tmp: Path | None = None
        self.startup_s = 0.0
        self._user: str | None = None  # run server tools as this user (when we are root)
        self._created_user = False

    # ------------------------------------------------------------------ public

    @property
    def datadir(self) -> Path:
        assert self.tmp is not None
        return self.tmp / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.dbname}"

    def start(self, attempts: int = 3) -> PostgresServer:
        t0 = time.monotonic()
        self._pick_user()
        self.tmp = Path(tempfile.mkdtemp(prefix="bios-pg-"))
        try:
            self._chown(self.tmp)
            self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
            for attempt in range(attempts):  # the free port can be taken before we bind it
                self.port = free_port()
                try:
                    self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(self.datadir),
                              "-l", str(self.tmp / "server.log"), "-o", self._server_opts())
                    break
                except RuntimeError:
                    if attempt == attempts - 1:
                        raise
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                      self.dbname)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.tmp is not None:
            if (self.datadir / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", "30",
                              "-D", str(self.datadir))
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        if self._created_user:
            subprocess.run(["userdel", _TEMP_USER], capture_output=True, check=False)
            self._created_user = False

    def log(self) -> str:
        if self.tmp is None or not (self.tmp / "server.log").exists():
            return ""
        return (self.tmp / "server.log").read_text(errors="replace")

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _server_opts(self) -> str:
        assert self.tmp is not None
        return " ".join([
            "-F",  # fsync off
            f"-p {self.port}",
            f"-k {self.tmp}",  # unix sockets in the temp dir, not /var/run/postgresql
            "-c listen_addresses=127.0.0.1",
            "-c synchronous_commit=off",
            "-c full_page_writes=off",
            "-c max_connections=64",
            "-c shared_buffers=32MB",
            "-c log_min_messages=warning",
        ])

    def _pick_user(self) -> None:
        if os.geteuid() != 0:
            self._user = None
            return
        for name in ("postgres", _TEMP_USER):
            try:
                pwd.getpwnam(name)
                self._user = name
                return
            except KeyError:
                pass
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                        _TEMP_USER], check=True, capture_output=True)
        self._user = _TEMP_USER
        self._created_user = True

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, tool: str, *args: str) -> None:
        kwargs: dict[str, Any] = {}
        if self._user is not None:
            pw = pwd.getpwnam(self._user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=str(self.tmp))
        proc = subprocess.run([str(self.bindir / tool), *args], cwd=self.tmp, env=env,
                              capture_output=True, text=True, timeout=60, check=False, **kwargs)
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed ({proc.returncode}):\n{proc.stdout}\n"
                               f"{proc.stderr}\n{self.log()[-4000:]}")
