"""`bios runs`, `bios checkpoints` and `bios trace`: the console on the command line.

Everything goes through the public SDK (`ServiceClient`, `RestClient`) with `BIOS_BASE_URL` and
`BIOS_API_KEY` (or `--base-url` / `--api-key`). Listings print `rich` tables, or JSON with
`-f json`. Errors print one line and exit with a code, never a traceback:

    0 ok   1 the server failed   2 bad input (a malformed path, an existing directory)
    3 the server cannot be reached   4 the API key was refused   5 no such run or checkpoint

`bios checkpoints export --format merged` needs torch, transformers and peft (the server's
stack), imported only by that command; everything else needs the SDK alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bios import types
from bios.exceptions import (
    APIConnectionError,
    APIStatusError,
    AuthenticationError,
    BiosAPIError,
    NotFoundError,
    PermissionDeniedError,
    UnsafeArchiveError,
)

EXIT_SERVER, EXIT_INPUT, EXIT_CONNECT, EXIT_AUTH, EXIT_NOT_FOUND = 1, 2, 3, 4, 5
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


class CLIError(Exception):
    """A failure to report in one line, with the process exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- plumbing


def _clients(args: argparse.Namespace) -> tuple[Any, Any]:
    import bios

    service = bios.ServiceClient(base_url=args.base_url, api_key=args.api_key,
                                 timeout=args.timeout, max_retries=2)
    return service, service.create_rest_client()


@contextmanager
def _reported(base_url: str) -> Iterator[None]:
    """Turn SDK errors into CLIErrors with a message that says what to do."""
    try:
        yield
    except AuthenticationError as e:
        raise CLIError(f"the server refused the API key ({e.detail}); set BIOS_API_KEY or pass "
                       "--api-key", EXIT_AUTH) from e
    except (NotFoundError, PermissionDeniedError) as e:
        raise CLIError(e.detail, EXIT_NOT_FOUND) from e
    except APIStatusError as e:
        code = EXIT_INPUT if 400 <= e.status_code < 500 else EXIT_SERVER
        raise CLIError(f"{e.status_code}: {e.detail}", code) from e
    except APIConnectionError as e:
        raise CLIError(f"{e} (the server: $BIOS_BASE_URL or --base-url, now {base_url})",
                       EXIT_CONNECT) from e
    except BiosAPIError as e:
        raise CLIError(str(e), EXIT_SERVER) from e
    except UnsafeArchiveError as e:
        raise CLIError(f"refused the checkpoint archive: {e}", EXIT_SERVER) from e
    except (FileExistsError, ValueError) as e:
        raise CLIError(str(e), EXIT_INPUT) from e


def _console() -> Any:
    from rich.console import Console

    return Console()


def _emit(args: argparse.Namespace, data: Any, table: Callable[[], Any]) -> None:
    """Print `data` as JSON (`-f json`) or the rich table that `table()` builds."""
    if args.format == "json":
        print(json.dumps(data, indent=2, default=str))
    else:
        _console().print(table())


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    return t


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _all_runs(rest: Any) -> list[types.TrainingRun]:
    runs: list[types.TrainingRun] = []
    while True:
        page = rest.list_training_runs(limit=100, offset=len(runs))
        runs += page.training_runs
        total = page.cursor.total_count if page.cursor else None
        if not page.training_runs or total is None or len(runs) >= total:
            return runs


def _checkpoint_of(rest: Any, path: str) -> types.Checkpoint:
    from bios.rest_client import parse_checkpoint_path

    run_id, seg, name = parse_checkpoint_path(path)
    for ck in rest.list_checkpoints(run_id).checkpoints:
        if ck.checkpoint_id == f"{seg}/{name}":
            return ck
    raise CLIError(f"checkpoint {path!r} not found", EXIT_NOT_FOUND)


# ----------------------------------------------------------------------------- runs


def runs_list(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    runs = _all_runs(rest) if args.limit == 0 else rest.list_training_runs(
        limit=args.limit).training_runs
    _emit(args, [r.model_dump() for r in runs], lambda: _table(
        f"training runs ({len(runs)})",
        ["run", "base model", "rank", "last request", "last checkpoint", "state"],
        [[r.training_run_id, r.base_model, r.lora_rank, r.last_request_time,
          r.last_checkpoint.tinker_path if r.last_checkpoint else None,
          "lost" if r.corrupted else "ok"] for r in runs]))


def runs_info(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    run = rest.get_training_run(args.run)
    metrics = rest.get_run_metrics(args.run)
    cks = rest.list_checkpoints(args.run).checkpoints
    history = rest.get_run_history(args.run)
    losses = [s.loss for s in history.steps if s.loss is not None]
    data = {"run": run.model_dump(), "metrics": metrics.model_dump(),
            "checkpoints": [c.model_dump() for c in cks],
            "last_loss": losses[-1] if losses else None}

    def tables() -> Any:
        from rich.console import Group

        m = metrics
        rows = [["base model", run.base_model], ["LoRA rank", run.lora_rank],
                ["owner", run.model_owner], ["state", "lost" if run.corrupted else "ok"],
                ["last request", run.last_request_time], ["steps", m.steps],
                ["last loss", f"{losses[-1]:.4f}" if losses else None],
                ["requests", m.requests], ["tokens", m.tokens],
                ["cycles with work", m.cycles_with_work], ["missed cycles", m.missed_cycles],
                ["queue wait", f"{m.queue_wait_s:.2f} s"], ["compute", f"{m.compute_s:.2f} s"],
                ["engine busy / idle", f"{m.engine_busy_s:.2f} s / {m.engine_idle_s:.2f} s"]]
        return Group(_table(f"run {run.training_run_id}", ["", ""], rows),
                     _checkpoints_table(cks, f"checkpoints ({len(cks)})"))

    _emit(args, data, tables)


# ----------------------------------------------------------------------------- checkpoints


def _checkpoints_table(cks: list[types.Checkpoint], title: str) -> Any:
    return _table(title, ["path", "type", "size", "time", "public"],
                  [[c.tinker_path, c.checkpoint_type, _size(c.size_bytes), c.time,
                    "yes" if c.public else "no"] for c in cks])


def checkpoints_list(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    run_ids = [args.run] if args.run else [r.training_run_id for r in _all_runs(rest)]
    cks = [c for rid in run_ids for c in rest.list_checkpoints(rid).checkpoints]
    _emit(args, [c.model_dump() for c in cks],
          lambda: _checkpoints_table(cks, f"checkpoints ({len(cks)})"))


def checkpoints_info(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    info = rest.get_weights_info_by_tinker_path(args.path)
    data: dict[str, Any] = {"tinker_path": args.path, **info.model_dump()}
    with suppress(CLIError, NotFoundError):  # the listing entry is the owner's to see
        data.update(_checkpoint_of(rest, args.path).model_dump())
    _emit(args, data, lambda: _table(args.path, ["", ""], [[k, v] for k, v in data.items()]))


def checkpoints_publish(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    if args.command_name == "publish":
        rest.publish_checkpoint_from_tinker_path(args.path)
        print(f"published {args.path}: other tenants may now load and sample it")
    else:
        rest.unpublish_checkpoint_from_tinker_path(args.path)
        print(f"unpublished {args.path}")


def checkpoints_delete(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    if not args.yes:
        if not sys.stdin.isatty():
            raise CLIError(f"refusing to delete {args.path} without confirmation; pass --yes",
                           EXIT_INPUT)
        if input(f"delete {args.path}? [y/N] ").strip().lower() not in ("y", "yes"):
            raise CLIError("not deleted", EXIT_INPUT)
    rest.delete_checkpoint_from_tinker_path(args.path)
    print(f"deleted {args.path}")


def _download(rest: Any, path: str, dest: Path, quiet: bool = False) -> Path:
    """Download a checkpoint archive with a progress bar, then extract it safely."""
    import httpx
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    from bios.checkpoint_archive import check_destination, extract_archive

    dest = dest.expanduser().absolute()
    check_destination(dest)  # before downloading anything
    url = rest.get_checkpoint_archive_url_from_tinker_path(path).url
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tar.part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, httpx.stream("GET", url, timeout=60.0,
                                                      follow_redirects=True) as r:
            if r.status_code != 200:
                r.read()
                detail = r.json().get("detail", r.text) if r.headers.get(
                    "content-type", "").startswith("application/json") else r.text
                raise CLIError(f"download failed ({r.status_code}): {detail}",
                               EXIT_NOT_FOUND if r.status_code == 404 else EXIT_SERVER)
            total = int(r.headers.get("content-length", 0)) or None
            with Progress("[progress.description]{task.description}", BarColumn(),
                          DownloadColumn(), TransferSpeedColumn(), disable=quiet,
                          transient=False) as bar:
                task = bar.add_task(dest.name, total=total)
                for chunk in r.iter_bytes(1 << 20):
                    out.write(chunk)
                    bar.advance(task, len(chunk))
        return extract_archive(tmp, dest)
    except httpx.TransportError as e:
        raise CLIError(f"download failed: {type(e).__name__}: {e}", EXIT_CONNECT) from e
    finally:
        os.unlink(tmp)


def checkpoints_download(args: argparse.Namespace) -> None:
    from bios.rest_client import parse_checkpoint_path

    _, rest = _clients(args)
    run_id, seg, name = parse_checkpoint_path(args.path)
    dest = Path(args.output or f"{run_id.replace(':', '__')}-{seg}-{name}")
    out = _download(rest, args.path, dest, quiet=args.quiet)
    print(f"extracted {args.path} into {out}")


def checkpoints_export(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    dest = Path(args.output).expanduser().absolute()
    from bios.checkpoint_archive import check_destination

    check_destination(dest)
    if args.export_format == "merged" and not args.base:
        raise CLIError("--format merged needs the base model as a local Hugging Face "
                       "directory: pass --base DIR", EXIT_INPUT)
    with tempfile.TemporaryDirectory(prefix=".bios-export-", dir=dest.parent
                                     if dest.parent.exists() else None) as tmp:
        adapter = _download(rest, args.path, Path(tmp) / "adapter", quiet=args.quiet)
        if args.export_format == "peft":
            dest.mkdir(parents=True, exist_ok=True)
            for f in PEFT_FILES:
                shutil.copy2(adapter / f, dest / f)
            print(f"wrote a PEFT adapter to {dest} (peft.PeftModel.from_pretrained(base, "
                  f"{str(dest)!r}))")
            return
        merge_adapter(Path(args.base), adapter, dest)
    print(f"wrote {args.path} merged into {args.base} to {dest} "
          f"(transformers.AutoModelForCausalLM.from_pretrained({str(dest)!r}))")


def merge_adapter(base_dir: Path, adapter_dir: Path, dest: Path) -> None:
    """Save base + LoRA (merged into the weights, fp32) as a transformers model directory.

    A tied unembedding (`tie_word_embeddings`) is untied first when the adapter trains it, so
    that merging its delta does not also change the input embeddings.
    """
    try:
        import peft
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise CLIError(f"--format merged needs torch, transformers and peft ({e}); install the "
                       "server requirements (requirements/server.txt)", EXIT_INPUT) from e
    if not (base_dir / "config.json").is_file():
        raise CLIError(f"--base {base_dir} is not a Hugging Face model directory (no "
                       "config.json)", EXIT_INPUT)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if "lm_head" in config.get("target_modules", []) and model.config.tie_word_embeddings:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    dest.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(dest)
    for f in TOKENIZER_FILES:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, dest / f)


# ----------------------------------------------------------------------------- trace


def trace_events(run: types.TrainingRun, history: types.RunHistory) -> dict[str, Any]:
    """A Chrome/Perfetto trace (JSON object format) of a run's requests and cycles.

    Process 1 is the run: each request is two async spans on its own track, "queue" (stored
    until claimed) and its kind (claimed until finished), categorised pass / optimizer /
    save / load / other. Process 2 is the base model's engine: each cycle the run had work in
    is a span (the cycle's total time) holding an "engine" span (its engine time); cycles it
    missed are instant events. Times are microseconds since the run's first request.
    """
    reqs = history.requests
    t0 = min([r.created_at for r in reqs] + [c.started_at for c in history.cycles], default=0.0)

    def us(t: float) -> float:
        return round((t - t0) * 1e6, 1)

    category = {"forward_backward": "pass", "forward": "pass", "optim_step": "optimizer",
                "save_weights": "save", "save_weights_for_sampler": "save",
                "load_weights": "load", "create": "create"}
    ev: list[dict[str, Any]] = [
        {"ph": "M", "pid": 1, "name": "process_name",
         "args": {"name": f"run {run.training_run_id}"}},
        {"ph": "M", "pid": 2, "name": "process_name",
         "args": {"name": f"engine {run.base_model}"}},
        {"ph": "M", "pid": 2, "tid": 1, "name": "thread_name", "args": {"name": "cycles"}},
    ]
    for r in reqs:
        cat = category.get(r.kind, "other")
        args = {"seq_id": r.seq_id, "kind": r.kind, "status": r.status, "cycle_id": r.cycle_id}
        if r.loss is not None:
            args["loss"] = r.loss
        if r.error:
            args["error"] = r.error
        if r.started_at is not None:
            for ph, t in (("b", r.created_at), ("e", r.started_at)):
                ev.append({"ph": ph, "pid": 1, "tid": 1, "cat": "queue", "id": f"q{r.seq_id}",
                           "name": "queue wait", "ts": us(t), "args": args})
        end = r.completed_at
        if r.started_at is not None and end is not None:
            for ph, t in (("b", r.started_at), ("e", end)):
                ev.append({"ph": ph, "pid": 1, "tid": 2, "cat": cat, "id": f"r{r.seq_id}",
                           "name": f"{r.kind} #{r.seq_id}", "ts": us(t), "args": args})
    for c in history.cycles:
        args = {"cycle_id": c.cycle_id, "runs": c.runs, "tokens": c.tokens,
                "run_tokens": c.run_tokens, "run_ops": c.run_ops,
                "run_compute_ms": c.run_compute_ms, "engine_ms": c.engine_ms}
        if c.missed:
            ev.append({"ph": "i", "pid": 2, "tid": 1, "s": "t", "ts": us(c.started_at),
                       "name": f"missed cycle {c.cycle_id}", "args": args})
            continue
        ev.append({"ph": "X", "pid": 2, "tid": 1, "cat": "cycle", "name": f"cycle {c.cycle_id}",
                   "ts": us(c.started_at), "dur": round(c.total_ms * 1e3, 1), "args": args})
        ev.append({"ph": "X", "pid": 2, "tid": 1, "cat": "engine", "name": "engine",
                   "ts": us(c.started_at), "dur": round(min(c.engine_ms, c.total_ms) * 1e3, 1),
                   "args": args})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"training_run_id": run.training_run_id, "base_model": run.base_model,
                          "start_unix_s": t0}}


def trace(args: argparse.Namespace) -> None:
    _, rest = _clients(args)
    run = rest.get_training_run(args.run)
    history = rest.get_run_history(args.run)
    out = Path(args.output)
    out.write_text(json.dumps(trace_events(run, history)))
    print(f"wrote {len(history.requests)} requests and {len(history.cycles)} cycles of "
          f"{args.run} to {out} (open it at https://ui.perfetto.dev or chrome://tracing)")


# ----------------------------------------------------------------------------- parser


def _common(p: argparse.ArgumentParser, listing: bool = False) -> None:
    p.add_argument("--base-url", default=None, help="the server (default: $BIOS_BASE_URL, "
                   "else http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="default: $BIOS_API_KEY")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP call")
    if listing:
        p.add_argument("-f", "--format", choices=("table", "json"), default="table",
                       help="a table (default) or JSON for scripts")


def _wrap(fn: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from bios.service_client import DEFAULT_BASE_URL

        base = args.base_url or os.environ.get("BIOS_BASE_URL") or DEFAULT_BASE_URL
        try:
            with _reported(base):
                fn(args)
        except CLIError as e:
            print(f"bios: {e}", file=sys.stderr)
            return e.code
        except KeyboardInterrupt:
            print("bios: interrupted", file=sys.stderr)
            return 130
        return 0

    return run


def add_console_commands(sub: Any) -> None:
    """Register `runs`, `checkpoints` and `trace` on the `bios` command's subparsers."""
    runs = sub.add_parser("runs", help="your training runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    p = runs_sub.add_parser("list", help="list your training runs")
    p.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    _common(p, listing=True)
    p.set_defaults(func=_wrap(runs_list))
    p = runs_sub.add_parser("info", help="one run: metrics, last loss, checkpoints")
    p.add_argument("run", help="the run id (<session>:train:<n>)")
    _common(p, listing=True)
    p.set_defaults(func=_wrap(runs_info))

    cks = sub.add_parser("checkpoints", help="your checkpoints")
    cks_sub = cks.add_subparsers(dest="checkpoints_command", required=True)
    p = cks_sub.add_parser("list", help="the checkpoints of one run (or of all your runs)")
    p.add_argument("run", nargs="?", default=None)
    _common(p, listing=True)
    p.set_defaults(func=_wrap(checkpoints_list))
    p = cks_sub.add_parser("info", help="what a checkpoint was trained as")
    p.add_argument("path", help="bios://<run>/weights/<name> or .../sampler_weights/<name>")
    _common(p, listing=True)
    p.set_defaults(func=_wrap(checkpoints_info))
    for name, what in (("publish", "let other tenants load and sample it"),
                       ("unpublish", "make it private again")):
        p = cks_sub.add_parser(name, help=what)
        p.add_argument("path")
        _common(p)
        p.set_defaults(func=_wrap(checkpoints_publish), command_name=name)
    p = cks_sub.add_parser("delete", help="delete a checkpoint")
    p.add_argument("path")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")
    _common(p)
    p.set_defaults(func=_wrap(checkpoints_delete))
    p = cks_sub.add_parser("download", help="download and extract a checkpoint safely")
    p.add_argument("path")
    p.add_argument("-o", "--output", default=None,
                   help="a new directory (default: <run>-<type>-<name> here)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=_wrap(checkpoints_download))
    p = cks_sub.add_parser("export", help="a PEFT adapter dir, or base + adapter merged as a "
                           "transformers model dir")
    p.add_argument("path")
    p.add_argument("--format", dest="export_format", choices=("peft", "merged"),
                   default="peft")
    p.add_argument("-o", "--output", required=True, help="a new directory")
    p.add_argument("--base", default=None,
                   help="merged: the base model as a local Hugging Face directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=_wrap(checkpoints_export))

    p = sub.add_parser("trace", help="a run's requests and cycles as a Chrome/Perfetto trace")
    p.add_argument("run")
    p.add_argument("-o", "--output", default="trace.json")
    _common(p)
    p.set_defaults(func=_wrap(trace))
