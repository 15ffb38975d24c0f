"""What every benchmark shares: an offline environment, the tests' `ServerProcess` on the import
path, and the machine facts each result is stored with (its numbers depend on them)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # server_process.ServerProcess, MODEL_CACHE


def load() -> list[float]:
    """The 1/5/15-minute load averages (the machines are shared: record them)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """nproc, CPU model, Python version and load average."""
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model or platform.processor(),
            "python": platform.python_version(), "loadavg": load()}
