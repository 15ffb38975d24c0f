"""The base model: a compact decoder-only transformer that loads Hugging Face checkpoints.

Owns the architecture (Llama, Mistral, Qwen2, Qwen3), loading their safetensors weights, rotary
embeddings and a minimal per-row KV cache for sampling. It knows nothing about runs, losses,
tokenizers or HTTP. LoRA enters only through the `lora` argument: every LoRA-able linear calls
`lora.apply(key, x)` (the unembedding `lora.add_to(key, x, logits)`, which may add in place)
explicitly, with keys "layers.{i}.self_attn.{q,k,v,o}_proj", "layers.{i}.mlp.{gate,up,down}_proj"
and "lm_head".

Dtypes: the frozen base weights live in `base_dtype` (bf16 by default). The residual stream,
norms and rotary embeddings run in fp32; linears cast their input to the weight dtype, so run
under `torch.autocast(device_type, dtype=torch.bfloat16)` for speed. Sliding-window
attention (Mistral's `sliding_window`; Qwen2/Qwen3 with `use_sliding_window`, from layer
`max_window_layers` on, or per config `layer_types`) lets a query at position i see keys at
i - window < j <= i, as transformers does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    from bios.server.engine.lora import LoRABatch

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # one of SUPPORTED_ARCHS
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # {"rope_type": "llama3" | "linear", ...} or None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v_proj
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before rope
    o_proj_bias: bool = False
    mlp_bias: bool = False
    # per layer: the sliding attention window, or None for full causal attention
    sliding_windows: tuple[int | None, ...] | None = None

    def window(self, layer: int) -> int | None:
        return None if self.sliding_windows is None else self.sliding_windows[layer]

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a config.json dict (transformers 4 `rope_theta`/`rope_scaling` or 5
        `rope_parameters` style)."""
        arch = hf.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"unsupported model_type {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}; only silu")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r}; supported: linear, llama3")
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        num_heads = hf["num_attention_heads"]
        bias = bool(hf.get("attention_bias", False))
        return cls(
            sliding_windows=_sliding_windows(arch, hf),
            arch=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bias,  # Qwen2 always has q/k/v bias
            o_proj_bias=False if arch == "qwen2" else bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
        )


def _sliding_windows(arch: str, hf: dict[str, Any]) -> tuple[int | None, ...] | None:
    """Each layer's attention window from a config.json dict, as transformers reads it."""
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if arch == "llama" or (arch in ("qwen2", "qwen3") and not hf.get("use_sliding_window")):
        window = None
    if not window:
        return None
    if hf.get("layer_types"):
        types = hf["layer_types"]
        if len(types) != layers:
            raise ValueError(f"layer_types has {len(types)} entries for {layers} layers")
        windows = tuple(window if t == "sliding_attention" else None for t in types)
    elif arch in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", layers)
        windows = tuple(window if i >= first else None for i in range(layers))
    else:  # mistral: every layer
        windows = (window,) * layers
    return windows if any(w is not None for w in windows) else None


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse rotary frequencies (head_dim // 2,), fp32, with linear or llama3 scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


# On CPU, PyTorch's flash-attention kernel is slower than the plain math one for short rows:
# fwd+bwd of 8 rows x 64 tokens (8 heads of 32) took 5.6 vs 1.8 ms, and they break even at
# about 256 tokens (2-core EPYC, bf16); past that, flash wins (33 vs 73 ms at 4 x 512).
CPU_MATH_ATTENTION_MAX_LEN = 256


def banded_causal_mask(n: int, window: int, device: torch.device) -> Tensor:
    """(n, n) bool: query i sees keys i - window < j <= i (sliding-window causal attention)."""
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, band: Tensor | None = None) -> Tensor:
    """Causal self-attention over q (B, H, T, D) and k, v (B, kvH, T, D), GQA-aware; `band`
    (T, T), from `banded_causal_mask`, for a sliding window narrower than T."""
    if band is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=True)
    if q.device.type == "cpu" and q.shape[-2] <= CPU_MATH_ATTENTION_MAX_LEN:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos/sin (B, 1, T, D). Rotates the two halves of D (HF's convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.float() * x


def linear(layer: nn.Linear, key: str, x: Tensor, lora: LoRABatch | None) -> Tensor:
    """The frozen base projection plus the pass's LoRA delta for `key`."""
    y = F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)
    delta = lora.apply(key, x) if lora is not None else None
    return y if delta is None else y + delta


class KVCache:
    """Per-layer keys/values (B, kv_heads, max_len, head_dim) plus each row's filled length.

    A forward pass with the cache writes row b's T new tokens to slots lengths[b] .. +T-1,
    attends to every filled slot up to each query, then advances lengths by T. After a
    right-padded prefill, call `truncate(prompt_lengths)`: the pad slots are then ignored and
    overwritten by the next decode step. Use it under torch.no_grad().
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
    ):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    def truncate(self, lengths: Tensor) -> None:
        """Set each row's filled length (<= its current one), e.g. to prompt lengths."""
        lengths = lengths.to(self.lengths.device)
        if bool((lengths > self.lengths).any()):
            raise ValueError("truncate cannot grow a row")
        self.lengths = lengths.clone()

    def slots(self, num_new: int) -> Tensor:
        """Slot index (B, T) of each new token."""
        return self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)


# A layer's view of the cache: k and v buffers, new tokens' slots (B, T), mask (B, 1, T, L),
# with the layer's sliding window applied, or None when the cache was empty (causal attention
# over the new tokens). A cached token's slot is its position.
LayerCache = tuple[Tensor, Tensor, Tensor, Tensor | None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm, self.head_dim, self.prefix = cfg.qk_norm, d, prefix

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        lora: LoRABatch | None,
        cache: LayerCache | None,
        band: Tensor | None,
    ) -> Tensor:
        """`band`: this layer's sliding-window mask over the new tokens (see causal_attention),
        or None; used when no cached token takes part."""
        B, T, _ = x.shape
        p = self.prefix
        q = linear(self.q_proj, p + "q_proj", x, lora).view(B, T, -1, self.head_dim)
        k = linear(self.k_proj, p + "k_proj", x, lora).view(B, T, -1, self.head_dim)
        v = linear(self.v_proj, p + "v_proj", x, lora).view(B, T, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
        if cache is None:  # right-padded causal training pass
            y = causal_attention(q, k, v, band)
        else:
            ck, cv, slots, mask = cache
            rows = torch.arange(B, device=x.device)[:, None]
            ck[rows, :, slots] = k.transpose(1, 2).to(ck.dtype)  # (B, T, kvH, D) into slots
            cv[rows, :, slots] = v.transpose(1, 2).to(cv.dtype)
            if mask is None:  # empty cache: causal over the new tokens
                y = causal_attention(q, k, v, band)
            else:
                L = mask.shape[-1]
                ks, vs = ck[:, :, :L].to(q.dtype), cv[:, :, :L].to(q.dtype)
                y = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return linear(self.o_proj, p + "o_proj", y, lora)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str):
        super().__init__()
        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, m, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, m, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(m, h, bias=cfg.mlp_bias)
        self.prefix = prefix

    def forward(self, x: Tensor, lora: LoRABatch | None) -> Tensor:
        p = self.prefix
        gate = linear(self.gate_proj, p + "gate_proj", x, lora)
        up = linear(self.up_proj, p + "up_proj", x, lora)
        return linear(self.down_proj, p + "down_proj", F.silu(gate) * up, lora)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, f"layers.{i}.self_attn.")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, f"layers.{i}.mlp.")

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        lora: LoRABatch | None,
        cache: LayerCache | None,
        band: Tensor | None = None,
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, lora, cache, band)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class Transformer(nn.Module):
    """Module names mirror HF's (minus the "model." prefix), so checkpoints load by name."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(
        self,
        input_ids: Tensor,
        lora: LoRABatch | None = None,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, hidden), fp32.

        Without a cache this is a causal pass over right-padded rows. With one, the tokens
        continue each row at its cached length (see KVCache). `positions` (B, T) overrides the
        rotary positions, which default to 0..T-1 or the cached lengths onward (a sliding
        window counts cache slots, which are those default positions).
        """
        B, T = input_ids.shape
        device = input_ids.device
        slots, mask = None, None
        if kv_cache is not None:
            slots = kv_cache.slots(T)  # (B, T)
            end = int(slots.max()) + 1  # the pass's one host sync
            if end > kv_cache.max_len:
                raise ValueError(f"KV cache overflow: {end} slots > max_len={kv_cache.max_len}")
            if end > T:  # some row has cached tokens: query t of row b sees slots <= its own
                mask = (torch.arange(end, device=device) <= slots[..., None])[:, None]
        if positions is None:
            positions = slots if slots is not None else torch.arange(T, device=device)
            positions = positions.expand(B, T)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos(), emb.sin()

        # Sliding-window masks, once per pass for each distinct window (not per layer): over
        # the new tokens (only for windows narrower than T), and over the cache slots.
        windows = set(self.cfg.sliding_windows or ()) - {None}
        bands = {w: banded_causal_mask(T, w, device) for w in windows if w < T}
        masks: dict[int, Tensor] = {}  # a layer without a window here takes `mask` itself
        if mask is not None:
            keys = torch.arange(mask.shape[-1], device=device)
            masks = {w: mask & ((slots[..., None] - keys) < w)[:, None] for w in windows}

        x = self.embed_tokens(input_ids).float()
        for i, block in enumerate(self.layers):
            w = self.cfg.window(i)
            cache = (None if kv_cache is None
                     else (kv_cache.k[i], kv_cache.v[i], slots, masks.get(w, mask)))
            x = block(x, cos, sin, lora, cache, bands.get(w))
        if kv_cache is not None:
            kv_cache.lengths = kv_cache.lengths + T
        return self.norm(x)

    def unembed(self, hidden: Tensor, lora: LoRABatch | None = None) -> Tensor:
        """hidden (B, ..., hidden) -> logits (B, ..., vocab). Rows must match the LoRABatch."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden.to(weight.dtype), weight)
        return logits if lora is None else lora.add_to("lm_head", hidden, logits)


# ----------------------------------------------------------------------------- loading


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return files


def load_transformer(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    base_dtype: torch.dtype = torch.bfloat16,
) -> tuple[Transformer, ModelConfig]:
    """Load an HF checkpoint directory (config.json + safetensors, sharded or not).

    Weights are stored frozen (requires_grad=False) in `base_dtype`.
    """
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = set(model.state_dict())
    state: dict[str, Tensor] = {}
    for path in _safetensors_files(model_dir):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = hf_name.removeprefix("model.")
                if name in expected:
                    state[name] = f.get_tensor(hf_name).to(base_dtype)
                elif not (name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")):
                    raise ValueError(f"unexpected weight {hf_name!r} in {path.name}")
    missing = expected - set(state)
    if missing:
        raise ValueError(f"{model_dir} is missing weights: {sorted(missing)[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    model.requires_grad_(False)
    model.eval()
    return model, cfg
