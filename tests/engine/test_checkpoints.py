"""Checkpoints: atomic writes, exact training resume, weights-only loads, PEFT-loadable exports."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bios.server.engine import checkpoints
from bios.server.engine.engine import Engine
from bios.server.engine.lora import LoRABatch
from bios.server.plan import (
    AdapterSpec,
    CreateAdapterOp,
    CyclePlan,
    DatumRows,
    ForwardBackwardOp,
    LoadStateOp,
    OptimStepOp,
    PassGroup,
    SaveStateOp,
    Step,
)

BASE = "bios/tiny-llama"
SPEC = AdapterSpec(rank=4, seed=1, alpha=16.0)


def make_engine(tiny_fp32) -> Engine:
    model, cfg = tiny_fp32
    return Engine(model, cfg, device="cpu", autocast_dtype=None, token_budget=4096)


def execute(engine: Engine, *steps: Step, base_model: str = BASE) -> dict:
    result = engine.execute(CyclePlan(0, base_model, list(steps)))
    return {r.request_id: r for r in result.results}


def batch(i: int) -> PassGroup:
    gen = torch.Generator().manual_seed(i)
    data = []
    for n in (9, 6):
        seq = torch.randint(0, 49152, (n + 1,), generator=gen).tolist()
        data.append(DatumRows(seq[:-1], {"target_tokens": seq[1:]}))
    return PassGroup([ForwardBackwardOp(f"fb-{i}", "run", data, "cross_entropy", {})])


def train(engine: Engine, steps: range) -> None:
    for i in steps:
        hp = {"learning_rate": 1e-2, "weight_decay": 0.1}
        results = execute(engine, batch(i), OptimStepOp(f"step-{i}", "run", hp))
        assert all(r.ok for r in results.values()), results


def weights(engine: Engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.runs["run"].adapter.parameters()]


def all_equal(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


def create(spec: AdapterSpec = SPEC) -> CreateAdapterOp:
    return CreateAdapterOp("create", "run", spec)


def save(path, what: str = "training") -> SaveStateOp:
    return SaveStateOp(f"save-{what}", "run", str(path), what, BASE)  # type: ignore[arg-type]


def load(path, optimizer: bool) -> LoadStateOp:
    return LoadStateOp("load", "run", str(path), optimizer)


# ----------------------------------------------------------------------------- resume


def test_training_checkpoint_resumes_exactly(tiny_fp32, tmp_path):
    uninterrupted = make_engine(tiny_fp32)
    execute(uninterrupted, create())
    train(uninterrupted, range(2))
    assert execute(uninterrupted, save(tmp_path / "ckpt"))["save-training"].ok
    train(uninterrupted, range(2, 4))

    resumed = make_engine(tiny_fp32)
    execute(resumed, create(AdapterSpec(rank=4, seed=99, alpha=16.0)), batch(7))  # other init
    results = execute(resumed, load(tmp_path / "ckpt", optimizer=True))
    assert results["load"].ok, results["load"].error
    assert all(p.grad is None for p in resumed.runs["run"].adapter.parameters())
    assert resumed.runs["run"].optimizer.step_count == 2
    train(resumed, range(2, 4))
    assert all_equal(weights(resumed), weights(uninterrupted))


def test_weights_only_load_starts_a_fresh_optimizer(tiny_fp32, tmp_path):
    engine = make_engine(tiny_fp32)
    execute(engine, create())
    train(engine, range(2))
    saved = weights(engine)
    execute(engine, save(tmp_path / "ckpt"))
    train(engine, range(2, 3))
    assert execute(engine, load(tmp_path / "ckpt", optimizer=False))["load"].ok
    assert all_equal(weights(engine), saved)
    optimizer = engine.runs["run"].optimizer
    assert optimizer.step_count == 0
    assert all(not m.any() for m in optimizer.exp_avg + optimizer.exp_avg_sq)

    # The same as a new run that starts from those weights.
    fresh = make_engine(tiny_fp32)
    execute(fresh, create())
    with torch.no_grad():
        for p, w in zip(fresh.runs["run"].adapter.parameters(), saved, strict=True):
            p.copy_(w)
    train(engine, range(5, 6))
    train(fresh, range(5, 6))
    assert all_equal(weights(engine), weights(fresh))


def test_training_checkpoint_layout(tiny_fp32, tmp_path):
    engine = make_engine(tiny_fp32)
    execute(engine, create())
    train(engine, range(1))
    path = execute(engine, save(tmp_path / "ckpt"))["save-training"].result["path"]
    assert sorted(os.listdir(path)) == [
        "adapter_config.json", "adapter_model.safetensors", "bios_state.json",
        "optimizer.safetensors",
    ]  # fmt: skip
    state = json.loads((tmp_path / "ckpt" / "bios_state.json").read_text())
    assert state["base_model"] == BASE and state["optimizer_step"] == 1
    assert state["spec"] == {
        "rank": 4, "seed": 1, "alpha": 16.0, "train_attn": True, "train_mlp": True,
        "train_unembed": True,
    }  # fmt: skip
    ckpt = checkpoints.read_checkpoint(path, base_model=BASE, with_optimizer=True)
    assert ckpt.kind == "training" and ckpt.spec == SPEC and ckpt.optimizer_step == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


# ----------------------------------------------------------------------------- errors


def test_loads_that_do_not_fit_fail_as_user_errors(tiny_fp32, tmp_path):
    engine = make_engine(tiny_fp32)
    execute(engine, create())
    train(engine, range(1))
    execute(engine, save(tmp_path / "train"), save(tmp_path / "sampler", "sampler"))
    before = weights(engine)

    other = make_engine(tiny_fp32)
    execute(other, CreateAdapterOp("c", "run", AdapterSpec(rank=8, seed=1, alpha=16.0)))
    cases = {
        "rank": (other, load(tmp_path / "train", optimizer=True), BASE),
        "base": (engine, load(tmp_path / "train", optimizer=True), "other/model"),
        "missing": (engine, load(tmp_path / "nope", optimizer=False), BASE),
        "sampler+optimizer": (engine, load(tmp_path / "sampler", optimizer=True), BASE),
    }
    errors = {}
    for name, (eng, op, base) in cases.items():
        result = execute(eng, op, base_model=base)["load"]
        assert not result.ok and result.category == "user", name
        errors[name] = result.error
    assert "has shape (4, 256), this run expects (8, 256)" in errors["rank"]
    assert "trained on base model 'bios/tiny-llama', not 'other/model'" in errors["base"]
    assert "does not exist" in errors["missing"]
    assert "no optimizer state" in errors["sampler+optimizer"]
    assert all_equal(weights(engine), before)
    # A sampler export loads as weights only.
    assert execute(engine, load(tmp_path / "sampler", optimizer=False))["load"].ok
    assert all_equal(weights(engine), before)


# ----------------------------------------------------------------------------- atomicity


def test_a_failed_write_leaves_nothing_or_the_old_checkpoint(tmp_path):
    good = {"w": torch.ones(2)}
    config = {"peft_type": "LORA", "base_model_name_or_path": BASE, "r": 1, "lora_alpha": 1}
    kwargs = dict(spec=SPEC, adapter_state=good, adapter_config=config, optimizer_step=0)
    target = tmp_path / "ckpt"
    bad_optimizer = {"step": "not a tensor"}  # fails after the adapter files are written
    with pytest.raises(AttributeError):
        checkpoints.write_training_state(target, optimizer_state=bad_optimizer, **kwargs)
    assert list(tmp_path.iterdir()) == []

    checkpoints.write_sampler_weights(target, adapter_state=good, adapter_config=config)
    with pytest.raises(AttributeError):
        checkpoints.write_training_state(target, optimizer_state=bad_optimizer, **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]

    # Overwriting replaces the whole directory.
    checkpoints.write_training_state(target, optimizer_state={"step": torch.tensor(0)}, **kwargs)
    checkpoints.write_sampler_weights(target, adapter_state=good, adapter_config=config)
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ----------------------------------------------------------------------------- PEFT export


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT: merge only
def test_sampler_export_loads_in_peft_with_the_same_logits(tiny_fp32, tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    engine = make_engine(tiny_fp32)
    execute(engine, create())
    train(engine, range(2))  # B != 0 everywhere, so every LoRA term shows in the logits
    results = execute(engine, save(tmp_path / "export", "sampler"))
    export = tmp_path / "export"
    assert results["save-sampler"].ok
    assert sorted(os.listdir(export)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 16, BASE)
    assert (config["bias"], config["lora_dropout"]) == ("none", 0.0)
    assert set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"
    }  # fmt: skip

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, str(export)).eval()
    ids = torch.tensor([[5, 17, 300, 4096, 12, 7, 49151, 1]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits  # [1, T, V]
        adapter = engine.runs["run"].adapter
        lora = LoRABatch.build([adapter], [1], ids.shape[1])
        model = engine.model
        ours = model.unembed(model(ids, lora=lora), lora=lora)
        base = model.unembed(model(ids))
    assert (ours - base).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
