"""API keys (no torch): hashing, parsing the keys file and env, lookup, the bind rule, the
`bios keys add` command and the auth middleware (over a stub service)."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from bios.cli import main as cli_main
from bios.server.app import create_app, owner_of
from bios.server.auth import (
    KeyConfigError,
    KeyRing,
    add_key,
    bind_refusal,
    hash_key,
    is_loopback,
    load_keys,
    parse_keys_env,
    parse_keys_text,
    presented_key,
)
from bios.server.config import ServerConfig

H1 = hash_key("key-one")
H2 = hash_key("key-two")


def test_hash_is_sha256_hex() -> None:
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(H1) == 64 and H1 != H2


def test_parse_file_text_skips_comments_and_blank_lines() -> None:
    text = f"# keys\n\nalice:{H1}  # laptop\nbob : {H2.upper()}\n"
    assert parse_keys_text(text, "keys") == [("alice", H1), ("bob", H2)]


@pytest.mark.parametrize("line, needle", [
    ("alice", "expected 'tenant:sha256hex'"),
    ("alice:not-a-hash", "sha256"),
    ("alice:" + "a" * 63, "sha256"),
    (f"../evil:{H1}", "tenant name"),
    (f":{H1}", "tenant name"),
    (f"{'x' * 65}:{H1}", "tenant name"),
    ("alice:bios_rawkeyinsteadofahash", "never raw keys"),
])
def test_parse_rejects_bad_lines_naming_the_line(line: str, needle: str) -> None:
    with pytest.raises(KeyConfigError) as e:
        parse_keys_text(f"# first\n{line}\n", "keys.txt")
    assert "keys.txt line 2" in str(e.value) and needle in str(e.value)


def test_parse_env_is_comma_separated() -> None:
    assert parse_keys_env(f"alice:{H1}, bob:{H2},") == [("alice", H1), ("bob", H2)]
    with pytest.raises(KeyConfigError, match="BIOS_API_KEYS entry 2"):
        parse_keys_env(f"alice:{H1},bob")


def test_load_keys_merges_file_and_env_and_rejects_a_hash_shared_by_two_tenants(
        tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"alice:{H1}\n")
    assert load_keys(f, f"bob:{H2}") == [("alice", H1), ("bob", H2)]
    assert load_keys(None, None) == []
    with pytest.raises(KeyConfigError, match="two tenants"):
        load_keys(f, f"bob:{H1}")
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_keys(tmp_path / "missing", None)


def test_keyring_lookup() -> None:
    ring = KeyRing((("alice", H1), ("bob", H2), ("alice", hash_key("rotated"))))
    assert ring.enabled and not KeyRing().enabled
    assert ring.tenant_for("key-one") == "alice"
    assert ring.tenant_for("rotated") == "alice"
    assert ring.tenant_for("key-two") == "bob"
    assert ring.tenant_for("key-three") is None
    assert ring.tenant_for("") is None and ring.tenant_for(None) is None
    assert ring.tenant_for(H1) is None  # the hash itself is not a key


def test_presented_key_header_forms() -> None:
    assert presented_key({"x-api-key": "k1"}) == "k1"
    assert presented_key({"authorization": "Bearer k2"}) == "k2"
    assert presented_key({"authorization": "bearer  k3 "}) == "k3"
    assert presented_key({"authorization": "Basic abc"}) is None
    assert presented_key({}) is None


@pytest.mark.parametrize("host, loop", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.4", False),
    ("example.com", False)])
def test_loopback_detection_and_bind_rule(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop
    assert bind_refusal(host, keys_enabled=True) is None
    refusal = bind_refusal(host, keys_enabled=False)
    assert (refusal is None) is loop
    if refusal:
        assert "--api-keys-file" in refusal and "BIOS_API_KEYS" in refusal


def test_add_key_appends_hash_only_with_private_mode(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "keys"
    k1 = add_key(f, "alice")
    k2 = add_key(f, "bob")
    text = f.read_text()
    assert k1 not in text and k2 not in text
    assert parse_keys_text(text, "f") == [("alice", hash_key(k1)), ("bob", hash_key(k2))]
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    with pytest.raises(KeyConfigError):
        add_key(f, "no/slashes")


def test_cli_keys_add_prints_the_key_once(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "keys"
    assert cli_main(["keys", "add", "carol", "--file", str(f)]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("bios_") and "carol" in out.err
    assert KeyRing(tuple(load_keys(f, None))).tenant_for(key) == "carol"


def test_cli_serve_refuses_non_loopback_without_keys(capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIOS_API_KEYS", raising=False)
    assert cli_main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--api-keys-file" in capsys.readouterr().err


def test_cli_serve_rejects_a_broken_keys_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "keys"
    f.write_text("alice:rawkey\n")
    assert cli_main(["serve", "--api-keys-file", str(f)]) == 2
    assert "line 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- middleware


class StubRegistry:
    def names(self) -> list[str]:
        return []


class StubService:
    """Just enough of BiosService for routes that only need the owner."""

    def __init__(self) -> None:
        self.ready = True
        self.registry = StubRegistry()
        self.notify: Any = None

    def __getattr__(self, name: str) -> Any:  # routes bind other service methods at build time
        def unused(*args: Any) -> None:
            raise AssertionError(f"StubService.{name} called")
        return unused

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def list_runs(self, owner: str, limit: int, offset: int) -> dict[str, Any]:
        return {"training_runs": [], "cursor": {"offset": offset, "limit": limit,
                                                "total_count": 0}, "owner_seen": owner}


def client_for(keys: list[tuple[str, str]]) -> tuple[TestClient, StubService]:
    svc = StubService()
    app = create_app(ServerConfig(api_keys=keys), service=svc)  # type: ignore[arg-type]
    seen: list[str] = []
    orig = svc.list_runs

    def list_runs(owner: str, limit: int, offset: int) -> Any:
        seen.append(owner)
        return orig(owner, limit, offset)

    svc.list_runs = list_runs  # type: ignore[method-assign]
    svc.seen = seen  # type: ignore[attr-defined]
    return TestClient(app), svc


def test_middleware_with_keys() -> None:
    client, svc = client_for([("alice", H1), ("bob", H2)])
    with client:
        assert client.get("/api/v1/healthz").status_code == 200  # open
        r = client.get("/api/v1/training_runs")
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        assert "no API key" in r.json()["detail"] and "BIOS_API_KEY" in r.json()["detail"]
        r = client.get("/api/v1/training_runs", headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "not valid" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = client.post("/api/v1/create_session", json={"garbage": True})
        assert r.status_code == 401  # before the body is even looked at
        assert client.get("/api/v1/get_server_capabilities").status_code == 401
        assert client.get("/api/v1/training_runs",
                          headers={"X-API-Key": "key-one"}).status_code == 200
        assert client.get("/api/v1/training_runs",
                          headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert svc.seen == ["alice", "bob"]  # type: ignore[attr-defined]


def test_middleware_local_mode_is_one_tenant() -> None:
    client, svc = client_for([])
    with client:
        assert client.get("/api/v1/training_runs").status_code == 200
        assert client.get("/api/v1/training_runs",
                          headers={"X-API-Key": "anything"}).status_code == 200
    assert svc.seen == ["local", "local"]  # type: ignore[attr-defined]


def test_owner_of_fails_closed_without_the_middleware() -> None:
    from starlette.requests import Request

    from bios.server.validation import APIError

    req = Request({"type": "http", "headers": [], "state": {}})
    with pytest.raises(APIError) as e:
        owner_of(req)
    assert e.value.status == 401


def test_guard_checks_the_key_before_the_body() -> None:
    """An over-size body gets 413 only once the key is good: a client without one gets 401
    and cannot make the server read (or buffer) its body."""
    client, _ = client_for([("alice", H1)])
    too_big = str(ServerConfig().max_body_bytes + 1)
    with client:
        r = client.post("/api/v1/create_session", content=b"{}",
                        headers={"Content-Length": too_big})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        r = client.post("/api/v1/create_session", content=b"{}",
                        headers={"Content-Length": too_big, "X-API-Key": "key-one"})
        assert r.status_code == 413 and r.json()["code"] == "too_large"
        assert too_big in r.json()["detail"]


def test_long_poll_wakes_with_the_body_it_is_handed() -> None:
    """The clock hands a finished request's body to its waiting long-polls, from its own
    thread; a waiter it has no body for is woken with None (and reads the store)."""
    import asyncio
    import threading

    from bios.server.app import Waiters

    async def scenario() -> tuple[str | None, str | None, bool]:
        waiters = Waiters()
        waiters.loop = asyncio.get_running_loop()
        a, b, other = waiters.register("req-a"), waiters.register("req-b"), waiters.register("x")
        t = threading.Thread(target=waiters.notify_threadsafe,
                             args=({"req-a": '{"loss": 1.5}', "req-b": None},))
        t.start()
        await asyncio.wait_for(asyncio.gather(a.wait(), b.wait()), timeout=5)
        t.join()
        return a.body, b.body, other.is_set()

    body_a, body_b, other_set = asyncio.run(scenario())
    assert body_a == '{"loss": 1.5}' and body_b is None and not other_set
