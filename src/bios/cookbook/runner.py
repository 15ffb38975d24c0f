"""Running recipes by name, and the `bios cookbook` command."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from bios.cookbook.recipe import RecipeConfig, RecipeResult

# name -> (module, what it teaches)
RECIPES: dict[str, tuple[str, str]] = {
    "sl": ("bios.cookbook.sl", "supervised fine-tuning on chat data; loss on the assistant's "
                               "tokens only; held-out eval loss"),
    "rl": ("bios.cookbook.rl", "RL with a verifiable reward (arithmetic): grouped sampling, "
                               "group-normalised advantages, importance_sampling / ppo"),
    "dpo": ("bios.cookbook.dpo", "preference learning from chosen/rejected pairs against a "
                                 "frozen reference, via forward_backward_custom"),
    "distill": ("bios.cookbook.distill", "on-policy distillation: the student samples, a "
                                         "teacher scores, per-token reverse KL as advantage"),
    "eval": ("bios.cookbook.evaluation", "sample a held-out set and score it with code "
                                         "(zero-shot vs few-shot prompting)"),
}
STYLES = ("sync", "async")


def run_recipe(name: str, style: str = "sync", config: RecipeConfig | None = None
               ) -> RecipeResult:
    """Run recipe `name` in `style` ("sync" or "async") and return its result.

    Raises:
        ValueError: an unknown recipe or style.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)}")
    if style not in STYLES:
        raise ValueError(f"style must be 'sync' or 'async', got {style!r}")
    module = importlib.import_module(RECIPES[name][0])
    cfg = config or RecipeConfig()
    if style == "sync":
        return module.run_sync(cfg)
    return asyncio.run(module.run_async(cfg))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `cookbook list` and `cookbook run` to the `bios` command's subparsers."""
    cookbook = sub.add_parser("cookbook", help="post-training recipes (sl, rl, dpo, distill, "
                                               "eval), sync and async")
    commands = cookbook.add_subparsers(dest="cookbook_command", required=True)
    commands.add_parser("list", help="print the recipes").set_defaults(func=_list)
    run = commands.add_parser("run", help="run a recipe against $BIOS_BASE_URL (or --local)")
    run.add_argument("recipe", choices=list(RECIPES))
    run.add_argument("--style", choices=STYLES, default="sync")
    run.add_argument("--base-model", default=RecipeConfig.base_model)
    run.add_argument("--steps", type=int, default=None, help="training steps (default: the "
                                                             "recipe's own)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--log-dir", default=None, help="write metrics.jsonl and a plot here")
    run.add_argument("--rank", type=int, default=RecipeConfig.rank)
    run.add_argument("--learning-rate", type=float, default=None)
    run.add_argument("--loss", choices=("importance_sampling", "ppo"),
                     default="importance_sampling", help="rl only")
    run.add_argument("--max-off-policy", type=int, choices=(0, 1), default=1,
                     help="async rl/distill: how stale samples may be, in optimizer steps")
    run.add_argument("--local", action="store_true",
                     help="start a local `bios serve` on --base-model (like `bios demo`)")
    run.add_argument("--data-dir", default=".bios-cookbook", help="the --local server's data")
    run.set_defaults(func=_run)


def _list(args: argparse.Namespace) -> int:
    for name, (_, teaches) in RECIPES.items():
        print(f"{name:8s} {teaches}")
    return 0


def _run(args: argparse.Namespace) -> int:
    cfg = RecipeConfig(base_model=args.base_model, steps=args.steps, seed=args.seed,
                       log_dir=Path(args.log_dir) if args.log_dir else None, rank=args.rank,
                       learning_rate=args.learning_rate, loss=args.loss,
                       max_off_policy=args.max_off_policy)
    server = None
    if args.local:
        from bios.local_server import LocalServer

        server = LocalServer(Path(args.data_dir), [args.base_model])
        # The server runs in its own session: a SIGTERM must unwind to `finally` to stop it.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        print(f"Starting bios serve on {server.base_url} (log: {server.log_path}) ...",
              flush=True)
        server.start(timeout=600)
        cfg = replace(cfg, base_url=server.base_url)
    else:
        print(f"Using the server at {os.environ.get('BIOS_BASE_URL', 'http://127.0.0.1:8000')}",
              flush=True)
    try:
        result = run_recipe(args.recipe, args.style, cfg)
    except ValueError as e:
        print(f"bios cookbook: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    print(f"wall time {result.wall_s:.1f}s" + (f"  metrics: {cfg.log_dir}/metrics.jsonl"
                                                if cfg.log_dir else "")
          + (f"  plot: {result.plot}" if result.plot else ""), flush=True)
    print(result.summary, flush=True)
    return 0
