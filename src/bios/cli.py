"""The `bios` command: `bios serve` runs a server, `bios demo` runs the end-to-end demo;
`bios runs`, `bios checkpoints` and `bios trace` query a server (src/bios/console_cli.py).

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

    from bios.server.auth import ENV_KEYS, KeyConfigError, bind_refusal, load_keys

    try:
        api_keys = load_keys(args.api_keys_file, os.environ.get(ENV_KEYS))
    except KeyConfigError as e:
        print(f"bios serve: {e}", file=sys.stderr)
        return 2
    refusal = bind_refusal(args.host, bool(api_keys))
    if refusal:
        print(f"bios serve: {refusal}", file=sys.stderr)
        return 2

    import uvicorn

    from bios.server.app import create_app
    from bios.server.config import ServerConfig
    from bios.server.integrity import DataDirError, check_data_dir

    config = ServerConfig(
        data_dir=Path(args.data_dir), host=args.host, port=args.port,
        models=args.models or ServerConfig().models, clock_period=args.clock_period,
        database_url=args.database_url, device=args.device, token_budget=args.token_budget,
        model_cache=Path(args.model_cache_dir) if args.model_cache_dir else None,
        api_keys=api_keys, **{k: v for k, v in (
            ("max_queued_per_run", args.max_queued_per_run),
            ("max_queued_per_tenant", args.max_queued_per_tenant),
            ("max_queued_total", args.max_queued_total),
            ("snapshot_steps", args.snapshot_steps),
            ("snapshot_seconds", args.snapshot_seconds),
            ("unload_idle_s", args.unload_idle_seconds),
            ("cycle_tokens", args.cycle_tokens),
            ("cycle_seconds", args.cycle_seconds),
            ("max_tokens_per_request", args.max_tokens_per_request),
            ("max_queued_tokens_per_tenant", args.max_queued_tokens_per_tenant),
            ("max_resident_runs", args.max_resident_runs),
            ("max_resident_runs_per_tenant", args.max_resident_runs_per_tenant),
            ("max_resident_bytes", args.max_resident_bytes),
            ("max_resident_bytes_per_tenant", args.max_resident_bytes_per_tenant),
            ("max_stored_bytes_per_tenant", args.max_stored_bytes_per_tenant),
            ("max_metadata_bytes", args.max_metadata_bytes),
            ("max_body_bytes", args.max_body_bytes),
            ("max_body_bytes_in_flight", args.max_body_bytes_in_flight))
            if v is not None},
        allow_empty_database=args.allow_empty_database,
    )
    try:  # before models load, so a damaged data dir fails in a second, with the reason
        config.data_dir.mkdir(parents=True, exist_ok=True)
        check_data_dir(config)
    except DataDirError as e:
        print(f"bios serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tenants = sorted({t for t, _ in api_keys})
    logging.getLogger("bios.server").info(
        "auth: %s", f"API keys for tenants {', '.join(tenants)}" if tenants
        else "local mode (no API keys; loopback only)")
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="warning",
                http=_http_protocol())
    return 0


def _http_protocol() -> object:
    """uvicorn's protocol with request heads bounded (http_protocol.py); h11 with its own
    head bound where httptools is missing."""
    try:
        from bios.server.http_protocol import BoundedHttpProtocol
    except ImportError:
        return "h11"
    return BoundedHttpProtocol


def _keys_add(args: argparse.Namespace) -> int:
    from bios.server.auth import KeyConfigError, add_key

    try:
        key = add_key(args.file, args.name)
    except KeyConfigError as e:
        print(f"bios keys add: {e}", file=sys.stderr)
        return 2
    print(key)
    print(f"added a key for tenant {args.name!r} to {args.file} (only its sha256 is stored; "
          "this is the one time the key is shown: give it to the tenant as BIOS_API_KEY)",
          file=sys.stderr)
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
    serve.add_argument("--unload-idle-seconds", type=float, default=None, metavar="SECONDS",
                       help="release the engine memory of runs idle this long (after a "
                            "snapshot; their next request reloads them); 0 = never "
                            "(default 900)")
    serve.add_argument("--database-url", default=None,
                       help="SQLAlchemy URL (default: SQLite in the data dir); "
                            "postgresql+psycopg://... works too")
    serve.add_argument("--model-cache-dir", default=os.environ.get("BIOS_MODEL_CACHE"),
                       help="where converted/built models are cached (default: DATA_DIR/models)")
    serve.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    serve.add_argument("--token-budget", type=int, default=None,
                       help="tokens per batched forward/backward pass")
    serve.add_argument("--api-keys-file", default=os.environ.get("BIOS_API_KEYS_FILE"),
                       metavar="PATH",
                       help="file of 'tenant:sha256hex' lines (see `bios keys add`); with keys, "
                            "every request needs one and each tenant sees only its own runs. "
                            "$BIOS_API_KEYS (comma-separated entries) adds more. Required to "
                            "bind a non-loopback --host")
    serve.add_argument("--max-queued-per-run", type=int, default=None, metavar="N",
                       help="backpressure: queued requests per run before a 429")
    serve.add_argument("--max-queued-per-tenant", type=int, default=None, metavar="N",
                       help="backpressure: queued requests per tenant before a 429")
    serve.add_argument("--max-queued-total", type=int, default=None, metavar="N",
                       help="backpressure: queued requests on the server before a 429")
    serve.add_argument("--cycle-tokens", type=int, default=None, metavar="N",
                       help="fairness: forward/backward tokens per clock cycle, shared fairly "
                            "between tenants and their runs; the rest waits for the next "
                            "cycle, and a bigger request is split across cycles (default: 4 x "
                            "--token-budget; 0 = no bound, all queued work in one cycle)")
    serve.add_argument("--cycle-seconds", type=float, default=None, metavar="SECONDS",
                       help="fairness: also bound a cycle to about this much engine time, "
                            "at the measured throughput (default 0.5; 0 = tokens only)")
    serve.add_argument("--max-tokens-per-request", type=int, default=None, metavar="N",
                       help="tokens in one forward/forward_backward request before a 413 "
                            "(default 262144)")
    serve.add_argument("--max-queued-tokens-per-tenant", type=int, default=None, metavar="N",
                       help="backpressure: forward/backward tokens one tenant may have queued "
                            "or running before a 429 (default 4194304)")
    serve.add_argument("--max-resident-runs", type=int, default=None, metavar="N",
                       help="runs kept in engine memory per base model; past it the least "
                            "recently used idle runs are unloaded and reload on demand "
                            "(default 64; 0 = unbounded)")
    serve.add_argument("--max-resident-runs-per-tenant", type=int, default=None, metavar="N",
                       help="the same bound per tenant; a tenant with this many runs holding "
                            "unapplied gradients gets a 429 creating another (default 32; "
                            "0 = unbounded)")
    serve.add_argument("--max-resident-bytes", type=int, default=None, metavar="BYTES",
                       help="bytes of runs' adapter weights plus AdamW state (fp32) kept in "
                            "engine memory per base model; past it the least recently used "
                            "idle runs are unloaded and reload on demand (default: half the "
                            "host's memory; 0 = unbounded)")
    serve.add_argument("--max-resident-bytes-per-tenant", type=int, default=None,
                       metavar="BYTES", help="the same bound per tenant (default 0 = unbounded)")
    serve.add_argument("--max-stored-bytes-per-tenant", type=int, default=None, metavar="BYTES",
                       help="checkpoint bytes plus user_metadata one tenant may store; a save "
                            "past it gets a 413 (default 0 = unbounded)")
    serve.add_argument("--max-metadata-bytes", type=int, default=None, metavar="BYTES",
                       help="user_metadata of one session or run, as JSON, before a 413 "
                            "(default 65536)")
    serve.add_argument("--snapshot-steps", type=int, default=None, metavar="N",
                       help="crash recovery: snapshot a run's state every N optim steps "
                            "(default 50); a restart replays the requests since its snapshot")
    serve.add_argument("--snapshot-seconds", type=float, default=None, metavar="SECONDS",
                       help="crash recovery: also snapshot a run whose unsaved changes are "
                            "this old (default 120)")
    serve.add_argument("--max-body-bytes", type=int, default=None, metavar="BYTES",
                       help="largest request body accepted, else 413 (default 64 MiB)")
    serve.add_argument("--max-body-bytes-in-flight", type=int, default=None, metavar="BYTES",
                       help="request body bytes read and parsed at once, all requests "
                            "together; larger bodies wait their turn (default: the body limit)")
    serve.add_argument("--allow-empty-database", action="store_true",
                       help="start even if DATA_DIR/bios.db is a zero-length file (refused "
                            "by default: it looks like a truncated or badly restored database)")
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="create a key for a tenant; print it once, store its "
                                          "hash in the keys file")
    add.add_argument("name", help="tenant name (letters, digits, '.', '_', '-')")
    add.add_argument("--file", required=True, help="the keys file (created with mode 0600)")
    add.set_defaults(func=_keys_add)

    demo = sub.add_parser("demo", help="fine-tune SmolLM2 on a small dataset, end to end")
    demo.add_argument("--steps", type=int, default=30)
    demo.add_argument("--data-dir", default=".bios-demo")
    demo.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    demo.set_defaults(func=_demo)

    from bios.console_cli import add_console_commands
    from bios.cookbook.runner import add_parser as add_cookbook_parser

    add_console_commands(sub)  # runs, checkpoints, trace (src/bios/console_cli.py)
    add_cookbook_parser(sub)  # cookbook list|run (src/bios/cookbook/)

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
