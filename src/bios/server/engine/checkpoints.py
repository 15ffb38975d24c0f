"""A run's adapter (and optimizer) state on disk, written atomically, read back with checks.

Two kinds of checkpoint directory:
  * "training" (resumable): adapter_model.safetensors (PEFT tensor names) + adapter_config.json
    + optimizer.safetensors (AdamW moments, see optimizer.AdamW.state_tensors) + bios_state.json
    (format version, base model, adapter spec, optimizer step).
  * "sampler" (export): exactly PEFT's format, adapter_model.safetensors + adapter_config.json,
    so `PeftModel.from_pretrained(base, directory)` loads it.

A directory is written under a temporary name in the same parent, fsynced, then renamed into
place, so a crash never leaves a half-written checkpoint under the final name. This module
deals in plain tensors and specs; it knows nothing about the engine, runs or the scheduler.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bios.server.engine.lora import ATTN_TARGETS, MLP_TARGETS
from bios.server.plan import AdapterSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.safetensors"
BIOS_STATE = "bios_state.json"
FORMAT = "bios-lora-checkpoint"
FORMAT_VERSION = 1

CheckpointKind = Literal["training", "sampler"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not fit the run (a user error)."""


@dataclass(frozen=True)
class Checkpoint:
    """What `read_checkpoint` returns. `spec` has the saved seed for training checkpoints;
    for sampler checkpoints (PEFT config only) it is rebuilt with seed 0."""

    directory: Path
    kind: CheckpointKind
    base_model: str
    spec: AdapterSpec
    target_modules: list[str]
    adapter_state: dict[str, Tensor]  # PEFT names -> lora_A [r, in] / lora_B [out, r]
    optimizer_state: dict[str, Tensor] | None  # AdamW.state_tensors(), training only
    optimizer_step: int


# ----------------------------------------------------------------------------- writing


def write_sampler_weights(
    directory: str | Path,
    *,
    adapter_state: Mapping[str, Tensor],
    adapter_config: dict[str, Any],
) -> Path:
    """Write a PEFT adapter directory atomically; returns its path.

    `adapter_config` is PEFT's adapter_config.json (`Adapter.peft_config(base_model)`).
    """
    return _write_directory(
        Path(directory),
        {
            ADAPTER_WEIGHTS: _safetensors_writer(adapter_state),
            ADAPTER_CONFIG: _json_writer(adapter_config),
        },
    )


def write_training_state(
    directory: str | Path,
    *,
    spec: AdapterSpec,
    adapter_state: Mapping[str, Tensor],
    adapter_config: dict[str, Any],
    optimizer_state: Mapping[str, Tensor],
    optimizer_step: int,
) -> Path:
    """Write a resumable checkpoint (adapter + optimizer + bios_state.json) atomically.

    The base model recorded is `adapter_config["base_model_name_or_path"]`.
    """
    state = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": "training",
        "base_model": adapter_config["base_model_name_or_path"],
        "spec": asdict(spec),
        "optimizer_step": optimizer_step,
    }
    return _write_directory(
        Path(directory),
        {
            ADAPTER_WEIGHTS: _safetensors_writer(adapter_state),
            ADAPTER_CONFIG: _json_writer(adapter_config),
            OPTIMIZER_STATE: _safetensors_writer(optimizer_state),
            BIOS_STATE: _json_writer(state),
        },
    )


def _safetensors_writer(tensors: Mapping[str, Tensor]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        # CPU and contiguous, as safetensors needs; step counters etc. keep their dtype.
        plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(plain, str(path), metadata={"format": "pt"})

    return write


def _json_writer(data: dict[str, Any]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    return write


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_directory(final: Path, files: Mapping[str, Callable[[Path], None]]) -> Path:
    """Write `files` into a temp dir beside `final`, fsync, and rename it to `final`.

    An existing `final` is first renamed aside and deleted after the swap, so the final name
    always holds either the old or the new complete checkpoint (or, for an instant after a
    crash between the two renames, nothing; the old copy then lies beside it as .old-*).
    """
    final = final.absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)
        for name, write in files.items():
            write(tmp / name)
            _fsync(tmp / name)
        _fsync(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- reading


def read_checkpoint(
    directory: str | Path, *, base_model: str | None = None, with_optimizer: bool = False
) -> Checkpoint:
    """Read a training or sampler checkpoint; raises CheckpointError with the reason.

    `base_model`, when given, must equal the model the checkpoint was trained on.
    `with_optimizer=True` requires a training checkpoint and reads its AdamW state.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    config = _read_json(directory / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{directory}: not a LoRA adapter (peft_type {config.get('peft_type')!r})"
        )
    saved_base = str(config.get("base_model_name_or_path"))
    state_path = directory / BIOS_STATE
    kind: CheckpointKind = "training" if state_path.exists() else "sampler"
    step = 0
    if kind == "training":
        state = _read_json(state_path)
        if state.get("format") != FORMAT or state.get("version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{directory}: unsupported checkpoint format {state.get('format')!r} "
                f"version {state.get('version')!r} (expected {FORMAT!r} v{FORMAT_VERSION})"
            )
        try:
            spec = AdapterSpec(**state["spec"])
        except TypeError as exc:
            raise CheckpointError(f"{directory}: bad adapter spec in {BIOS_STATE}: {exc}") from exc
        saved_base, step = str(state["base_model"]), int(state["optimizer_step"])
    else:
        spec = _spec_from_peft_config(config)
    if base_model is not None and saved_base != base_model:
        raise CheckpointError(
            f"checkpoint {directory} was trained on base model {saved_base!r}, not {base_model!r}"
        )
    if with_optimizer and kind != "training":
        raise CheckpointError(
            f"{directory} is a sampler (weights-only) checkpoint; it has no optimizer state"
        )
    optimizer = _read_safetensors(directory / OPTIMIZER_STATE) if with_optimizer else None
    return Checkpoint(
        directory=directory,
        kind=kind,
        base_model=saved_base,
        spec=spec,
        target_modules=list(config.get("target_modules") or []),
        adapter_state=_read_safetensors(directory / ADAPTER_WEIGHTS),
        optimizer_state=optimizer,
        optimizer_step=step,
    )


def check_adapter_state(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> None:
    """Raise CheckpointError unless `got` has exactly `expected`'s tensor names and shapes."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"adapter weights do not fit this run: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "rank and train_attn/train_mlp/train_unembed must match"
        )
    for name, tensor in expected.items():
        if tuple(got[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"adapter weight {name} has shape {tuple(got[name].shape)}, this run "
                f"expects {tuple(tensor.shape)} (different rank?)"
            )


def _spec_from_peft_config(config: Mapping[str, Any]) -> AdapterSpec:
    targets = set(config.get("target_modules") or [])
    try:
        return AdapterSpec(
            rank=int(config["r"]),
            seed=0,
            alpha=float(config["lora_alpha"]),
            train_attn=bool(targets & set(ATTN_TARGETS)),
            train_mlp=bool(targets & set(MLP_TARGETS)),
            train_unembed="lm_head" in targets,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"bad {ADAPTER_CONFIG}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} is missing") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
