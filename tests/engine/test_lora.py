"""Adapters against PEFT's LoRA, and multi-adapter passes against one pass per adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from bios.server.engine.lora import Adapter, LoRABatch, peft_key
from bios.server.plan import AdapterSpec


def nonzero_b(adapter: Adapter, seed: int) -> Adapter:
    """Give B random values so that A's gradient and the delta are nonzero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, B in adapter.weights.values():
            B.copy_(torch.randn(B.shape, generator=gen) * 0.02)
    return adapter


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float summation order, relative to the gradient's scale."""
    assert expected.abs().max() > 0
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max()


def token_batch(rows: int, seq_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    return ids, torch.randint(0, vocab, (rows, seq_len), generator=gen)


def test_init_is_seeded_and_follows_the_spec(tiny_fp32):
    _, cfg = tiny_fp32
    spec = AdapterSpec(rank=4, seed=7, train_mlp=False)
    a, b = Adapter.init(cfg, spec, "cpu"), Adapter.init(cfg, spec, "cpu")
    other = Adapter.init(cfg, AdapterSpec(rank=4, seed=8, train_mlp=False), "cpu")
    assert list(a.weights) == [
        *(f"layers.{i}.self_attn.{m}_proj" for i in range(cfg.num_layers) for m in "qkvo"),
        "lm_head",
    ]
    assert a.peft_target_modules() == ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]
    assert a.scaling == 32 / 4
    for (A, B), (A2, _), (A3, _) in zip(
        a.weights.values(), b.weights.values(), other.weights.values(), strict=True
    ):
        assert A.dtype == torch.float32
        assert torch.equal(A, A2) and not torch.equal(A, A3)
        assert A.abs().max() <= 1 / math.sqrt(A.shape[0])  # kaiming_uniform(a=sqrt(5)) bound
        assert B.shape[0] == 4 and not B.any()
    q_a, q_b = a.weights["layers.0.self_attn.k_proj"]
    assert q_a.shape == (cfg.hidden_size, 4) and q_b.shape == (4, cfg.num_kv_heads * cfg.head_dim)
    assert a.tensors()[:2] == [q for q in a.weights["layers.0.self_attn.q_proj"]]

    # the blocks' matrices are views of one packed leaf; the unembedding's are leaves
    assert a.packed.is_leaf and a.packed.requires_grad and a.packed.numel() == a.layout.size
    assert a.parameters() == [a.packed, *a.weights["lm_head"]]
    base = a.packed.untyped_storage().data_ptr()
    for key, (A, B) in a.weights.items():
        packed = key != "lm_head"
        assert (A.untyped_storage().data_ptr() == base) == packed
        assert (B.untyped_storage().data_ptr() == base) == packed
        assert A.is_contiguous() and B.is_contiguous()
        assert (A.is_leaf and A.requires_grad) == (not packed)


def test_packed_views_stay_plain_aliases_through_steps_and_loads(tiny_fp32):
    """The per-matrix views share the packed leaf's memory and version counter, and stay
    outside autograd after in-place writes (an optimizer step, a load)."""
    from bios.server.engine.optimizer import AdamW, adam_params

    _, cfg = tiny_fp32
    adapter = Adapter.init(cfg, AdapterSpec(rank=4, seed=0, train_unembed=False), "cpu")
    A, _ = adapter.weights["layers.0.self_attn.q_proj"]
    version = adapter.packed._version
    adapter.packed.grad = torch.ones_like(adapter.packed)
    AdamW(adapter.tensors()).step(adapter.tensors(), adam_params({"learning_rate": 0.1}),
                                  adapter.grads())
    assert adapter.packed._version > version  # the step reached the leaf's version counter
    adapter.load_peft_state_dict(adapter.to_peft_state_dict())
    assert not A.requires_grad and A.grad_fn is None
    assert torch.equal(A.flatten(), adapter.packed.detach()[: A.numel()])


def test_grads_are_per_matrix_views_of_the_packed_gradient(tiny_fp32):
    _, cfg = tiny_fp32
    adapter = Adapter.init(cfg, AdapterSpec(rank=4, seed=0), "cpu")
    assert all(g is None for g in adapter.grads())
    adapter.packed.grad = torch.arange(adapter.layout.size, dtype=torch.float32)
    grads = adapter.grads()
    assert [g is None for g in grads] == [False] * (len(grads) - 2) + [True, True]  # lm_head
    at = 0
    for t, g in zip(adapter.tensors()[:-2], grads[:-2], strict=True):
        assert g.shape == t.shape and int(g.flatten()[0]) == at
        at += t.numel()
    assert at == adapter.layout.size


def test_peft_state_dict_round_trip_and_errors(tiny_fp32):
    _, cfg = tiny_fp32
    spec = AdapterSpec(rank=4, seed=1)
    src = nonzero_b(Adapter.init(cfg, spec, "cpu"), seed=0)
    sd = src.to_peft_state_dict()
    assert sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 256)
    assert sd["base_model.model.lm_head.lora_B.weight"].shape == (cfg.vocab_size, 4)

    dst = Adapter.init(cfg, AdapterSpec(rank=4, seed=2), "cpu")
    dst.load_peft_state_dict(sd)
    for (A, B), (A2, B2) in zip(src.weights.values(), dst.weights.values(), strict=True):
        assert torch.equal(A, A2) and torch.equal(B, B2)
    loaded = dst.packed.clone()
    assert torch.equal(loaded, src.packed)  # written in place, into the packed leaf

    wrong_rank = Adapter.init(cfg, AdapterSpec(rank=8, seed=2), "cpu")
    with pytest.raises(ValueError, match=r"lora_A.weight: shape \(4, 256\), expected \(8, 256\)"):
        wrong_rank.load_peft_state_dict(sd)
    no_mlp = Adapter.init(cfg, AdapterSpec(rank=4, seed=2, train_mlp=False), "cpu")
    with pytest.raises(ValueError, match="unexpected"):
        no_mlp.load_peft_state_dict(sd)


def test_logits_and_gradients_match_peft(tiny_fp32, tiny_model_dir):
    model, cfg = tiny_fp32
    adapter = nonzero_b(Adapter.init(cfg, AdapterSpec(rank=8, seed=3), "cpu"), seed=1)
    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora_config = LoraConfig(
        r=8, lora_alpha=32, lora_dropout=0.0, target_modules=adapter.peft_target_modules()
    )
    peft_model = get_peft_model(hf, lora_config)
    set_peft_model_state_dict(peft_model, adapter.to_peft_state_dict())

    ids, targets = token_batch(2, 12, cfg.vocab_size, seed=0)
    batch = LoRABatch.build([adapter], [2], seq_len=12)
    ours = model.unembed(model(ids, lora=batch), batch)
    theirs = peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    F.cross_entropy(ours.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), targets.flatten()).backward()

    params = dict(peft_model.named_parameters())
    grads = adapter.grads()
    for key, grad_A, grad_B in zip(adapter.weights, grads[0::2], grads[1::2], strict=True):
        peft_A = params[peft_key(key) + ".lora_A.default.weight"].grad
        peft_B = params[peft_key(key) + ".lora_B.default.weight"].grad
        assert_grad_close(grad_A, peft_A.t())
        assert_grad_close(grad_B, peft_B.t())


def test_peft_loads_our_adapter_directory(tiny_fp32, tiny_model_dir, tmp_path):
    model, cfg = tiny_fp32
    spec = AdapterSpec(rank=4, seed=5, alpha=16.0, train_unembed=False)
    adapter = nonzero_b(Adapter.init(cfg, spec, "cpu"), seed=2)
    save_file(adapter.to_peft_state_dict(), tmp_path / "adapter_model.safetensors")
    config = adapter.peft_config(base_model="bios/tiny-llama")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    hf = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path)
    ids, _ = token_batch(1, 8, cfg.vocab_size, seed=1)
    batch = LoRABatch.build([adapter], [1], seq_len=8)
    with torch.no_grad():
        ours = model.unembed(model(ids, lora=batch), batch)
        torch.testing.assert_close(ours, peft_model(ids).logits, rtol=1e-4, atol=1e-5)


SPECS = [
    AdapterSpec(rank=4, seed=1),
    AdapterSpec(rank=8, seed=2, train_mlp=False),
    AdapterSpec(rank=2, seed=3, alpha=8.0, train_unembed=False),
]


@pytest.mark.parametrize("rows", [[2, 1, 3], [2, 2, 2]])
def test_batched_adapters_equal_separate_passes(tiny_fp32, rows):
    check_batch_equals_separate_passes(*tiny_fp32, SPECS, rows)


def test_an_adapter_with_nothing_packed_batches_with_others(tiny_fp32):
    """An unembedding-only adapter (an empty packed leaf) next to a full one: zeros in the
    stacked blocks' rows for it, and no gradient leaks either way."""
    only_unembed = AdapterSpec(rank=4, seed=9, train_attn=False, train_mlp=False)
    check_batch_equals_separate_passes(*tiny_fp32, [SPECS[1], only_unembed], [1, 2])


def check_batch_equals_separate_passes(model, cfg, specs, rows):
    adapters = [nonzero_b(Adapter.init(cfg, s, "cpu"), seed=i) for i, s in enumerate(specs)]
    T = 10
    ids, targets = token_batch(sum(rows), T, cfg.vocab_size, seed=4)

    batch = LoRABatch.build(adapters, rows, seq_len=T)
    joint = model.unembed(model(ids, lora=batch), batch)
    F.cross_entropy(joint.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    joint_grads = [[g.clone() for g in a.grads()] for a in adapters]

    start = 0
    for adapter, n, grads in zip(adapters, rows, joint_grads, strict=True):
        for t in adapter.parameters():
            t.grad = None
        one = LoRABatch.build([adapter], [n], seq_len=T)
        rows_k = slice(start, start + n)
        alone = model.unembed(model(ids[rows_k], lora=one), one)
        torch.testing.assert_close(joint[rows_k], alone, rtol=1e-4, atol=1e-5)
        loss = F.cross_entropy(alone.flatten(0, 1), targets[rows_k].flatten(), reduction="sum")
        loss.backward()
        for g, g_alone in zip(grads, adapter.grads(), strict=True):
            assert_grad_close(g, g_alone)
        start += n


def test_gradients_stay_in_their_adapter(tiny_fp32):
    model, cfg = tiny_fp32
    adapters = [nonzero_b(Adapter.init(cfg, s, "cpu"), seed=i) for i, s in enumerate(SPECS)]
    ids, targets = token_batch(4, 6, cfg.vocab_size, seed=5)
    batch = LoRABatch.build(adapters, [1, 2, 1], seq_len=6)
    logits = model.unembed(model(ids, lora=batch), batch)
    F.cross_entropy(logits[1:3].flatten(0, 1), targets[1:3].flatten()).backward()  # adapter 1
    assert all(g.abs().max() > 0 for g in adapters[1].grads())  # every matrix of adapter 1
    for a in (adapters[0], adapters[2]):
        assert all(g is None or not g.any() for g in a.grads())

    # a second pass accumulates into the same .grad
    first = [t.grad.clone() for t in adapters[1].parameters()]
    batch = LoRABatch.build(adapters, [1, 2, 1], seq_len=6)
    logits = model.unembed(model(ids, lora=batch), batch)
    F.cross_entropy(logits[1:3].flatten(0, 1), targets[1:3].flatten()).backward()
    for t, g in zip(adapters[1].parameters(), first, strict=True):
        torch.testing.assert_close(t.grad, 2 * g)


def test_apply_routing_edges(tiny_fp32):
    _, cfg = tiny_fp32
    no_unembed = [Adapter.init(cfg, AdapterSpec(rank=2, seed=0, train_unembed=False), "cpu")]
    batch = LoRABatch.build(no_unembed * 2, [1, 1], seq_len=4)
    x = torch.randn(2, 4, cfg.hidden_size)
    assert batch.apply("lm_head", x) is None
    assert batch.apply("layers.0.mlp.up_proj", x).shape == (2, 4, cfg.intermediate_size)
    with pytest.raises(ValueError, match="3 rows"):
        batch.apply("layers.0.mlp.up_proj", torch.randn(3, 4, cfg.hidden_size))
    with pytest.raises(ValueError, match="at least one row"):
        LoRABatch.build(no_unembed, [0], seq_len=4)


def test_cast_b_is_reused_until_b_changes(tiny_fp32):
    """The unembedding's bf16 B is kept between passes, and never outlives an optimizer step
    or a load (both update B in place) or a replaced tensor."""
    from bios.server.engine.optimizer import AdamW, adam_params

    _, cfg = tiny_fp32
    adapter = nonzero_b(Adapter.init(cfg, AdapterSpec(rank=4, seed=0), "cpu"), seed=1)
    first = adapter.cast_b("lm_head", torch.bfloat16)
    assert adapter.cast_b("lm_head", torch.bfloat16) is first
    B = adapter.weights["lm_head"][1]
    torch.testing.assert_close(first, B.detach().bfloat16())

    for p in adapter.parameters():
        p.grad = torch.ones_like(p)
    AdamW(adapter.parameters()).step(adapter.parameters(), adam_params({"learning_rate": 0.1}))
    stepped = adapter.cast_b("lm_head", torch.bfloat16)
    assert not torch.equal(stepped, first)
    torch.testing.assert_close(stepped, B.detach().bfloat16())

    adapter.load_peft_state_dict(nonzero_b(Adapter.init(cfg, AdapterSpec(rank=4, seed=0), "cpu"),
                                           seed=2).to_peft_state_dict())
    torch.testing.assert_close(adapter.cast_b("lm_head", torch.bfloat16), B.detach().bfloat16())

    A = adapter.weights["lm_head"][0]
    adapter.weights["lm_head"] = (A, torch.zeros_like(B, requires_grad=True))
    assert not adapter.cast_b("lm_head", torch.bfloat16).any()

    # a replacement at the same version counter as the tensor it replaces is not mistaken for it
    fresh = nonzero_b(Adapter.init(cfg, AdapterSpec(rank=4, seed=0), "cpu"), seed=3)
    A, B = fresh.weights["lm_head"]
    first = fresh.cast_b("lm_head", torch.bfloat16)
    other = torch.zeros_like(B, requires_grad=True)
    with torch.no_grad():
        other.fill_(1.0)  # one in-place write, as nonzero_b gave B
    assert other._version == B._version
    fresh.weights["lm_head"] = (A, other)
    assert torch.equal(fresh.cast_b("lm_head", torch.bfloat16), torch.ones_like(first))


@pytest.mark.parametrize("rows", [[3], [1, 2, 1]])
def test_no_grad_passes_reuse_one_cast_of_the_weights(tiny_fp32, rows):
    """A sampler keeps one LoRABatch across decode steps: under no_grad and autocast it stacks
    and casts the weights once, with the same result as the autograd path."""
    _, cfg = tiny_fp32
    adapters = [nonzero_b(Adapter.init(cfg, s, "cpu"), seed=i)
                for i, s in enumerate(SPECS[: len(rows)])]
    x = torch.randn(sum(rows), 2, cfg.hidden_size)
    key = "layers.1.mlp.down_proj"
    x_down = torch.randn(sum(rows), 2, cfg.intermediate_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = LoRABatch.build(adapters, rows, 2).apply(key, x_down).detach()  # autograd path
        batch = LoRABatch.build(adapters, rows, 2)
        with torch.no_grad():
            first = batch.apply(key, x_down)
            stacked = batch._stacked
            again = batch.apply(key, x_down)
            batch.apply("layers.0.self_attn.q_proj", x)
    assert torch.equal(first, want) and torch.equal(again, want)
    assert stacked is not None and batch._stacked is stacked  # stacked and cast once, reused
    assert all(t.dtype == torch.bfloat16 for pair in stacked.values() for t in pair)


def test_row_lora_adds_unembedding_deltas_in_the_logits_dtype(tiny_fp32):
    """Decode rows in any order, some on the bare base model: each adapter row gets its own
    delta, base rows none, and the sum stays in the logits' dtype (bf16 under autocast)."""
    from bios.server.engine.sampler import RowLoRA

    _, cfg = tiny_fp32
    a, b = (nonzero_b(Adapter.init(cfg, AdapterSpec(rank=4, seed=i), "cpu"), seed=i)
            for i in range(2))
    order = [b, None, a, b]
    x = torch.randn(4, 1, cfg.hidden_size)
    y = torch.randn(4, 1, cfg.vocab_size).bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rows = RowLoRA.build(order, 1)
        assert rows is not None and not rows.in_place
        out = rows.add_to("lm_head", x, y.clone())
        alone = [None if ad is None else
                 LoRABatch.build([ad], [1], 1).add_to("lm_head", x[i : i + 1], y[i : i + 1].clone())
                 for i, ad in enumerate(order)]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[1], y[1])  # the base row is untouched
    for i in (0, 2, 3):
        torch.testing.assert_close(out[i], alone[i][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unembedding_deltas_of_short_and_long_segments_match_the_dense_formula(tiny_fp32, dtype):
    """`add_to` adds a long segment's delta (from ADDMM_MIN_ROWS rows) with addmm_ and, in bf16
    on a CPU, a short one as a matmul and an add: both give `y + (x @ A) * scale @ B`, and the
    same gradients for A, B and x."""
    from bios.server.engine.lora import ADDMM_MIN_ROWS

    _, cfg = tiny_fp32
    a, b = (nonzero_b(Adapter.init(cfg, AdapterSpec(rank=4, seed=i), "cpu"), seed=i)
            for i in range(2))
    rows = [3, ADDMM_MIN_ROWS + 5]
    bounds = [(0, 3), (3, sum(rows))]
    x = torch.randn(sum(rows), cfg.hidden_size, requires_grad=True)
    y = torch.randn(sum(rows), cfg.vocab_size).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = LoRABatch.build([a, b], rows, 1).add_to("lm_head", x, y.clone())
        want = torch.cat([y[s:e] + (x[s:e] @ ad.weights["lm_head"][0]) * ad.scaling
                          @ ad.weights["lm_head"][1]
                          for ad, (s, e) in zip([a, b], bounds, strict=True)])
    assert got.dtype == dtype
    tol = {} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(got, want, **tol)
    leaves = [x, *a.weights["lm_head"], *b.weights["lm_head"]]
    weight = torch.randn_like(y, dtype=torch.float32)
    for g_got, g_want in zip(torch.autograd.grad((got.float() * weight).sum(), leaves),
                             torch.autograd.grad((want.float() * weight).sum(), leaves),
                             strict=True):
        torch.testing.assert_close(g_got, g_want, **tol)


@pytest.mark.parametrize("spec", [AdapterSpec(rank=4, seed=0), AdapterSpec(rank=8, seed=0,
                                  train_mlp=False), AdapterSpec(rank=2, seed=0,
                                  train_attn=False, train_unembed=False)])
def test_the_schedulers_adapter_size_is_the_engines(tiny_fp32, spec):
    """plan.adapter_params (the scheduler's resident-bytes bound, no torch) counts the
    parameters Adapter.init allocates, from the dims the engine reports in info()."""
    from bios.server.plan import ModelDims, adapter_params

    _, cfg = tiny_fp32
    dims = ModelDims(cfg.hidden_size, cfg.intermediate_size, cfg.num_layers,
                     cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                     cfg.vocab_size)
    adapter = Adapter.init(cfg, spec, "cpu")
    assert adapter_params(dims, spec) == sum(p.numel() for p in adapter.parameters())
