"""Server configuration: one dataclass built at the edge (CLI or tests) and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_MODEL = "bios/tiny-llama"


@dataclass
class ServerConfig:
    """Everything `bios serve` can be told.

    models: registry names, local HF directories, or `alias=source` entries.
    clock_period: seconds between clock cycles; 0 runs cycles back to back whenever work waits.
    """

    data_dir: Path = field(default_factory=lambda: Path(".bios"))
    host: str = "127.0.0.1"
    port: int = 8000
    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    clock_period: float = 0.0
    database_url: str | None = None  # default: SQLite file in data_dir
    device: str | None = None  # None: CUDA when present, else CPU
    token_budget: int | None = None  # tokens per batched pass; None: engine default for device
    long_poll_seconds: float = 30.0  # how long retrieve_future holds a request open
    max_body_bytes: int = 64 * 1024 * 1024
    # Request bodies read and parsed at once, all requests together (None: max_body_bytes);
    # a body over 256 KiB waits until its bytes fit (see http_guard.ByteBudget).
    max_body_bytes_in_flight: int | None = None
    max_queued_per_run: int = 1024  # backpressure: requests queued but not yet run, per run
    max_queued_total: int = 16384
    max_queued_per_tenant: int = 4096  # queued requests of one tenant, all its runs/samplers
    max_tokens_per_request: int = 262_144
    # Tokens of forward/forward_backward work one tenant may have queued or running (429).
    max_queued_tokens_per_tenant: int = 4_194_304
    # The cycle bound: pass tokens per clock cycle (None: 4 x the engine's token budget per
    # pass; 0: no bound, every runnable request in one cycle) and a target engine time per
    # cycle (0: none), which the clock turns into tokens with its measured throughput. The
    # budget is shared fairly between tenants and their runs; the rest waits for the next
    # cycle, and a request bigger than one pass's token budget is split across cycles.
    cycle_tokens: int | None = None
    cycle_seconds: float = 0.5
    # Runs resident in the engine (0: unbounded), server-wide per base model and per tenant:
    # before a cycle needs more, the least recently used idle runs are unloaded (after a
    # snapshot) and reload on their next request.
    max_resident_runs: int = 64
    max_resident_runs_per_tenant: int = 32
    # The same by bytes: resident runs' fp32 adapter weights plus AdamW state, per base model
    # (None: half the host's physical memory; 0: unbounded) and per tenant (0: unbounded).
    max_resident_bytes: int | None = None
    max_resident_bytes_per_tenant: int = 0
    # Stored bytes per tenant: checkpoints plus user_metadata (0: unbounded; a save past it is
    # a 413), and the user_metadata of one session or run (413).
    max_stored_bytes_per_tenant: int = 0
    max_metadata_bytes: int = 65_536
    max_rank: int = 256
    max_samples_per_request: int = 128
    # Crash recovery: snapshot a run's state (data_dir/state/<run>/) once it has this many
    # optim steps, or a change this many seconds old, not yet in a snapshot (bounds replay).
    snapshot_steps: int = 50
    snapshot_seconds: float = 120.0
    # Runs idle this long (all requests done, no pending gradients) leave engine memory after
    # a snapshot and are rebuilt from it on their next request; a restart rebuilds at once
    # only runs active this recently. 0: keep every run resident (and rebuild all at start).
    unload_idle_s: float = 900.0
    # Start on a zero-length bios.db (refused by default: see integrity.check_sqlite_file).
    allow_empty_database: bool = False
    model_cache: Path | None = None  # default: data_dir/models; share one across servers
    # (tenant, sha256 hex of a key) pairs; empty: local mode, one tenant "local", loopback only.
    api_keys: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.clock_period < 0:
            raise ValueError("clock_period must be >= 0 (0 = continuous cycles)")
        if self.unload_idle_s < 0:
            raise ValueError("unload_idle_s must be >= 0 (0 = never unload)")
        if self.cycle_tokens is not None and self.cycle_tokens < 0:
            raise ValueError("cycle_tokens must be >= 0 (0 = no bound)")
        if self.max_resident_bytes is not None and self.max_resident_bytes < 0:
            raise ValueError("max_resident_bytes must be >= 0 (0 = unbounded)")
        for name in ("cycle_seconds", "max_resident_runs", "max_resident_runs_per_tenant",
                     "max_resident_bytes_per_tenant",
                     "max_stored_bytes_per_tenant", "max_metadata_bytes",
                     "max_queued_tokens_per_tenant", "max_tokens_per_request"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def resident_bytes_bound(self) -> int:
        """`max_resident_bytes`, with None resolved to half the host's physical memory
        (0 where the host does not say)."""
        if self.max_resident_bytes is not None:
            return self.max_resident_bytes
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
        except (ValueError, OSError, AttributeError):
            return 0

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'bios.db').resolve()}"

    @property
    def archive_secret_path(self) -> Path:
        return self.data_dir / "archive_url_secret"

    @property
    def checkpoint_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def state_dir(self) -> Path:
        """Run-private crash-recovery snapshots (not user checkpoints)."""
        return self.data_dir / "state"

    @property
    def model_cache_dir(self) -> Path:
        return Path(self.model_cache) if self.model_cache else self.data_dir / "models"
