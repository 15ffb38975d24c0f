"""Multi-LoRA: each run's adapter weights, and the routing that lets many runs share one pass.

`Adapter` owns one run's LoRA tensors (fp32 leaves, on the model's device) and their PEFT
state-dict format. `LoRABatch` routes one batched pass: rows are contiguous per adapter, and
`apply(key, x)` returns every row's scaled delta `x @ A @ B * alpha / rank` computed with two
`torch.bmm` over the stacked adapters. The stacks are built from the adapters' own leaf tensors,
so autograd sends each adapter's gradient into its own `.grad` (run isolation by construction).
Nothing here knows about optimizers, losses or checkpoints on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from bios.server.engine.model import ModelConfig
from bios.server.plan import AdapterSpec

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def target_shapes(cfg: ModelConfig, spec: AdapterSpec) -> dict[str, tuple[int, int]]:
    """key -> (in_features, out_features) for every module the spec trains, in a fixed order."""
    h, m = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    mlp = {"gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(cfg.num_layers):
        if spec.train_attn:
            shapes |= {f"layers.{i}.self_attn.{n}": s for n, s in attn.items()}
        if spec.train_mlp:
            shapes |= {f"layers.{i}.mlp.{n}": s for n, s in mlp.items()}
    if spec.train_unembed:
        shapes["lm_head"] = (h, cfg.vocab_size)
    return shapes


def peft_key(key: str) -> str:
    """Our module key -> PEFT's module path ("layers.0.mlp.up_proj" -> "...model.layers...")."""
    return "base_model.model." + (key if key == "lm_head" else "model." + key)


def as_input(x: Tensor, weight: Tensor) -> Tensor:
    """x in the weight's dtype, unless autocast is about to cast both (skip a round trip)."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


@dataclass(eq=False)  # compared by identity: tensors have no truth value
class Adapter:
    """One run's LoRA weights: key -> (A (in, r), B (r, out)), fp32 leaves with requires_grad."""

    spec: AdapterSpec
    weights: dict[str, tuple[Tensor, Tensor]]
    # (key, dtype) -> (the B that was cast, its version counter then, the detached cast)
    _casts: dict[tuple[str, torch.dtype], tuple[Tensor, int, Tensor]] = field(
        default_factory=dict, init=False, repr=False)

    def cast_b(self, key: str, dtype: torch.dtype) -> Tensor:
        """A detached `dtype` copy of B for `key`, reused until B changes.

        In-place updates (the optimizer step, a checkpoint load) advance a tensor's version
        counter, which invalidates the copy; so does replacing the tensor. The unembedding's B
        (r x vocab) is the one worth keeping: casting it was a full pass over it per pass.
        """
        B = self.weights[key][1]
        cached = self._casts.get((key, dtype))
        if cached is not None and cached[0] is B and cached[1] == B._version:
            return cached[2]
        cast = B.detach().to(dtype)
        self._casts[(key, dtype)] = (B, B._version, cast)
        return cast

    @property
    def scaling(self) -> float:
        return self.spec.alpha / self.spec.rank

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values()))[0].device

    @classmethod
    def init(cls, cfg: ModelConfig, spec: AdapterSpec, device: torch.device | str) -> Adapter:
        """A ~ kaiming_uniform(a=sqrt(5)) over fan_in (as PEFT / microsoft LoRA), B = 0.

        Drawn on the CPU from a generator seeded by spec.seed, so the same spec gives the same
        adapter on any device.
        """
        if spec.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {spec.rank}")
        shapes = target_shapes(cfg, spec)
        if not shapes:
            raise ValueError("the adapter spec trains nothing (attn, mlp and unembed all off)")
        gen = torch.Generator().manual_seed(spec.seed)
        weights = {}
        for key, (fan_in, fan_out) in shapes.items():
            a = torch.empty(spec.rank, fan_in)  # nn.Linear(in, r).weight layout, as PEFT inits it
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            A = a.t().contiguous().to(device).requires_grad_()
            B = torch.zeros(spec.rank, fan_out, device=device, requires_grad=True)
            weights[key] = (A, B)
        return cls(spec, weights)

    def parameters(self) -> list[Tensor]:
        """[A_0, B_0, A_1, B_1, ...] in target order (layers ascending, then lm_head)."""
        return [t for pair in self.weights.values() for t in pair]

    def peft_target_modules(self) -> list[str]:
        return [
            *(ATTN_TARGETS if self.spec.train_attn else ()),
            *(MLP_TARGETS if self.spec.train_mlp else ()),
            *(("lm_head",) if self.spec.train_unembed else ()),
        ]

    def peft_config(self, base_model: str) -> dict:
        """adapter_config.json contents that peft's LoraConfig loads (unset fields: defaults)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": self.peft_target_modules(),
            "fan_in_fan_out": False,
            "use_rslora": False,
            "inference_mode": True,
        }

    def to_peft_state_dict(self) -> dict[str, Tensor]:
        """PEFT layout: lora_A.weight (r, in), lora_B.weight (out, r); detached CPU copies."""
        sd = {}
        for key, (A, B) in self.weights.items():
            sd[peft_key(key) + ".lora_A.weight"] = A.detach().t().contiguous().cpu()
            sd[peft_key(key) + ".lora_B.weight"] = B.detach().t().contiguous().cpu()
        return sd

    def load_peft_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Copy a PEFT state dict (as `to_peft_state_dict` writes) into our tensors in place."""
        expected = {}
        for key, (A, B) in self.weights.items():
            expected[peft_key(key) + ".lora_A.weight"] = (A, (A.shape[1], A.shape[0]))
            expected[peft_key(key) + ".lora_B.weight"] = (B, (B.shape[1], B.shape[0]))
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"LoRA state dict does not match the adapter (rank {self.spec.rank}, targets "
                f"{self.peft_target_modules()}): missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        for name, (_, shape) in expected.items():
            if tuple(sd[name].shape) != shape:
                raise ValueError(f"{name}: shape {tuple(sd[name].shape)}, expected {shape}")
        with torch.no_grad():
            for name, (dst, _) in expected.items():
                dst.copy_(sd[name].t())


class LoRABatch:
    """LoRA routing for one batched pass: adapter k owns rows [sum(rows[:k]), sum(rows[:k+1])).

    Stacked weights (and, for no-grad passes under autocast, the weights' casts) are cached per
    key at first use. They are copies: build a new LoRABatch after the adapters change (an
    optimizer step, a load), and build one per training pass (a cached stack belongs to one
    autograd graph). Many no-grad sampling passes may share one.
    """

    def __init__(self, adapters: list[Adapter], rows: list[int], seq_len: int):
        self.adapters, self.rows, self.seq_len = adapters, rows, seq_len
        self.num_rows = sum(rows)
        self.targets = set().union(*(a.weights for a in adapters))
        self._stacks: dict[str, tuple[Tensor, Tensor]] = {}
        self._casts: dict[str, tuple[Tensor, Tensor]] = {}  # see _frozen_casts
        if len(adapters) > 1:
            device = adapters[0].device
            self.max_rank = max(a.spec.rank for a in adapters)
            self.equal_rows = len(set(rows)) == 1
            # alpha / rank per adapter, (K, 1, 1)
            self._scales = torch.tensor([a.scaling for a in adapters], device=device)[:, None, None]
            # flat index, into the (K * max_rows) padded rows, of every real row in pass order
            rmax = max(rows)
            self._real_rows = torch.cat(
                [k * rmax + torch.arange(n, device=device) for k, n in enumerate(rows)]
            )

    @classmethod
    def build(cls, adapters: list[Adapter], rows_per_adapter: list[int], seq_len: int) -> LoRABatch:
        """seq_len is the pass's padded length, kept for bookkeeping: `apply` routes by the
        first dim only, so (rows, T, in), (rows, in) or a slice of T all work."""
        if not adapters or len(adapters) != len(rows_per_adapter):
            raise ValueError("need one row count per adapter, and at least one adapter")
        if min(rows_per_adapter) < 1:
            raise ValueError(f"every adapter needs at least one row: {rows_per_adapter}")
        if len({a.device for a in adapters}) > 1:
            raise ValueError("all adapters of a pass must be on one device")
        return cls(list(adapters), list(rows_per_adapter), seq_len)

    def _out_features(self, key: str) -> int:
        return next(a.weights[key][1].shape[1] for a in self.adapters if key in a.weights)

    def _stack(self, key: str) -> tuple[Tensor, Tensor]:
        """(A (K, in, rmax), B (K, rmax, out)), zero-padded ranks and zero missing targets."""
        if key not in self._stacks:
            r = self.max_rank
            A0, B0 = next(a.weights[key] for a in self.adapters if key in a.weights)
            As, Bs = [], []
            for a in self.adapters:
                if key in a.weights:
                    A, B = a.weights[key]
                    if A.shape[1] < r:  # F.pad copies even when it pads nothing
                        A, B = F.pad(A, (0, r - A.shape[1])), F.pad(B, (0, 0, 0, r - B.shape[0]))
                    As.append(A)
                    Bs.append(B)
                else:
                    As.append(A0.new_zeros(A0.shape[0], r))
                    Bs.append(B0.new_zeros(r, B0.shape[1]))
            self._stacks[key] = self._frozen_casts(key, (torch.stack(As), torch.stack(Bs)))
        return self._stacks[key]

    def _frozen_casts(self, key: str, weights: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Under no_grad with autocast on, the weights cast to the autocast dtype once for this
        LoRABatch's life: a sampler keeps one LoRABatch across decode steps, and autocast would
        otherwise cast every adapter matrix again at every step. Otherwise the weights as they
        are (under autograd, autocast casts them, and the gradient reaches the fp32 leaves)."""
        A = weights[0]
        if torch.is_grad_enabled() or not torch.is_autocast_enabled(A.device.type):
            return weights
        dtype = torch.get_autocast_dtype(A.device.type)
        if key not in self._casts:
            self._casts[key] = (weights[0].to(dtype), weights[1].to(dtype))
        return self._casts[key]

    # Targets whose deltas are added row segment by row segment, in place (`add_to`): their
    # weights are large next to a pass's rows (the unembedding's B is r x vocab), so stacking K
    # copies of them (and their casts and gradients) costs more than K small matmuls, and a
    # delta-sized temporary costs a pass over [rows, vocab] memory.
    loop_keys: frozenset[str] = frozenset({"lm_head"})

    def add_to(self, key: str, x: Tensor, y: Tensor) -> Tensor:
        """`y + delta(key, x)`, where y (rows, ..., out) is the frozen projection of x; y itself
        may be updated in place and returned. Returns y if no adapter targets key."""
        if key not in self.targets:
            return y
        if key not in self.loop_keys:
            return y + self.apply(key, x)  # type: ignore[operator]  (key is targeted)
        if x.shape[0] != self.num_rows:
            raise ValueError(f"pass has {x.shape[0]} rows, LoRABatch routes {self.num_rows}")
        bounds, operands = [], []
        start = 0
        for a, n in zip(self.adapters, self.rows, strict=True):
            if key in a.weights:
                A, B = a.weights[key]
                u = (as_input(x[start : start + n], A) @ A) * a.scaling  # (n, ..., r)
                bounds.append((start, start + n))
                operands += [u, B, a.cast_b(key, y.dtype)]
            start += n
        return _AddRowDeltas.apply(y, tuple(bounds), *operands)

    def apply(self, key: str, x: Tensor) -> Tensor | None:
        """x (B, ..., in) -> scaled LoRA delta (B, ..., out), or None if no adapter targets key."""
        if key not in self.targets:
            return None
        if x.shape[0] != self.num_rows:
            raise ValueError(f"pass has {x.shape[0]} rows, LoRABatch routes {self.num_rows}")
        if len(self.adapters) == 1:
            adapter = self.adapters[0]
            A, B = self._frozen_casts(key, adapter.weights[key])
            return ((as_input(x, A) @ A) * adapter.scaling) @ B

        if key in self.loop_keys:  # the delta alone: added to zeros of the matmuls' dtype
            device = x.device.type
            dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else x.dtype)
            zeros = x.new_zeros(*x.shape[:-1], self._out_features(key), dtype=dtype)
            return self.add_to(key, x, zeros)
        A, B = self._stack(key)
        K, n_rows = len(self.adapters), x.shape[0]
        xr = as_input(x, A).reshape(n_rows, -1, x.shape[-1])  # (rows, N, in)
        N = xr.shape[1]
        if self.equal_rows:
            xk = xr.reshape(K, -1, xr.shape[-1])  # (K, rows_k * N, in): a view
        else:
            xk = pad_sequence(list(xr.split(self.rows)), batch_first=True)  # (K, rmax, N, in)
            xk = xk.reshape(K, -1, xr.shape[-1])
        h = torch.bmm(xk, A)  # (K, M, r)
        y = torch.bmm(h * self._scales.to(h.dtype), B)  # (K, M, out)
        if not self.equal_rows:
            y = y.reshape(-1, N, y.shape[-1])[self._real_rows]  # (rows, N, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class _AddRowDeltas(torch.autograd.Function):
    """`y[a:b] += u @ B` in place for each row segment (a, b), in y's dtype.

    Operands come in threes per segment: u (rows, ..., r), the fp32 leaf B (r, out) that
    receives the gradient, and B already cast to y's dtype (`Adapter.cast_b`). Each delta goes
    straight into y's rows with one `addmm_`, and backward hands y's gradient through
    untouched: no delta-sized temporary, no concatenation, no extra add.
    """

    @staticmethod
    def forward(ctx, y: Tensor, bounds: tuple[tuple[int, int], ...], *operands: Tensor) -> Tensor:
        saved = []
        for (a, b), u, B_cast in zip(bounds, operands[0::3], operands[2::3], strict=True):
            u_ = u.to(y.dtype)
            y[a:b].view(-1, y.shape[-1]).addmm_(u_.reshape(-1, u_.shape[-1]), B_cast)
            saved += [u_, B_cast]
        ctx.mark_dirty(y)
        ctx.save_for_backward(*saved)
        ctx.bounds = bounds
        ctx.dtypes = [(u.dtype, B.dtype) for u, B in zip(operands[0::3], operands[1::3],
                                                          strict=True)]
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        grads: list[Tensor | None] = []
        for (a, b), u_, B_cast, (u_dtype, B_dtype) in zip(
                ctx.bounds, saved[0::2], saved[1::2], ctx.dtypes, strict=True):
            g = grad[a:b].reshape(-1, grad.shape[-1])
            grad_u = (g @ B_cast.t()).view(u_.shape).to(u_dtype)
            grad_B = (u_.reshape(-1, u_.shape[-1]).t() @ g).to(B_dtype)
            grads += [grad_u, grad_B, None]
        return (grad, None, *grads)
