"""A run idle past --unload-idle-seconds leaves engine memory and comes back on its next
request, with exactly the weights and optimizer state it left with."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from test_crash_recovery import TINY, probe, step

import bios
from server_process import ServerProcess


def train(data_dir: Path, unload_after: str) -> tuple[np.ndarray, str]:
    """5 steps of one run; with unloading on, the run goes idle (and is unloaded) after 3.
    Returns the run's logprobs on a probe batch, and the server log."""
    server = ServerProcess(data_dir, [TINY],
                           extra_args=["--unload-idle-seconds", unload_after]).start()
    try:
        client = bios.ServiceClient(base_url=server.base_url).create_lora_training_client(
            base_model=TINY, rank=8, seed=5)
        for i in range(3):
            step(client, i)
        if unload_after != "0":
            deadline = time.monotonic() + 60
            while f"idle runs of {TINY}" not in server.log():
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.2)
        for i in range(3, 5):  # an unloaded run is rebuilt from its snapshot first
            step(client, i)
        return probe(client), server.log()
    finally:
        server.stop()


def test_idle_run_is_unloaded_and_reloaded_with_exact_state(tmp_path: Path) -> None:
    got, log = train(tmp_path / "unloading", unload_after="1")
    assert "unloaded 1 idle runs" in log and "reloaded run " in log
    assert "snapshot@seq 6" in log  # the snapshot taken at unloading: after step 3's optim
    want, log = train(tmp_path / "resident", unload_after="0")
    assert "unloaded" not in log
    np.testing.assert_array_equal(got, want)  # the same weights, to the last bit
