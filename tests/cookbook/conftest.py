from __future__ import annotations

from collections.abc import Iterator

import pytest

from server_process import ServerProcess

TINY = "bios/tiny-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One continuous-mode `bios serve` on the tiny model for a whole test module."""
    proc = ServerProcess(tmp_path_factory.mktemp("cookbook-server"), [TINY]).start()
    yield proc
    proc.stop()
