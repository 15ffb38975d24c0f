"""get_tokenizer: files from the server, cached on disk, loaded without any hub access."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_server import FakeBios, tiny_tokenizer_files

import bios
from bios.tokenizer import Tokenizer, tokenizer_cache_dir, write_tokenizer_files


@pytest.fixture
def no_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails


def test_cache_dir_follows_bios_cache_dir_and_is_a_safe_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIOS_CACHE_DIR", str(tmp_path))
    d = tokenizer_cache_dir("ultrasafe/usf-finance")
    assert d.parent == tmp_path / "tokenizers"
    assert d.name.startswith("ultrasafe_usf-finance-") and "/" not in d.name
    assert tokenizer_cache_dir("a/b") != tokenizer_cache_dir("a_b")
    monkeypatch.delenv("BIOS_CACHE_DIR")
    assert tokenizer_cache_dir("m").parent == Path.home() / ".cache" / "bios" / "tokenizers"


@pytest.mark.parametrize("name", ["../evil.json", "sub/tokenizer.json", "..", ""])
def test_file_names_from_the_server_cannot_escape_the_cache_dir(tmp_path: Path,
                                                                name: str) -> None:
    with pytest.raises(ValueError, match="refusing"):
        write_tokenizer_files(tmp_path / "t", {name: "x"})


def test_get_tokenizer_without_transformers_uses_the_tokenizers_wrapper(
        fake: FakeBios, training_client: bios.TrainingClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, no_transformers: None) -> None:
    monkeypatch.setenv("BIOS_CACHE_DIR", str(tmp_path))
    tok = training_client.get_tokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.encode("hello world") == [3, 4]
    assert tok.decode([3, 4]) == "hello world"
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert training_client.get_tokenizer() is tok  # fetched once per client
    assert [p for _, p, _ in fake.calls].count("/tokenizer") == 1
    cached = tokenizer_cache_dir("base")
    assert sorted(os.listdir(cached)) == ["tokenizer.json", "tokenizer_config.json"]


async def test_sampling_client_get_tokenizer_async(
        fake: FakeBios, service: bios.ServiceClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, no_transformers: None) -> None:
    monkeypatch.setenv("BIOS_CACHE_DIR", str(tmp_path))
    sampler = await service.create_sampling_client_async(base_model="base")
    tok = await sampler.get_tokenizer_async()
    assert tok.encode("Test 1") == [5, 6]


def test_transformers_loads_the_cached_files_offline(tmp_path: Path) -> None:
    # transformers imports torch, so this runs in its own interpreter.
    pytest.importorskip("transformers")
    files = json.dumps(tiny_tokenizer_files())
    code = (
        "import json, sys\n"
        "from bios.tokenizer import load_tokenizer_files\n"
        f"tok = load_tokenizer_files('ultrasafe/usf-finance', json.loads({files!r}))\n"
        "assert type(tok).__module__.startswith('transformers'), type(tok)\n"
        "print(json.dumps([tok.encode('hello world', add_special_tokens=False), "
        "tok.decode([3, 4]), tok.eos_token_id]))\n")
    env = {**os.environ, "BIOS_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[3, 4], "hello world", 2]
