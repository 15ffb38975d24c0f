"""Six 55 MB request bodies at once: server RSS and another tenant's /healthz latency, with
the body byte budget (the default: bodies read and parsed up to --max-body-bytes at once)
and without it (a budget of 1 GiB: every body at once, as before issue 20).

Each body is a forward_backward whose one datum has 4.3M tokens: valid JSON that the server
must parse and validate before it rejects it (400: longer than the context). RSS is read from
/proc/<pid>/status every 20 ms during the burst. Both servers run in one process, one after
the other. Last line: `body_memory: peak rss added <budget> MiB vs <unbounded> MiB`.

    PYTHONPATH=src .venv/bin/python bench/body_memory.py
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import httpx

from harness import REPO, load, machine
from server_process import ServerProcess

BODIES = 6
TOKENS = 4_300_000  # twice in the body (inputs and targets): ~55 MB of JSON


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def body(run_id: str) -> bytes:
    tokens = [1 + (i * 7919) % 49151 for i in range(TOKENS)]  # real ids: not cached ints
    return json.dumps({"model_id": run_id, "seq_id": 1, "forward_backward_input": {
        "loss_fn": "cross_entropy", "data": [{
            "model_input": {"chunks": [{"tokens": tokens, "type": "encoded_text"}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens, "dtype": "int64"}}}]}}
    ).encode()


def measure(in_flight: int | None, payload: bytes, root: Path) -> dict:
    extra = ["--max-body-bytes-in-flight", str(in_flight)] if in_flight else []
    server = ServerProcess(root / f"data-{in_flight or 'default'}", ["bios/tiny-llama"],
                           extra_args=extra).start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        http = httpx.Client(base_url=f"{server.base_url}/api/v1", timeout=300)
        for _ in range(5):  # warm the routes up
            http.get("/healthz")
        base = rss_mib(pid)
        peak = base
        health: list[float] = []
        statuses: list[int] = []
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mib(pid))
                time.sleep(0.02)

        def probe() -> None:
            with httpx.Client(base_url=f"{server.base_url}/api/v1", timeout=60) as c:
                while not done.is_set():
                    t0 = time.perf_counter()
                    c.get("/healthz")
                    health.append(time.perf_counter() - t0)
                    time.sleep(0.05)

        def send() -> None:
            with httpx.Client(base_url=f"{server.base_url}/api/v1", timeout=600) as c:
                r = c.post("/forward_backward", content=payload,
                           headers={"Content-Type": "application/json"})
                statuses.append(r.status_code)

        helpers = [threading.Thread(target=f) for f in (sample, probe)]
        senders = [threading.Thread(target=send) for _ in range(BODIES)]
        t0 = time.perf_counter()
        for t in helpers + senders:
            t.start()
        for t in senders:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        done.set()
        for t in helpers:
            t.join()
        after = rss_mib(pid)
        health.sort()
        return {"in_flight_budget": in_flight or "default (64 MiB)", "statuses": statuses,
                "rss_before_mib": round(base), "rss_peak_mib": round(peak),
                "rss_after_mib": round(after), "peak_added_mib": round(peak - base),
                "burst_s": round(wall, 2),
                "healthz_p50_s": round(health[len(health) // 2], 3) if health else None,
                "healthz_max_s": round(health[-1], 3) if health else None,
                "load": load()}
    finally:
        server.stop()


def main() -> None:
    payload = body("s-none:train:0")
    print(f"body: {len(payload) / 1e6:.1f} MB x {BODIES}; load {load()}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        budget = measure(None, payload, Path(d))
        print(budget, flush=True)
        unbounded = measure(1 << 30, payload, Path(d))
        print(unbounded, flush=True)
    out = {"machine": machine(), "bodies": BODIES, "body_bytes": len(payload),
           "with_budget": budget, "without_budget": unbounded}
    path = REPO / "bench" / "results" / "body_memory.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"body_memory: peak rss added {budget['peak_added_mib']} MiB vs "
          f"{unbounded['peak_added_mib']} MiB")


if __name__ == "__main__":
    main()
