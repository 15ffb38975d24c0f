"""API keys and tenants: parsing the key list, checking a presented key, the bind-address rule.

Keys are never stored: the server holds `tenant:sha256hex` entries (from `--api-keys-file` or
`$BIOS_API_KEYS`) and compares sha256(presented key) against every entry with
`hmac.compare_digest`. Each tenant name is an owner in the store; several keys may share one
tenant (rotation). No keys configured means local mode: one tenant, "local", and only a
loopback bind is allowed. Pure functions; no HTTP or SQL here.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "bios_"
ENV_KEYS = "BIOS_API_KEYS"


class KeyConfigError(ValueError):
    """The key list is malformed; the message names the source and line."""


def hash_key(key: str) -> str:
    """The sha256 hex digest the server stores for a key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random API key (256 bits, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_entry(entry: str, where: str) -> tuple[str, str]:
    """`tenant:sha256hex` -> (tenant, hash); raises KeyConfigError naming `where`."""
    tenant, sep, digest = entry.strip().partition(":")
    tenant, digest = tenant.strip(), digest.strip().lower()
    if not sep:
        raise KeyConfigError(f"{where}: expected 'tenant:sha256hex', got {entry.strip()!r}")
    if not TENANT_RE.match(tenant):
        raise KeyConfigError(f"{where}: tenant name {tenant!r} must be 1-64 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
    if not HASH_RE.match(digest):
        raise KeyConfigError(f"{where}: expected the 64-hex-digit sha256 of a key after "
                             f"{tenant + ':'!r} (store hashes, never raw keys; "
                             "`bios keys add` writes them)")
    return tenant, digest


def parse_keys_text(text: str, source: str) -> list[tuple[str, str]]:
    """A keys file's text: one `tenant:sha256hex` per line; blank lines and `#` comments skipped."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(parse_entry(line, f"{source} line {lineno}"))
    return out


def parse_keys_env(value: str) -> list[tuple[str, str]]:
    """`$BIOS_API_KEYS`: comma-separated `tenant:sha256hex` entries."""
    return [parse_entry(item, f"${ENV_KEYS} entry {i}")
            for i, item in enumerate(value.split(","), 1) if item.strip()]


def load_keys(path: str | Path | None, env: str | None) -> list[tuple[str, str]]:
    """All configured (tenant, hash) entries from a keys file and/or the env value."""
    entries: list[tuple[str, str]] = []
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise KeyConfigError(f"cannot read the API keys file {str(p)!r}: {e}") from e
        entries += parse_keys_text(text, str(p))
    if env:
        entries += parse_keys_env(env)
    seen: dict[str, str] = {}
    for tenant, digest in entries:
        if digest in seen and seen[digest] != tenant:
            raise KeyConfigError(f"one key hash is listed for two tenants ({seen[digest]!r} and "
                                 f"{tenant!r}); a key belongs to exactly one tenant")
        seen[digest] = tenant
    return entries


@dataclass(frozen=True)
class KeyRing:
    """The configured keys; `tenant_for(key)` is the tenant of a presented key, or None."""

    entries: tuple[tuple[str, str], ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def tenant_for(self, presented: str | None) -> str | None:
        if not presented:
            return None
        digest = hash_key(presented).encode()
        found: str | None = None
        for tenant, stored in self.entries:  # no early exit: time does not depend on position
            if hmac.compare_digest(digest, stored.encode()):
                found = tenant
        return found


def presented_key(headers: dict[str, str] | object) -> str | None:
    """The key in `X-API-Key`, else in `Authorization: Bearer <key>`."""
    get = headers.get  # type: ignore[attr-defined]
    key = get("x-api-key")
    if key:
        return str(key).strip()
    auth = get("authorization")
    if auth:
        scheme, _, value = str(auth).partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # another host name: assume it is reachable from the network


def bind_refusal(host: str, keys_enabled: bool) -> str | None:
    """Why the server must not start on `host`, or None when it may."""
    if keys_enabled or is_loopback(host):
        return None
    return (f"refusing to serve on {host!r} without API keys: anyone who can reach this "
            "address could train, sample and read every checkpoint. Add --api-keys-file PATH "
            f"(create keys with `bios keys add NAME --file PATH`) or set ${ENV_KEYS}, or bind "
            "to 127.0.0.1 for local use. See docs/security.md.")


def add_key(path: str | Path, tenant: str) -> str:
    """Generate a key for `tenant`, append its hash to the keys file, return the key."""
    if not TENANT_RE.match(tenant):
        raise KeyConfigError(f"tenant name {tenant!r} must be 1-64 letters, digits, '.', '_' or "
                             "'-', starting with a letter or digit")
    p = Path(path)
    if p.exists():
        parse_keys_text(p.read_text(), str(p))  # refuse to append to a broken file
    key = generate_key()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        if p.stat().st_size and not p.read_text().endswith("\n"):
            f.write("\n")
        f.write(f"{tenant}:{hash_key(key)}\n")
    return key
