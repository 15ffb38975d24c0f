"""Paths the store keeps are relative to the data dir; absolute ones only at the engine.

Checkpoint and snapshot directories used to be stored as absolute paths, so a copied or
restored data dir silently read (and deleted) the original's files. Now the store holds
`checkpoints/<run>/weights/<name>` and `state/<run>/seq-...`, resolved against the serving
data dir where files are touched: in the service (archives, deletes, sampler weights) and,
for plans, by `DataDirExecutor` in front of the engine, which also turns the data dir back
into relative names in the engine's error messages (clients never see server paths).
Rows written by older servers (absolute) are rewritten at start-up (`relative_form`).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from pathlib import Path, PurePosixPath
from typing import Any

from bios.server import plan as P

# What each kind of stored directory looks like below the data dir (number of components).
_SHAPES = {"checkpoints": 4, "state": 3}  # checkpoints/<run>/<seg>/<name>, state/<run>/<dir>


def to_stored(root: Path, path: str | Path) -> str:
    """`path` as the store keeps it: relative to the data dir `root` when below it."""
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)  # outside the data dir (not made by Bios): kept as it is


def resolve(root: Path, stored: str | None) -> Path | None:
    """The absolute path of a stored directory (relative ones are under the data dir)."""
    if stored is None:
        return None
    p = Path(stored)
    return p if p.is_absolute() else root.resolve() / p


def relative_form(stored: str) -> str | None:
    """The data-dir-relative form of an absolute directory an older server stored
    (`.../checkpoints/<run>/<seg>/<name>` or `.../state/<run>/<dir>`), else None."""
    p = PurePosixPath(stored)
    if not p.is_absolute():
        return None
    parts = p.parts
    for top, n in _SHAPES.items():
        if len(parts) > n and parts[-n] == top:
            return "/".join(parts[-n:])
    return None


def relative_names(root: Path, text: str | None) -> str | None:
    """`text` with the data dir's absolute path removed (messages name files relatively)."""
    if not text:
        return text
    base = str(root.resolve())
    return text.replace(base + "/", "").replace(base, ".")


class DataDirExecutor:
    """An engine executor's `submit`, with stored (relative) directories in plans resolved
    against the data dir, and the data dir's path taken out of results' error messages."""

    def __init__(self, executor: Any, root: Path) -> None:
        self.executor = executor
        self.root = Path(root).resolve()

    def submit(self, plan: Any) -> Future[Any]:
        inner = self.executor.submit(self._resolved(plan))
        outer: Future[Any] = Future()

        def done(f: Future[Any]) -> None:
            try:
                outer.set_result(self._relative_errors(f.result()))
            except BaseException as e:  # handed to the waiter as is
                outer.set_exception(e)

        inner.add_done_callback(done)
        return outer

    def __getattr__(self, name: str) -> Any:  # info(), shutdown(), ...
        return getattr(self.executor, name)

    def _path(self, stored: str | None) -> str | None:
        p = resolve(self.root, stored)
        return None if p is None else str(p)

    def _resolved(self, plan: Any) -> Any:
        if isinstance(plan, P.CyclePlan):
            steps = [dataclasses.replace(s, directory=self._path(s.directory))
                     if isinstance(s, P.SaveStateOp | P.LoadStateOp)
                     else dataclasses.replace(s, load_from=self._path(s.load_from))
                     if isinstance(s, P.CreateAdapterOp) and s.load_from is not None else s
                     for s in plan.steps]
            return dataclasses.replace(plan, steps=steps)
        if isinstance(plan, P.SamplePlan):
            admit = [dataclasses.replace(op, adapter_dir=self._path(op.adapter_dir))
                     for op in plan.admit]
            return dataclasses.replace(plan, admit=admit)
        return plan

    def _relative_errors(self, result: Any) -> Any:
        ops = getattr(result, "results", None) if isinstance(result, P.CycleResult) else (
            getattr(result, "finished", None) if isinstance(result, P.SampleResult) else None)
        if not ops or not any(r.error for r in ops):
            return result
        fixed = [dataclasses.replace(r, error=relative_names(self.root, r.error))
                 if r.error else r for r in ops]
        field = "results" if isinstance(result, P.CycleResult) else "finished"
        return dataclasses.replace(result, **{field: fixed})
