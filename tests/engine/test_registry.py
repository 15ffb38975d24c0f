"""Model names, aliases and directories, and the built-in models' builds."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from bios.server.engine.model import KVCache, load_transformer
from bios.server.engine.registry import (
    SMOLLM2,
    TINY_LLAMA,
    ModelRegistry,
    UnknownModelError,
    write_tiny_llama,
)


def test_tiny_build_is_deterministic(registry, tiny_model_dir, tmp_path):
    again = tmp_path / "again"
    again.mkdir()
    write_tiny_llama(again, registry.smollm2_tokenizer_dir())
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    weights = load_file(tiny_model_dir / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (49152, 256)
    assert weights["model.layers.3.self_attn.k_proj.weight"].shape == (128, 256)
    assert "lm_head.weight" not in weights  # tied
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["model_type"] == "llama"


def test_materialize_reuses_the_cache(registry, tiny_model_dir):
    mtime = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert registry.materialize(TINY_LLAMA) == tiny_model_dir
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")]


def test_default_entries_are_the_builtins(model_cache):
    registry = ModelRegistry(model_cache)
    assert registry.names() == [SMOLLM2, TINY_LLAMA]
    assert registry.resolve(TINY_LLAMA).kind == "tiny"
    assert registry.resolve(SMOLLM2).kind == "bundled"
    assert registry.context_length(SMOLLM2) == 8192


def test_aliases_share_one_canonical_model(model_cache, tiny_model_dir):
    entries = [TINY_LLAMA, "tiny=bios/tiny-llama", "small = bios/tiny-llama"]
    registry = ModelRegistry(model_cache, entries)
    assert registry.names() == [TINY_LLAMA, "tiny", "small"]
    assert registry.resolve("tiny") == registry.resolve("small") == registry.resolve(TINY_LLAMA)
    assert registry.aliases_of(TINY_LLAMA) == ["tiny", "small"]
    assert registry.materialize("small") == tiny_model_dir
    assert registry.context_length("tiny") == 2048


def test_unknown_name_lists_the_available_ones(model_cache):
    registry = ModelRegistry(model_cache, ["t=bios/tiny-llama"])
    with pytest.raises(UnknownModelError) as err:
        registry.resolve(SMOLLM2)
    assert isinstance(err.value, KeyError)
    assert str(err.value) == f"unknown base model {SMOLLM2!r}; available: bios/tiny-llama, t"


def test_directory_entries(model_cache, tiny_model_dir, tmp_path):
    registry = ModelRegistry(model_cache, [f"mine={tiny_model_dir}", str(tiny_model_dir)])
    source = registry.resolve("mine")
    assert source.kind == "directory" and source.path == str(tiny_model_dir.resolve())
    assert registry.names() == [source.name, "mine"]
    assert registry.materialize("mine") == tiny_model_dir.resolve()
    assert registry.context_length("mine") == 2048
    files = registry.tokenizer_files("mine")
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    assert len(json.loads(files["tokenizer.json"])["model"]["vocab"]) == 49152

    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        ModelRegistry(model_cache, [str(bad)])
    with pytest.raises(ValueError, match="neither a registry name"):
        ModelRegistry(model_cache, ["x=/no/such/dir"])
    with pytest.raises(ValueError, match="already names"):
        ModelRegistry(model_cache, [f"m={tiny_model_dir}", "m=bios/tiny-llama"])


def test_tokenizer_files_rebuild_the_tokenizer(registry, tmp_path):
    for name, text in registry.tokenizer_files(TINY_LLAMA).items():
        (tmp_path / name).write_text(text)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "The capital of France is Paris. 東京 🙂"
    assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat.startswith("<|im_start|>")


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(registry):
    path = registry.materialize(SMOLLM2)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    theirs = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = theirs.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in tok.decode(expected)

    model, cfg = load_transformer(path, base_dtype=torch.float32)
    cache = KVCache(cfg, 1, max_len=ids.shape[1] + 8, dtype=torch.float32)
    tokens, nxt = [], ids
    with torch.no_grad():
        for _ in range(8):
            nxt = model.unembed(model(nxt, kv_cache=cache)[:, -1:]).argmax(-1)  # (1, 1)
            tokens.append(int(nxt))
    assert tokens == expected.tolist()
