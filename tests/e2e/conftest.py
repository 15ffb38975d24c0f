from __future__ import annotations

from collections.abc import Iterator

import pytest

import bios
from server_process import ServerProcess, keyed_server_process

TINY = "bios/tiny-llama"
ALIAS = "ultrasafe/usf-finance"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One continuous-mode server on the tiny model, with the seeds' model name as an alias."""
    proc = ServerProcess(tmp_path_factory.mktemp("server"), [TINY, f"{ALIAS}={TINY}"]).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server with two tenants, alice (KEY_A) and bob (KEY_B) (see server_process.py)."""
    proc = keyed_server_process(tmp_path_factory.mktemp("tenants"), [TINY]).start()
    yield proc
    proc.stop()


@pytest.fixture
def service_client(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> bios.ServiceClient:
    monkeypatch.setenv("BIOS_BASE_URL", server.base_url)
    return bios.ServiceClient()
