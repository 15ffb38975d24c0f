"""Run `bios serve` as a child process on loopback: for the demo, tests and benchmarks.

SDK-side (no torch, no server imports): the child imports the server; this module only starts
it, waits until `/api/v1/healthz` answers, and stops it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """A `bios serve` subprocess; its output goes to data_dir/server.log."""

    def __init__(self, data_dir: Path, models: list[str], clock_period: float = 0.0,
                 extra_args: list[str] | None = None, port: int | None = None,
                 env: dict[str, str] | None = None, model_cache: Path | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cache = ["--model-cache-dir", str(model_cache)] if model_cache else []
        self.args = [sys.executable, "-m", "bios.cli", "serve", "--port", str(self.port),
                     "--data-dir", str(self.data_dir), "--clock-period", str(clock_period),
                     *cache, "--models", *models, *(extra_args or [])]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self, timeout: float = 180.0) -> LocalServer:
        """Start the server and wait until it is healthy (models loaded)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bios serve exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text()[-4000:])
            try:
                if httpx.get(f"{self.base_url}/api/v1/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("bios serve did not become healthy:\n" + self.log_path.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
