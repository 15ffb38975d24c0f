"""Checkpoint archives: signed download URLs and the tar stream behind them.

`GET .../checkpoints/{seg}/{name}/archive` answers 302 to `/api/v1/archives/<token>`. The token
is the credential: it names one checkpoint (run, type, name, row id and creation time, so a
checkpoint overwritten under the same name is a different one), the tenant it was issued to,
and an expiry, and is signed with HMAC-SHA256 under a per-data-dir secret:

    v1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, "bios-archive-v1." + claims))>

The claims are readable by whoever holds the URL; they hold nothing the tenant cannot see.

The archive is an uncompressed POSIX tar (safetensors of float weights barely compress, and
plain tar lets the server send an exact Content-Length) of the files Bios writes into a
checkpoint directory (see engine/checkpoints.py): `adapter_config.json` and
`adapter_model.safetensors` (a PEFT adapter directory once extracted), plus, for training
checkpoints, `optimizer.safetensors` and `bios_state.json`. Only those names, only regular
files, opened without following symlinks. Pure stdlib: no torch, no HTTP, no SQL.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("bios.server")

ARCHIVE_URL_TTL_S = 15 * 60
SECRET_FILE = "archive_url_secret"
TOKEN_VERSION = "v1"
_SIGN_CONTEXT = b"bios-archive-v1."
_SECRET_RE = re.compile(r"^[0-9a-f]{64}$")
# Token characters (base64url and the dots between parts); the auth middleware lets exactly
# `/api/v1/archives/<one segment of these>` through without an API key.
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,8}\.[A-Za-z0-9_-]{1,4096}\.[A-Za-z0-9_-]{43}$")
MAX_TOKEN_CHARS = 4200
# The files of a checkpoint directory that go into its archive, in archive order. The first
# two are required (a PEFT adapter); the others are there for training checkpoints only.
ARCHIVE_FILES = ("adapter_config.json", "adapter_model.safetensors", "bios_state.json",
                 "optimizer.safetensors")
REQUIRED_FILES = ARCHIVE_FILES[:2]
_CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE


class ArchiveTokenError(ValueError):
    """A token that is malformed, wrongly signed, or expired; the message says which."""


@dataclass(frozen=True)
class ArchiveClaims:
    """What a token grants: one checkpoint, for one tenant, until `exp` (unix seconds)."""

    run: str
    seg: str  # "weights" | "sampler_weights"
    name: str
    ckpt_id: int
    created_at: float
    tenant: str
    exp: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ArchiveSigner:
    """Signs and checks archive tokens with the secret in `secret_path` (made on first use).

    The secret is 32 random bytes, hex, in a file of mode 0600, so signed URLs survive a
    restart; deleting the file (and restarting) invalidates every URL issued so far.
    """

    def __init__(self, secret_path: Path, ttl_s: int = ARCHIVE_URL_TTL_S) -> None:
        self.secret_path = Path(secret_path)
        self.ttl_s = ttl_s
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read (or create) the secret now: a start-up check, so a corrupted file stops the
        server with a clear message instead of failing archive routes later."""
        self._secret()

    def _secret(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = _load_or_create_secret(self.secret_path)
            return self._key

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._secret(), _SIGN_CONTEXT + payload.encode("ascii"),
                          hashlib.sha256).digest()
        return _b64(digest)

    def sign(self, claims: ArchiveClaims) -> str:
        """The URL-safe token for `claims`."""
        payload = _b64(json.dumps(asdict(claims), separators=(",", ":"),
                                  sort_keys=True).encode("utf-8"))
        return f"{TOKEN_VERSION}.{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float | None = None) -> ArchiveClaims:
        """The claims of a genuine, unexpired token; else ArchiveTokenError saying why."""
        if len(token) > MAX_TOKEN_CHARS or not TOKEN_RE.fullmatch(token):
            raise ArchiveTokenError("this archive URL is malformed")
        version, payload, mac = token.split(".")
        if version != TOKEN_VERSION:
            raise ArchiveTokenError(f"this archive URL has an unknown version {version!r}")
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise ArchiveTokenError("this archive URL's signature is not valid (was it altered, "
                                    "or issued by another server?)")
        try:
            raw = json.loads(_unb64(payload))
            claims = ArchiveClaims(run=str(raw["run"]), seg=str(raw["seg"]),
                                   name=str(raw["name"]), ckpt_id=int(raw["ckpt_id"]),
                                   created_at=float(raw["created_at"]),
                                   tenant=str(raw["tenant"]), exp=int(raw["exp"]))
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise ArchiveTokenError("this archive URL is malformed") from e
        current = time.time() if now is None else now
        if current >= claims.exp:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(claims.exp))
            raise ArchiveTokenError(f"this archive URL expired at {when}; ask for a new one "
                                    "(RestClient.get_checkpoint_archive_url)")
        return claims

    def expiry(self, now: float | None = None) -> int:
        """The expiry (unix seconds) of a token issued now."""
        return int(time.time() if now is None else now) + self.ttl_s


def _load_or_create_secret(path: Path) -> bytes:
    """Read the secret, or create it: written to a private temp file, then linked into place
    (link fails if another process got there first, and then its secret is read)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process was first
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning("%s is readable by other users (mode %o): anyone who reads it can forge "
                    "archive URLs; chmod 600 it", path, stat.S_IMODE(mode))
    text = path.read_bytes().decode("ascii", "replace").strip()
    if not _SECRET_RE.fullmatch(text):
        raise RuntimeError(f"{path.name} in the data dir does not hold a 64-hex-digit secret; "
                           "delete it and restart to make a new one (this invalidates the "
                           "archive URLs issued so far)")
    return bytes.fromhex(text)


# ----------------------------------------------------------------------------- tar stream


class CheckpointFilesMissing(FileNotFoundError):
    """The checkpoint directory or one of its required files is gone."""


class TarStream:
    """An uncompressed tar of a checkpoint's files, produced chunk by chunk.

    The files are opened (without following symlinks) when the stream is made, so a checkpoint
    deleted or overwritten while it streams still yields the complete, consistent old copy.
    Iterate once; `close()` (idempotent) releases the files.
    """

    def __init__(self, directory: Path) -> None:
        self._files: list[tuple[str, BinaryIO, int, float]] = []
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow)
        except OSError as e:
            raise CheckpointFilesMissing(f"checkpoint directory {directory} is gone") from e
        try:
            for name in ARCHIVE_FILES:
                try:
                    fd = os.open(name, os.O_RDONLY | nofollow, dir_fd=dir_fd)
                except OSError:  # absent, or a symlink (ELOOP): never part of an archive
                    fd = -1
                if fd >= 0:
                    f = os.fdopen(fd, "rb", buffering=0)
                    st = os.fstat(fd)
                    if stat.S_ISREG(st.st_mode):
                        self._files.append((name, f, st.st_size, st.st_mtime))
                        continue
                    f.close()
                if name in REQUIRED_FILES:
                    raise CheckpointFilesMissing(f"checkpoint file {name} is gone")
        except BaseException:
            self.close()
            raise
        finally:
            os.close(dir_fd)

    @property
    def names(self) -> list[str]:
        """The member names, in archive order."""
        return [name for name, *_ in self._files]

    @property
    def size(self) -> int:
        """The exact length of the tar in bytes (for Content-Length)."""
        body = sum(_BLOCK + size + (-size % _BLOCK) for _, _, size, _ in self._files)
        return body + 2 * _BLOCK

    def __iter__(self) -> Iterator[bytes]:
        try:
            for name, f, size, mtime in self._files:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = size, int(mtime), 0o644
                yield info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8",
                                 errors="strict")
                left = size
                while left:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:  # checkpoints are immutable; a short file is a broken one
                        raise OSError(f"{name} shrank while it was being archived")
                    left -= len(chunk)
                    yield chunk
                if size % _BLOCK:
                    yield b"\0" * (-size % _BLOCK)
            yield b"\0" * (2 * _BLOCK)
        finally:
            self.close()

    def close(self) -> None:
        """Close the opened files."""
        for _, f, _, _ in self._files:
            f.close()

    def __enter__(self) -> TarStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
