"""The `bios` command: `bios serve` runs a server, `bios demo` runs the end-to-end demo.

Server code is imported only inside the commands that need it, so `bios --help` works with
the SDK alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import uvicorn

    from bios.server.app import create_app
    from bios.server.config import ServerConfig

    config = ServerConfig(
        data_dir=Path(args.data_dir), host=args.host, port=args.port,
        models=args.models or ServerConfig().models, clock_period=args.clock_period,
        database_url=args.database_url, device=args.device, token_budget=args.token_budget,
        model_cache=Path(args.model_cache_dir) if args.model_cache_dir else None,
    )
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from bios.demo import run_demo

    return run_demo(steps=args.steps, data_dir=Path(args.data_dir), port=args.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bios", description="Bios: multi-LoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a Bios server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default=".bios",
                       help="database, checkpoints and model cache (default: ./.bios)")
    serve.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                       help="registry names, local HF directories or alias=source entries "
                            "(default: HuggingFaceTB/SmolLM2-135M-Instruct)")
    serve.add_argument("--clock-period", type=float, default=0.0, metavar="SECONDS",
                       help="seconds between clock cycles; 0 = continuous (default)")
    serve.add_argument("--database-url", default=None,
                       help="SQLAlchemy URL (default: SQLite in the data dir); "
                            "postgresql+psycopg://... works too")
    serve.add_argument("--model-cache-dir", default=os.environ.get("BIOS_MODEL_CACHE"),
                       help="where converted/built models are cached (default: DATA_DIR/models)")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    serve.add_argument("--token-budget", type=int, default=None,
                       help="tokens per batched forward/backward pass")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="fine-tune SmolLM2 on a small dataset, end to end")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--data-dir", default=".bios-demo")
    demo.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
