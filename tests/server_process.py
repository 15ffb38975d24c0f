"""Start a real `bios serve` process on loopback for end-to-end tests (sharing one model cache,
so the tiny model is built once)."""

from __future__ import annotations

import os
from pathlib import Path

from bios.local_server import LocalServer, free_port

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("BIOS_TEST_MODEL_CACHE", REPO / ".bios" / "test-model-cache"))

__all__ = ["MODEL_CACHE", "REPO", "ServerProcess", "free_port"]


class ServerProcess(LocalServer):
    """A `LocalServer` whose models come from the tests' shared cache."""

    def __init__(self, data_dir: Path, models: list[str], **kwargs):
        kwargs.setdefault("model_cache", MODEL_CACHE)
        super().__init__(data_dir, models, **kwargs)
