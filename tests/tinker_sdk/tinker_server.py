"""The server the Tinker SDK tests drive: the tiny model, and a `tml-` key in its keys file."""

from __future__ import annotations

from pathlib import Path

from bios.server.auth import hash_key
from server_process import ServerProcess

TINY = "bios/tiny-llama"
TML_KEY = "tml-bios-compat-test-key"  # a Tinker-style key (tenant `tinker-user`)


def tinker_server_process(root: Path) -> ServerProcess:
    """A server (not started) whose keys file holds TML_KEY."""
    root.mkdir(parents=True, exist_ok=True)
    keys = root / "keys"
    keys.write_text(f"tinker-user:{hash_key(TML_KEY)}\n")
    return ServerProcess(root / "data", [TINY], extra_args=["--api-keys-file", str(keys)])
