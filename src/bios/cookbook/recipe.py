"""What every recipe takes and returns: `RecipeConfig` and `RecipeResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RecipeConfig:
    """Settings shared by the recipes; None means the recipe's own default.

    Attributes:
        base_url: the Bios server (None: $BIOS_BASE_URL, default http://127.0.0.1:8000).
        base_model: the model to train (the teacher too, for `distill`).
        steps: training steps.
        seed: LoRA initialisation, data order and sampling seeds (the same in both styles).
        log_dir: where metrics.jsonl and the plot go (None: nowhere).
        rank: LoRA rank.
        learning_rate: Adam learning rate.
        loss: the RL loss, "importance_sampling" or "ppo" (`rl` only).
        max_off_policy: how many optimizer steps older than the current weights the async RL
            and distill samples may be (0: on-policy like the sync version; default 1).
        echo: print one line per step.
    """

    base_url: str | None = None
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    steps: int | None = None
    seed: int = 0
    log_dir: Path | None = None
    rank: int = 16
    learning_rate: float | None = None
    loss: str = "importance_sampling"
    max_off_policy: int = 1
    echo: bool = True


@dataclass
class RecipeResult:
    """The outcome of one recipe run.

    Attributes:
        recipe, style: which recipe ("sl", ...) in which style ("sync" / "async").
        metric: what `before` and `after` measure (e.g. "eval loss").
        before, after: the metric before training and after it.
        wall_s: wall time of the whole run (client creation to the last result).
        records: the per-step metrics (also in metrics.jsonl).
        plot: the plot's path, when one was written.
    """

    recipe: str
    style: str
    metric: str
    before: float
    after: float
    wall_s: float
    records: list[dict[str, Any]] = field(default_factory=list)
    plot: Path | None = None

    @property
    def summary(self) -> str:
        """The recipe's last line: `RECIPE: <metric> <before> -> <after>`."""
        return f"{self.recipe}: {self.metric} {self.before:.3f} -> {self.after:.3f}"
