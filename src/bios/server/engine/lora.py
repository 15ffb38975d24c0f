"""Multi-LoRA: each run's adapter weights, and the routing that lets many runs share one pass.

`Adapter` owns one run's LoRA tensors (fp32, on the model's device) and their PEFT state-dict
format. The transformer blocks' A and B matrices live end to end in one packed fp32 leaf per
adapter (`PackedLayout` says where), so that a pass stacks K adapters with K copies instead of
a stack and a cast per target, and their gradients come back the same way. `LoRABatch` routes one
batched pass: rows are contiguous per adapter, and `apply(key, x)` returns every row's scaled
delta `x @ A @ B * alpha / rank`, computed with two `torch.bmm` over the stacked adapters (two
`mm` for one adapter). Each adapter's gradient reaches only its own leaves' `.grad` (run
isolation by construction). Nothing here knows about optimizers, losses or checkpoints on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
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


def matmul_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype matmuls on `device` run in here: autocast's if it is on, else `default`."""
    on = torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if on else default


def as_input(x: Tensor, weight: Tensor) -> Tensor:
    """x in the weight's dtype, unless autocast is about to cast both (skip a round trip)."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


# Targets whose deltas are added row segment by row segment, in place (`LoRABatch.add_to`):
# their weights are large next to a pass's rows (the unembedding's B is r x vocab), so stacking
# K copies of them (and their casts and gradients) would cost more than K small matmuls. They
# stay separate leaves; every other target is packed.
LOOP_KEYS: frozenset[str] = frozenset({"lm_head"})


# On a CPU in bf16, a segment of fewer rows gets its unembedding delta as a matmul, then an add:
# in-place `addmm_` on a short row block (64 rows x 49k columns, rank 32) was the slower of the
# two by about 0.15 ms per segment in the mixed pass, about 1.2 ms of an 8-adapter 512-token
# pass (2-core EPYC, AVX512-BF16), and faster only from about 128 rows. In fp32 `addmm_` was
# the faster at any size (docs/benchmarks.md, Mixing); a GPU was not measured.
ADDMM_MIN_ROWS = 128


def _short_block_matmul_first(rows: Tensor) -> bool:
    return (rows.shape[0] < ADDMM_MIN_ROWS and rows.dtype == torch.bfloat16
            and rows.device.type == "cpu")


@dataclass(frozen=True)
class PackedLayout:
    """Where each packed target's A (in, r) and B (r, out) sit in a 1-D buffer: A, then B,
    target after target, each row-major. Equal layouts mean equal rank and targets."""

    rank: int
    targets: tuple[tuple[str, int, int], ...]  # (key, in_features, out_features)

    @property
    def size(self) -> int:
        return sum(self.rank * (i + o) for _, i, o in self.targets)

    def views(self, buf: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """buf (..., size) -> key -> (A (..., in, r), B (..., r, out)), views of buf."""
        lead, r, out, at = buf.shape[:-1], self.rank, {}, 0
        for key, fan_in, fan_out in self.targets:
            A = buf[..., at : at + fan_in * r].view(*lead, fan_in, r)
            at += fan_in * r
            B = buf[..., at : at + r * fan_out].view(*lead, r, fan_out)
            at += r * fan_out
            out[key] = (A, B)
        return out

    @classmethod
    def union(cls, layouts: list[PackedLayout]) -> PackedLayout:
        """Every target of any layout (first-seen order) at the largest rank."""
        if all(x == layouts[0] for x in layouts[1:]):
            return layouts[0]
        targets: dict[str, tuple[str, int, int]] = {}
        for layout in layouts:
            targets |= {t[0]: t for t in layout.targets if t[0] not in targets}
        return cls(max(x.rank for x in layouts), tuple(targets.values()))


@dataclass(eq=False)  # compared by identity: tensors have no truth value
class Adapter:
    """One run's LoRA weights: key -> (A (in, r), B (r, out)), fp32.

    The transformer blocks' matrices are views of `packed`, one fp32 leaf laid out by `layout`;
    the unembedding's (`LOOP_KEYS`) are leaves of their own. Autograd and gradients go through
    `parameters()` (those leaves); the optimizer and checkpoints see one tensor per matrix
    (`tensors()`, `grads()`), in a fixed order.
    """

    spec: AdapterSpec
    layout: PackedLayout
    packed: Tensor  # (layout.size,) fp32 leaf
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
        return self.packed.device

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
        layout = PackedLayout(spec.rank, tuple(
            (key, fan_in, fan_out) for key, (fan_in, fan_out) in shapes.items()
            if key not in LOOP_KEYS))
        packed = torch.zeros(layout.size, device=device, requires_grad=True)
        # Views of a detached alias: they share packed's memory and version counter (in-place
        # writes through them, by the optimizer or a load, reach it and invalidate what was
        # derived from it), but never join autograd. Views of packed itself would turn into
        # differentiable non-leaf views after the first in-place write.
        views = layout.views(packed.detach())
        gen = torch.Generator().manual_seed(spec.seed)
        weights = {}
        for key, (fan_in, fan_out) in shapes.items():
            a = torch.empty(spec.rank, fan_in)  # nn.Linear(in, r).weight layout, as PEFT inits it
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            if key in views:
                views[key][0].copy_(a.t())
                weights[key] = views[key]
            else:
                A = a.t().contiguous().to(device).requires_grad_()
                B = torch.zeros(spec.rank, fan_out, device=device, requires_grad=True)
                weights[key] = (A, B)
        return cls(spec, layout, packed, weights)

    def parameters(self) -> list[Tensor]:
        """The autograd leaves: `packed`, then each loop target's A and B."""
        return [self.packed, *(t for k in LOOP_KEYS if k in self.weights for t in self.weights[k])]

    def tensors(self) -> list[Tensor]:
        """[A_0, B_0, A_1, B_1, ...] in target order (layers ascending, then lm_head)."""
        return [t for pair in self.weights.values() for t in pair]

    def grads(self) -> list[Tensor | None]:
        """The gradient of each of `tensors()` (views of `packed.grad`), None where none."""
        grad = self.packed.grad
        packed = self.layout.views(grad) if grad is not None else {}
        out: list[Tensor | None] = []
        for key, (A, B) in self.weights.items():
            if key in LOOP_KEYS:
                out += [A.grad, B.grad]
            else:
                out += list(packed.get(key, (None, None)))
        return out

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

    At first use it stacks the adapters' packed weights, cast to the autocast dtype if one is
    on, into one (K, size) buffer (`_StackPacked`): a copy, so build a new LoRABatch after the
    adapters change (an optimizer step, a load), and one per training pass (the stack belongs
    to one autograd graph). Many no-grad sampling passes may share one: the cast is done once.
    """

    loop_keys: frozenset[str] = LOOP_KEYS

    def __init__(self, adapters: list[Adapter], rows: list[int], seq_len: int):
        self.adapters, self.rows, self.seq_len = adapters, rows, seq_len
        self.num_rows = sum(rows)
        self.targets = set().union(*(a.weights for a in adapters))
        self.layout = PackedLayout.union([a.layout for a in adapters])
        self.equal_rows = len(set(rows)) == 1
        self._stacked: dict[str, tuple[Tensor, Tensor]] | None = None

    @cached_property
    def _scales(self) -> Tensor:
        """alpha / rank per adapter, (K, 1, 1)."""
        scales = [a.scaling for a in self.adapters]
        return torch.tensor(scales, device=self.adapters[0].device)[:, None, None]

    @cached_property
    def _real_rows(self) -> Tensor:
        """Flat index, into the (K * max_rows) padded rows, of every real row in pass order."""
        device, rmax = self.adapters[0].device, max(self.rows)
        return torch.cat([k * rmax + torch.arange(n, device=device)
                          for k, n in enumerate(self.rows)])

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

    def _weights(self, key: str) -> tuple[Tensor, Tensor]:
        """(A, B) for a packed key: (in, r), (r, out) for one adapter, else (K, in, rmax),
        (K, rmax, out) with zero-padded ranks and zeros for adapters without the target."""
        if self._stacked is None:
            dtype = matmul_dtype(self.adapters[0].device, self.adapters[0].packed.dtype)
            stacked = _StackPacked.apply(
                self.layout, [a.layout for a in self.adapters], dtype,
                *(a.packed for a in self.adapters))
            self._stacked = dict(zip((t[0] for t in self.layout.targets),
                                     zip(stacked[0::2], stacked[1::2], strict=True), strict=True))
        return self._stacked[key]

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
        if key in self.loop_keys:  # the delta alone: added to zeros of the matmuls' dtype
            out = next(a.weights[key][1].shape[1] for a in self.adapters if key in a.weights)
            zeros = x.new_zeros(*x.shape[:-1], out, dtype=matmul_dtype(x.device, x.dtype))
            return self.add_to(key, x, zeros)
        A, B = self._weights(key)
        if len(self.adapters) == 1:
            return ((as_input(x, A) @ A) * self.adapters[0].scaling) @ B
        K, n_rows = len(self.adapters), x.shape[0]
        xr = as_input(x, A).reshape(n_rows, -1, x.shape[-1])  # (rows, N, in)
        N = xr.shape[1]
        if self.equal_rows:
            xk = xr.reshape(K, -1, xr.shape[-1])  # (K, rows_k * N, in): a view
        else:
            xk = pad_sequence(list(xr.split(self.rows)), batch_first=True)  # (K, rmax, N, in)
            xk = xk.reshape(K, -1, xr.shape[-1])
        h = torch.bmm(xk, A)  # (K, M, r)
        y = torch.bmm(h.mul_(self._scales), B)  # (K, M, out); h is not saved for backward
        if not self.equal_rows:
            y = y.reshape(-1, N, y.shape[-1])[self._real_rows]  # (rows, N, out)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class _StackPacked(torch.autograd.Function):
    """K adapters' packed weights -> one (K, size) buffer in `layout` and `dtype` (for K = 1,
    (size,)); returns every target's (A, B) views of it, flattened: A_0, B_0, A_1, ...

    An adapter whose layout is the batch's is one copy (with the cast); any other (a smaller
    rank, fewer targets) is copied target by target into a zeroed row. Backward is the mirror:
    one fp32 (K, size) gradient buffer filled target by target, whose row k is adapter k's
    gradient; no per-target autograd nodes, no [K x targets] gradient accumulations.
    """

    @staticmethod
    def forward(ctx, layout: PackedLayout, layouts: list[PackedLayout], dtype: torch.dtype,
                *packed: Tensor) -> tuple[Tensor, ...]:
        buf = packed[0].new_empty(len(packed), layout.size, dtype=dtype)
        for row, own, p in zip(buf, layouts, packed, strict=True):
            if own == layout:
                row.copy_(p)
                continue
            row.zero_()
            into = layout.views(row)
            for key, (A, B) in own.views(p).items():
                into[key][0][:, : own.rank].copy_(A)
                into[key][1][: own.rank].copy_(B)
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.layouts, ctx.grad_dtype = layout, layouts, packed[0].dtype
        if len(packed) == 1:
            return tuple(t for pair in layout.views(buf[0]).values() for t in pair)
        # One contiguous (K, ...) copy per matrix: bmm would otherwise copy each strided
        # (K-stride = size) view itself, in forward and again in backward.
        return tuple(t.contiguous() for pair in layout.views(buf).values() for t in pair)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        layout, layouts = ctx.layout, ctx.layouts
        some = next((g for g in grads if g is not None), None)
        if some is None:
            return (None,) * (3 + len(layouts))
        buf = some.new_empty(len(layouts), layout.size, dtype=ctx.grad_dtype)
        views = layout.views(buf if len(layouts) > 1 else buf[0])
        for (A, B), gA, gB in zip(views.values(), grads[0::2], grads[1::2], strict=True):
            for dst, g in ((A, gA), (B, gB)):
                dst.zero_() if g is None else dst.copy_(g)
        out: list[Tensor] = []
        for row, own in zip(buf, layouts, strict=True):
            if own == layout:
                out.append(row)
                continue
            mine = row.new_empty(own.size)
            source = layout.views(row)
            for key, (A, B) in own.views(mine).items():
                A.copy_(source[key][0][:, : own.rank])
                B.copy_(source[key][1][: own.rank])
            out.append(mine)
        return (None, None, None, *out)


class _AddRowDeltas(torch.autograd.Function):
    """`y[a:b] += u @ B` in place for each row segment (a, b), in y's dtype.

    Operands come in threes per segment: u (rows, ..., r), the fp32 leaf B (r, out) that
    receives the gradient, and B already cast to y's dtype (`Adapter.cast_b`). Each delta goes
    straight into y's rows with one `addmm_` (a short bf16 segment on a CPU: a matmul, then
    an add; see `ADDMM_MIN_ROWS`), and backward hands y's gradient through untouched: no
    concatenation, no pass-sized temporary.
    """

    @staticmethod
    def forward(ctx, y: Tensor, bounds: tuple[tuple[int, int], ...], *operands: Tensor) -> Tensor:
        saved = []
        for (a, b), u, B_cast in zip(bounds, operands[0::3], operands[2::3], strict=True):
            u_ = u.to(y.dtype)
            rows, u2 = y[a:b].view(-1, y.shape[-1]), u_.reshape(-1, u_.shape[-1])
            if _short_block_matmul_first(rows):
                rows.add_(u2 @ B_cast)
            else:
                rows.addmm_(u2, B_cast)
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
