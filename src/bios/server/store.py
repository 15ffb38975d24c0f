"""Durable state: sessions, training runs, requests (the futures), checkpoints, cycles.

SQLAlchemy 2 over SQLite by default (WAL) or PostgreSQL. This module is the only place with
SQL; it knows nothing about torch, HTTP or the engine. Every request is written here before its
submit call returns, so "submitted" means "stored and ordered".

Ordering: a training run's requests carry the client's `seq_id` (create is 0). The scheduler
claims, per run, only the contiguous run of queued seq ids that starts at the run's `next_seq`,
so a request whose predecessor has not arrived yet waits for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    mapped_column,
    sessionmaker,
)

QUEUED, RUNNING, COMPLETED, FAILED = "queued", "running", "completed", "failed"
TERMINAL = (COMPLETED, FAILED)


class Base(DeclarativeBase):
    pass


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    tags: Mapped[str] = mapped_column(Text, default="[]")
    user_metadata: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float] = mapped_column(Float)


class RunRow(Base):
    __tablename__ = "training_runs"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), ForeignKey("sessions.id"), index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    base_model: Mapped[str] = mapped_column(String(256))  # the name the user asked for
    canonical_model: Mapped[str] = mapped_column(String(256), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    train_attn: Mapped[bool] = mapped_column(Boolean)
    train_mlp: Mapped[bool] = mapped_column(Boolean)
    train_unembed: Mapped[bool] = mapped_column(Boolean)
    user_metadata: Mapped[str] = mapped_column(Text, default="{}")
    created_at: Mapped[float] = mapped_column(Float)
    last_request_time: Mapped[float] = mapped_column(Float)
    next_seq: Mapped[int] = mapped_column(Integer, default=0)  # next seq id the scheduler runs
    # Set when the run's in-memory state is gone (it could not be recovered after a restart);
    # new work is refused.
    lost_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Crash recovery: the run's last periodic snapshot (a training checkpoint directory) and
    # the last seq id whose effects it contains. Replay starts after it (see prepare_recovery).
    snapshot_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    snapshot_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)


class RequestRow(Base):
    __tablename__ = "requests"
    __table_args__ = (UniqueConstraint("run_id", "seq_id", name="uq_run_seq"),
                      UniqueConstraint("sampler_id", "seq_id", name="uq_sampler_seq"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    run_id: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    sampler_id: Mapped[str | None] = mapped_column(String(128), index=True, nullable=True)
    seq_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(256), index=True)  # canonical
    payload: Mapped[str] = mapped_column(Text)
    payload_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_category: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    cycle_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # forward/forward_backward: the batch's token count (the scheduler's fair-share cost and
    # the per-tenant queued-token limit); 0 or NULL (rows from before the column) for others.
    tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    datum_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)  # longest datum


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("run_id", "kind", "name", name="uq_ckpt"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128), index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "training" | "sampler"
    name: Mapped[str] = mapped_column(String(256))
    directory: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(String(256))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # int4 overflows at 2 GiB
    public: Mapped[bool] = mapped_column(Boolean, default=False)
    ephemeral: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)


class SamplerRow(Base):
    __tablename__ = "samplers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    session_id: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    base_model: Mapped[str] = mapped_column(String(256))
    canonical_model: Mapped[str] = mapped_column(String(256))
    model_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    checkpoint_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class CycleRow(Base):
    __tablename__ = "cycles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    base_model: Mapped[str] = mapped_column(String(256), index=True)
    started_at: Mapped[float] = mapped_column(Float)
    engine_ms: Mapped[float] = mapped_column(Float)
    total_ms: Mapped[float] = mapped_column(Float)
    runs: Mapped[int] = mapped_column(Integer)
    ops: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)
    passes: Mapped[int] = mapped_column(Integer)


class RunCycleRow(Base):
    """One run's part in one training cycle (written by the clock with the cycle).

    missed=False: the run had work in the cycle (`tokens`, `ops`, and `compute_ms`, its share
    of the cycle's engine time). missed=True: the run had no work in the cycle, but one of its
    requests was stored after the cycle started (its claim cutoff) and before it ended, and
    was still queued when it ended, so it waited for a later cycle. See Store.run_metrics.
    """

    __tablename__ = "run_cycles"
    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    cycle_id: Mapped[int] = mapped_column(Integer, primary_key=True, index=True)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    ops: Mapped[int] = mapped_column(Integer, default=0)
    compute_ms: Mapped[float] = mapped_column(Float, default=0.0)
    missed: Mapped[bool] = mapped_column(Boolean, default=False)


# ----------------------------------------------------------------------------- plain records


@dataclass(frozen=True)
class RunWork:
    """What one run did in one cycle: tokens through passes, ops, engine time (ms)."""

    tokens: int = 0
    ops: int = 0
    compute_ms: float = 0.0


@dataclass(frozen=True)
class ClaimedRequest:
    """A request the scheduler took for a cycle, detached from the DB session."""

    id: str
    run_id: str | None
    seq_id: int | None
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Pending:
    """A runnable queued request as the fair-share selection sees it (no payload)."""

    id: str
    run_id: str
    owner: str
    seq_id: int
    kind: str
    tokens: int  # forward/forward_backward tokens; 0 for every other kind
    datum_tokens: int = 0  # its longest datum (the smallest part it splits into; 0: unknown)


# Chooses, from each run's runnable requests (in seq order), how many to claim this cycle:
# run id -> a count of that run's leading requests (a run left out gets none).
Selector = Callable[[dict[str, list[Pending]]], dict[str, int]]


# Request kinds whose effects are in a run's state (weights, AdamW moments, gradients).
REPLAYED_KINDS = ("forward_backward", "optim_step", "load_weights")


@dataclass
class RunRecovery:
    """What `prepare_recovery` found for one run: rebuild it from its snapshot (or from its
    create) and replay `replay`, the completed state-changing requests after snapshot_seq."""

    run: RunRow
    snapshot_dir: str | None
    snapshot_seq: int
    replay: list[ClaimedRequest]
    requeued: int  # its requests that were running at the crash and are queued again


@dataclass(frozen=True)
class Outcome:
    """A request's end: its wire result, or an error with its category."""

    request_id: str
    result: dict[str, Any] | None = None
    error: str | None = None
    category: str | None = None


def response_body(completed: bool, result: str | None, error: str | None,
                  category: str | None) -> str:
    """The JSON body `retrieve_future` answers for a finished request: its stored result
    (`{}` when it has none), or its error and category."""
    if completed:
        return result or "{}"
    return json.dumps({"error": error, "category": category or "server"})


def payload_digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


class SeqConflictError(Exception):
    """The (run, seq_id) slot already holds a different request."""


class QueueFullError(Exception):
    """Too many queued requests; carries the queue state for the 429 body."""

    def __init__(self, message: str, queued: int, limit: int, scope: str = "server",
                 unit: str = "requests", flag: str | None = None):
        super().__init__(message)
        self.queued = queued
        self.limit = limit
        self.scope = scope  # "server" | "tenant" | "run"
        self.unit = unit  # what queued and limit count: "requests" | "tokens"
        self.flag = flag  # the `bios serve` flag that sets the limit


class Store:
    """All durable state. Thread-safe: each method opens its own short transaction."""

    def __init__(self, url: str):
        # Up to 40 request threads (FastAPI's pool) and the clocks use the store at once:
        # SQLAlchemy's default pool (5 + 10 overflow) made them queue for a connection, and
        # opened and closed overflow connections (with their PRAGMAs) on every burst.
        kwargs: dict[str, Any] = {"pool_size": 32, "max_overflow": 16}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Queue limits are a count then an insert; submits of this process take this lock
        # across both so a burst cannot overshoot a limit (one server process owns a store).
        self._admission = threading.Lock()

    @contextlib.contextmanager
    def tx(self) -> Iterator[Session]:
        with self._sessions.begin() as s:
            yield s

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ sessions, runs

    def create_session(self, owner: str, tags: list[str], user_metadata: dict | None) -> str:
        sid = "s-" + uuid.uuid4().hex[:12]
        now = time.time()
        with self.tx() as s:
            s.add(SessionRow(id=sid, owner=owner, tags=json.dumps(tags),
                             user_metadata=json.dumps(user_metadata or {}),
                             created_at=now, last_heartbeat=now))
        return sid

    def get_session(self, session_id: str) -> SessionRow | None:
        with self.tx() as s:
            return s.get(SessionRow, session_id)

    def heartbeat(self, session_id: str) -> None:
        with self.tx() as s:
            s.execute(update(SessionRow).where(SessionRow.id == session_id)
                      .values(last_heartbeat=time.time()))

    def create_run(self, run: RunRow, create_payload: dict[str, Any]) -> str:
        """Insert the run and its create request (seq 0); idempotent for a retried create."""
        try:
            return self._create_run(run, create_payload)
        except IntegrityError:  # an identical create raced us; the second look sees it
            return self._create_run(run, create_payload)

    def _create_run(self, run: RunRow, create_payload: dict[str, Any]) -> str:
        digest = payload_digest(create_payload)
        with self.tx() as s:
            existing = s.get(RunRow, run.id)
            if existing is not None:
                req = s.execute(select(RequestRow).where(RequestRow.run_id == run.id,
                                                         RequestRow.seq_id == 0)).scalar_one()
                if req.payload_hash != digest:
                    raise SeqConflictError(
                        f"model_seq_id of {run.id!r} was already used to create a different run; "
                        "use a new model_seq_id")
                return req.id
            s.add(run)
            rid = new_request_id()
            s.add(RequestRow(id=rid, owner=run.owner, run_id=run.id, seq_id=0, kind="create",
                             base_model=run.canonical_model, payload=json.dumps(create_payload),
                             payload_hash=digest, status=QUEUED, created_at=time.time()))
            return rid

    def get_run(self, run_id: str) -> RunRow | None:
        with self.tx() as s:
            return s.get(RunRow, run_id)

    def list_runs(self, owner: str, limit: int, offset: int) -> tuple[list[RunRow], int]:
        with self.tx() as s:
            total = s.execute(select(func.count()).select_from(RunRow)
                              .where(RunRow.owner == owner)).scalar_one()
            rows = s.execute(select(RunRow).where(RunRow.owner == owner)
                             .order_by(RunRow.created_at.desc()).limit(limit)
                             .offset(offset)).scalars().all()
            return list(rows), int(total)

    # ------------------------------------------------------------------ crash recovery

    def prepare_recovery(self, base_model: str,
                         active_since: float | None = None) -> list[RunRecovery]:
        """After a restart, before the clock starts: what each run of `base_model` must replay.

        In one transaction: requests that were RUNNING (claimed, results never recorded, so
        their effects are in no replayed state) go back to QUEUED, samples included, and each
        run's `next_seq` is rewound to its first such request. Returns, per run not lost whose
        create completed, its snapshot (if any) and its COMPLETED state-changing requests
        (forward_backward, optim_step, load_weights) after the snapshot's seq, in seq order.
        Failed requests stay failed and are not replayed. With `active_since`, only runs with
        queued requests or a request since then are returned; the others are restored when
        work arrives for them (`run_recovery`).
        """
        with self.tx() as s:
            running = s.execute(select(RequestRow).where(
                RequestRow.base_model == base_model, RequestRow.status == RUNNING)
            ).scalars().all()
            rewind: dict[str, int] = {}
            for req in running:
                req.status = QUEUED
                req.started_at = None
                if req.run_id is not None and req.seq_id is not None:
                    rewind[req.run_id] = min(rewind.get(req.run_id, req.seq_id), req.seq_id)
            runs = s.execute(select(RunRow).where(RunRow.canonical_model == base_model)
                             .order_by(RunRow.id)).scalars().all()
            pending = set(s.execute(select(RequestRow.run_id).distinct().where(
                RequestRow.base_model == base_model, RequestRow.status == QUEUED)).scalars())
            out: list[RunRecovery] = []
            for run in runs:
                if run.id in rewind:
                    run.next_seq = min(run.next_seq, rewind[run.id])
                if (active_since is not None and run.id not in pending
                        and run.last_request_time < active_since):
                    continue
                rec = self._recovery_of(s, run, sum(1 for r in running if r.run_id == run.id))
                if rec is not None:
                    out.append(rec)
            return out

    def run_recovery(self, run_id: str) -> RunRecovery | None:
        """How to rebuild one run (as `prepare_recovery` does), e.g. after it was unloaded;
        None if it is lost or was never created."""
        with self.tx() as s:
            run = s.get(RunRow, run_id)
            return None if run is None else self._recovery_of(s, run, 0)

    @staticmethod
    def _recovery_of(s: Session, run: RunRow, requeued: int) -> RunRecovery | None:
        if run.lost_reason:
            return None
        create = s.execute(select(RequestRow.status).where(
            RequestRow.run_id == run.id, RequestRow.seq_id == 0)).scalar_one_or_none()
        if create != COMPLETED:
            return None  # not created yet (queued again) or failed: nothing in memory
        after = int(run.snapshot_seq or 0) if run.snapshot_dir else 0
        rows = s.execute(select(RequestRow).where(
            RequestRow.run_id == run.id, RequestRow.seq_id > after,
            RequestRow.status == COMPLETED, RequestRow.kind.in_(REPLAYED_KINDS))
            .order_by(RequestRow.seq_id)).scalars().all()
        return RunRecovery(
            run=run, snapshot_dir=run.snapshot_dir if run.snapshot_dir else None,
            snapshot_seq=after,
            replay=[ClaimedRequest(r.id, r.run_id, r.seq_id, r.kind, json.loads(r.payload))
                    for r in rows],
            requeued=requeued)

    def relativize_paths(self) -> int:
        """Rewrite directories an older server stored as absolute paths into their
        data-dir-relative form (data_paths.relative_form): checkpoints, samplers, snapshots
        and the load/save payloads replayed or run later. Returns how many were rewritten."""
        from bios.server.data_paths import relative_form

        n = 0
        with self.tx() as s:
            for ck in s.execute(select(CheckpointRow)).scalars():
                if (rel := relative_form(ck.directory)) is not None:
                    ck.directory, n = rel, n + 1
            for sm in s.execute(select(SamplerRow).where(
                    SamplerRow.checkpoint_dir.is_not(None))).scalars():
                if sm.checkpoint_dir and (rel := relative_form(sm.checkpoint_dir)) is not None:
                    sm.checkpoint_dir, n = rel, n + 1
            for run in s.execute(select(RunRow).where(RunRow.snapshot_dir.is_not(None))
                                 ).scalars():
                if run.snapshot_dir and (rel := relative_form(run.snapshot_dir)) is not None:
                    run.snapshot_dir, n = rel, n + 1
            # Payloads only where an older server left absolute rows (a scan of the log).
            for req in () if n == 0 else s.execute(select(RequestRow).where(RequestRow.kind.in_(
                    ("load_weights", "save_weights", "save_weights_for_sampler")),
                    RequestRow.payload.like('%"directory": "/%'))).scalars():
                payload = json.loads(req.payload)
                holder = payload.get("checkpoint", payload)
                rel = relative_form(str(holder.get("directory", "")))
                if rel is not None:
                    holder["directory"] = rel
                    req.payload = json.dumps(payload)
                    # A retry of this request from an SDK computes its payload anew, with
                    # the relative directory: it must still match (idempotent retry).
                    req.payload_hash = payload_digest(payload)
                    n += 1
        return n

    def set_snapshot(self, run_id: str, directory: str, seq: int) -> None:
        """Record a run's newest periodic snapshot (written before this is called)."""
        with self.tx() as s:
            s.execute(update(RunRow).where(RunRow.id == run_id)
                      .values(snapshot_dir=directory, snapshot_seq=seq))

    def mark_run_lost(self, run_id: str, reason: str) -> int:
        """A run whose state could not be rebuilt: refuse new work, fail its pending requests."""
        now = time.time()
        with self.tx() as s:
            n = s.execute(update(RequestRow).where(
                RequestRow.run_id == run_id, RequestRow.status.in_([QUEUED, RUNNING]))
                .values(status=FAILED, error=reason, error_category="server",
                        completed_at=now)).rowcount
            s.execute(update(RunRow).where(RunRow.id == run_id).values(lost_reason=reason))
            return int(n or 0)

    # ------------------------------------------------------------------ requests

    def submit(self, *, owner: str, run_id: str | None, seq_id: int | None, kind: str,
               base_model: str, payload: dict[str, Any], sampler_id: str | None = None,
               max_queued_per_run: int = 0, max_queued_total: int = 0,
               max_queued_per_tenant: int = 0, tokens: int = 0,
               max_queued_tokens_per_tenant: int = 0, datum_tokens: int = 0) -> str:
        """Store a request durably and return its id.

        A retry of the same (run, seq_id) with the same payload returns the original id; a
        different payload in an occupied slot raises SeqConflictError. `tokens` is the
        request's pass tokens; with `max_queued_tokens_per_tenant`, a request that would take
        the tenant's unfinished (queued or running) tokens past it raises QueueFullError.
        """
        limited = bool(max_queued_per_run or max_queued_total or max_queued_per_tenant
                       or max_queued_tokens_per_tenant)
        try:
            with self._admission if limited else contextlib.nullcontext():
                return self._submit(owner=owner, run_id=run_id, seq_id=seq_id, kind=kind,
                                    base_model=base_model, payload=payload,
                                    sampler_id=sampler_id,
                                    max_queued_per_run=max_queued_per_run,
                                    max_queued_total=max_queued_total,
                                    max_queued_per_tenant=max_queued_per_tenant,
                                    tokens=tokens, datum_tokens=datum_tokens,
                                    max_queued_tokens_per_tenant=max_queued_tokens_per_tenant)
        except IntegrityError as e:  # a concurrent submit took the (run|sampler, seq) slot
            if seq_id is None or (run_id is None and sampler_id is None):
                raise
            slot = (RequestRow.run_id == run_id if run_id is not None
                    else RequestRow.sampler_id == sampler_id)
            with self.tx() as s:
                prior = s.execute(select(RequestRow.id, RequestRow.payload_hash).where(
                    slot, RequestRow.seq_id == seq_id)).first()
            if prior is not None and prior.payload_hash == payload_digest(payload):
                return prior.id  # it was the same request: an idempotent retry
            owner_name = run_id or sampler_id
            raise SeqConflictError(f"seq_id {seq_id} of {owner_name!r} is taken") from e

    def _submit(self, *, owner: str, run_id: str | None, seq_id: int | None, kind: str,
                base_model: str, payload: dict[str, Any], sampler_id: str | None,
                max_queued_per_run: int, max_queued_total: int,
                max_queued_per_tenant: int = 0, tokens: int = 0,
                max_queued_tokens_per_tenant: int = 0, datum_tokens: int = 0) -> str:
        digest = payload_digest(payload)
        with self.tx() as s:
            if run_id is not None and seq_id is not None:
                prior = s.execute(select(RequestRow).where(
                    RequestRow.run_id == run_id, RequestRow.seq_id == seq_id)).scalar_one_or_none()
                if prior is not None:
                    if prior.payload_hash == digest:
                        return prior.id
                    raise SeqConflictError(
                        f"seq_id {seq_id} of run {run_id!r} already holds a different request; "
                        "seq_ids must be unique per run (the SDK assigns them)")
            if sampler_id is not None and seq_id is not None:
                prior = s.execute(select(RequestRow).where(
                    RequestRow.sampler_id == sampler_id, RequestRow.seq_id == seq_id)
                ).scalar_one_or_none()
                if prior is not None:
                    if prior.payload_hash == digest:
                        return prior.id
                    raise SeqConflictError(
                        f"seq_id {seq_id} of sampler {sampler_id!r} already holds a different "
                        "request")
            if max_queued_total:
                queued = s.execute(select(func.count()).select_from(RequestRow)
                                   .where(RequestRow.status == QUEUED)).scalar_one()
                if queued >= max_queued_total:
                    raise QueueFullError("the server's queue is full", queued, max_queued_total,
                                         "server")
            if max_queued_per_tenant:
                queued = s.execute(select(func.count()).select_from(RequestRow).where(
                    RequestRow.owner == owner, RequestRow.status == QUEUED)).scalar_one()
                if queued >= max_queued_per_tenant:
                    raise QueueFullError(f"tenant {owner!r} has {queued} queued requests",
                                         queued, max_queued_per_tenant, "tenant")
            if max_queued_per_run and run_id is not None:
                queued = s.execute(select(func.count()).select_from(RequestRow).where(
                    RequestRow.run_id == run_id, RequestRow.status == QUEUED)).scalar_one()
                if queued >= max_queued_per_run:
                    raise QueueFullError(f"run {run_id!r} has {queued} queued requests",
                                         queued, max_queued_per_run, "run")
            if max_queued_tokens_per_tenant and tokens:
                # Running requests count too: a split request runs over several cycles.
                unfinished = int(s.execute(select(func.coalesce(func.sum(RequestRow.tokens), 0))
                                 .where(RequestRow.owner == owner,
                                        RequestRow.status.in_([QUEUED, RUNNING]))).scalar_one())
                if unfinished + tokens > max_queued_tokens_per_tenant:
                    raise QueueFullError(
                        f"tenant {owner!r} has {unfinished} tokens queued or running and this "
                        f"request adds {tokens}", unfinished, max_queued_tokens_per_tenant,
                        "tenant", "tokens", "--max-queued-tokens-per-tenant")
            rid = new_request_id()
            s.add(RequestRow(id=rid, owner=owner, run_id=run_id, sampler_id=sampler_id,
                             seq_id=seq_id, kind=kind, base_model=base_model,
                             payload=json.dumps(payload), payload_hash=digest, status=QUEUED,
                             created_at=time.time(), tokens=tokens,
                             datum_tokens=datum_tokens))
            s.flush()  # here, not in the update's autoflush; IntegrityError is handled by submit
            if run_id is not None:
                s.execute(update(RunRow).where(RunRow.id == run_id)
                          .values(last_request_time=time.time()))
            return rid

    def record_rejected(self, *, owner: str, run_id: str, seq_id: int, kind: str,
                        base_model: str, error: str) -> None:
        """Fill a run's seq slot with a failed request so later seq ids do not wait for it."""
        with self.tx() as s:
            prior = s.execute(select(RequestRow.id).where(
                RequestRow.run_id == run_id, RequestRow.seq_id == seq_id)).scalar_one_or_none()
            if prior is not None:
                return
            now = time.time()
            s.add(RequestRow(id=new_request_id(), owner=owner, run_id=run_id, seq_id=seq_id,
                             kind=kind, base_model=base_model, payload="{}",
                             payload_hash="rejected", status=FAILED, error=error,
                             error_category="user", created_at=now, completed_at=now))

    def get_request(self, request_id: str) -> RequestRow | None:
        with self.tx() as s:
            return s.get(RequestRow, request_id)

    def has_queued(self, base_model: str) -> bool:
        with self.tx() as s:
            return s.execute(select(RequestRow.id).where(
                RequestRow.base_model == base_model, RequestRow.status == QUEUED,
                RequestRow.run_id.is_not(None)).limit(1)).first() is not None

    def queued_counts(self, run_ids: set[str]) -> dict[str, int]:
        """Queued requests per run, for these runs (runs with none are left out)."""
        if not run_ids:
            return {}
        with self.tx() as s:
            rows = s.execute(select(RequestRow.run_id, func.count()).where(
                RequestRow.run_id.in_(sorted(run_ids)), RequestRow.status == QUEUED)
                .group_by(RequestRow.run_id)).all()
        return {run_id: int(n) for run_id, n in rows}

    def has_queued_samples(self, base_model: str) -> bool:
        with self.tx() as s:
            return s.execute(select(RequestRow.id).where(
                RequestRow.base_model == base_model, RequestRow.status == QUEUED,
                RequestRow.kind == "sample").limit(1)).first() is not None

    def claim_cycle(self, base_model: str, cutoff: float,
                    choose: Selector | None = None) -> list[ClaimedRequest]:
        """Take the requests of this base model that are runnable now, in per-run seq order.

        Per run, the runnable requests are the queued ones created at or before `cutoff`,
        contiguous from `next_seq` (slots already failed at submit are skipped). `choose`
        (default: all of them) sees them as `Pending` rows and says how many of each run's
        leading ones to take; those become RUNNING and the run's `next_seq` moves past them,
        so the rest of a run (carried over to a later cycle) keeps its order.
        """
        claimed: list[ClaimedRequest] = []
        now = time.time()
        with self.tx() as s:
            runs = sorted(set(s.execute(
                select(RequestRow.run_id).distinct()
                .where(RequestRow.base_model == base_model, RequestRow.status == QUEUED,
                       RequestRow.created_at <= cutoff, RequestRow.run_id.is_not(None))
            ).scalars()))
            walks: dict[str, tuple[RunRow, list[tuple[RequestRow, int]]]] = {}
            for run_id in runs:
                run = s.get(RunRow, run_id)
                assert run is not None
                # All rows at or past next_seq, terminal ones included, to walk the sequence;
                # payloads are read only for the rows taken.
                seq_rows = s.execute(select(RequestRow).options(defer(RequestRow.payload))
                                     .where(RequestRow.run_id == run_id,
                                            RequestRow.seq_id >= run.next_seq)
                                     .order_by(RequestRow.seq_id)).scalars().all()
                expected = run.next_seq
                runnable: list[tuple[RequestRow, int]] = []  # (row, next_seq after taking it)
                for req in seq_rows:
                    if req.seq_id != expected:
                        break  # a gap: the predecessor has not arrived yet
                    if req.status in TERMINAL:
                        expected += 1
                        continue
                    if req.status != QUEUED or req.created_at > cutoff:
                        break
                    expected += 1
                    runnable.append((req, expected))
                if runnable:
                    walks[run_id] = (run, runnable)
            if choose is None:
                take = {run_id: len(rows) for run_id, (_, rows) in walks.items()}
            else:
                take = choose({run_id: [Pending(r.id, run_id, r.owner, int(r.seq_id or 0),
                                                r.kind, int(r.tokens or 0),
                                                int(r.datum_tokens or 0)) for r, _ in rows]
                               for run_id, (_, rows) in walks.items()})
            for run_id, (run, rows) in walks.items():
                n = min(take.get(run_id, 0), len(rows))
                if n <= 0:
                    continue
                ids = [r.id for r, _ in rows[:n]]
                payloads = dict(s.execute(select(RequestRow.id, RequestRow.payload)
                                          .where(RequestRow.id.in_(ids))).all())
                for req, _ in rows[:n]:
                    req.status = RUNNING
                    req.started_at = now
                    claimed.append(ClaimedRequest(req.id, req.run_id, req.seq_id, req.kind,
                                                  json.loads(payloads[req.id])))
                # Taking all: past trailing failed slots too, as before; else just past the
                # last taken (the walk skips failed slots again next time).
                run.next_seq = (rows[n - 1][1] if n < len(rows) else
                                max(rows[-1][1], self._past_terminal(s, run_id, rows[-1][1])))
        return claimed

    @staticmethod
    def _past_terminal(s: Session, run_id: str, seq: int) -> int:
        """The first seq id at or after `seq` that is not a terminal (failed-at-submit) slot."""
        rows = s.execute(select(RequestRow.seq_id, RequestRow.status).where(
            RequestRow.run_id == run_id, RequestRow.seq_id >= seq)
            .order_by(RequestRow.seq_id)).all()
        for seq_id, status in rows:
            if seq_id != seq or status not in TERMINAL:
                break
            seq += 1
        return seq

    def claim_samples(self, base_model: str, limit: int) -> list[ClaimedRequest]:
        """Take up to `limit` queued sample requests of this base model, oldest first."""
        now = time.time()
        with self.tx() as s:
            rows = s.execute(select(RequestRow).where(
                RequestRow.base_model == base_model, RequestRow.status == QUEUED,
                RequestRow.kind == "sample").order_by(RequestRow.created_at)
                .limit(limit)).scalars().all()
            out = []
            for req in rows:
                req.status = RUNNING
                req.started_at = now
                out.append(ClaimedRequest(req.id, None, req.seq_id, req.kind,
                                          json.loads(req.payload)))
            return out

    def finish(self, request_id: str, *, result: dict[str, Any] | None = None,
               error: str | None = None, category: str | None = None,
               cycle_id: int | None = None) -> None:
        self.finish_many([Outcome(request_id, result, error, category)], cycle_id=cycle_id)

    def finish_many(self, outcomes: list[Outcome], cycle_id: int | None = None
                    ) -> dict[str, str]:
        """Record many requests' results in one transaction (a cycle's, say).

        Returns each request's `retrieve_future` body (`response_body`), so that the
        long-polls waiting for them need not read them back.
        """
        if not outcomes:
            return {}
        now = time.time()
        bodies: dict[str, str] = {}
        with self.tx() as s:
            for o in outcomes:
                text = json.dumps(o.result) if o.result is not None else None
                bodies[o.request_id] = response_body(o.error is None, text, o.error, o.category)
                s.execute(update(RequestRow).where(RequestRow.id == o.request_id).values(
                    status=COMPLETED if o.error is None else FAILED, result=text,
                    error=o.error, error_category=o.category, completed_at=now,
                    cycle_id=cycle_id))
        return bodies

    def record_cycle(self, base_model: str, started_at: float, engine_ms: float,
                     total_ms: float, runs: int, ops: int, tokens: int, passes: int,
                     *, cycle_id: int | None = None,
                     run_work: dict[str, RunWork] | None = None,
                     ended_at: float | None = None) -> int:
        """Store a finished cycle (with `cycle_id`, the plan's id, else the next id).

        With `run_work` (run id -> its work in the cycle) also store each run's part, and a
        missed cycle for every other run of this base model with a request stored after
        `started_at` (the claim cutoff) and before `ended_at` (default: now), the cycle's end,
        that is still queued.
        """
        with self.tx() as s:
            row = CycleRow(base_model=base_model, started_at=started_at, engine_ms=engine_ms,
                           total_ms=total_ms, runs=runs, ops=ops, tokens=tokens, passes=passes)
            if cycle_id is not None:
                row.id = cycle_id
            s.add(row)
            s.flush()
            if run_work is not None:
                for run_id, w in run_work.items():
                    s.add(RunCycleRow(run_id=run_id, cycle_id=row.id, tokens=w.tokens,
                                      ops=w.ops, compute_ms=w.compute_ms, missed=False))
                late = s.execute(select(RequestRow.run_id).distinct().where(
                    RequestRow.base_model == base_model, RequestRow.status == QUEUED,
                    RequestRow.run_id.is_not(None), RequestRow.created_at > started_at,
                    RequestRow.created_at <= (ended_at or time.time()))).scalars().all()
                for run_id in sorted(set(late) - set(run_work)):
                    s.add(RunCycleRow(run_id=run_id, cycle_id=row.id, tokens=0, ops=0,
                                      compute_ms=0.0, missed=True))
            return row.id

    def run_metrics(self, run_id: str) -> dict[str, Any]:
        """Per-run accounting, derived from requests, run_cycles and cycles.

        - cycles_with_work / missed_cycles: the run's run_cycles rows (see RunCycleRow).
        - queue_wait_s: sum over the run's started requests of (started_at - created_at).
        - active_s: from the run's first request stored to its last one finished (to now
          while any is queued or running).
        - engine_busy_s: engine time of this base model's cycles that started in that window
          (all runs' work, not only this run's); engine_idle_s = active_s - engine_busy_s.
        - tokens, compute_s: sums of the run's work (compute = its share of engine time).
        - steps: completed optim_steps; requests: every request of the run (create included).
        """
        now = time.time()
        with self.tx() as s:
            run = s.get(RunRow, run_id)
            if run is None:
                raise KeyError(run_id)
            work = s.execute(select(
                func.count(), func.coalesce(func.sum(RunCycleRow.tokens), 0),
                func.coalesce(func.sum(RunCycleRow.compute_ms), 0.0))
                .where(RunCycleRow.run_id == run_id, RunCycleRow.missed.is_(False))).one()
            missed = s.execute(select(func.count()).select_from(RunCycleRow).where(
                RunCycleRow.run_id == run_id, RunCycleRow.missed.is_(True))).scalar_one()
            req = s.execute(select(
                func.count(), func.min(RequestRow.created_at), func.max(RequestRow.completed_at),
                func.coalesce(func.sum(RequestRow.started_at - RequestRow.created_at), 0.0))
                .where(RequestRow.run_id == run_id)).one()
            pending = s.execute(select(func.count()).select_from(RequestRow).where(
                RequestRow.run_id == run_id, RequestRow.status.in_([QUEUED, RUNNING]))
                ).scalar_one()
            steps = s.execute(select(func.count()).select_from(RequestRow).where(
                RequestRow.run_id == run_id, RequestRow.kind == "optim_step",
                RequestRow.status == COMPLETED)).scalar_one()
            first = req[1]
            last = now if pending or req[2] is None else req[2]
            busy_ms = 0.0
            if first is not None:
                busy_ms = float(s.execute(select(func.coalesce(func.sum(CycleRow.engine_ms), 0.0))
                                          .where(CycleRow.base_model == run.canonical_model,
                                                 CycleRow.started_at >= first,
                                                 CycleRow.started_at <= last)).scalar_one())
        active = max(0.0, last - first) if first is not None else 0.0
        busy = min(busy_ms / 1000.0, active)
        return {"cycles_with_work": int(work[0]), "missed_cycles": int(missed),
                "queue_wait_s": max(0.0, float(req[3])), "engine_busy_s": busy,
                "engine_idle_s": active - busy, "active_s": active, "tokens": int(work[1]),
                "compute_s": float(work[2]) / 1000.0, "steps": int(steps),
                "requests": int(req[0])}

    def engine_utilization(self, base_model: str, last: int) -> list[dict[str, Any]]:
        """The last `last` training cycles of a base model, oldest first.

        busy_fraction = engine_ms / the cycle's period, the time from its start to the next
        cycle's start (for the newest, to now, or its own total time if longer), capped at 1.
        """
        now = time.time()
        with self.tx() as s:
            rows = s.execute(select(CycleRow).where(CycleRow.base_model == base_model)
                             .order_by(CycleRow.started_at.desc(), CycleRow.id.desc())
                             .limit(last)).scalars().all()
        rows = list(reversed(rows))
        out = []
        for i, r in enumerate(rows):
            if i + 1 < len(rows):
                period = rows[i + 1].started_at - r.started_at
            else:
                period = max(now - r.started_at, r.total_ms / 1000.0)
            busy = min(1.0, r.engine_ms / 1000.0 / period) if period > 0 else 1.0
            out.append({"cycle_id": r.id, "started_at": r.started_at, "engine_ms": r.engine_ms,
                        "total_ms": r.total_ms, "busy_fraction": busy, "runs": r.runs,
                        "tokens": r.tokens})
        return out

    def next_cycle_id(self) -> int:
        with self.tx() as s:
            return int(s.execute(select(func.coalesce(func.max(CycleRow.id), 0))).scalar_one()) + 1

    # ------------------------------------------------------------------ checkpoints, samplers

    def add_checkpoint(self, row: CheckpointRow) -> None:
        with self.tx() as s:
            old = s.execute(select(CheckpointRow).where(
                CheckpointRow.run_id == row.run_id, CheckpointRow.kind == row.kind,
                CheckpointRow.name == row.name)).scalar_one_or_none()
            if old is not None:
                s.delete(old)
                s.flush()
            s.add(row)

    def get_checkpoint(self, run_id: str, kind: str, name: str) -> CheckpointRow | None:
        with self.tx() as s:
            return s.execute(select(CheckpointRow).where(
                CheckpointRow.run_id == run_id, CheckpointRow.kind == kind,
                CheckpointRow.name == name)).scalar_one_or_none()

    def list_checkpoints(self, run_id: str) -> list[CheckpointRow]:
        with self.tx() as s:
            return list(s.execute(select(CheckpointRow).where(
                CheckpointRow.run_id == run_id, CheckpointRow.ephemeral.is_(False))
                .order_by(CheckpointRow.created_at)).scalars().all())

    def stored_bytes(self, owner: str) -> int:
        """What a tenant stores: its checkpoints' bytes plus its sessions' and runs'
        user_metadata (the per-tenant stored-bytes limit)."""
        with self.tx() as s:
            ckpts = s.execute(select(func.coalesce(func.sum(CheckpointRow.size_bytes), 0))
                              .where(CheckpointRow.owner == owner)).scalar_one()
            meta = sum(s.execute(select(func.coalesce(func.sum(func.length(t.user_metadata)),
                                                      0)).where(t.owner == owner)).scalar_one()
                       for t in (SessionRow, RunRow))
        return int(ckpts) + int(meta)

    def set_checkpoint_public(self, ckpt_id: int, public: bool) -> None:
        with self.tx() as s:
            s.execute(update(CheckpointRow).where(CheckpointRow.id == ckpt_id)
                      .values(public=public))

    def delete_checkpoint(self, ckpt_id: int) -> None:
        with self.tx() as s:
            row = s.get(CheckpointRow, ckpt_id)
            if row is not None:
                s.delete(row)

    def add_sampler(self, row: SamplerRow) -> None:
        with self.tx() as s:
            if s.get(SamplerRow, row.id) is None:
                s.add(row)

    def get_sampler(self, sampler_id: str) -> SamplerRow | None:
        with self.tx() as s:
            return s.get(SamplerRow, sampler_id)


def _add_missing_columns(engine: Any) -> None:
    """Additive migration: add nullable columns that an older database's tables lack.

    create_all makes missing tables but never alters existing ones; a nullable column added to
    a model (e.g. training_runs.snapshot_dir) is added here with a plain ALTER TABLE ... ADD
    COLUMN, which SQLite and PostgreSQL both run.
    """
    insp = inspect(engine)
    tables = set(insp.get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have or not col.nullable:
                continue
            ddl = col.type.compile(dialect=engine.dialect)
            with engine.begin() as conn:
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {col.name} {ddl}'))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
