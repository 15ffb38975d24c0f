"""Start a real `bios serve` process on loopback for end-to-end tests (sharing one model cache,
so the tiny model is built once)."""

from __future__ import annotations

import os
from pathlib import Path

from bios.local_server import LocalServer, free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("BIOS_TEST_MODEL_CACHE", REPO / ".bios" / "test-model-cache"))

__all__ = ["KEY_A", "KEY_B", "MODEL_CACHE", "REPO", "ServerProcess", "free_port",
           "keyed_server_process"]

# The two tenants of the shared keyed test server: alice (from a keys file), bob (from the env).
KEY_A = "bios_alice-test-key"
KEY_B = "bios_bob-test-key"


class ServerProcess(LocalServer):
    """A `LocalServer` whose models come from the tests' shared cache."""

    def __init__(self, data_dir: Path, models: list[str], **kwargs):
        kwargs.setdefault("model_cache", MODEL_CACHE)
        super().__init__(data_dir, models, **kwargs)


def keyed_server_process(data_dir: Path, models: list[str]) -> ServerProcess:
    """A server (not started) with two API keys: alice's in a keys file, bob's in the env."""
    from bios.server.auth import hash_key

    keys_file = data_dir / "keys"
    data_dir.mkdir(parents=True, exist_ok=True)
    keys_file.write_text(f"alice:{hash_key(KEY_A)}\n")
    return ServerProcess(data_dir / "data", models,
                         extra_args=["--api-keys-file", str(keys_file)],
                         env={"BIOS_API_KEYS": f"bob:{hash_key(KEY_B)}"})
