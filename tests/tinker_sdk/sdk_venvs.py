"""Per-version virtual environments holding Tinker's official SDK, for the compatibility tests.

Each version gets `.bios/tinker-venvs/<version>/` (gitignored), built once with the package
index pip is configured for and reused while its stamp file exists. No torch is installed in
them: the SDK needs only its own dependencies (transformers among them). Its
`forward_backward_custom` does need torch, so a `.pth` file appends the test runner's own
site-packages (where the server's torch is) to the end of the venv's path: the venv's packages
still win, torch comes from the one already installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_ROOT = Path(os.environ.get("BIOS_TINKER_VENVS", REPO / ".bios" / "tinker-venvs"))
# The oldest version every open peer server pins, one in between, and the newest the index serves.
SDK_VERSIONS = ("0.25.0", "0.33.0", "0.38.0")
STAMP = ".bios-complete"


class SDKUnavailable(Exception):
    """The package index could not serve this SDK version (the reason is the message)."""


def venv_python(version: str) -> Path:
    """The interpreter of a version's virtual environment, building it first if needed."""
    root = VENV_ROOT / version
    python = root / "bin" / "python"
    if (root / STAMP).exists() and python.exists():
        _share_torch(root)
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        raise SDKUnavailable(f"cannot create a virtual environment: {made.stderr.strip()[-800:]}")
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", f"tinker=={version}"],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise SDKUnavailable(f"pip could not install tinker=={version}: "
                             f"{(pip.stderr or pip.stdout).strip()[-800:]}")
    _share_torch(root)
    (root / STAMP).write_text(f"tinker=={version}\n")
    return python


def _share_torch(root: Path) -> None:
    try:
        import torch
    except ImportError:
        return  # then forward_backward_custom is not available in the venv either
    where = Path(torch.__file__).resolve().parents[1]
    for site in (root / "lib").glob("python*/site-packages"):
        (site / "bios-shared-torch.pth").write_text(f"{where}\n")


if __name__ == "__main__":  # build them ahead of a test run: python tests/tinker_sdk/sdk_venvs.py
    for v in sys.argv[1:] or SDK_VERSIONS:
        print(v, venv_python(v))
