"""Every recipe, in both styles, for a few steps on the tiny model against a real `bios serve`.

The two styles share data order, LoRA init and sampling seeds, so their metrics agree: exactly
the same computation for `sl`, `dpo`, `eval`, and for `rl`/`distill` with max_off_policy=0 (the
async version's default, one step off-policy, is checked for its bounded gap). Sizes are cut
down (module constants) to keep the module short on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bios.cookbook import RecipeConfig, RecipeResult, distill, dpo, evaluation, rl, run_recipe, sl
from server_process import REPO, ServerProcess

TINY = "bios/tiny-llama"
# Metrics that depend on timing, not on the computation.
TIMING = {"elapsed_s"}


@pytest.fixture(autouse=True)
def small_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    for module, name, value in [
        (sl, "BATCH", 2), (sl, "EVAL_EVERY", 2), (sl, "PIPELINE_DEPTH", 2),
        (rl, "BATCH", 2), (rl, "GROUP", 3), (rl, "MAX_TOKENS", 4), (rl, "EVAL_PROBLEMS", 2),
        (dpo, "BATCH", 2), (dpo, "EVAL_EVERY", 2),
        (distill, "BATCH", 2), (distill, "GROUP", 2), (distill, "MAX_TOKENS", 4),
        (distill, "EVAL_PROBLEMS", 2), (evaluation, "MAX_TOKENS", 4),
    ]:
        monkeypatch.setattr(module, name, value)


def config(server: ServerProcess, tmp_path: Path, style: str, **kwargs: Any) -> RecipeConfig:
    return RecipeConfig(base_url=server.base_url, base_model=TINY, rank=4, seed=3,
                        log_dir=tmp_path / style, echo=False, **kwargs)


def run_both(recipe: str, server: ServerProcess, tmp_path: Path, **kwargs: Any
             ) -> tuple[RecipeResult, RecipeResult]:
    results = []
    for style in ("sync", "async"):
        result = run_recipe(recipe, style, config(server, tmp_path, style, **kwargs))
        logged = [json.loads(x) for x in (tmp_path / style / "metrics.jsonl").read_text()
                  .splitlines()]
        assert logged == result.records and logged, f"{recipe}/{style}: metrics.jsonl"
        assert result.plot is not None and result.plot.exists()
        results.append(result)
    return results[0], results[1]


def assert_same_metrics(a: RecipeResult, b: RecipeResult, rel: float = 1e-3,
                        skip: frozenset[str] = frozenset()) -> None:
    assert [r["step"] for r in a.records] == [r["step"] for r in b.records]
    for ra, rb in zip(a.records, b.records, strict=True):
        keys = set(ra) - TIMING - skip
        assert keys == set(rb) - TIMING - skip
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-4), (k, ra, rb)
    assert (a.before, a.after) == pytest.approx((b.before, b.after), rel=rel, abs=1e-4)


def test_sl_sync_and_async_agree_and_eval_loss_falls(server: ServerProcess,
                                                     tmp_path: Path) -> None:
    sync, async_ = run_both("sl", server, tmp_path, steps=4, learning_rate=1e-2)
    assert_same_metrics(sync, async_)
    assert sync.metric == "eval loss" and sync.after < sync.before
    assert [r["step"] for r in sync.records] == [0, 1, 2, 3, 4]


def test_dpo_sync_and_async_agree(server: ServerProcess, tmp_path: Path) -> None:
    sync, async_ = run_both("dpo", server, tmp_path, steps=2)
    assert_same_metrics(sync, async_)
    first = sync.records[1]
    assert first["dpo_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: ln 2
    assert "eval_accuracy" in sync.records[-1]


def test_rl_on_policy_async_matches_sync(server: ServerProcess, tmp_path: Path) -> None:
    sync, async_ = run_both("rl", server, tmp_path, steps=2, max_off_policy=0)
    assert_same_metrics(sync, async_)
    assert all(r.get("off_policy_steps", 0) == 0 for r in async_.records)


def test_rl_async_overlaps_with_a_gap_of_one_step(server: ServerProcess, tmp_path: Path) -> None:
    result = run_recipe("rl", "async", config(server, tmp_path, "async", steps=3, loss="ppo"))
    gaps = [r["off_policy_steps"] for r in result.records if "off_policy_steps" in r]
    trained = [r["trained"] for r in result.records if "trained" in r]
    assert len(gaps) == 3 and gaps[0] == 0 and max(gaps) <= 1
    if all(trained):  # every step trained: each later batch was sampled one step behind
        assert gaps == [0, 1, 1]


def test_distill_on_policy_async_matches_sync(server: ServerProcess, tmp_path: Path) -> None:
    sync, async_ = run_both("distill", server, tmp_path, steps=2, max_off_policy=0)
    assert_same_metrics(sync, async_, rel=1e-2)
    assert sync.metric == "reverse KL"


def test_eval_sync_and_async_agree(server: ServerProcess, tmp_path: Path) -> None:
    sync, async_ = run_both("eval", server, tmp_path, steps=3)
    assert_same_metrics(sync, async_)
    assert [r["shots"] for r in sync.records] == [0, 3]


def test_bad_settings_fail_before_any_work(server: ServerProcess, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss must be one of"):
        run_recipe("rl", "sync", config(server, tmp_path, "sync", loss="dro"))
    with pytest.raises(ValueError, match="unknown recipe"):
        run_recipe("grpo", "sync")
    with pytest.raises(ValueError, match="style"):
        run_recipe("sl", "threads")


def test_cli_list_and_run(server: ServerProcess, tmp_path: Path) -> None:
    env = {**os.environ, "BIOS_BASE_URL": server.base_url,
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cli = [sys.executable, "-m", "bios.cli", "cookbook"]
    listed = subprocess.run([*cli, "list"], capture_output=True, text=True, env=env, check=True,
                            timeout=120).stdout
    assert [line.split()[0] for line in listed.splitlines()] == ["sl", "rl", "dpo", "distill",
                                                                  "eval"]
    out = subprocess.run([*cli, "run", "eval", "--style", "async", "--base-model", TINY,
                          "--steps", "1", "--log-dir", str(tmp_path / "cli")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("eval: exact match ") and " -> " in lines[-1]
    assert any(line.startswith("[eval/async] step") for line in lines)
    assert (tmp_path / "cli" / "metrics.jsonl").exists()
    assert (tmp_path / "cli" / "eval_async.png").exists()
