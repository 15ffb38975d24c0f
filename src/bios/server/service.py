"""The server's composition root: registry, store, engines and clock loops, and the submit path.

`BiosService` turns validated wire requests into stored requests (durable before the reply),
wakes the right clock loop, and answers queries. HTTP lives in `app.py`; SQL in `store.py`;
cycles in `scheduler.py`; torch only behind the engine executor.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bios import types as T
from bios.server.archives import (
    ArchiveClaims,
    ArchiveSigner,
    ArchiveTokenError,
    CheckpointFilesMissing,
    TarStream,
)
from bios.server.config import ServerConfig
from bios.server.data_paths import DataDirExecutor, resolve, to_stored
from bios.server.integrity import check_data_dir
from bios.server.plan import AdapterSpec, ModelDims, resident_bytes
from bios.server.scheduler import ClockLoop
from bios.server.store import (
    COMPLETED,
    FAILED,
    CheckpointRow,
    QueueFullError,
    RunRow,
    SamplerRow,
    SeqConflictError,
    Store,
    response_body,
)
from bios.server.validation import (
    APIError,
    ModelLimits,
    check_forward_backward,
    check_int,
    check_lora_config,
    check_name,
    check_optimizer_config,
    check_sample,
    check_sample_extras,
    parse_checkpoint_path,
)

log = logging.getLogger("bios.server")

LORA_ALPHA = 32.0
_counter_lock = threading.Lock()


@dataclass
class ServedModel:
    """One base model in memory: its limits, engine executor and clock loop."""

    canonical: str
    arch: str
    limits: ModelLimits
    executor: Any
    clock: ClockLoop


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def run_dir_name(run_id: str) -> str:
    return run_id.replace(":", "__")


def queue_full(e: QueueFullError) -> APIError:
    """The 429 for a full queue; its body carries the queue state (scope, queued, limit)."""
    flag = f" ({e.flag})" if e.flag else ""
    unit = "" if e.unit == "requests" else f" {e.unit}"
    return APIError(429, f"{e}: {e.queued}{unit} queued, limit {e.limit}{unit} per {e.scope}"
                    f"{flag}. Wait for results before submitting more (the SDK retries this "
                    "with backoff).", None, "queue_full",
                    {"queue_state": {"scope": e.scope, "queued": e.queued, "limit": e.limit,
                                     "unit": e.unit}})


class BiosService:
    """Owns everything behind the HTTP routes. Start with `start()`, stop with `stop()`."""

    def __init__(self, config: ServerConfig, notify: Any = None):
        self.config = config
        self.notify = notify or (lambda ids: None)
        self.store: Store | None = None
        self.registry: Any = None
        self.models: dict[str, ServedModel] = {}  # canonical name -> served model
        self.archives = ArchiveSigner(config.archive_secret_path)
        self.ready = False
        # Called from clock threads with streamed samples' tokens so far (openai_api.py).
        self.sample_progress: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        from bios.server.engine.engine import Engine
        from bios.server.engine.executor import InProcessExecutor
        from bios.server.engine.registry import ModelRegistry

        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        check_data_dir(cfg)  # before any model loads: a damaged data dir stops here
        self.store = Store(cfg.db_url)
        moved = self.store.relativize_paths()
        if moved:
            log.info("stored %d checkpoint/snapshot paths relative to the data dir", moved)
        self.registry = ModelRegistry(cfg.model_cache_dir, list(cfg.models))
        canonicals: list[str] = []
        for name in self.registry.names():
            c = self.registry.resolve(name).name
            if c not in canonicals:
                canonicals.append(c)
        for canonical in canonicals:
            t0 = time.perf_counter()
            model_dir = self.registry.materialize(canonical)
            hf = json.loads((Path(model_dir) / "config.json").read_text())
            engine = Engine.from_model_dir(model_dir, device=cfg.device,
                                           token_budget=cfg.token_budget)
            executor = InProcessExecutor(engine)
            pass_tokens = int(engine.token_budget)
            clock = ClockLoop(base_model=canonical, store=self.store,
                              executor=DataDirExecutor(executor, cfg.data_dir),
                              data_dir=cfg.data_dir,
                              period=cfg.clock_period, notify=self.notify,
                              cycle_ids=self._next_cycle_id, state_dir=cfg.state_dir,
                              snapshot_steps=cfg.snapshot_steps,
                              snapshot_seconds=cfg.snapshot_seconds,
                              unload_idle_s=cfg.unload_idle_s,
                              cycle_tokens=(4 * pass_tokens if cfg.cycle_tokens is None
                                            else cfg.cycle_tokens),
                              cycle_seconds=cfg.cycle_seconds, split_tokens=pass_tokens,
                              max_resident_runs=cfg.max_resident_runs,
                              max_resident_runs_per_tenant=cfg.max_resident_runs_per_tenant,
                              model_dims=ModelDims.from_info(executor.info()),
                              max_resident_bytes=cfg.resident_bytes_bound,
                              max_resident_bytes_per_tenant=cfg.max_resident_bytes_per_tenant,
                              on_sample_progress=self._sample_progress)
            limits = ModelLimits(int(hf["vocab_size"]), self.registry.context_length(canonical))
            self.models[canonical] = ServedModel(canonical, str(hf.get("model_type", "llama")),
                                                 limits, executor, clock)
            log.info("loaded %s (%s) in %.1fs: vocab=%d context=%d", canonical, model_dir,
                     time.perf_counter() - t0, limits.vocab_size, limits.context_length)
        self._cycle_counter = self.store.next_cycle_id()
        for m in self.models.values():  # crash recovery: runs are rebuilt once clocks run
            m.clock.recover(background=True)
        for m in self.models.values():
            m.clock.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        for m in self.models.values():
            m.clock.stop()
            m.executor.shutdown()
        if self.store is not None:
            self.store.close()

    def _sample_progress(self, partial: dict[str, list[list[int]]]) -> None:
        if self.sample_progress is not None:
            self.sample_progress(partial)

    def _next_cycle_id(self) -> int:
        # Clock threads call this; int += under the GIL is not atomic, so guard it.
        with _counter_lock:
            self._cycle_counter += 1
            return self._cycle_counter - 1

    # ------------------------------------------------------------------ helpers

    @property
    def db(self) -> Store:
        assert self.store is not None, "service not started"
        return self.store

    def _served(self, name: str, field: str = "base_model") -> ServedModel:
        try:
            canonical = self.registry.resolve(name).name
        except KeyError:
            canonical = None
        if canonical is None or canonical not in self.models:
            avail = ", ".join(self.registry.names())
            raise APIError(404, f"unknown base model {name!r}; this server serves: {avail}. "
                           "Start the server with --models to add one.", field, "unknown_model")
        return self.models[canonical]

    def _on_disk(self, stored: str) -> Path:
        """A stored checkpoint directory (relative to the data dir) as an absolute path."""
        p = resolve(self.config.data_dir, stored)
        assert p is not None
        return p.resolve()

    def _owned_run(self, owner: str, run_id: str, field: str = "model_id") -> RunRow:
        run = self.db.get_run(run_id)
        if run is None or run.owner != owner:
            raise APIError(404, f"training run {run_id!r} not found", field, "unknown_run")
        return run

    def _submit(self, owner: str, run: RunRow, seq_id: int, kind: str,
                payload: dict[str, Any], tokens: int = 0,
                datum_tokens: int = 0) -> T.UntypedAPIFuture:
        if run.lost_reason:
            raise APIError(409, f"run {run.id!r} cannot take new work: {run.lost_reason}",
                           "model_id", "run_lost")
        if seq_id < 1:
            raise APIError(400, "seq_id must be >= 1 (0 is the run's creation)", "seq_id")
        check_int(seq_id, "seq_id")
        try:
            rid = self.db.submit(owner=owner, run_id=run.id, seq_id=seq_id, kind=kind,
                                 base_model=run.canonical_model,
                                 payload={"owner": owner, "base_model_name": run.base_model,
                                          "canonical_model": run.canonical_model,
                                          **payload},
                                 max_queued_per_run=self.config.max_queued_per_run,
                                 max_queued_total=self.config.max_queued_total,
                                 max_queued_per_tenant=self.config.max_queued_per_tenant,
                                 tokens=tokens, datum_tokens=datum_tokens,
                                 max_queued_tokens_per_tenant=(
                                     self.config.max_queued_tokens_per_tenant))
        except SeqConflictError as e:
            raise APIError(409, str(e), "seq_id", "seq_conflict") from e
        except QueueFullError as e:
            raise queue_full(e) from e
        self.models[run.canonical_model].clock.wake()
        return T.UntypedAPIFuture(request_id=rid, model_id=run.id)

    def reject(self, owner: str, run_id: str | None, seq_id: int | None, kind: str,
               error: APIError) -> None:
        """Fill the seq slot of a rejected request so the run's later requests are not stuck."""
        if run_id is None or seq_id is None or not 1 <= seq_id < 2**31:
            return
        run = self.db.get_run(run_id)
        if run is None or run.owner != owner:
            return
        self.db.record_rejected(owner=owner, run_id=run_id, seq_id=seq_id, kind=kind,
                                base_model=run.canonical_model, error=error.detail)
        self.models[run.canonical_model].clock.wake()

    # ------------------------------------------------------------------ sessions, models

    def _check_metadata(self, metadata: dict[str, Any] | None) -> None:
        size = len(json.dumps(metadata or {}))
        if self.config.max_metadata_bytes and size > self.config.max_metadata_bytes:
            raise APIError(413, f"user_metadata is {size} bytes as JSON, more than this "
                           f"server's limit of {self.config.max_metadata_bytes} "
                           "(--max-metadata-bytes); store less", "user_metadata")

    def _check_stored_bytes(self, owner: str) -> None:
        limit = self.config.max_stored_bytes_per_tenant
        if limit and (used := self.db.stored_bytes(owner)) >= limit:
            # A 4xx, not a 507: waiting does not help (the SDK retries 5xx), and a 4xx fills
            # the request's seq slot so the run's later requests go on.
            raise APIError(413, f"tenant {owner!r} stores {used} bytes of checkpoints and "
                           f"user_metadata, at this server's limit of {limit} per tenant "
                           "(--max-stored-bytes-per-tenant); delete checkpoints to save more",
                           "path", "storage_full")

    def create_session(self, owner: str, req: T.CreateSessionRequest) -> T.CreateSessionResponse:
        self._check_metadata(req.user_metadata)
        sid = self.db.create_session(owner, req.tags, req.user_metadata)
        return T.CreateSessionResponse(session_id=sid)

    def heartbeat(self, owner: str, session_id: str) -> None:
        s = self.db.get_session(session_id)
        if s is None or s.owner != owner:
            raise APIError(404, f"session {session_id!r} not found", "session_id")
        self.db.heartbeat(session_id)

    def create_model(self, owner: str, req: T.CreateModelRequest,
                     load: dict[str, Any] | None = None) -> T.UntypedAPIFuture:
        """Create a run (its seq 0); `load` (load_from, load_optimizer, load_path) makes the
        creation also load a checkpoint into it."""
        s = self.db.get_session(req.session_id)
        if s is None or s.owner != owner:
            raise APIError(404, f"session {req.session_id!r} not found; create one first",
                           "session_id")
        served = self._served(req.base_model)
        check_lora_config(req.lora_config, self.config.max_rank)
        self._check_metadata(req.user_metadata)
        limit = self.config.max_resident_runs_per_tenant
        if limit and (pinned := served.clock.pinned_runs(owner)) >= limit:
            raise APIError(429, f"tenant {owner!r} has {pinned} runs holding gradients that no "
                           f"optim_step has applied, at this server's limit of {limit} resident "
                           "runs per tenant (--max-resident-runs-per-tenant); call optim_step "
                           "on them (or finish them) before creating another run",
                           "base_model", "resident_runs")
        check_optimizer_config(req.optimizer_config)
        check_int(req.model_seq_id, "model_seq_id")
        run_id = f"{req.session_id}:train:{req.model_seq_id}"
        cfg = req.lora_config
        self._check_resident_bytes(served, cfg)
        seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
        now = time.time()
        run = RunRow(id=run_id, session_id=req.session_id, owner=owner,
                     base_model=req.base_model, canonical_model=served.canonical, rank=cfg.rank,
                     seed=seed, alpha=LORA_ALPHA, train_attn=cfg.train_attn,
                     train_mlp=cfg.train_mlp, train_unembed=cfg.train_unembed,
                     user_metadata=json.dumps(req.user_metadata or {}), created_at=now,
                     last_request_time=now, next_seq=0)
        try:
            rid = self.db.create_run(run, {"wire": req.model_dump(mode="json"), **(load or {})})
        except SeqConflictError as e:
            raise APIError(409, str(e), "model_seq_id", "seq_conflict") from e
        served.clock.wake()
        return T.UntypedAPIFuture(request_id=rid, model_id=run_id)

    def _check_resident_bytes(self, served: ServedModel, cfg: Any) -> None:
        """A 413 for an adapter that alone is over a resident-bytes bound: no eviction can
        make room for it."""
        clock = served.clock
        if clock.model_dims is None:
            return
        need = resident_bytes(clock.model_dims, AdapterSpec(
            rank=cfg.rank, seed=0, train_attn=cfg.train_attn, train_mlp=cfg.train_mlp,
            train_unembed=cfg.train_unembed))
        for limit, flag in ((clock.max_resident_bytes, "--max-resident-bytes"),
                            (clock.max_resident_bytes_per_tenant,
                             "--max-resident-bytes-per-tenant")):
            if limit and need > limit:
                raise APIError(413, f"a rank-{cfg.rank} adapter on {served.canonical} needs "
                               f"{need} bytes in engine memory (fp32 weights and AdamW state), "
                               f"over this server's {flag} of {limit} bytes; use a lower "
                               "lora_config.rank or train fewer modules (train_mlp, "
                               "train_unembed)", "lora_config.rank", "resident_bytes")

    def get_info(self, owner: str, model_id: str) -> T.GetInfoResponse:
        run = self._owned_run(owner, model_id)
        served = self.models[run.canonical_model]
        return T.GetInfoResponse(
            model_id=run.id, is_lora=True, lora_rank=run.rank, model_name=run.base_model,
            model_data=T.ModelData(arch=served.arch, model_name=run.base_model,
                                   tokenizer_id=run.base_model))

    def capabilities(self) -> T.GetServerCapabilitiesResponse:
        out = []
        for name in self.registry.names():
            canonical = self.registry.resolve(name).name
            if canonical not in self.models:
                continue
            m = self.models[canonical]
            aliases = [a for a in self.registry.aliases_of(canonical) if a != name]
            out.append(T.SupportedModel(model_name=name,
                                        max_context_length=m.limits.context_length,
                                        arch=m.arch, aliases=aliases))
        return T.GetServerCapabilitiesResponse(supported_models=out)

    def tokenizer_files(self, base_model: str) -> dict[str, Any]:
        served = self._served(base_model)
        return {"base_model": base_model,
                "files": self.registry.tokenizer_files(served.canonical)}

    # ------------------------------------------------------------------ training ops

    def forward_backward(self, owner: str, req: T.ForwardBackwardRequest | T.ForwardRequest
                         ) -> T.UntypedAPIFuture:
        run = self._owned_run(owner, req.model_id)
        forward_only = isinstance(req, T.ForwardRequest)
        inp = req.forward_input if forward_only else req.forward_backward_input  # type: ignore[union-attr]
        prefix = "forward_input" if forward_only else "forward_backward_input"
        tokens = check_forward_backward(inp, self.models[run.canonical_model].limits,
                                        self.config.max_tokens_per_request, prefix)
        kind = "forward" if forward_only else "forward_backward"
        longest = max((sum(len(c.tokens) for c in d.model_input.chunks) for d in inp.data),
                      default=0)
        return self._submit(owner, run, req.seq_id, kind, {"wire": req.model_dump(mode="json")},
                            tokens=tokens, datum_tokens=longest)

    def optim_step(self, owner: str, req: T.OptimStepRequest) -> T.UntypedAPIFuture:
        run = self._owned_run(owner, req.model_id)
        if req.optimizer_params is not None:
            family = T.OptimizerConfig(type=str(req.optimizer_params.get("type", "?")))
            check_optimizer_config(family, "optimizer_params")
        return self._submit(owner, run, req.seq_id, "optim_step",
                            {"wire": req.model_dump(mode="json")})

    def save_weights(self, owner: str, req: T.SaveWeightsRequest) -> T.UntypedAPIFuture:
        run = self._owned_run(owner, req.model_id)
        name = check_name(req.path, "path")
        self._check_stored_bytes(owner)
        if not req.overwrite and self.db.get_checkpoint(run.id, "training", name):
            raise APIError(409, f"checkpoint {name!r} already exists for this run; pick another "
                           "name or pass overwrite=True", "path", "exists")
        directory = self.config.checkpoint_dir / run_dir_name(run.id) / "weights" / name
        ck = {"kind": "training", "name": name,
              "directory": to_stored(self.config.data_dir, directory),
              "path": f"bios://{run.id}/weights/{name}"}
        return self._submit(owner, run, req.seq_id, "save_weights",
                            {"wire": req.model_dump(mode="json"), "checkpoint": ck})

    def save_weights_for_sampler(self, owner: str, req: T.SaveWeightsForSamplerRequest
                                 ) -> T.UntypedAPIFuture:
        run = self._owned_run(owner, req.model_id)
        self._check_stored_bytes(owner)
        if req.path:
            if req.kind == "inflight":
                raise APIError(400, "kind='inflight' is for save_weights_and_get_sampling_client "
                               "(no path); a named sampler checkpoint is a snapshot", "kind")
            name = check_name(req.path, "path")
            ck: dict[str, Any] = {"kind": "sampler", "name": name,
                                  "path": f"bios://{run.id}/sampler_weights/{name}"}
        elif req.sampling_session_seq_id is not None:
            check_int(req.sampling_session_seq_id, "sampling_session_seq_id")
            check_int(req.seq_id, "seq_id")
            # An inflight sampler reads the run's one "inflight" directory, which every later
            # inflight save replaces (atomically), so it follows the newest weights.
            name = ("inflight" if req.kind == "inflight"
                    else f"ephemeral-{req.sampling_session_seq_id}-{req.seq_id}")
            ck = {"kind": "sampler", "name": name, "ephemeral": True,
                  "session_id": run.session_id,
                  "sampler_id": f"{run.session_id}:sample:{req.sampling_session_seq_id}",
                  "path": None}
        else:
            raise APIError(400, "give either path (a name for a persistent sampler checkpoint) "
                           "or sampling_session_seq_id (an ephemeral snapshot)", "path")
        directory = self.config.checkpoint_dir / run_dir_name(run.id) / "sampler_weights" / name
        ck["directory"] = to_stored(self.config.data_dir, directory)
        return self._submit(owner, run, req.seq_id, "save_weights_for_sampler",
                            {"wire": req.model_dump(mode="json"), "checkpoint": ck})

    def _checkpoint_for(self, owner: str, path: str, field: str = "path") -> CheckpointRow:
        src_run, kind, name = parse_checkpoint_path(path, field)
        ck = self.db.get_checkpoint(src_run, kind, name)
        if ck is None or (ck.owner != owner and not ck.public):
            raise APIError(404, f"checkpoint {path!r} not found", field, "unknown_checkpoint")
        return ck

    def load_weights(self, owner: str, req: T.LoadWeightsRequest) -> T.UntypedAPIFuture:
        if req.model_id is None:
            return self._create_run_from_checkpoint(owner, req)
        if req.seq_id is None:
            raise APIError(400, "seq_id is required when loading into an existing run "
                           "(model_id)", "seq_id")
        run = self._owned_run(owner, req.model_id)
        ck = self._checkpoint_for(owner, req.path)
        if req.optimizer and ck.kind != "training":
            raise APIError(400, "optimizer state is only in training checkpoints "
                           "(bios://<run>/weights/<name>), not in sampler weights", "path")
        src = self.db.get_run(ck.run_id)
        if src is not None:
            if src.canonical_model != run.canonical_model:
                raise APIError(400, f"checkpoint was trained on {src.base_model!r}, this run "
                               f"uses {run.base_model!r}", "path")
            mine = (run.rank, run.train_attn, run.train_mlp, run.train_unembed)
            theirs = (src.rank, src.train_attn, src.train_mlp, src.train_unembed)
            if mine != theirs:
                raise APIError(400, f"checkpoint has LoRA (rank, attn, mlp, unembed)={theirs} but "
                               f"this run has {mine}; use create_training_client_from_state to "
                               "get a run shaped like the checkpoint", "path")
        return self._submit(owner, run, req.seq_id, "load_weights",
                            {"wire": req.model_dump(mode="json"), "directory": ck.directory})

    def _create_run_from_checkpoint(self, owner: str, req: T.LoadWeightsRequest
                                    ) -> T.UntypedAPIFuture:
        """Tinker 0.38's create_training_client_from_state: one load_weights that creates the
        run `{session_id}:train:{model_seq_id}` shaped like the checkpoint and loads it.

        Both happen in the run's creation (seq 0), since the SDK numbers its first request on
        the new run seq 1."""
        if req.session_id is None or req.model_seq_id is None:
            raise APIError(400, "give model_id and seq_id (load into a run), or session_id and "
                           "model_seq_id (create the run from the checkpoint)", "model_id")
        check_optimizer_config(req.optimizer_config)
        ck = self._checkpoint_for(owner, req.path)
        if ck.kind != "training":
            raise APIError(400, "a run is created from a training checkpoint "
                           "(tinker://<run>/weights/<name>), not from sampler weights", "path")
        src = self.db.get_run(ck.run_id)
        if src is None:
            raise APIError(404, f"the run that saved {req.path!r} is gone", "path",
                           "unknown_checkpoint")
        base = req.base_model or src.base_model
        lora = T.LoraConfig(rank=src.rank, seed=src.seed, train_attn=src.train_attn,
                            train_mlp=src.train_mlp, train_unembed=src.train_unembed)
        return self.create_model(owner, T.CreateModelRequest(
            session_id=req.session_id, model_seq_id=req.model_seq_id, base_model=base,
            lora_config=lora, user_metadata=req.user_metadata),
            load={"load_from": ck.directory, "load_optimizer": req.optimizer,
                  "load_path": req.path})

    def weights_info(self, owner: str, path: str) -> T.WeightsInfoResponse:
        ck = self._checkpoint_for(owner, path, "tinker_path")
        src = self.db.get_run(ck.run_id)
        assert src is not None
        return T.WeightsInfoResponse(base_model=src.base_model, is_lora=True, lora_rank=src.rank,
                                     train_unembed=src.train_unembed, train_mlp=src.train_mlp,
                                     train_attn=src.train_attn)

    # ------------------------------------------------------------------ futures

    def future_state(self, owner: str, request_id: str) -> str | None:
        """The finished response of a request (JSON text), or None while it is pending."""
        row = self.db.get_request(request_id)
        if row is None or row.owner != owner:
            raise APIError(404, f"request {request_id!r} not found", "request_id")
        if row.status in (COMPLETED, FAILED):
            return response_body(row.status == COMPLETED, row.result, row.error,
                                 row.error_category)
        return None

    # ------------------------------------------------------------------ runs, checkpoints

    def _checkpoint_wire(self, ck: CheckpointRow) -> T.Checkpoint:
        seg = "weights" if ck.kind == "training" else "sampler_weights"
        return T.Checkpoint(checkpoint_id=f"{seg}/{ck.name}", checkpoint_type=ck.kind,
                            time=iso(ck.created_at) or "", size_bytes=ck.size_bytes,
                            tinker_path=f"bios://{ck.run_id}/{seg}/{ck.name}", public=ck.public)

    def _run_wire(self, run: RunRow) -> T.TrainingRun:
        cks = self.db.list_checkpoints(run.id)
        last_t = next((c for c in reversed(cks) if c.kind == "training"), None)
        last_s = next((c for c in reversed(cks) if c.kind == "sampler"), None)
        return T.TrainingRun(
            training_run_id=run.id, base_model=run.base_model, model_owner=run.owner,
            is_lora=True, corrupted=bool(run.lost_reason), lora_rank=run.rank,
            last_request_time=iso(run.last_request_time),
            last_checkpoint=self._checkpoint_wire(last_t) if last_t else None,
            last_sampler_checkpoint=self._checkpoint_wire(last_s) if last_s else None,
            user_metadata=json.loads(run.user_metadata or "{}"))

    def list_runs(self, owner: str, limit: int, offset: int) -> T.TrainingRunsResponse:
        rows, total = self.db.list_runs(owner, limit, offset)
        return T.TrainingRunsResponse(
            training_runs=[self._run_wire(r) for r in rows],
            cursor=T.Cursor(offset=offset, limit=limit, total_count=total))

    def get_run(self, owner: str, run_id: str) -> T.TrainingRun:
        return self._run_wire(self._owned_run(owner, run_id, "training_run_id"))

    def list_checkpoints(self, owner: str, run_id: str) -> T.CheckpointsListResponse:
        run = self._owned_run(owner, run_id, "training_run_id")
        cks = [self._checkpoint_wire(c) for c in self.db.list_checkpoints(run.id)]
        return T.CheckpointsListResponse(checkpoints=cks)

    def run_metrics(self, owner: str, run_id: str) -> T.RunMetrics:
        run = self._owned_run(owner, run_id, "training_run_id")
        return T.RunMetrics(training_run_id=run.id, **self.db.run_metrics(run.id))

    def engine_utilization(self, base_model: str | None, last: int
                           ) -> T.EngineUtilizationResponse:
        """The last `last` training cycles of a base model (the only one, if not given)."""
        if base_model:
            served = self._served(base_model)
        elif len(self.models) == 1:
            served = next(iter(self.models.values()))
        else:
            raise APIError(400, "this server serves several base models; give base_model",
                           "base_model")
        cycles = [T.CycleUtilization(**c)
                  for c in self.db.engine_utilization(served.canonical, last)]
        busy = 0.0
        if cycles:
            wall = max(time.time() - cycles[0].started_at, sum(c.total_ms for c in cycles) / 1e3)
            busy = min(1.0, sum(c.engine_ms for c in cycles) / 1e3 / wall) if wall > 0 else 1.0
        return T.EngineUtilizationResponse(base_model=served.canonical, cycles=cycles,
                                           busy_fraction=busy)

    def _own_checkpoint(self, owner: str, run_id: str, seg: str, name: str,
                        action: str) -> CheckpointRow:
        """The caller's own checkpoint; 403 if it is someone else's published one, else 404."""
        if seg not in ("weights", "sampler_weights"):
            raise APIError(400, "checkpoint type must be 'weights' or 'sampler_weights'",
                           "checkpoint_id")
        check_name(name, "checkpoint_id")
        kind = "training" if seg == "weights" else "sampler"
        run = self.db.get_run(run_id)
        if run is None or run.owner != owner:
            ck = self.db.get_checkpoint(run_id, kind, name)
            if ck is not None and ck.public and run is not None:
                raise APIError(403, f"checkpoint {seg}/{name} is published by another tenant: "
                               f"you may load and sample it, but only its owner can {action} "
                               "it", "checkpoint_id", "not_owner")
            raise APIError(404, f"training run {run_id!r} not found", "training_run_id",
                           "unknown_run")
        ck = self.db.get_checkpoint(run.id, kind, name)
        if ck is None or (ck.ephemeral and action != "delete"):
            raise APIError(404, f"checkpoint {seg}/{name} not found in run {run_id!r}",
                           "checkpoint_id")
        return ck

    def publish_checkpoint(self, owner: str, run_id: str, seg: str, name: str,
                           public: bool) -> T.Checkpoint:
        """Publish (others may load and sample it) or unpublish one of the owner's checkpoints."""
        ck = self._own_checkpoint(owner, run_id, seg, name,
                                  "publish" if public else "unpublish")
        if ck.public == public:
            state = "already published" if public else "not published"
            raise APIError(409, f"checkpoint {seg}/{name} is {state}", "checkpoint_id",
                           "already_published" if public else "not_published")
        self.db.set_checkpoint_public(ck.id, public)
        ck.public = public
        return self._checkpoint_wire(ck)

    def delete_checkpoint(self, owner: str, run_id: str, seg: str, name: str) -> None:
        ck = self._own_checkpoint(owner, run_id, seg, name, "delete")
        root = self.config.checkpoint_dir.resolve()
        directory = self._on_disk(ck.directory)
        if root in directory.parents:  # never delete outside the data dir
            shutil.rmtree(directory, ignore_errors=True)
        self.db.delete_checkpoint(ck.id)

    # ------------------------------------------------------------------ archives

    def archive_token(self, owner: str, run_id: str, seg: str, name: str) -> tuple[str, int]:
        """A signed token for downloading a checkpoint the caller may read (its owner, or
        anyone once it is published; else 404), and its expiry in unix seconds."""
        if seg not in ("weights", "sampler_weights"):
            raise APIError(400, "checkpoint type must be 'weights' or 'sampler_weights'",
                           "checkpoint_id")
        check_name(name, "checkpoint_id")
        kind = "training" if seg == "weights" else "sampler"
        ck = self.db.get_checkpoint(run_id, kind, name)
        if ck is None or ck.ephemeral or (ck.owner != owner and not ck.public):
            raise APIError(404, f"checkpoint {seg}/{name} not found in run {run_id!r}",
                           "checkpoint_id", "unknown_checkpoint")
        exp = self.archives.expiry()
        token = self.archives.sign(ArchiveClaims(run=run_id, seg=seg, name=name,
                                                 ckpt_id=ck.id, created_at=ck.created_at,
                                                 tenant=owner, exp=exp))
        return token, exp

    def open_archive(self, token: str) -> tuple[TarStream, str]:
        """The tar stream of the checkpoint a token names, and a file name for it.

        403 for a bad or expired token; 404 when the checkpoint was deleted, replaced, or is
        no longer visible to the tenant the token was issued to (unpublished) since.
        """
        try:
            claims = self.archives.verify(token)
        except ArchiveTokenError as e:
            raise APIError(403, str(e), "token", "invalid_archive_url") from e
        kind = "training" if claims.seg == "weights" else "sampler"
        gone = APIError(404, f"checkpoint {claims.seg}/{claims.name} of run {claims.run!r} was "
                        "deleted, replaced or unpublished since this URL was issued", "token",
                        "unknown_checkpoint")
        ck = self.db.get_checkpoint(claims.run, kind, claims.name)
        if (ck is None or ck.id != claims.ckpt_id or ck.created_at != claims.created_at
                or ck.ephemeral or (ck.owner != claims.tenant and not ck.public)):
            raise gone
        root = self.config.checkpoint_dir.resolve()
        directory = self._on_disk(ck.directory)
        if root not in directory.parents:  # never read outside the data dir
            raise gone
        try:
            stream = TarStream(directory)
        except CheckpointFilesMissing as e:
            raise gone from e
        return stream, f"{run_dir_name(claims.run)}-{claims.seg}-{claims.name}.tar"

    # ------------------------------------------------------------------ samplers

    def create_sampling_session(self, owner: str, req: T.CreateSamplingSessionRequest
                                ) -> T.CreateSamplingSessionResponse:
        s = self.db.get_session(req.session_id)
        if s is None or s.owner != owner:
            raise APIError(404, f"session {req.session_id!r} not found", "session_id")
        if bool(req.base_model) == bool(req.model_path):
            raise APIError(400, "give exactly one of base_model or model_path", "model_path")
        check_int(req.sampling_session_seq_id, "sampling_session_seq_id")
        sid = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if req.model_path:
            ck = self._checkpoint_for(owner, req.model_path, "model_path")
            src = self.db.get_run(ck.run_id)
            base = src.base_model if src else ck.base_model
            served = self._served(base, "model_path")
            row = SamplerRow(id=sid, session_id=req.session_id, owner=owner, base_model=base,
                             canonical_model=served.canonical, model_path=req.model_path,
                             checkpoint_dir=ck.directory, created_at=time.time())
        else:
            assert req.base_model
            served = self._served(req.base_model)
            row = SamplerRow(id=sid, session_id=req.session_id, owner=owner,
                             base_model=req.base_model, canonical_model=served.canonical,
                             model_path=None, checkpoint_dir=None, created_at=time.time())
        self.db.add_sampler(row)
        return T.CreateSamplingSessionResponse(sampling_session_id=sid)

    def sample(self, owner: str, req: T.SampleRequest, *, stream: bool = False,
               stop_tokens: tuple[int, ...] = ()) -> T.UntypedAPIFuture:
        """Queue a sample request against a sampler (or a base model / checkpoint path).

        stream: report its tokens so far after every decode chunk (`sample_progress`);
        stop_tokens: more stop token ids (the OpenAI routes add the model's end tokens).
        """
        checkpoint_dir: str | None = None
        sampler_id = req.sampling_session_id
        if sampler_id:
            row = self.db.get_sampler(sampler_id)
            if row is None or row.owner != owner:
                raise APIError(404, f"sampler {sampler_id!r} not found; create it with "
                               "create_sampling_client", "sampling_session_id")
            if row.model_path:  # still visible? (deleted, or unpublished by its owner)
                self._checkpoint_for(owner, row.model_path, "sampling_session_id")
            served = self.models.get(row.canonical_model) or self._served(row.base_model)
            checkpoint_dir = row.checkpoint_dir
        elif req.model_path:
            ck = self._checkpoint_for(owner, req.model_path, "model_path")
            served = self._served(ck.base_model, "model_path")
            checkpoint_dir = ck.directory
        elif req.base_model:
            served = self._served(req.base_model)
        else:
            raise APIError(400, "give sampling_session_id (or base_model / model_path)",
                           "sampling_session_id")
        check_sample_extras(req)
        op = check_sample(req, served.limits, self.config.max_samples_per_request)
        adapter_key = None
        if checkpoint_dir is not None:
            weights = self._on_disk(checkpoint_dir) / "adapter_model.safetensors"
            if not weights.exists():
                raise APIError(404, "the sampler's weights are gone (checkpoint deleted)",
                               "sampling_session_id")
            adapter_key = f"{checkpoint_dir}@{weights.stat().st_mtime_ns}"
        op.update(adapter_key=adapter_key, adapter_dir=checkpoint_dir)
        if stream:
            op["stream"] = True
        if stop_tokens:
            op["stop_tokens"] = sorted(set(op["stop_tokens"]) | set(stop_tokens))
        try:
            rid = self.db.submit(owner=owner, run_id=None, sampler_id=sampler_id,
                                 seq_id=req.seq_id, kind="sample", base_model=served.canonical,
                                 payload={"owner": owner, "wire": req.model_dump(mode="json"),
                                          "sample_op": op},
                                 max_queued_total=self.config.max_queued_total,
                                 max_queued_per_tenant=self.config.max_queued_per_tenant)
        except SeqConflictError as e:
            raise APIError(409, str(e), "seq_id", "seq_conflict") from e
        except QueueFullError as e:
            raise queue_full(e) from e
        served.clock.wake()
        return T.UntypedAPIFuture(request_id=rid, sample_sequence_ids=[
            f"{rid}:{i}" for i in range(req.num_samples)])

    def cancel_sample(self, base_model: str, request_id: str) -> None:
        """Stop a sample request of this (canonical) base model whose client went away."""
        served = self.models.get(base_model)
        if served is not None:
            served.clock.cancel_sample(request_id)

    def get_sampler(self, owner: str, sampler_id: str) -> T.GetSamplerResponse:
        row = self.db.get_sampler(sampler_id)
        if row is None or row.owner != owner:
            raise APIError(404, f"sampler {sampler_id!r} not found", "sampler_id")
        return T.GetSamplerResponse(sampler_id=row.id, base_model=row.base_model,
                                    model_path=row.model_path)

