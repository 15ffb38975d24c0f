"""A request fired without waiting (the seeds' `save_state` just before `raise`) still reaches
the server: interpreter exit waits, bounded, for submissions in flight."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import asyncio, sys
sys.path.insert(0, {here!r})
from fake_server import FakeBios, make_service

fake = FakeBios()
fake.submit_delay = {{1: 0.5}}  # the save takes a while to be accepted
original = fake._post

async def recording_post(path, body):
    reply = await original(path, body)
    if path == "/save_weights":
        open({marker!r}, "w").write(body["path"])
    return reply

fake._post = recording_post
client = make_service(fake).create_lora_training_client(base_model="base")

async def main():
    try:
        raise ValueError("training blew up")
    except ValueError:
        client.save_state(name="error_step_0")  # no wait, then fail
        raise

asyncio.run(main())
"""


def test_exit_waits_for_requests_still_being_submitted(tmp_path: Path) -> None:
    marker = tmp_path / "saved"
    code = SCRIPT.format(here=str(Path(__file__).parent), marker=str(marker))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "training blew up" in out.stderr
    assert marker.read_text() == "error_step_0"
