"""Tinker's official SDK (0.25, 0.33, 0.38) drives a real `bios serve`, unmodified.

Each version runs tests/tinker_sdk/sdk_driver.py in its own virtual environment (built once into
.bios/tinker-venvs/, see sdk_venvs.py) against one keyed server on loopback serving the tiny
model. The user's code changes only the base URL and the `tml-` API key.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sdk_venvs import SDK_VERSIONS, SDKUnavailable, venv_python
from tinker_server import TINY, TML_KEY

from server_process import ServerProcess

DRIVER = Path(__file__).with_name("sdk_driver.py")


def run_driver(version: str, base_url: str) -> list[dict]:
    try:
        python = venv_python(version)
    except SDKUnavailable as e:
        pytest.skip(str(e))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BIOS_", "TINKER_"))}
    env.update(TINKER_BASE_URL=base_url, TINKER_API_KEY=TML_KEY, TINKER_TELEMETRY="0",
               BIOS_BASE_MODEL=TINY, HF_HUB_OFFLINE="1", PYTHONPATH="")
    try:
        proc = subprocess.run([str(python), str(DRIVER)], env=env, capture_output=True,
                              text=True, timeout=300)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # report the steps that ran, and where it hung
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        err = "the driver timed out after 300 s\n" + err
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert lines and "close" in {s["step"] for s in lines}, (
        f"the driver stopped early; steps: {[s['step'] for s in lines]}\n{err[-4000:]}")
    return lines


@pytest.mark.parametrize("version", SDK_VERSIONS)
def test_official_sdk_drives_bios(version: str, tinker_server: ServerProcess) -> None:
    steps = run_driver(version, tinker_server.base_url)
    failed = [s for s in steps if not s["ok"]]
    assert not failed, "\n\n".join(f"{s['step']}: {s['error']}\n{s['trace']}" for s in failed)
    by_name = {s["step"]: s for s in steps}
    assert by_name["train"]["losses"][-1] < by_name["train"]["losses"][0]
    if version >= "0.26":  # every sampled sequence carries the id the server gave it
        ids = by_name["save_weights_and_get_sampling_client"]["sequence_ids"]
        assert len(set(ids)) == 2 and all(ids), ids
    if version >= "0.38":  # created by one load_weights, under the id the SDK computed
        model_id = by_name["create_training_client_from_state_with_optimizer"]["model_id"]
        assert ":train:" in model_id, model_id
        assert "inflight_sampling_client" in by_name
    assert by_name["save_state"]["path"].startswith("tinker://")
