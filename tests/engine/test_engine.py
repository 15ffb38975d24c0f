"""Engine.execute on a small random Llama (fp32 base, no autocast, so comparisons are tight):
batching vs alone, token-budget splits, gradient accumulation, run and failure isolation."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest
import torch

from bios.server.engine.engine import Engine, pack_rows
from bios.server.engine.executor import InProcessExecutor
from bios.server.engine.model import ModelConfig, Transformer, load_transformer
from bios.server.plan import (
    AdapterSpec,
    CreateAdapterOp,
    CyclePlan,
    DatumRows,
    ForwardBackwardOp,
    OptimStepOp,
    PassGroup,
    ReleaseAdapterOp,
    Step,
)

BASE = "test/small-llama"
VOCAB = 1024
TIGHT = {"rtol": 1e-4, "atol": 1e-5}  # fp32; batching only reorders float sums


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Transformer, ModelConfig]:
    """A 2-layer Llama with untied embeddings (the tiny test model's are tied), fp32."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return load_transformer(path, base_dtype=torch.float32)


def make_engine(small, token_budget: int = 4096) -> Engine:
    model, cfg = small
    return Engine(model, cfg, device="cpu", autocast_dtype=None, token_budget=token_budget)


def datum(n: int, seed: int, rl: bool = False) -> DatumRows:
    """n input tokens predicting the next ones; with rl, sampling logprobs and advantages."""
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (n + 1,), generator=gen).tolist()
    inputs: dict = {"target_tokens": seq[1:]}
    if rl:
        inputs["logprobs"] = (-7.5 + torch.rand(n, generator=gen)).tolist()
        inputs["advantages"] = torch.randn(n, generator=gen).tolist()
    else:
        inputs["weights"] = [0.0, *([1.0] * (n - 1))]  # the first token is "prompt"
    return DatumRows(tokens=seq[:-1], loss_inputs=inputs)


def fb(req: str, run: str, data: list[DatumRows], loss_fn: str = "cross_entropy", **kw):
    return ForwardBackwardOp(req, run, data, loss_fn, kw.pop("config", {}), **kw)


def create(run: str, rank: int, seed: int, **spec) -> CreateAdapterOp:
    return CreateAdapterOp(f"create-{run}", run, AdapterSpec(rank=rank, seed=seed, **spec))


def step(run: str, i: int = 0, **adam) -> OptimStepOp:
    return OptimStepOp(f"step-{run}-{i}", run, {"learning_rate": 1e-2, **adam})


def execute(engine: Engine, *steps: Step, cycle: int = 0):
    result = engine.execute(CyclePlan(cycle, BASE, list(steps)))
    return {r.request_id: r for r in result.results}, result


def weights(engine: Engine, run: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.runs[run].adapter.parameters()]


def all_equal(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


def grads(engine: Engine, run: str) -> list[torch.Tensor]:
    return [p.grad.clone() for p in engine.runs[run].adapter.parameters()]


def assert_close_all(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
    """Equal up to fp32 summation order, relative to each tensor's scale."""
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()) + 1e-8)


def assert_same_output(a: dict, b: dict) -> None:
    for x, y in zip(a["loss_fn_outputs"], b["loss_fn_outputs"], strict=True):
        torch.testing.assert_close(
            torch.tensor(x["logprobs"]["data"]), torch.tensor(y["logprobs"]["data"]), **TIGHT
        )
    for key in ("loss:sum", "loss:mean"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-5, abs=1e-6)


# Three runs with different ranks, targets, row counts, lengths and losses.
RUNS = {
    "a": (create("a", 4, seed=1), [datum(12, 1), datum(7, 2)], "cross_entropy"),
    "b": (create("b", 8, seed=2, train_unembed=False), [datum(20, 3, rl=True)], "ppo"),
    "c": (create("c", 16, seed=3, train_mlp=False), [datum(5, 4), datum(9, 5), datum(3, 6)],
          "cross_entropy"),
}  # fmt: skip


def run_ops(names: str) -> list[ForwardBackwardOp]:
    return [fb(f"fb-{n}", n, RUNS[n][1], RUNS[n][2]) for n in names]


def warm_up(engine: Engine, names: str) -> None:
    """Create the runs and take one step each, so B is nonzero and every LoRA term counts.
    Each run warms up in passes of its own, so its weights are the same in any engine."""
    for n in names:
        execute(engine, RUNS[n][0], PassGroup(run_ops(n)), step(n))


# ----------------------------------------------------------------------------- packing


def test_pack_rows_respects_the_budget_longest_first():
    assert pack_rows([3, 10, 4, 10], 20) == [[1, 3], [2, 0]]
    assert pack_rows([30, 2], 20) == [[0], [1]]  # an oversized row gets a pass of its own
    assert pack_rows([], 20) == []
    for passes in (pack_rows([5, 9, 1, 7, 7, 2, 8], b) for b in (1, 9, 16, 30, 100)):
        assert sorted(i for p in passes for i in p) == list(range(7))


# ----------------------------------------------------------------------------- batching


def test_batched_runs_equal_each_run_alone(small):
    together = make_engine(small)
    warm_up(together, "abc")
    results, cycle = execute(together, PassGroup(run_ops("abc")))
    assert cycle.stats.passes == 1
    for name in "abc":
        alone = make_engine(small)
        warm_up(alone, name)
        assert all_equal(weights(alone, name), weights(together, name))
        solo, _ = execute(alone, PassGroup(run_ops(name)))
        assert results[f"fb-{name}"].ok
        assert_same_output(results[f"fb-{name}"].result, solo[f"fb-{name}"].result)
        assert_close_all(grads(together, name), grads(alone, name))


def test_token_budget_splits_give_the_same_result(small):
    engine = make_engine(small)
    warm_up(engine, "abc")
    outputs, gradients, passes = [], [], []
    for budget in (4096, 24, 1):  # one pass; several; one row per pass
        engine.token_budget = budget
        results, cycle = execute(engine, PassGroup(run_ops("abc")))
        outputs.append(results)
        gradients.append({n: grads(engine, n) for n in "abc"})
        passes.append(cycle.stats.passes)
        for n in "abc":
            engine.runs[n].zero_grad()
    assert passes == [1, 3, 6]
    for other, other_grads in zip(outputs[1:], gradients[1:], strict=True):
        for name in "abc":
            assert_same_output(other[f"fb-{name}"].result, outputs[0][f"fb-{name}"].result)
            assert_close_all(other_grads[name], gradients[0][name])


def test_unembedding_chunks_give_the_same_result(small):
    """Chunks spanning runs (one of which has no unembedding LoRA), chunks cutting a run's
    tokens, one token per chunk: the same logprobs, losses and gradients."""
    engine = make_engine(small)
    warm_up(engine, "abc")
    outputs, gradients = [], []
    for chunk in (256, 7, 1):
        engine.unembed_chunk = chunk
        results, _ = execute(engine, PassGroup(run_ops("abc")))
        outputs.append(results)
        gradients.append({n: grads(engine, n) for n in "abc"})
        for n in "abc":
            engine.runs[n].zero_grad()
    for other, other_grads in zip(outputs[1:], gradients[1:], strict=True):
        for name in "abc":
            assert_same_output(other[f"fb-{name}"].result, outputs[0][f"fb-{name}"].result)
            assert_close_all(other_grads[name], gradients[0][name])


def test_output_format_and_loss_mean(small):
    engine = make_engine(small)
    data = [datum(6, 1), DatumRows([], {"target_tokens": []}), datum(4, 2)]
    results, _ = execute(engine, create("a", 4, 1), PassGroup([fb("f", "a", data)]))
    out = results["f"].result
    assert out["loss_fn_output_type"] == "ArrayRecord"
    shapes = [o["logprobs"]["shape"] for o in out["loss_fn_outputs"]]
    assert shapes == [[6], [0], [4]]
    assert all(o["logprobs"]["dtype"] == "float32" for o in out["loss_fn_outputs"])
    lps = [v for o in out["loss_fn_outputs"] for v in o["logprobs"]["data"][1:]]
    assert out["metrics"]["loss:sum"] == pytest.approx(-sum(lps), rel=1e-5)
    assert out["metrics"]["loss:mean"] == pytest.approx(-sum(lps) / 8, rel=1e-5)  # 5 + 3 weighted
    zero = DatumRows([1, 2], {"target_tokens": [3, 4], "weights": [0.0, 0.0]})
    results, _ = execute(engine, PassGroup([fb("z", "a", [zero])]))
    assert results["z"].result["metrics"] == {"loss:sum": 0.0, "loss:mean": 0.0}


def test_forward_only_accumulates_no_gradient_and_sees_current_weights(small):
    engine = make_engine(small)
    warm_up(engine, "a")
    fwd = fb("fwd", "a", RUNS["a"][1], forward_only=True)
    results, cycle = execute(engine, PassGroup([fwd]))
    assert all(p.grad is None for p in engine.runs["a"].adapter.parameters())
    assert cycle.stats.ops_by_kind == {"forward": 1}
    results2, _ = execute(engine, PassGroup(run_ops("a")))  # with gradients: same values
    assert_same_output(results["fwd"].result, results2["fb-a"].result)


def test_gradient_accumulation_equals_one_big_batch(small):
    first, second = [datum(10, 7), datum(6, 8)], [datum(8, 9)]
    split, joined = make_engine(small), make_engine(small)
    for engine in (split, joined):
        warm_up(engine, "a")
    execute(split, PassGroup([fb("f1", "a", first)]))
    execute(split, PassGroup([fb("f2", "a", second)]), step("a", 1))
    execute(joined, PassGroup([fb("f", "a", first + second)]), step("a", 1))
    assert_close_all(weights(split, "a"), weights(joined, "a"))


@pytest.mark.parametrize("release", ["next cycle", "idle"])
def test_a_gradient_kept_past_its_cycle_holds_only_its_own_memory(small, release):
    """Runs of one layout batched in one pass get their packed gradients as rows of one shared
    buffer. A run still holding its row one cycle later, or when the engine falls idle, gets
    it copied out with the same values, so it does not keep its pass-mates' rows alive."""
    engine, reference = make_engine(small), make_engine(small)
    data = {r: [datum(9, seed)] for seed, r in enumerate("xyz")}
    for seed, r in enumerate("xyz"):
        execute(engine, create(r, 4, seed=seed))
    execute(reference, create("y", 4, seed=1))
    ops = [fb(f"fb-{r}", r, data[r]) for r in "xyz"]
    _, cycle = execute(engine, PassGroup(ops), step("x"))
    assert cycle.stats.passes == 1
    assert engine.runs["x"].adapter.packed.grad is None  # stepped: consumed and cleared
    # y and z may step in the next cycle: no copy yet
    assert all(engine.runs[r].holds_shared_gradient() for r in "yz")
    if release == "idle":
        engine.idle()
    else:
        execute(engine, step("x", 1))
    for r in "yz":
        g = engine.runs[r].adapter.packed.grad
        assert g is not None and g.abs().max() > 0
        assert g._base is None and not engine.runs[r].holds_shared_gradient()
    execute(reference, PassGroup([fb("fb-y", "y", data["y"])]))
    assert_close_all(grads(engine, "y"), grads(reference, "y"))


# ----------------------------------------------------------------------------- isolation


def test_a_row_of_this_cycles_pass_is_not_copied_out(small):
    """The copy-out is for rows held one cycle past their pass. Runs that step and run their
    next batched pass in the following cycle hold rows of the new buffer, which wait their own
    cycle: copying those out on every cycle would cost a copy per run per step for nothing."""
    engine = make_engine(small)
    for seed, r in enumerate("xy"):
        execute(engine, create(r, 4, seed=seed))
    ops = [fb(f"fb-{r}", r, [datum(9, seed)]) for seed, r in enumerate("xy")]
    execute(engine, PassGroup(ops))
    first = engine.runs["x"].adapter.packed.grad._base
    execute(engine, step("x"), step("y"), PassGroup(ops))
    for r in "xy":
        assert engine.runs[r].holds_shared_gradient()  # the new pass's row, not a copy of it
        assert engine.runs[r].adapter.packed.grad._base is not first
    execute(engine, step("x", 1))  # y holds its row one cycle on: copied out now
    assert engine.runs["y"].adapter.packed.grad is not None
    assert not engine.runs["y"].holds_shared_gradient()


def test_runs_are_isolated(small):
    engine = make_engine(small)
    warm_up(engine, "ab")
    a_weights = weights(engine, "a")
    a_state = {k: v.clone() for k, v in engine.runs["a"].optimizer.state_tensors().items()}
    # B trains and decays its weights for a few cycles; A's state must not move at all.
    for i in range(3):
        execute(engine, PassGroup(run_ops("b")), step("b", i, weight_decay=0.5))
    assert all_equal(weights(engine, "a"), a_weights)
    for key, value in engine.runs["a"].optimizer.state_tensors().items():
        assert torch.equal(value, a_state[key])
    assert all(p.grad is None for p in engine.runs["a"].adapter.parameters())

    # A trained alongside B gives what A trained alone gives.
    alone = make_engine(small)
    warm_up(alone, "a")
    for i in range(2):
        results, _ = execute(
            engine, PassGroup(run_ops("ab")), step("a", i), step("b", i, weight_decay=0.5)
        )
        solo, _ = execute(alone, PassGroup(run_ops("a")), step("a", i))
        assert_same_output(results["fb-a"].result, solo["fb-a"].result)
    assert_close_all(weights(engine, "a"), weights(alone, "a"))


def test_bad_ops_fail_alone_as_user_errors(small):
    engine = make_engine(small)
    warm_up(engine, "ab")
    b_before = weights(engine, "b")
    bad_token = DatumRows([1, VOCAB, 3], {"target_tokens": [1, 2, 3]})
    bad_length = DatumRows([1, 2, 3], {"target_tokens": [1, 2]})
    results, cycle = execute(
        engine,
        PassGroup(
            [
                fb("good-a", "a", RUNS["a"][1]),
                fb("bad-token", "b", [bad_token]),
                fb("bad-length", "a", [bad_length]),
                fb("bad-config", "a", RUNS["a"][1], config={"beta": 1.0}),
                fb("unknown-run", "zzz", RUNS["a"][1]),
            ]
        ),
        create("a", 4, 1),
        step("a", 1),
        step("b", 1, learning_rate=-1.0),
    )
    assert results["good-a"].ok and results["step-a-1"].ok
    failed = {k: r for k, r in results.items() if not r.ok}
    assert set(failed) == {
        "bad-token", "bad-length", "bad-config", "unknown-run", "create-a", "step-b-1"
    }  # fmt: skip
    assert all(r.category == "user" for r in failed.values())
    assert f"token id {VOCAB} outside the vocabulary" in failed["bad-token"].error
    assert "unknown run 'zzz'" in failed["unknown-run"].error
    assert "already exists" in failed["create-a"].error
    assert all_equal(weights(engine, "b"), b_before)
    assert cycle.stats.passes == 1 and cycle.stats.runs == 3


def test_a_failing_pass_is_retried_op_by_op(small):
    reference = make_engine(small)
    warm_up(reference, "ac")
    expected, _ = execute(reference, PassGroup(run_ops("ac")))

    engine = make_engine(small)
    warm_up(engine, "abc")
    # Corrupt run b's adapter (10 packed weights where its layout has thousands): its rows
    # cannot run.
    adapter = engine.runs["b"].adapter
    adapter.packed = adapter.packed.detach()[:10].clone().requires_grad_()
    results, cycle = execute(engine, PassGroup(run_ops("abc")))
    assert not results["fb-b"].ok and results["fb-b"].category == "server"
    for name in "ac":
        assert_same_output(results[f"fb-{name}"].result, expected[f"fb-{name}"].result)
        assert_close_all(grads(engine, name), grads(reference, name))
    assert cycle.stats.passes == 4  # the failed batched pass, then one per op


# ----------------------------------------------------------------------------- lifecycle


def test_lifecycle_stats_and_determinism(small):
    def cycle(engine):
        return engine.execute(
            CyclePlan(
                7,
                BASE,
                [
                    create("a", 4, 1),
                    PassGroup(run_ops("a")),
                    step("a"),  # then a step with nothing accumulated: allowed
                    step("a", 1, weight_decay=0.1),
                    PassGroup([fb("fwd", "a", RUNS["a"][1], forward_only=True)]),
                    ReleaseAdapterOp("rel", "a"),
                    ReleaseAdapterOp("rel-again", "a"),
                ],
            )
        )

    first, second = cycle(make_engine(small)), cycle(make_engine(small))
    assert [r.ok for r in first.results] == [True] * 7
    assert [r.result for r in first.results] == [r.result for r in second.results]
    by_id = {r.request_id: r.result for r in first.results}
    assert by_id["step-a-1"]["metrics"]["grad_norm"] == 0.0
    assert by_id["step-a-0"]["metrics"]["learning_rate"] == 1e-2
    assert (by_id["rel"], by_id["rel-again"]) == ({"released": True}, {"released": False})
    stats = first.stats
    assert (stats.runs, stats.passes, stats.tokens) == (1, 2, 38)
    assert stats.ops_by_kind == {
        "create": 1, "forward_backward": 1, "optim_step": 2, "forward": 1, "release": 2
    }  # fmt: skip
    assert stats.engine_ms > 0


def test_executor_runs_plans_on_its_worker_thread(small):
    executor = InProcessExecutor(make_engine(small))
    try:
        futures = [
            executor.submit(CyclePlan(0, BASE, [create("a", 4, 1)])),
            executor.submit(CyclePlan(1, BASE, [PassGroup(run_ops("a")), step("a")])),
        ]
        assert all(isinstance(f, Future) for f in futures)
        results = [f.result(timeout=60) for f in futures]
        assert [r.cycle_id for r in results] == [0, 1]
        assert all(r.ok for c in results for r in c.results)
        assert executor.info()["vocab_size"] == VOCAB
    finally:
        executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(CyclePlan(2, BASE, []))


def test_executor_tells_the_engine_once_per_lull(small, monkeypatch):
    engine = make_engine(small)
    lulls: list[float] = []
    monkeypatch.setattr(engine, "idle", lambda: lulls.append(time.monotonic()) or False)
    executor = InProcessExecutor(engine, idle_s=0.05)

    def wait_for(n: int) -> None:  # a deadline, not a fixed sleep: a loaded CI box is slow
        deadline = time.monotonic() + 60
        while len(lulls) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    try:
        time.sleep(0.2)
        assert lulls == []  # nothing ran yet: nothing to clean up after
        done = executor.submit(CyclePlan(0, BASE, [create("a", 4, 1)])).result(timeout=60)
        finished = time.monotonic()
        wait_for(1)
        time.sleep(0.3)  # and no second one without work in between
        assert len(lulls) == 1 and lulls[0] - finished >= 0.04  # once, after the lull
        assert done.results[0].ok
        executor.submit(CyclePlan(1, BASE, [PassGroup(run_ops("a"))])).result(timeout=60)
        wait_for(2)
        assert len(lulls) == 2
    finally:
        executor.shutdown()


def test_executor_shutdown_runs_the_queued_plans(small):
    executor = InProcessExecutor(make_engine(small))
    futures = [executor.submit(CyclePlan(i, BASE, [create(f"r{i}", 4, i)])) for i in range(3)]
    executor.shutdown(wait=True)
    assert all(f.done() and f.result().results[0].ok for f in futures)


def test_from_model_dir_picks_hardware_defaults(tiny_model_dir):
    engine = Engine.from_model_dir(tiny_model_dir)
    assert engine.device.type in ("cpu", "cuda")
    if engine.device.type == "cpu":
        assert engine.token_budget == 2048
    assert engine.info() == {"arch": "llama", "vocab_size": 49152, "max_context_length": 2048,
                             "hidden_size": 256, "intermediate_size": 688, "num_layers": 4,
                             "q_dim": 256, "kv_dim": 128}
    results, _ = execute(engine, create("a", 4, 1), PassGroup(run_ops("a")), step("a"))
    assert all(r.ok for r in results.values())


@pytest.mark.parametrize("loss_fn", ["cross_entropy", "ppo"])
def test_a_request_split_across_cycles_equals_one_pass(small, loss_fn):
    """The scheduler's split of a big request (its datums in parts, one cycle each, outputs
    and loss sums merged at the end) gives the one-pass result and the same gradients."""
    from bios.server.scheduler import SplitRequest
    from bios.server.store import ClaimedRequest

    rl = loss_fn == "ppo"
    data = [datum(n, 40 + i, rl=rl) for i, n in enumerate([12, 7, 20, 5, 9, 16, 3])]
    whole, split = make_engine(small), make_engine(small)
    for engine in (whole, split):
        warm_up(engine, "a")
    one, _ = execute(whole, PassGroup([fb("big", "a", data, loss_fn)]))
    request = SplitRequest(ClaimedRequest("big", "a", 5, "forward_backward", {}),
                           fb("big", "a", data, loss_fn))
    cycles = 0
    while not request.done:
        part = request.part(25)  # tokens per part: a few datums each
        res, _ = execute(split, PassGroup([part]), cycle=cycles)
        request.add(res[part.request_id])
        cycles += 1
    assert cycles >= 3
    merged = request.result()
    assert merged.keys() == one["big"].result.keys()
    assert_same_output(merged, one["big"].result)
    assert_close_all(grads(split, "a"), grads(whole, "a"))
    execute(whole, step("a", 1))
    execute(split, step("a", 1))
    assert_close_all(weights(split, "a"), weights(whole, "a"))


def test_info_reports_the_dims_that_size_an_adapter(small):
    """The scheduler sizes adapters from info() (no torch there): the dims must be in it."""
    from bios.server.plan import AdapterSpec, ModelDims, resident_bytes

    engine = make_engine(small)
    dims = ModelDims.from_info(engine.info())
    assert dims == ModelDims(64, 176, 2, 64, 32, VOCAB)
    spec = AdapterSpec(rank=4, seed=0, train_unembed=False)
    assert resident_bytes(dims, spec) == 12 * 4 * 2 * ((64 + 64) + 2 * (64 + 32) + (64 + 64)
                                                      + 3 * (64 + 176))
