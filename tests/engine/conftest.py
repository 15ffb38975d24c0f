"""Shared engine fixtures: a per-session model cache with the tiny test model built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bios.server.engine.model import ModelConfig, Transformer, load_transformer
from bios.server.engine.registry import TINY_LLAMA, ModelRegistry


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def registry(model_cache: Path) -> ModelRegistry:
    return ModelRegistry(model_cache)


@pytest.fixture(scope="session")
def tiny_model_dir(registry: ModelRegistry) -> Path:
    """bios/tiny-llama as an HF directory (config.json, model.safetensors, tokenizer)."""
    return registry.materialize(TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_fp32(tiny_model_dir: Path) -> tuple[Transformer, ModelConfig]:
    """The tiny model with an fp32 base, for exact comparisons. Shared: do not modify."""
    return load_transformer(tiny_model_dir, base_dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_bf16(tiny_model_dir: Path) -> tuple[Transformer, ModelConfig]:
    """The tiny model as the engine runs it: bf16 frozen base. Shared: do not modify."""
    return load_transformer(tiny_model_dir)
