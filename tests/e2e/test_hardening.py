"""Issue 20's probes, against a real `bios serve`: a rejected request never hangs its run, no
bare 500s, strict input checks, bounded request heads (parts 2-4).

Raw httpx where the probe was raw HTTP; the SDK where its own path was the trigger.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import bios
from bios import types
from server_process import ServerProcess

TINY = "bios/tiny-llama"


class Run:
    """A session and a run on the server, driven with raw HTTP and explicit seq ids."""

    def __init__(self, server: ServerProcess, model_seq_id: int) -> None:
        self.http = httpx.Client(base_url=f"{server.base_url}/api/v1", timeout=120)
        self.session = self.ok("/create_session", {})["session_id"]
        fut = self.ok("/create_model", {"session_id": self.session,
                                        "model_seq_id": model_seq_id, "base_model": TINY,
                                        "lora_config": {"rank": 2}})
        self.id = fut["model_id"]
        self.wait(fut["request_id"])

    def ok(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        r = self.http.post(path, json=body, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, request_id: str) -> Any:
        return self.ok("/retrieve_future", {"request_id": request_id})

    def slot(self, seq: int) -> dict[str, str]:
        return {types.SLOT_RUN_HEADER: self.id, types.SLOT_SEQ_HEADER: str(seq)}

    def fb(self, seq: int) -> dict[str, Any]:
        return {"model_id": self.id, "seq_id": seq, "forward_backward_input": {
            "loss_fn": "cross_entropy", "data": [{
                "model_input": {"chunks": [{"tokens": [1, 2, 3], "type": "encoded_text"}]},
                "loss_fn_inputs": {"target_tokens": {"data": [2, 3, 4], "dtype": "int64"}}}]}}

    def post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.http.post(path, content=content,
                              headers={"Content-Type": "application/json", **headers})


@pytest.fixture(scope="module")
def run(server: ServerProcess) -> Run:
    return Run(server, 700)


def test_over_limit_body_fills_its_slot_and_the_next_request_runs(server: ServerProcess) -> None:
    r = Run(server, 701)
    body = json.dumps(r.fb(1)).encode()
    huge = body[:-1] + b', "pad": "' + b"x" * (65 * 1024 * 1024) + b'"}'
    resp = r.post("/forward_backward", huge, r.slot(1))
    assert resp.status_code == 413, resp.text
    assert "limit" in resp.json()["detail"]
    later = r.ok("/forward_backward", r.fb(2))
    out = r.wait(later["request_id"])  # seq 2 completes instead of waiting for seq 1
    assert "loss:sum" in out["metrics"], out


def test_truncated_json_fills_its_slot_and_names_the_position(server: ServerProcess) -> None:
    r = Run(server, 702)
    body = json.dumps(r.fb(1)).encode()
    resp = r.post("/forward_backward", body[:40], r.slot(1))
    assert resp.status_code == 400, resp.text
    detail = resp.json()["detail"]
    assert "not valid JSON" in detail and "at character 40" in detail, detail
    assert resp.json().get("field") is None  # not `field: "40"`
    out = r.wait(r.ok("/forward_backward", r.fb(2))["request_id"])
    assert "loss:sum" in out["metrics"], out


def test_abandoned_seq_ids_are_filled_before_the_next_request(server: ServerProcess) -> None:
    """The SDK names the seq ids it gave up on (say, a disk-full period outlasting its
    retries): seq 3 arrives first, naming 1 and 2, and runs."""
    r = Run(server, 703)
    fut = r.ok("/optim_step", {"model_id": r.id, "seq_id": 3, "adam_params": {}},
               {types.ABANDONED_SEQS_HEADER: "1,2"})
    res = r.wait(fut["request_id"])
    assert "error" not in res, res
    late = r.http.post("/forward_backward", json=r.fb(1))
    assert late.status_code == 409, late.text  # its slot is taken by the failed marker


SMALL_LIMIT = 1_000_000  # --max-body-bytes of the small server: ~7.7k one-token datums


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    """A server with a 1 MB body limit whose data dir is on its own 48 MiB tmpfs when this
    test may mount one (root), so that its disk can really fill up; else on the test disk."""
    root = tmp_path_factory.mktemp("small")
    mnt = root / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0
    proc = ServerProcess(mnt / "data", [TINY],
                         extra_args=["--max-body-bytes", str(SMALL_LIMIT)]).start()
    yield proc, mnt if mounted else Path()
    proc.stop()
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sdk_over_limit_batch_raises_and_the_run_goes_on(
        small_server: tuple[ServerProcess, Path]) -> None:
    """Many one-token datums (~190k against the default 64 MiB limit; 10k against this
    server's 1 MB) make a body over the limit: the future raises the 413 (not retried) and
    the run's next operation still completes."""
    sc = bios.ServiceClient(base_url=small_server[0].base_url)
    tc = sc.create_lora_training_client(TINY, rank=2)
    one = types.Datum(model_input=types.ModelInput.from_ints([5]),
                      loss_fn_inputs={"target_tokens": types.TensorData(data=[6],
                                                                        dtype="int64")})
    big = tc.forward_backward([one] * 10_000, "cross_entropy")
    with pytest.raises(bios.APIStatusError) as e:
        big.result(timeout=300)
    assert e.value.status_code == 413
    out = tc.forward_backward([one], "cross_entropy").result(timeout=120)
    assert "loss:sum" in out.metrics


def test_full_disk_is_a_507_and_reads_still_work(small_server: tuple[ServerProcess, Path]
                                                 ) -> None:
    proc, mnt = small_server
    if mnt == Path():
        pytest.skip("needs a tmpfs mount (root) to fill a disk for real")
    r = Run(proc, 710)
    filler = mnt / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill the data dir's disk to the last byte
        for block in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * block):
                    pass
    try:
        statuses = []
        for seq in range(1, 40):  # SQLite may still reuse free WAL pages for a few writes
            resp = r.http.post("/forward_backward", json=r.fb(seq))
            statuses.append(resp.status_code)
            if resp.status_code != 200:
                break
        assert statuses[-1] == 507, (statuses, resp.text)
        assert resp.json()["code"] == "storage_full", resp.text
        assert r.http.get("/healthz").status_code == 200
        listing = r.http.get("/training_runs")
        assert listing.status_code == 200 and listing.json()["training_runs"], listing.text
    finally:
        filler.unlink()
    fut = r.ok("/forward_backward", r.fb(seq))  # space again: the same seq goes through
    assert "loss:sum" in r.wait(fut["request_id"])["metrics"]


def fill(path: Path) -> None:
    """Fill the disk under `path` to the last byte."""
    with open(path, "wb", buffering=0) as f:
        for block in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * block):
                    pass


def test_disk_full_while_a_cycle_runs_records_its_results_once_space_returns(
        tmp_path: Path) -> None:
    """The disk fills while a cycle computes a long forward: the clock cannot record the
    results, keeps them and retries, without stranding the request or running it again;
    /healthz and reads answer meanwhile. Once space returns the future resolves with the
    result a fresh identical forward gives."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs a tmpfs mount (root) to fill a disk for real")
    proc = ServerProcess(mnt / "data", [TINY]).start()
    filler = mnt / "filler"
    try:
        r = Run(proc, 1)
        datums = [{"model_input": {"chunks": [{"tokens": [5 + (i * 7 + j) % 1000
                                                          for j in range(1500)],
                                               "type": "encoded_text"}]},
                   "loss_fn_inputs": {"target_tokens": {
                       "data": [6 + (i * 7 + j) % 1000 for j in range(1500)],
                       "dtype": "int64"}}} for i in range(8)]  # 12k tokens: several cycles
        body = {"model_id": r.id, "seq_id": 1, "forward_input": {
            "loss_fn": "cross_entropy", "data": datums}}
        fut = r.ok("/forward", body)["request_id"]
        db = sqlite3.connect(mnt / "data" / "bios.db", timeout=30)
        deadline = time.monotonic() + 300
        while db.execute("SELECT status FROM requests WHERE id = ?", (fut,)).fetchone()[0] \
                != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # No WAL frames left to reuse: every write the server makes now needs new blocks.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        fill(filler)
        failed = "recording the results of cycle"
        while failed not in proc.log():
            assert time.monotonic() < deadline, proc.log()[-3000:]
            assert db.execute("SELECT status FROM requests WHERE id = ?",
                              (fut,)).fetchone()[0] == "running", "recorded on a full disk"
            time.sleep(0.05)
        assert r.http.get("/healthz").status_code == 200
        assert r.http.post("/retrieve_future", json={"request_id": fut}).json().get(
            "type") == "try_again"
        listing = r.http.get("/training_runs")
        assert listing.status_code == 200 and listing.json()["training_runs"], listing.text
        filler.unlink()
        out = r.wait(fut)  # space again: the kept results are recorded
        assert "recorded the results of cycle" in proc.log()
        assert len(out["loss_fn_outputs"]) == 8
        again = r.wait(r.ok("/forward", {**body, "seq_id": 2})["request_id"])
        assert out["loss_fn_outputs"] == again["loss_fn_outputs"]
        assert out["metrics"]["loss:sum"] == pytest.approx(again["metrics"]["loss:sum"])
    finally:
        filler.unlink(missing_ok=True)
        proc.stop()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("tokens,target,what", [
    ([True, 2, 3], [2, 3, 4], "tokens"),
    (["7", 2, 3], [2, 3, 4], "tokens"),
    ([1, 2, 3], [True, 3, 4], "target_tokens"),
    ([1, 2, 3], ["7", 3, 4], "target_tokens"),
])
def test_token_ids_must_be_integers(run: Run, tokens: list[Any], target: list[Any],
                                    what: str) -> None:
    body = run.fb(9000)
    d = body["forward_backward_input"]["data"][0]
    d["model_input"]["chunks"][0]["tokens"] = tokens
    d["loss_fn_inputs"]["target_tokens"]["data"] = target
    resp = run.http.post("/forward_backward", json=body)
    assert resp.status_code == 400, resp.text
    assert what in resp.json()["field"], resp.json()


@pytest.mark.parametrize("lr", [1e308, 11.0])
def test_absurd_learning_rate_is_rejected(run: Run, lr: float) -> None:
    resp = run.http.post("/optim_step", json={"model_id": run.id, "seq_id": 9001,
                                              "adam_params": {"learning_rate": lr}})
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == "adam_params.learning_rate"


@pytest.mark.parametrize("offset", [2**63, 2**63 - 1, 2**31])
def test_huge_offset_is_a_400(run: Run, offset: int) -> None:
    resp = run.http.get("/training_runs", params={"offset": offset})
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == "query.offset"


def _raw(server: ServerProcess, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        with contextlib.suppress(OSError):  # the server closed while we still sent: fine
            s.sendall(head)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except OSError:
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


def test_oversize_request_head_is_refused_before_auth(server: ServerProcess) -> None:
    big = b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * (1 << 20) + b"\r\n\r\n"
    assert _raw(server, big).startswith(b"HTTP/1.1 431")
    many = b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n"
    assert _raw(server, many).startswith(b"HTTP/1.1 431")
    ok = _raw(server, b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]


# ----------------------------------------------------------------------------- start-up checks


def _serve_fails(data_dir: Path, *extra: str) -> str:
    proc = ServerProcess(data_dir, [TINY], extra_args=list(extra))
    with pytest.raises(RuntimeError) as e:
        proc.start(timeout=120)
    return str(e.value)


@pytest.fixture
def fresh_data_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "data"
    d.mkdir()
    yield d


def test_zero_length_database_is_refused_without_the_flag(fresh_data_dir: Path) -> None:
    (fresh_data_dir / "bios.db").write_bytes(b"")
    out = _serve_fails(fresh_data_dir)
    assert "empty (0 bytes)" in out and "--allow-empty-database" in out, out[-2000:]


def test_corrupted_database_is_refused(fresh_data_dir: Path) -> None:
    import sqlite3

    db = fresh_data_dir / "bios.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x TEXT)")
    conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    conn.commit()
    conn.close()
    raw = bytearray(db.read_bytes())
    for page in range(1, len(raw) // 4096):  # every page but the header: garbage
        raw[page * 4096:page * 4096 + 64] = b"\xff" * 64
    db.write_bytes(bytes(raw))
    out = _serve_fails(fresh_data_dir)
    assert "bios.db in the data dir is" in out and "backup" in out, out[-2000:]


def test_corrupted_archive_secret_is_refused(fresh_data_dir: Path) -> None:
    (fresh_data_dir / "archive_url_secret").write_bytes(b"\x00\xffnot a secret")
    out = _serve_fails(fresh_data_dir)
    assert "archive URL secret" in out and "64-hex-digit" in out, out[-2000:]


# ----------------------------------------------------------------------------- data dir


def test_clean_shutdown_snapshots_and_a_copied_data_dir_reads_its_own_files(
        tmp_path: Path) -> None:
    """SIGTERM snapshots the run (the restart replays nothing); directories are stored
    relative to the data dir, so a copy works after the original is gone; bios.db is 0600;
    size_bytes is the checkpoint's real size."""
    import shutil
    import sqlite3
    import time

    data = tmp_path / "data"
    server = ServerProcess(data, [TINY]).start()
    try:
        sc = bios.ServiceClient(base_url=server.base_url)
        tc = sc.create_lora_training_client(TINY, rank=2, seed=3)
        one = types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7]),
                          loss_fn_inputs={"target_tokens": [6, 7, 8]})
        for _ in range(2):
            tc.forward_backward([one], "cross_entropy").result(timeout=120)
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
        path = tc.save_state("ck1").result(timeout=120).path
        listing = httpx.get(f"{server.base_url}/api/v1/training_runs/{tc.model_id}/"
                            "checkpoints", timeout=30).json()["checkpoints"]
        [ck] = listing
        files = [f for f in (data / "checkpoints").rglob("*") if f.is_file()]
        assert ck["size_bytes"] == sum(f.stat().st_size for f in files) > 0
        assert (data / "bios.db").stat().st_mode & 0o777 == 0o600
    finally:
        server.stop()  # SIGTERM
    assert "snapshots model=bios/tiny-llama runs=1" in server.log()
    with sqlite3.connect(data / "bios.db") as conn:
        stored = [r[0] for r in conn.execute("SELECT directory FROM checkpoints")]
        stored += [r[0] for r in conn.execute("SELECT snapshot_dir FROM training_runs")]
    assert all(not d.startswith("/") for d in stored), stored

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    shutil.rmtree(data)  # the original is gone: the copy must read its own files
    server = ServerProcess(copy, [TINY]).start()
    try:
        sc = bios.ServiceClient(base_url=server.base_url)
        resumed = sc.create_training_client_from_state_with_optimizer(path)
        out = resumed.forward_backward([one], "cross_entropy").result(timeout=120)
        assert "loss:sum" in out.metrics
        deadline = time.monotonic() + 120
        while "recovered run" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"recovered run {tc.model_id}: snapshot@seq 5 + replayed 0 ops" in server.log()
    finally:
        server.stop()
