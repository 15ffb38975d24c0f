"""Stored directories are data-dir-relative; the engine sees absolute ones and its error
messages come back without the server's paths (data_paths.py)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

from bios.server import plan as P
from bios.server.data_paths import DataDirExecutor, relative_form, resolve, to_stored


class Recorder:
    """An executor that records plans and fails every op naming its directory."""

    def __init__(self) -> None:
        self.plans: list = []

    def submit(self, plan):
        self.plans.append(plan)
        f: Future = Future()
        f.set_result(P.CycleResult(plan.cycle_id, [
            P.OpResult(s.request_id, False, error=f"checkpoint {s.directory} does not exist")
            for s in plan.steps]))
        return f


def test_plans_get_absolute_directories_and_errors_relative_ones(tmp_path: Path) -> None:
    inner = Recorder()
    ex = DataDirExecutor(inner, tmp_path)
    res = ex.submit(P.CyclePlan(1, "m", [
        P.LoadStateOp("a", "r", "checkpoints/r/weights/x", True),
        P.SaveStateOp("b", "r", "/elsewhere/ck", "training", "m")])).result()
    assert [s.directory for s in inner.plans[0].steps] == [
        str(tmp_path.resolve() / "checkpoints/r/weights/x"), "/elsewhere/ck"]
    assert [r.error for r in res.results] == [
        "checkpoint checkpoints/r/weights/x does not exist",
        "checkpoint /elsewhere/ck does not exist"]


def test_stored_forms(tmp_path: Path) -> None:
    assert to_stored(tmp_path, tmp_path / "checkpoints" / "r" / "weights" / "a") == \
        "checkpoints/r/weights/a"
    assert to_stored(tmp_path, "/not/under/it") == "/not/under/it"
    assert resolve(tmp_path, "state/r/s") == tmp_path.resolve() / "state/r/s"
    assert relative_form("/old/dd/checkpoints/r/sampler_weights/n") == \
        "checkpoints/r/sampler_weights/n"
    assert relative_form("/old/dd/state/r/seq-0000000001-ab") == "state/r/seq-0000000001-ab"
    assert relative_form("checkpoints/r/weights/a") is None
    assert relative_form("/somewhere/else") is None


class Accepting(Recorder):
    """An executor that records plans and answers with no op results."""

    def submit(self, plan):
        self.plans.append(plan)
        f: Future = Future()
        f.set_result(P.CycleResult(plan.cycle_id, []))
        return f


def test_a_creation_from_a_checkpoint_gets_its_absolute_directory(tmp_path: Path) -> None:
    """Tinker 0.38's create-from-state: the creation op itself loads the checkpoint."""
    inner = Accepting()
    spec = P.AdapterSpec(rank=4, seed=0)
    DataDirExecutor(inner, tmp_path).submit(P.CyclePlan(1, "m", [
        P.CreateAdapterOp("a", "r", spec, load_from="checkpoints/q/weights/x"),
        P.CreateAdapterOp("b", "s", spec)])).result()
    assert [s.load_from for s in inner.plans[0].steps] == [
        str(tmp_path.resolve() / "checkpoints/q/weights/x"), None]
