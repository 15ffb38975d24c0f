"""Import boundaries, checked in a fresh interpreter: the SDK stays light."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN_FOR_SDK = ("torch", "fastapi", "sqlalchemy", "bios.server", "transformers",
                     "tokenizers", "uvicorn")


def modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_bios_leaves_out_torch_fastapi_sqlalchemy_and_the_server() -> None:
    loaded = modules_after("import bios\nfrom bios import types\nfrom bios.exceptions import "
                           "BiosAPIError\nbios.ServiceClient().create_rest_client()")
    leaked = sorted(m for m in loaded for bad in FORBIDDEN_FOR_SDK
                    if m == bad or m.startswith(bad + "."))
    assert leaked == []


def test_every_sdk_module_imports_without_the_server_stack() -> None:
    sdk_modules = ["bios._loop", "bios.exceptions", "bios.futures", "bios.transport",
                   "bios.service_client", "bios.training_client", "bios.sampling_client",
                   "bios.rest_client", "bios.tokenizer", "bios.types",
                   "bios.checkpoint_archive"]
    loaded = modules_after("\n".join(f"import {m}" for m in sdk_modules))
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "fastapi", "sqlalchemy")}
    assert not {m for m in loaded if m.startswith("bios.server")}
