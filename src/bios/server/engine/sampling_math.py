"""Choosing the next token from logits: greedy, temperature, top-k, top-p, and seeded draws.

Pure tensor math over a batch of rows, each row with its own settings. It knows nothing about
models, caches, requests or tokenizers (see sampler.py for those).

Randomness: every sampled token costs its row exactly one uniform number in [0, 1), drawn by the
caller from the row's own `random.Random` (see `row_rng`), and the token is found by inverse-CDF
search, in vocabulary order, over the row's (tempered, filtered) distribution. So a row's tokens
depend only on its seed, its sample index and its logits, never on which other rows share the
batch (the last bits of the logits can, so the search avoids any order that rounding could
change), and drawing 64 rows' numbers is a 64-element list comprehension rather than 64
generator calls on the device.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CDF_BLOCK = 256  # columns per block of the two-level inverse-CDF search


@dataclass(frozen=True)
class RowSampling:
    """One row's settings. temperature 0 = greedy (argmax of the raw logits, exactly);
    top_k <= 0 = no limit; top_p = 1.0 = no nucleus cut (top_p must be in (0, 1])."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def row_rng(seed: int | None, sample_index: int) -> random.Random:
    """The random stream of sample `sample_index` of a request.

    With a seed, the stream is a pure function of (seed, sample_index), so the same request
    sampled again gives the same tokens while its num_samples rows differ from each other.
    Without one it is seeded from the OS.
    """
    if seed is None:
        return random.Random()
    return random.Random(f"bios-sample:{seed}:{sample_index}")  # str seeds hash with SHA-512


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """probs (n, V) unnormalized, uniforms (n,) float64 in [0, 1) -> column index (n,).

    Picks the first column whose cumulative mass exceeds u * total; a zero-probability column
    is never picked. Two levels keep this cheap without losing mass to rounding over a large
    vocabulary: float64 cumulative sums over the masses of blocks of CDF_BLOCK columns find
    the block, then over that block's columns find the column. The only pass over all of
    `probs` is the fp32 per-block sum.
    """
    n, vocab = probs.shape
    pad = -vocab % CDF_BLOCK
    blocks = F.pad(probs, (0, pad)) if pad else probs
    blocks = blocks.reshape(n, -1, CDF_BLOCK)  # (n, nb, CDF_BLOCK)
    block_mass = blocks.sum(dim=-1).double()  # (n, nb)
    block_cdf = block_mass.cumsum(dim=-1)
    target = uniforms * block_cdf[:, -1]
    rows = torch.arange(n, device=probs.device)
    block = _search(block_cdf, target, block_mass > 0)
    inner = blocks[rows, block].double()  # (n, CDF_BLOCK)
    offset = block_cdf[rows, block] - block_mass[rows, block]
    return block * CDF_BLOCK + _search(inner.cumsum(dim=-1), target - offset, inner > 0)


def _search(cdf: Tensor, target: Tensor, nonzero: Tensor) -> Tensor:
    """cdf (n, m), target (n,) -> the first column with cdf > target, but never past the last
    column with nonzero mass (where rounding could put a target at the very end)."""
    picked = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    position = torch.arange(1, cdf.shape[1] + 1, device=cdf.device)
    last = (nonzero * position).argmax(dim=-1)
    return torch.minimum(picked, last)


def tempered(logits: Tensor, temperatures: Tensor) -> Tensor:
    """`logits / t` per row, shifted so each row's largest logit is 0 first (the softmax is
    the same). Without the shift a tiny positive t (say 1e-40) overflows the largest logits to
    inf and the softmax to NaN; with it they stay 0 and the rest go to -inf, so the draw takes
    the argmax, the limit of sampling as t goes to 0."""
    return (logits - logits.amax(dim=-1, keepdim=True)) / temperatures


class TokenChooser:
    """The sampling settings of one batch of rows, pre-split by the math each row needs.

    Built once per batch composition (rows joining or leaving), called once per decode step.
    Rows fall in three groups: greedy (argmax), plain (softmax of logits / T) and filtered
    (top-k and/or top-p over the tempered distribution, top-k applied first). Each group is one
    vectorized computation; empty groups cost nothing, and a group of every row indexes nothing.
    """

    def __init__(self, rows: Sequence[RowSampling], device: torch.device | str):
        self.num_rows = len(rows)
        greedy = [i for i, r in enumerate(rows) if r.greedy]
        plain = [i for i, r in enumerate(rows) if not r.greedy and not r.filtered]
        filtered = [i for i, r in enumerate(rows) if not r.greedy and r.filtered]
        self.greedy = self._selector(greedy, device)
        self.plain = self._selector(plain, device)
        self.filtered = self._selector(filtered, device)
        self.plain_temp = self._temperatures([rows[i] for i in plain], device)
        self.filtered_temp = self._temperatures([rows[i] for i in filtered], device)
        self.top_p = torch.tensor([rows[i].top_p for i in filtered], device=device)
        self.top_k_list = [rows[i].top_k for i in filtered]
        self.top_k = torch.tensor(self.top_k_list, dtype=torch.long, device=device)

    def _selector(self, rows: list[int], device: torch.device | str) -> Tensor | slice | None:
        if not rows:
            return None
        if len(rows) == self.num_rows:
            return slice(None)
        return torch.tensor(rows, dtype=torch.long, device=device)

    @staticmethod
    def _temperatures(rows: list[RowSampling], device: torch.device | str) -> Tensor | None:
        """(m, 1) divisors, or None when every row samples at temperature 1."""
        if all(r.temperature == 1.0 for r in rows):
            return None
        # fp32 like the logits; a positive t below fp32's range would round to 0 (0/0 = NaN)
        t = torch.tensor([r.temperature for r in rows], device=device)
        return t.clamp_min(torch.finfo(t.dtype).tiny)[:, None]

    def __call__(self, logits: Tensor, uniforms: Tensor) -> Tensor:
        """logits (n, V) raw, uniforms (n,) float64 -> chosen token ids (n,) long."""
        if logits.shape[0] != self.num_rows:
            raise ValueError(f"{logits.shape[0]} rows of logits for {self.num_rows} settings")
        logits = logits.float()
        tokens = torch.empty(self.num_rows, dtype=torch.long, device=logits.device)
        if self.greedy is not None:
            tokens[self.greedy] = logits[self.greedy].argmax(dim=-1)
        if self.plain is not None:
            scaled = logits[self.plain]
            if self.plain_temp is not None:
                scaled = tempered(scaled, self.plain_temp)
            probs = torch.softmax(scaled, dim=-1)
            tokens[self.plain] = inverse_cdf(probs, uniforms[self.plain])
        if self.filtered is not None:
            tokens[self.filtered] = self._filtered(logits[self.filtered], uniforms[self.filtered])
        return tokens

    def _filtered(self, logits: Tensor, uniforms: Tensor) -> Tensor:
        """Top-k, then top-p, over the tempered logits; the draw itself runs in vocabulary
        order, so near-equal logits that sort differently from one batch to the next (float
        rounding) do not change which token a given uniform picks."""
        vocab = logits.shape[1]
        if self.filtered_temp is not None:
            logits = tempered(logits, self.filtered_temp)
        # every row has a top_k: only the largest max(k) logits matter; else sort them all
        k_max = vocab if min(self.top_k_list) <= 0 else min(max(self.top_k_list), vocab)
        top, order = logits.topk(k_max, dim=-1, sorted=True)  # (m, k_max), descending
        rank = torch.arange(k_max, device=logits.device)
        k = torch.where(self.top_k > 0, self.top_k, vocab)
        top = top.masked_fill(rank[None] >= k[:, None], float("-inf"))
        probs = torch.softmax(top, dim=-1)  # renormalized over the top-k
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs * (mass_before < self.top_p[:, None])  # keeps at least the first token
        probs = torch.zeros_like(logits).scatter_(1, order, probs)  # back to vocabulary order
        return inverse_cdf(probs, uniforms)
