from __future__ import annotations

from collections.abc import Iterator

import pytest
from tinker_server import tinker_server_process

from server_process import ServerProcess


@pytest.fixture(scope="session")
def tinker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the Tinker SDK tests (see tinker_server.py)."""
    proc = tinker_server_process(tmp_path_factory.mktemp("tinker")).start()
    yield proc
    proc.stop()
