#!/usr/bin/env python
"""Load: N clients pipelining training and sampling against one server for a bounded time.

One `bios serve` (the tiny model, continuous clock) with small queue limits, so backpressure
(429 + retry) is exercised at every scope: per run, per tenant and for the whole server. The
clients are split over `--tenants` API-key tenants. Each client is an asyncio task with its own
ServiceClient and LoRA training run (rank 8) that keeps `--depth` steps of
forward_backward + optim_step in flight (1-2 sequences of 32-64 tokens), and every
`--sample-every` steps calls save_weights_and_get_sampling_client and fires `--samples`
concurrent sample requests (max_tokens 16) whose results it does not wait for. After
`--seconds` no new work starts and everything in flight is drained (`--drain-timeout`).

Every request the bench issues is tracked:
  submit latency      call -> the server acknowledged it (the first await of an `_async` call)
  completion latency  call -> result
  outcome             completed; failed with a clear error (a BiosAPIError with a message);
                      or lost (not resolved within the drain timeout, or a non-Bios exception)
The server's RSS is read from /proc every second, and its cycle log gives malloc's heap in use
after each cycle; "bounded" compares each one's maximum over the last third of the run with the
middle third's (the first third is warm-up). A plot goes to bench/results/load_memory.png.
429s are counted from the SDK's retry log records (by queue scope).
Afterwards the server's own request table is checked for requests left queued/running.

Prints a latency table per operation, the outcomes, 429s and memory; the LAST line is
`lost requests: N`. Writes bench/results/load.json.
Usage: python bench/load.py [--clients 32] [--seconds 60] [--tenants 4] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import os
import platform
import random
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

import bios
from bios import types
from bios.exceptions import (
    APIStatusError,
    BiosAPIError,
    InternalServerError,
    RateLimitError,
    RequestFailedError,
)
from harness import REPO
from server_process import ServerProcess

TINY = "bios/tiny-llama"
VOCAB = 49152
RESULTS = REPO / "bench" / "results" / "load.json"
KINDS = ("create", "forward_backward", "optim_step", "save_for_sampler", "sample")


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class Rec:
    """One request the bench issued."""

    kind: str
    client: int
    t_call: float
    t_submit: float | None = None  # None for one-await calls (create) and failed submissions
    t_done: float | None = None
    outcome: str | None = None  # completed | failed | lost (None while pending)
    error: str | None = None
    server_fault: bool = False  # a 5xx after retries, or a request failed with category server


def describe(e: BaseException) -> str:
    status = f" {e.status_code}" if isinstance(e, APIStatusError) else ""
    return f"{type(e).__name__}{status}: {e}"


class Ledger:
    """Every request, its timings and outcome; completion waiters run as tasks."""

    def __init__(self) -> None:
        self.recs: list[Rec] = []
        self.waiters: set[asyncio.Task[Any]] = set()

    def _settle(self, rec: Rec, e: BaseException | None) -> None:
        rec.t_done = time.monotonic()
        if e is None:
            rec.outcome = "completed"
        elif isinstance(e, BiosAPIError) and str(e).strip():
            rec.outcome, rec.error = "failed", describe(e)
            rec.server_fault = isinstance(e, InternalServerError) or (
                isinstance(e, RequestFailedError) and e.category == "server")
        else:  # an unclear error is as bad as no answer
            rec.outcome, rec.error = "lost", "unclear exception: " + describe(e)

    async def one(self, kind: str, client: int, fn: Callable[..., Awaitable[Any]],
                  *args: Any, **kw: Any) -> Any:
        """A one-await call (the SDK does not expose its submission): result or None."""
        rec = Rec(kind, client, time.monotonic())
        self.recs.append(rec)
        try:
            value = await fn(*args, **kw)
        except Exception as e:  # classified below, not swallowed
            self._settle(rec, e)
            return None
        self._settle(rec, None)
        return value

    async def submit(self, kind: str, client: int, fn: Callable[..., Awaitable[Any]],
                     *args: Any, **kw: Any) -> asyncio.Task[Any] | None:
        """Await the submission (`fn` returns the APIFuture once the server accepted it); a
        task then waits for the result (it never raises: the outcome goes to the Rec)."""
        rec = Rec(kind, client, time.monotonic())
        self.recs.append(rec)
        try:
            fut = await fn(*args, **kw)
        except Exception as e:
            self._settle(rec, e)
            return None
        rec.t_submit = time.monotonic()
        task = asyncio.create_task(self._finish(rec, fut))
        self.waiters.add(task)
        task.add_done_callback(self.waiters.discard)
        return task

    async def _finish(self, rec: Rec, fut: Any) -> Any:
        try:
            value = await fut
        except Exception as e:
            self._settle(rec, e)
            return None
        self._settle(rec, None)
        return value


class RetryCounter(logging.Handler):
    """Counts the SDK's retries (its `bios: ... failed (...); retry n in s` INFO records)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rate_limited: collections.Counter[str] = collections.Counter()  # by queue scope
        self.other: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if not (isinstance(record.msg, str) and "failed (%s); retry" in record.msg):
            return
        err = record.args[2] if isinstance(record.args, tuple) and len(record.args) > 2 else None
        if isinstance(err, RateLimitError):
            state = err.body.get("queue_state", {}) if isinstance(err.body, dict) else {}
            scope = str(state.get("scope", "?"))
            self.rate_limited[scope] += 1
            self.examples.setdefault(f"429/{scope}", str(err))
        else:
            name = describe(err) if isinstance(err, BaseException) else str(err)
            key = name.split(":")[0]
            self.other[key] += 1
            self.examples.setdefault(key, name)


class RssSampler(threading.Thread):
    """The server process's VmRSS (MiB) every `period` seconds."""

    def __init__(self, pid: int, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def read(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def run(self) -> None:
        while not self._halt.is_set():
            rss = self.read()
            if rss is not None:
                self.samples.append((time.monotonic(), rss))
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


# ----------------------------------------------------------------------------- the clients


def make_data(rng: random.Random) -> list[types.Datum]:
    out = []
    for _ in range(rng.randint(1, 2)):
        toks = [rng.randrange(3, VOCAB) for _ in range(rng.randint(32, 64) + 1)]
        out.append(types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                               loss_fn_inputs={"target_tokens": toks[1:]}))
    return out


async def client_loop(i: int, sc: bios.ServiceClient, ledger: Ledger, args: argparse.Namespace,
                      end: float, stats: dict[str, int]) -> None:
    rng = random.Random(1000 + i)
    tc = await ledger.one("create", i, sc.create_lora_training_client_async, base_model=TINY,
                          rank=args.rank, seed=i)
    if tc is None:
        return
    adam = types.AdamParams(learning_rate=1e-4)
    params = types.SamplingParams(max_tokens=16, temperature=1.0)
    window: collections.deque[tuple[Any, Any]] = collections.deque()
    step = 0
    while time.monotonic() < end:
        fb = await ledger.submit("forward_backward", i, tc.forward_backward_async,
                                 make_data(rng), "cross_entropy")
        opt = await ledger.submit("optim_step", i, tc.optim_step_async, adam)
        window.append((fb, opt))
        step += 1
        stats["steps"] += 1
        while len(window) >= args.depth:  # keep depth-1 steps queued behind the oldest
            for task in window.popleft():
                if task is not None:
                    await task
        if step % args.sample_every == 0 and time.monotonic() < end:
            # = save_weights_and_get_sampling_client_async, split so its submission is timed
            save = await ledger.submit("save_for_sampler", i,
                                       lambda: tc._save_and_sample()._submitted())
            sampler = await save if save is not None else None
            if sampler is None:
                continue
            prompts = [types.ModelInput.from_ints([rng.randrange(3, VOCAB)
                                                   for _ in range(rng.randint(8, 16))])
                       for _ in range(args.samples)]
            await asyncio.gather(*(ledger.submit("sample", i, sampler.sample_async, p,
                                                 num_samples=1, sampling_params=params)
                                   for p in prompts))
    for pair in window:
        for task in pair:
            if task is not None:
                await task


# ----------------------------------------------------------------------------- server


def make_tenants(n: int) -> tuple[list[str], str]:
    """n random API keys and the BIOS_API_KEYS value for them (tenant i = 'load-i')."""
    keys = [f"bios_{secrets.token_urlsafe(32)}" for _ in range(n)]
    env = ",".join(f"load-{t}:{hashlib.sha256(k.encode()).hexdigest()}"
                   for t, k in enumerate(keys))
    return keys, env


def server_log_problems(text: str) -> list[str]:
    """Lines of the server log that point at a server fault (tracebacks, 5xx, errors)."""
    marks = ("Traceback", "ERROR", "Exception in ASGI", "500 Internal", "engine error",
             "CRITICAL")
    return [line for line in text.splitlines() if any(m in line for m in marks)]


def store_statuses(db: Path) -> dict[str, dict[str, int]]:
    """{kind: {status: count}} from the server's request table (after it stopped)."""
    out: dict[str, dict[str, int]] = collections.defaultdict(dict)
    with sqlite3.connect(db) as conn:
        for kind, status, n in conn.execute(
                "select kind, status, count(*) from requests group by kind, status"):
            out[kind][status] = n
    return dict(out)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- main


async def drive(args: argparse.Namespace, server: ServerProcess, keys: list[str],
                ledger: Ledger, rss: RssSampler, retries: RetryCounter) -> dict[str, float]:
    services = [bios.ServiceClient(base_url=server.base_url, api_key=keys[i % len(keys)])
                for i in range(args.clients)]
    stats: dict[str, int] = collections.Counter()
    t0 = time.monotonic()
    end = t0 + args.seconds
    clients = [asyncio.create_task(client_loop(i, services[i], ledger, args, end, stats))
               for i in range(args.clients)]

    async def progress() -> None:
        while True:
            await asyncio.sleep(10)
            done = collections.Counter(r.outcome for r in ledger.recs)
            pending = done.pop(None, 0)
            rss_now = rss.samples[-1][1] if rss.samples else float("nan")
            print(f"  t={time.monotonic() - t0:5.0f}s  steps={stats['steps']:5d}  "
                  f"completed={done['completed']:6d}  failed={done['failed']:3d}  "
                  f"in flight={pending:4d}  429s={sum(retries.rate_limited.values()):5d}  "
                  f"server RSS={rss_now:6.0f} MiB  load={loadavg()}", flush=True)

    reporter = asyncio.create_task(progress())
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    t_stop = time.monotonic()
    print(f"  {args.seconds:.0f} s up: no new work; draining (timeout {args.drain_timeout:.0f} s)",
          flush=True)
    drain_deadline = t_stop + args.drain_timeout
    _, still = await asyncio.wait(clients, timeout=args.drain_timeout)
    while ledger.waiters and time.monotonic() < drain_deadline:
        await asyncio.wait(set(ledger.waiters),
                           timeout=max(0.01, drain_deadline - time.monotonic()))
    t_drained = time.monotonic()
    reporter.cancel()
    for task in [*still, *ledger.waiters]:
        task.cancel()
    await asyncio.gather(*still, *ledger.waiters, return_exceptions=True)
    for rec in ledger.recs:
        if rec.outcome is None:
            rec.outcome = "lost"
            rec.error = (f"not resolved {args.drain_timeout:.0f} s after the run ended "
                         f"({'submitted' if rec.t_submit else 'never acknowledged'})")
    return {"t0": t0, "run_s": t_stop - t0, "drain_s": t_drained - t_stop,
            "steps": stats["steps"]}


def summarize(ledger: Ledger, run_s: float) -> dict[str, Any]:
    per_kind: dict[str, Any] = {}
    for kind in KINDS:
        recs = [r for r in ledger.recs if r.kind == kind]
        if not recs:
            continue
        sub = [r.t_submit - r.t_call for r in recs if r.t_submit is not None]
        comp = [r.t_done - r.t_call for r in recs if r.outcome == "completed" and r.t_done]
        outcomes = collections.Counter(r.outcome for r in recs)
        per_kind[kind] = {
            "n": len(recs), "completed": outcomes["completed"], "failed": outcomes["failed"],
            "lost": outcomes["lost"], "per_s": outcomes["completed"] / run_s,
            "submit_p50_ms": None if not sub else 1000 * pct(sub, 50),
            "submit_p99_ms": None if not sub else 1000 * pct(sub, 99),
            "complete_p50_ms": None if not comp else 1000 * pct(comp, 50),
            "complete_p99_ms": None if not comp else 1000 * pct(comp, 99),
        }
    return per_kind


CYCLE_MEMORY = re.compile(r"rss_mib=(\d+) heap_mib=(\d+)")


def cycle_heap_mib(log_text: str) -> list[float]:
    """malloc's heap in use at the end of each cycle, from the server's cycle log lines."""
    return [float(m.group(2)) for m in CYCLE_MEMORY.finditer(log_text)]


def thirds_growth(values: list[float]) -> tuple[float, float] | None:
    """(max of the middle third, max of the last third): the first third is warm-up (runs
    being created, the allocator's first large passes) and is left out."""
    if len(values) < 3:
        return None
    third = len(values) // 3
    return max(values[third:2 * third]), max(values[-third:])


def within_bound(thirds: tuple[float, float]) -> bool:
    """The last third's max is within 10% (at least 64 MiB) of the middle third's."""
    middle, last = thirds
    return last - middle <= max(0.10 * middle, 64.0)


def memory_summary(samples: list[tuple[float, float]], t0: float, t_end: float,
                   heap: list[float]) -> dict[str, Any]:
    """Memory over the loaded period (from the first training result to the end of the run).

    Two series: the server's RSS sampled every second (includes each cycle's transient peak of
    activations and logits), and malloc's heap in use at the end of each cycle, from the
    server's cycle log (the live memory a leak would grow). Bounded: for both, the max over the
    last third is within 10% (at least 64 MiB) of the max over the middle third.
    """
    during = [v for t, v in samples if t0 <= t <= t_end]
    out: dict[str, Any] = {"samples": len(samples), "cycles_with_heap": len(heap)}
    rss_thirds, heap_thirds = thirds_growth(during), thirds_growth(heap)
    if rss_thirds is None:
        return out | {"bounded": None}
    out |= {"start_mib": during[0], "max_mib": max(v for _, v in samples),
            "final_mib": samples[-1][1], "rss_middle_third_max_mib": rss_thirds[0],
            "rss_last_third_max_mib": rss_thirds[1]}
    ok = [within_bound(rss_thirds)]
    if heap_thirds is not None:
        out |= {"heap_first_cycle_mib": heap[0], "heap_middle_third_max_mib": heap_thirds[0],
                "heap_last_third_max_mib": heap_thirds[1]}
        ok.append(within_bound(heap_thirds))
    return out | {"bounded": all(ok)}


def plot_memory(samples: list[tuple[float, float]], heap: list[float], t0: float,
                path: Path) -> Path | None:
    """RSS over time and heap in use per cycle, to bench/results/load_memory.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot([t - t0 for t, _ in samples], [v for _, v in samples], lw=1)
    ax1.set(title="server RSS (sampled every second)", xlabel="seconds since start",
            ylabel="MiB")
    ax2.plot(range(1, len(heap) + 1), heap, lw=1, marker=".")
    ax2.set(title="malloc heap in use at each cycle's end", xlabel="cycle", ylabel="MiB")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--tenants", type=int, default=4, help="API-key tenants the clients share")
    ap.add_argument("--depth", type=int, default=4, help="training steps in flight per client")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sample-every", type=int, default=3, help="steps between sampler saves")
    ap.add_argument("--samples", type=int, default=4, help="sample requests per sampler save")
    ap.add_argument("--max-queued-per-run", type=int, default=6)
    ap.add_argument("--max-queued-per-tenant", type=int, default=24)
    ap.add_argument("--max-queued-total", type=int, default=64)
    ap.add_argument("--drain-timeout", type=float, default=90.0)
    ap.add_argument("--quick", action="store_true", help="8 clients, 15 s")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--keep-dir", type=Path, default=None,
                    help="run the server in this data dir and keep it (log: server.log)")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.seconds = 8, 15.0
    args.tenants = max(1, min(args.tenants, args.clients))

    retries = RetryCounter()
    sdk_log = logging.getLogger("bios")
    sdk_log.setLevel(logging.INFO)
    sdk_log.addHandler(retries)
    sdk_log.propagate = False

    keys, keys_env = make_tenants(args.tenants)
    load_before = loadavg()
    print(f"load: {args.clients} clients ({args.tenants} tenants), {args.seconds:.0f} s, "
          f"depth {args.depth}, rank {args.rank}; queue limits run/tenant/total = "
          f"{args.max_queued_per_run}/{args.max_queued_per_tenant}/{args.max_queued_total}; "
          f"{os.cpu_count()} CPUs, load average {load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bios-load-") as tmp_dir:
        tmp = str(args.keep_dir) if args.keep_dir else tmp_dir
        server = ServerProcess(
            Path(tmp), [TINY], clock_period=0.0, env={"BIOS_API_KEYS": keys_env},
            extra_args=["--max-queued-per-run", str(args.max_queued_per_run),
                        "--max-queued-per-tenant", str(args.max_queued_per_tenant),
                        "--max-queued-total", str(args.max_queued_total)])
        t_start = time.monotonic()
        server.start()
        start_s = time.monotonic() - t_start
        assert server.proc is not None
        rss = RssSampler(server.proc.pid)
        rss.start()
        print(f"  server up in {start_s:.1f} s (pid {server.proc.pid})", flush=True)
        ledger = Ledger()
        try:
            timing = asyncio.run(drive(args, server, keys, ledger, rss, retries))
            healthy = httpx.get(f"{server.base_url}/api/v1/healthz", timeout=10).status_code
        finally:
            rss.stop()
            server.stop()
        log_text = server.log()
        problems = server_log_problems(log_text)
        statuses = store_statuses(Path(tmp) / "bios.db")
        cycles = log_text.count(" cycle ")

    run_s = timing["run_s"]
    per_kind = summarize(ledger, run_s)
    outcomes = collections.Counter(r.outcome for r in ledger.recs)
    errors = collections.Counter((r.outcome, r.error) for r in ledger.recs if r.error)
    lost = outcomes["lost"]
    server_5xx = sum(1 for r in ledger.recs if r.server_fault)
    stuck = {k: {s: n for s, n in v.items() if s in ("queued", "running")}
             for k, v in statuses.items()}
    stuck = {k: v for k, v in stuck.items() if v}
    warm = [r.t_done for r in ledger.recs
            if r.kind == "forward_backward" and r.outcome == "completed" and r.t_done]
    heap = cycle_heap_mib(log_text)
    mem = memory_summary(rss.samples, min(warm, default=timing["t0"]), timing["t0"] + run_s,
                         heap)
    plot = plot_memory(rss.samples, heap, t_start, args.out.with_name("load_memory.png"))
    n429 = sum(retries.rate_limited.values())

    print()
    print(f"{'operation':<18}{'n':>7}{'ok':>7}{'fail':>6}{'lost':>6}{'ok/s':>8}"
          f"{'submit p50':>12}{'p99':>8}{'complete p50':>14}{'p99':>8}   (ms)")
    for kind, k in per_kind.items():
        print(f"{kind:<18}{k['n']:>7}{k['completed']:>7}{k['failed']:>6}{k['lost']:>6}"
              f"{k['per_s']:>8.1f}{fmt(k['submit_p50_ms']):>12}{fmt(k['submit_p99_ms']):>8}"
              f"{fmt(k['complete_p50_ms']):>14}{fmt(k['complete_p99_ms']):>8}")
    print(f"{'all':<18}{len(ledger.recs):>7}{outcomes['completed']:>7}{outcomes['failed']:>6}"
          f"{lost:>6}{outcomes['completed'] / run_s:>8.1f}")
    print()
    print(f"training steps: {timing['steps']} in {run_s:.0f} s ({timing['steps'] / run_s:.1f}/s); "
          f"drain {timing['drain_s']:.1f} s; server cycles: {cycles}")
    print(f"429s (SDK retries): {n429} "
          f"({', '.join(f'{s}: {n}' for s, n in sorted(retries.rate_limited.items())) or 'none'}); "
          f"other retries: {sum(retries.other.values())}"
          + (f" ({dict(retries.other)})" if retries.other else ""))
    if mem.get("bounded") is not None:
        heap_line = (f"; heap in use at cycle ends: middle-third max "
                     f"{mem['heap_middle_third_max_mib']:.0f} vs last-third max "
                     f"{mem['heap_last_third_max_mib']:.0f} MiB"
                     if "heap_last_third_max_mib" in mem else "")
        print(f"server RSS: start {mem['start_mib']:.0f} MiB, max {mem['max_mib']:.0f} MiB, final "
              f"{mem['final_mib']:.0f} MiB; middle-third max {mem['rss_middle_third_max_mib']:.0f}"
              f" vs last-third max {mem['rss_last_third_max_mib']:.0f} MiB{heap_line} -> "
              f"{'bounded' if mem['bounded'] else 'GROWING'}"
              + (f" (plot: {plot.name})" if plot else ""))
    print(f"server: healthz {healthy} after the run, {len(problems)} error lines in its log, "
          f"5xx/server failures seen by clients: {server_5xx}, requests left queued/running in "
          f"its store: {stuck or 'none'}")
    for (outcome, err), n in errors.most_common(8):
        print(f"  {outcome} x{n}: {err[:300]}")
    for line in problems[:10]:
        print(f"  server log: {line[:300]}")
    print(f"load average before {load_before}, after {loadavg()}")

    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_before": load_before, "load_after": loadavg()},
        "server_start_s": start_s, "run_s": run_s, "drain_s": timing["drain_s"],
        "training_steps": timing["steps"], "server_cycles": cycles,
        "per_kind": per_kind, "outcomes": dict(outcomes),
        "errors": [{"outcome": o, "error": e, "n": n} for (o, e), n in errors.most_common()],
        "retries_429": dict(retries.rate_limited), "retries_other": dict(retries.other),
        "retry_examples": retries.examples,
        "server_rss": mem, "rss_series_mib": [round(v, 1) for _, v in rss.samples],
        "server_healthz_after": healthy, "server_log_problems": problems[:50],
        "server_store_statuses": statuses, "server_store_stuck": stuck,
        "client_failures_5xx_or_server": server_5xx,
        "lost_requests": lost,
        "lost_examples": [asdict(r) for r in ledger.recs if r.outcome == "lost"][:20],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(args.out)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    print(f"lost requests: {lost}")


if __name__ == "__main__":
    main()
