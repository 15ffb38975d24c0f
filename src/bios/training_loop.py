"""`bios.train` / `bios.train_async`: a whole supervised training loop over a `TrainingClient`.

    report = bios.train(training_client, batches, learning_rate=1e-4)               # efficient
    report = bios.train(training_client, batches, mode="simple")                    # teaching
    report = await bios.train_async(training_client, batches, pipeline_depth=8)

Two modes, the seeds' two ways of driving Bios, with the same result (same calls, same order):

- ``mode="simple"``: each call is waited for before the next is made (forward_backward, its
  result, optim_step, its result). Easy to follow; every call waits for its own clock cycle.
- ``mode="efficient"`` (default): the seeds' `pipelined_training`. Up to `pipeline_depth` steps
  (forward_backward + optim_step pairs) are queued on the server at once; the loop waits for the
  oldest step's results, reports them, and queues the next batch. The server runs every queued
  step in the next clock cycle, so a cycle does up to `pipeline_depth` steps instead of half of
  one. Memory stays bounded: batches are read from the iterable lazily, `pipeline_depth` steps
  at most are held, and only each step's loss and metrics are kept.

Errors, per step, as the seeds' `robust_training` (after the SDK's own HTTP retries):

- transient (the server failed running it: `RequestFailedError` of category "server"/"unknown",
  `InternalServerError`, `RateLimitError`, `APIConnectionError`, a timeout): the step is
  submitted again, up to `max_retries` times, then skipped with a warning. In efficient mode the
  retried step runs after the steps already queued behind it (order of batches changes).
- the batch is wrong (`BadRequestError`, `UnprocessableEntityError`, `RequestFailedError` of
  category "user", or the SDK's own check of the batch raising `ValueError`): skipped with a
  warning. In efficient mode a failure found only when the result arrives has its optim_step
  already queued; it applies no new gradient (Adam's momentum still moves the weights a little).
- anything else (including an exception from your callback): the loop queues
  `save_state(name=f"error_step_{n}")` and re-raises; `n` is the number of batches queued before
  the checkpoint, so `train(..., resume_from=<that path>)` continues with batch `n`. The exception
  carries a note with the path.

Resuming: `resume_from="bios://<run>/weights/step_40"` loads that checkpoint's weights and Adam
state into the given client and skips the first 40 batches (the number at the end of the name;
or pass `start_step`). `checkpoint_every=K` saves `step_<n>` checkpoints every K batches.

One implementation: `train_async` is the coroutine; `train` runs it on a private event loop in
the calling thread (or a helper thread when the caller is itself inside a running loop), never on
the SDK's own loop thread, so callbacks may call blocking SDK methods.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

from bios import types
from bios.exceptions import (
    APIConnectionError,
    BadRequestError,
    InternalServerError,
    RateLimitError,
    RequestFailedError,
    UnprocessableEntityError,
)
from bios.futures import APIFuture
from bios.rest_client import parse_checkpoint_path

__all__ = ["LearningRate", "StepCallback", "TrainingReport", "train", "train_async"]

log = logging.getLogger("bios")

DEFAULT_PIPELINE_DEPTH = 4  # the seeds: "maintain a pipeline depth of 4-8 requests"

# (step, loss, metrics) -> None (or an awaitable, awaited by the loop).
StepCallback = Callable[[int, float, dict[str, float]], Any]
# A constant, a per-step list (the last value holds after its end), or step -> learning rate.
LearningRate = float | Sequence[float] | Callable[[int], float]

# Server-side run metrics (read through RestClient.get_run_metrics when the server has it).
_SERVER_FIELDS = ("cycles_with_work", "missed_cycles", "queue_wait_s", "engine_busy_s",
                  "engine_idle_s", "tokens", "compute_s")


@dataclass
class TrainingReport:
    """What one `train` call did, measured by the client (and the server when it can tell).

    Attributes:
        model_id: the training run.
        mode: "simple" or "efficient".
        pipeline_depth: steps kept queued (1 in simple mode).
        start_step: the first batch index trained (after resuming).
        next_step: the index of the first batch not trained (resume point).
        steps: steps that finished.
        skipped: indices of batches skipped after errors.
        retries: step resubmissions after transient errors.
        wall_s: seconds from the first submission to the last result.
        losses: (step, loss) for every finished step, in the order they finished.
        step_latency_s: per finished step, seconds from its first submission to its last result
            (in efficient mode this includes waiting behind the steps queued before it).
        checkpoints: paths of the checkpoints the loop saved.
        server: the run's server-side metrics, when the server reports them (else None).
    """

    model_id: str
    mode: str
    pipeline_depth: int
    start_step: int
    next_step: int = 0
    steps: int = 0
    skipped: list[int] = field(default_factory=list)
    retries: int = 0
    wall_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    step_latency_s: list[float] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    server: dict[str, Any] | None = None

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else math.nan

    def derived(self) -> dict[str, float]:
        """Efficiency figures computed from the server's metrics (empty without them).

        The server's metrics cover the whole run (since its creation), not only this call.

        cycles_per_step: clock cycles in which the run had work, per optim_step.
        utilization: the engine's busy share while the run was active.
        simple_estimate_s: what simple mode would have taken for this call's steps: its own
            compute plus, for each of its 2 calls per step, the engine's idle time per cycle
            measured here (the wait for the next cycle: about one clock period with a fixed
            period, about nothing with continuous cycles).
        """
        s = self.server or {}
        out: dict[str, float] = {}
        cycles = _num(s.get("cycles_with_work"))
        run_steps = _num(s.get("steps")) or self.steps
        if cycles and run_steps:
            out["cycles_per_step"] = cycles / run_steps
        busy, idle = _num(s.get("engine_busy_s")), _num(s.get("engine_idle_s"))
        if busy is not None and idle is not None and busy + idle > 0:
            out["utilization"] = busy / (busy + idle)
        compute = _num(s.get("compute_s"))
        if (self.mode == "efficient" and cycles and idle is not None and compute is not None
                and run_steps and self.steps):
            per_step_compute = compute / run_steps
            out["simple_estimate_s"] = self.steps * (per_step_compute + 2 * idle / cycles)
        return out

    def summary(self) -> str:
        """The end-of-training report, a few lines of text."""
        lat = self.step_latency_s
        depth = f", pipeline_depth={self.pipeline_depth}" if self.mode == "efficient" else ""
        lines = [f"bios.train: {self.steps} steps in {self.wall_s:.1f} s "
                 f"({self.steps_per_s:.3f} steps/s), mode={self.mode}{depth}, "
                 f"run {self.model_id}"]
        if lat:
            lines.append(f"  step latency (submit -> done): mean {statistics.fmean(lat):.2f} s, "
                         f"median {statistics.median(lat):.2f} s, max {max(lat):.2f} s")
        if self.losses:
            lines.append(f"  loss: first {self.losses[0][1]:.4f}, last {self.final_loss:.4f}")
        if self.skipped or self.retries:
            lines.append(f"  errors: {self.retries} retries, skipped steps {self.skipped}")
        if self.server:
            shown = ", ".join(f"{k} {_fmt(self.server[k])}" for k in _SERVER_FIELDS
                              if k in self.server)
            lines.append(f"  server: {shown}")
            d = self.derived()
            parts = []
            if "cycles_per_step" in d:
                parts.append(f"{d['cycles_per_step']:.2f} cycles/step")
            if "utilization" in d:
                parts.append(f"engine utilization {100 * d['utilization']:.0f}%")
            if "simple_estimate_s" in d:
                parts.append(f"simple mode would take ~{d['simple_estimate_s']:.1f} s "
                             f"({d['simple_estimate_s'] / max(self.wall_s, 1e-9):.1f}x)")
            if parts:
                lines.append("  " + ", ".join(parts))
        lines.append(f"  resume point: step {self.next_step}")
        return "\n".join(lines)


def _num(x: Any) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def _fmt(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def _as_dict(obj: Any) -> dict[str, Any]:
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump())
    if isinstance(obj, dict):
        return dict(obj)
    try:
        return dict(obj)
    except (TypeError, ValueError):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def _lr_function(learning_rate: LearningRate | None, base: types.AdamParams
                 ) -> Callable[[int], float]:
    if learning_rate is None:
        return lambda step: base.learning_rate
    if callable(learning_rate):
        return lambda step: float(learning_rate(step))
    if isinstance(learning_rate, int | float):
        return lambda step: float(learning_rate)
    schedule = [float(x) for x in learning_rate]
    if not schedule:
        raise ValueError("learning_rate: an empty schedule")
    return lambda step: schedule[min(step, len(schedule) - 1)]


def _steps_in_checkpoint(path: str) -> int:
    """The trailing number of a checkpoint's name: "bios://r/weights/step_40" -> 40."""
    name = parse_checkpoint_path(path)[2]
    m = re.search(r"(\d+)$", name)
    if m is None:
        raise ValueError(f"resume_from={path!r}: the name has no step number at its end; pass "
                         "start_step= (the number of batches the checkpoint has seen)")
    return int(m.group(1))


class _InvalidBatch(Exception):
    """The SDK's own check of a batch failed (before anything was sent)."""


@dataclass
class _Step:
    step: int
    batch: Any
    adam: types.AdamParams
    attempts: int = 0
    t0: float = 0.0
    fb: APIFuture[types.ForwardBackwardOutput] | None = None
    opt: APIFuture[types.OptimStepResponse] | None = None
    fb_out: types.ForwardBackwardOutput | None = None
    opt_out: types.OptimStepResponse | None = None
    waiting: bool = False  # awaiting a result (not a submission) in simple mode

    def reset(self) -> None:
        self.fb = self.opt = self.fb_out = self.opt_out = None
        self.waiting = False


def _kind(exc: BaseException) -> Literal["transient", "user", "fatal"]:
    if isinstance(exc, _InvalidBatch | BadRequestError | UnprocessableEntityError):
        return "user"
    if isinstance(exc, RequestFailedError):
        return "user" if exc.category == "user" else "transient"
    if isinstance(exc, APIConnectionError | RateLimitError | InternalServerError | TimeoutError):
        return "transient"
    return "fatal"


class _Loop:
    """The one implementation behind `train` and `train_async`."""

    def __init__(self, client: Any, batches: Iterable[Any], *, loss_fn: str,
                 loss_fn_config: dict[str, float] | None, adam_params: types.AdamParams | None,
                 learning_rate: LearningRate | None, mode: str, pipeline_depth: int,
                 max_steps: int | None, callback: StepCallback | None, progress: bool,
                 print_report: bool, max_retries: int, retry_delay: float,
                 checkpoint_every: int | None, resume_from: str | None,
                 start_step: int | None) -> None:
        if mode not in ("simple", "efficient"):
            raise ValueError(f"mode must be 'simple' or 'efficient', not {mode!r}")
        if pipeline_depth < 1:
            raise ValueError(f"pipeline_depth must be >= 1, not {pipeline_depth}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, not {checkpoint_every}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries}")
        self.client = client
        self.batches = batches
        self.loss_fn = loss_fn
        self.loss_fn_config = loss_fn_config
        self.base_adam = adam_params or types.AdamParams()
        self.lr = _lr_function(learning_rate, self.base_adam)
        self.simple = mode == "simple"
        self.depth = 1 if self.simple else pipeline_depth
        self.max_steps = max_steps
        self.callback = callback
        self.progress = progress
        self.print_report = print_report
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.checkpoint_every = checkpoint_every
        self.resume_from = resume_from
        if resume_from is not None and start_step is None:
            start_step = _steps_in_checkpoint(resume_from)
        self.start = start_step or 0
        self.next_index = self.start  # batches taken from the iterable so far (global index)
        self.report = TrainingReport(model_id=str(getattr(client, "model_id", "?")), mode=mode,
                                     pipeline_depth=self.depth, start_step=self.start,
                                     next_step=self.start)
        self.saves: list[tuple[str, APIFuture[Any]]] = []
        self.inflight: deque[_Step] = deque()
        self.bar: Any = None

    # ------------------------------------------------------------------ one step

    async def _submit(self, s: _Step) -> None:
        """Queue the step's missing calls (simple mode: and wait for each)."""
        if s.t0 == 0.0:
            s.t0 = time.perf_counter()
        if s.fb is None:
            try:
                coro = self.client.forward_backward_async(s.batch, self.loss_fn,
                                                          self.loss_fn_config)
            except ValueError as e:  # the SDK's own check of the batch (nothing was sent)
                raise _InvalidBatch(str(e)) from e
            s.fb = await coro
        if self.simple and s.fb_out is None:
            s.waiting = True
            s.fb_out = await s.fb
            s.waiting = False
        if s.opt is None:
            s.opt = await self.client.optim_step_async(s.adam)
        if self.simple and s.opt_out is None:
            s.waiting = True
            s.opt_out = await s.opt
            s.waiting = False

    async def _finish(self, s: _Step) -> None:
        """Wait for the step's results, then report them."""
        assert s.fb is not None and s.opt is not None
        fb_out = s.fb_out if s.fb_out is not None else await s.fb
        opt_out = s.opt_out if s.opt_out is not None else await s.opt
        latency = time.perf_counter() - s.t0
        metrics = dict(fb_out.metrics)
        metrics.update({f"optim/{k}": v for k, v in (opt_out.metrics or {}).items()})
        metrics["learning_rate"] = s.adam.learning_rate
        metrics["step_latency_s"] = latency
        loss = fb_out.loss
        r = self.report
        r.steps += 1
        r.losses.append((s.step, loss))
        r.step_latency_s.append(latency)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if self.callback is not None:
            out = self.callback(s.step, loss, metrics)
            if inspect.isawaitable(out):
                await out

    async def _attempt(self, s: _Step, stage: Callable[[_Step], Any]) -> bool:
        """Run one stage of a step (`_submit` or `_finish`) with the per-step error policy.

        Returns True when the stage went through; False when the step was skipped, or (for
        `_finish`) resubmitted after a transient failure and queued to be waited for again.
        Fatal errors save a checkpoint and re-raise.
        """
        while True:
            try:
                await stage(s)
                return True
            except Exception as e:
                kind = _kind(e)
                if kind == "fatal":
                    await self._save_and_raise(e)
                if kind == "user" or s.attempts >= self.max_retries:
                    why = "bad batch" if kind == "user" else f"failed {s.attempts + 1} times"
                    log.warning("bios.train: skipping step %d (%s): %s", s.step, why, e)
                    self._write(f"step {s.step}: skipped ({why}): {e}")
                    self.report.skipped.append(s.step)
                    return False
                s.attempts += 1
                self.report.retries += 1
                log.warning("bios.train: step %d failed (%s); retry %d of %d", s.step, e,
                            s.attempts, self.max_retries)
                await asyncio.sleep(self.retry_delay * 2 ** (s.attempts - 1))
                if stage == self._finish or s.waiting:
                    # It reached the server and failed there: submit the whole step again.
                    s.reset()
                if stage == self._finish:
                    # Wait for the resubmitted step again, at the end of the queue.
                    if await self._attempt(s, self._submit):
                        self.inflight.append(s)
                    return False
                # A submission failed: loop to submit what the server has not accepted yet.

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    async def _save(self, name: str, overwrite: bool = False) -> str:
        fut = await self.client.save_state_async(name, overwrite=overwrite)
        path = f"bios://{self.report.model_id}/weights/{name}"
        self.saves.append((path, fut))
        return path

    async def _save_and_raise(self, exc: Exception) -> None:
        """The seeds' `save_state(name=f"error_step_{step}")` before re-raising."""
        name = f"error_step_{self.next_index}"
        try:
            path = await self._save(name, overwrite=True)
        except Exception as save_error:
            exc.add_note(f"bios.train: could not save checkpoint {name!r}: {save_error}")
        else:
            self.report.checkpoints.append(path)
            exc.add_note(f"bios.train: saved {path} (holds batches < {self.next_index}; "
                         f"continue with train(..., resume_from={path!r}))")
            log.error("bios.train: %s; saved %s before re-raising", type(exc).__name__, path)
        raise exc

    # ------------------------------------------------------------------ the loop

    def _batches(self) -> Iterator[Any]:
        it: Iterator[Any] = iter(self.batches)
        if self.start:
            it = islice(it, self.start, None)  # already trained (resume)
        if self.max_steps is not None:
            it = islice(it, self.max_steps)
        return it

    def _total(self) -> int | None:
        try:
            n = max(len(self.batches) - self.start, 0)  # type: ignore[arg-type]
        except TypeError:
            n = None
        if self.max_steps is not None:
            n = self.max_steps if n is None else min(n, self.max_steps)
        return n

    async def run(self) -> TrainingReport:
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self._total(), unit="step", desc=f"train ({self.report.mode})",
                            dynamic_ncols=True, file=sys.stderr)
        t0 = time.perf_counter()
        try:
            if self.resume_from is not None:
                try:
                    load = await self.client.load_state_with_optimizer_async(self.resume_from)
                    await load
                except Exception as e:
                    e.add_note(f"bios.train: loading resume_from={self.resume_from!r}")
                    raise
            batches = self._batches()
            exhausted = False
            while True:
                while not exhausted and len(self.inflight) < self.depth:
                    batch = next(batches, _END)
                    if batch is _END:
                        exhausted = True
                        break
                    s = _Step(self.next_index, batch, self.base_adam.model_copy(
                        update={"learning_rate": self.lr(self.next_index)}))
                    ok = await self._attempt(s, self._submit)
                    self.next_index += 1
                    self.report.next_step = self.next_index
                    if ok:
                        self.inflight.append(s)
                    if self.checkpoint_every and self.next_index % self.checkpoint_every == 0:
                        self.report.checkpoints.append(
                            await self._save(f"step_{self.next_index}", overwrite=True))
                if not self.inflight:
                    break
                await self._attempt(self.inflight.popleft(), self._finish)
            for path, fut in self.saves:
                try:
                    await fut
                except Exception as e:
                    log.warning("bios.train: checkpoint %s failed: %s", path, e)
        finally:
            self.report.wall_s = time.perf_counter() - t0
            if self.bar is not None:
                self.bar.close()
        self.report.server = await self._server_metrics()
        if self.print_report:
            print(self.report.summary(), flush=True)
        return self.report

    async def _server_metrics(self) -> dict[str, Any] | None:
        """The run's server metrics, if this SDK and server have RestClient.get_run_metrics."""
        from bios.rest_client import RestClient

        service = getattr(self.client, "_service", None)
        if service is None or not hasattr(RestClient, "get_run_metrics"):
            return None
        try:
            rest = service.create_rest_client()
            if hasattr(rest, "get_run_metrics_async"):
                got = await rest.get_run_metrics_async(self.report.model_id)
            else:
                got = await asyncio.to_thread(rest.get_run_metrics, self.report.model_id)
            return _as_dict(got)
        except Exception as e:  # a report is not worth failing the training for
            log.info("bios.train: no server metrics (%s)", e)
            return None


_END = object()


def _loop(client: Any, batches: Iterable[Any], **kw: Any) -> _Loop:
    return _Loop(client, batches, **kw)


async def train_async(
    training_client: Any,
    batches: Iterable[Sequence[types.Datum]],
    *,
    loss_fn: types.LossFnType = "cross_entropy",
    loss_fn_config: dict[str, float] | None = None,
    adam_params: types.AdamParams | None = None,
    learning_rate: LearningRate | None = None,
    mode: Literal["simple", "efficient"] = "efficient",
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
    max_steps: int | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    print_report: bool = True,
    max_retries: int = 2,
    retry_delay: float = 1.0,
    checkpoint_every: int | None = None,
    resume_from: str | None = None,
    start_step: int | None = None,
) -> TrainingReport:
    """Train `training_client` on `batches`: one forward_backward + optim_step per batch.

    Args:
        training_client: a `TrainingClient`.
        batches: an iterable of batches (each a list of `Datum`), read lazily; step i trains
            batch i.
        loss_fn, loss_fn_config: as for `forward_backward`.
        adam_params: AdamW parameters for every optim_step (default `AdamParams()`).
        learning_rate: overrides `adam_params.learning_rate`: a float, a per-step list (its last
            value holds after its end) or a function `step -> learning rate`.
        mode: "simple" (wait on each call) or "efficient" (keep `pipeline_depth` steps queued).
            Both make the same calls in the same order, so they give the same weights.
        pipeline_depth: steps queued at once in efficient mode (the seeds recommend 4-8).
        max_steps: stop after this many batches (for endless iterables).
        callback: `callback(step, loss, metrics)` after each step finishes (may be async);
            `metrics` holds the forward_backward metrics, "optim/..." ones, "learning_rate" and
            "step_latency_s". An exception from it is fatal (checkpoint, then re-raise).
        progress: show a tqdm progress bar (stderr).
        print_report: print the report's summary at the end.
        max_retries: resubmissions of a step after transient errors before skipping it.
        retry_delay: seconds before the first retry (doubling each time).
        checkpoint_every: save "step_<n>" checkpoints every this many batches.
        resume_from: a training checkpoint path to load (weights + Adam state) first; batches
            before the number at the end of its name are skipped.
        start_step: the index of the first batch to train (overrides the checkpoint's number).

    Returns:
        A `TrainingReport` (steps/s, wall time, per-step latency and loss, skipped steps,
        server metrics when available); `report.next_step` is where to resume.

    Raises:
        The first fatal error, after queueing `save_state(f"error_step_{n}")`.
    """
    return await _loop(training_client, batches, loss_fn=loss_fn, loss_fn_config=loss_fn_config,
                       adam_params=adam_params, learning_rate=learning_rate, mode=mode,
                       pipeline_depth=pipeline_depth, max_steps=max_steps, callback=callback,
                       progress=progress, print_report=print_report, max_retries=max_retries,
                       retry_delay=retry_delay, checkpoint_every=checkpoint_every,
                       resume_from=resume_from, start_step=start_step).run()


def train(
    training_client: Any,
    batches: Iterable[Sequence[types.Datum]],
    *,
    loss_fn: types.LossFnType = "cross_entropy",
    loss_fn_config: dict[str, float] | None = None,
    adam_params: types.AdamParams | None = None,
    learning_rate: LearningRate | None = None,
    mode: Literal["simple", "efficient"] = "efficient",
    pipeline_depth: int = DEFAULT_PIPELINE_DEPTH,
    max_steps: int | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    print_report: bool = True,
    max_retries: int = 2,
    retry_delay: float = 1.0,
    checkpoint_every: int | None = None,
    resume_from: str | None = None,
    start_step: int | None = None,
) -> TrainingReport:
    """Blocking version of `train_async` (same arguments, same behaviour); see there.

    Runs the loop on a private event loop in this thread, or on a helper thread when called
    from inside a running event loop; never on the SDK's loop thread.
    """
    loop = _loop(training_client, batches, loss_fn=loss_fn, loss_fn_config=loss_fn_config,
                 adam_params=adam_params, learning_rate=learning_rate, mode=mode,
                 pipeline_depth=pipeline_depth, max_steps=max_steps, callback=callback,
                 progress=progress, print_report=print_report, max_retries=max_retries,
                 retry_delay=retry_delay, checkpoint_every=checkpoint_every,
                 resume_from=resume_from, start_step=start_step)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(loop.run())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bios-train") as pool:
        return pool.submit(asyncio.run, loop.run()).result()
