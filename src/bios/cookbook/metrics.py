"""Metrics of a recipe run: one printed line per step, `metrics.jsonl`, and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Collects per-step metrics; prints each step and appends it to `log_dir/metrics.jsonl`.

    Attributes:
        records: every logged record (dicts with "step" and the metrics).
    """

    def __init__(self, recipe: str, style: str, log_dir: Path | None, total_steps: int,
                 echo: bool = True) -> None:
        self.recipe, self.style, self.total_steps, self.echo = recipe, style, total_steps, echo
        self.log_dir = Path(log_dir) if log_dir else None
        self.records: list[dict[str, Any]] = []
        self._t0 = time.monotonic()
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / "metrics.jsonl").write_text("")

    @property
    def path(self) -> Path | None:
        return self.log_dir / "metrics.jsonl" if self.log_dir else None

    def log(self, step: int, **metrics: float) -> None:
        """Record (and print) the metrics of `step`; step -1 / total_steps are before / after."""
        record = {"step": step, "elapsed_s": round(time.monotonic() - self._t0, 3), **metrics}
        self.records.append(record)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.echo:
            shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in metrics.items())
            print(f"[{self.recipe}/{self.style}] step {step:3d}/{self.total_steps}  {shown}",
                  flush=True)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric over the records that have it."""
        rows = [(r["step"], r[key]) for r in self.records if key in r]
        return [s for s, _ in rows], [float(v) for _, v in rows]

    def plot(self, keys: list[str]) -> Path | None:
        """Plot `keys` against step into `log_dir/<recipe>_<style>.png` (needs matplotlib;
        skipped, returning None, without a log dir or matplotlib)."""
        if not self.log_dir:
            return None
        try:
            import matplotlib
        except ImportError:
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in keys if self.series(k)[0]]
        fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.6 * max(1, len(keys))),
                                 squeeze=False)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            steps, values = self.series(key)
            ax.plot(steps, values, marker="o", markersize=3)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title(f"bios cookbook: {self.recipe} ({self.style})")
        fig.tight_layout()
        path = self.log_dir / f"{self.recipe}_{self.style}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
