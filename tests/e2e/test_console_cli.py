"""`bios runs`, `bios checkpoints` and `bios trace` against a real keyed server on the tiny
model: listings (table and JSON), tenants, publish/unpublish/delete, a safe download, PEFT and
merged exports that match the server's logprobs, a Perfetto trace, and errors with exit codes
and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import bios
from bios import types
from bios.cli import main
from peft_check import PEFT_ATOL, TINY_DIR, peft_logprobs
from server_process import KEY_A, KEY_B, REPO, ServerProcess

TINY = "bios/tiny-llama"
TOKENS = [1, 504, 2119, 314, 260, 1345, 282, 900, 901, 902, 903, 904]
STEPS = 4


@pytest.fixture(autouse=True)
def _env(keyed_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIOS_BASE_URL", keyed_server.base_url)
    monkeypatch.setenv("BIOS_API_KEY", KEY_A)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = cli(capsys, *argv, "-f", "json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def run(keyed_server: ServerProcess) -> dict[str, Any]:
    """Alice's run: STEPS steps, a training checkpoint and a sampler checkpoint."""
    service = bios.ServiceClient(base_url=keyed_server.base_url, api_key=KEY_A)
    tc = service.create_lora_training_client(base_model=TINY, rank=8, seed=5)
    d = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                    loss_fn_inputs={"target_tokens": TOKENS[1:]})
    for _ in range(STEPS):
        tc.forward_backward([d], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2))
    state = tc.save_state("cli-state").result(timeout=120).path
    sampler = tc.save_weights_for_sampler("cli-sampler").result(timeout=120).path
    return {"service": service, "tc": tc, "id": tc.model_id, "state": state,
            "sampler": sampler}


def server_logprobs(run: dict[str, Any], path: str) -> np.ndarray:
    """The server's logprob of each of TOKENS[1:] under the checkpoint (prompt logprobs)."""
    sampler = run["service"].create_sampling_client(model_path=path)
    out = sampler.sample(types.ModelInput.from_ints(TOKENS), 1,
                         types.SamplingParams(max_tokens=1, temperature=0.0),
                         include_prompt_logprobs=True).result(timeout=120)
    return np.array(out.prompt_logprobs[1:], dtype=np.float64)


def test_runs_list_and_info(capsys, run) -> None:
    runs = cli_json(capsys, "runs", "list")
    assert run["id"] in [r["training_run_id"] for r in runs]
    info = cli_json(capsys, "runs", "info", run["id"])
    assert info["metrics"]["steps"] == STEPS
    assert info["metrics"]["cycles_with_work"] >= 1
    assert isinstance(info["last_loss"], float)
    assert {c["tinker_path"] for c in info["checkpoints"]} == {run["state"], run["sampler"]}
    code, out, _ = cli(capsys, "runs", "info", run["id"])
    assert code == 0 and "missed cycles" in out and "cli-sampler" in out
    code, out, _ = cli(capsys, "runs", "list")
    assert code == 0 and "training runs" in out


def test_other_tenants_see_nothing(capsys, run, monkeypatch) -> None:
    monkeypatch.setenv("BIOS_API_KEY", KEY_B)
    assert run["id"] not in [r["training_run_id"] for r in cli_json(capsys, "runs", "list")]
    code, _, err = cli(capsys, "runs", "info", run["id"])
    assert code == 5 and "not found" in err
    code, _, err = cli(capsys, "checkpoints", "info", run["sampler"])
    assert code == 5


def test_checkpoints_list_info_publish(capsys, run, monkeypatch) -> None:
    listed = cli_json(capsys, "checkpoints", "list", run["id"])
    assert [c["tinker_path"] for c in listed] == [run["state"], run["sampler"]]
    everything = cli_json(capsys, "checkpoints", "list")
    assert {run["state"], run["sampler"]} <= {c["tinker_path"] for c in everything}
    info = cli_json(capsys, "checkpoints", "info", run["sampler"])
    assert info["base_model"] == TINY and info["lora_rank"] == 8 and info["public"] is False
    code, out, _ = cli(capsys, "checkpoints", "publish", run["sampler"])
    assert code == 0 and "published" in out
    code, _, err = cli(capsys, "checkpoints", "publish", run["sampler"])
    assert code == 2 and "already published" in err
    monkeypatch.setenv("BIOS_API_KEY", KEY_B)
    assert cli_json(capsys, "checkpoints", "info", run["sampler"])["base_model"] == TINY
    monkeypatch.setenv("BIOS_API_KEY", KEY_A)
    assert cli(capsys, "checkpoints", "unpublish", run["sampler"])[0] == 0
    monkeypatch.setenv("BIOS_API_KEY", KEY_B)
    assert cli(capsys, "checkpoints", "info", run["sampler"])[0] == 5


def test_download_extracts_safely(capsys, run, tmp_path) -> None:
    dest = tmp_path / "dl"
    code, out, _ = cli(capsys, "checkpoints", "download", run["state"], "-o", str(dest))
    assert code == 0, out
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in dest.iterdir()}
    code, _, err = cli(capsys, "checkpoints", "download", run["state"], "-o", str(dest))
    assert code == 2 and "not an empty directory" in err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_export_peft_and_merged_match_the_server(capsys, run, tmp_path) -> None:
    pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    ours = server_logprobs(run, run["sampler"])
    peft_dir = tmp_path / "peft"
    code, _, err = cli(capsys, "checkpoints", "export", run["sampler"], "--format", "peft",
                       "-o", str(peft_dir), "-q")
    assert code == 0, err
    assert sorted(p.name for p in peft_dir.iterdir()) == ["adapter_config.json",
                                                          "adapter_model.safetensors"]
    np.testing.assert_allclose(peft_logprobs(peft_dir, TOKENS), ours, atol=PEFT_ATOL)

    merged_dir = tmp_path / "merged"
    code, _, err = cli(capsys, "checkpoints", "export", run["sampler"], "--format", "merged",
                       "--base", str(TINY_DIR), "-o", str(merged_dir), "-q")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].float()
    merged = torch.log_softmax(logits, -1)[torch.arange(len(TOKENS) - 1),
                                           torch.tensor(TOKENS[1:])].numpy()
    np.testing.assert_allclose(merged, ours, atol=PEFT_ATOL)
    base = peft_logprobs(peft_dir, TOKENS, adapter=False)
    assert np.abs(merged - base).max() > 5 * PEFT_ATOL  # the adapter is really in there
    assert (merged_dir / "tokenizer.json").is_file()
    # the adapter trains the (tied) unembedding: it was untied, the input embeddings kept
    from safetensors.torch import load_file

    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False
    weights = load_file(str(merged_dir / "model.safetensors"))
    base_weights = load_file(str(TINY_DIR / "model.safetensors"))
    assert torch.equal(weights["model.embed_tokens.weight"].float(),
                       base_weights["model.embed_tokens.weight"].float())
    code, _, err = cli(capsys, "checkpoints", "export", run["sampler"], "--format", "merged",
                       "-o", str(tmp_path / "m2"))
    assert code == 2 and "--base" in err


def test_trace_is_a_perfetto_trace_of_the_run(capsys, run, tmp_path) -> None:
    out = tmp_path / "trace.json"
    code, _, err = cli(capsys, "trace", run["id"], "-o", str(out))
    assert code == 0, err
    trace = json.loads(out.read_text())
    events = trace["traceEvents"]
    spans = [e for e in events if e["ph"] == "b" and e["pid"] == 1 and e["tid"] == 2]
    kinds = [e["args"]["kind"] for e in spans]
    assert kinds.count("forward_backward") == STEPS and kinds.count("optim_step") == STEPS
    assert {e["cat"] for e in spans} >= {"pass", "optimizer", "save", "create"}
    ends = [e for e in events if e["ph"] == "e"]
    assert len(ends) == len([e for e in events if e["ph"] == "b"])
    metrics = cli_json(capsys, "runs", "info", run["id"])["metrics"]
    cycles = [e for e in events if e["ph"] == "X" and e["cat"] == "cycle"]
    assert len(cycles) == metrics["cycles_with_work"]
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in cycles)
    losses = [e["args"]["loss"] for e in spans if e["args"]["kind"] == "forward_backward"]
    assert all(isinstance(x, float) for x in losses)


def test_delete_asks_and_errors_are_one_line(capsys, run, monkeypatch) -> None:
    code, _, err = cli(capsys, "checkpoints", "delete", run["state"])
    assert code == 2 and "--yes" in err  # stdin is not a terminal: no silent delete
    code, _, err = cli(capsys, "checkpoints", "info", "bios://nope")
    assert code == 2 and "checkpoint paths look like" in err
    code, _, err = cli(capsys, "runs", "info", "no-such:train:0")
    assert code == 5
    monkeypatch.setenv("BIOS_API_KEY", "wrong-key")
    code, _, err = cli(capsys, "runs", "list")
    assert code == 4 and "API key" in err
    monkeypatch.setenv("BIOS_API_KEY", KEY_A)
    sc = cli(capsys, "checkpoints", "delete", run["state"], "--yes")
    assert sc[0] == 0
    assert run["state"] not in [c["tinker_path"] for c in
                                cli_json(capsys, "checkpoints", "list", run["id"])]


def test_server_down_is_exit_3_without_traceback() -> None:
    env = {**os.environ, "BIOS_BASE_URL": "http://127.0.0.1:9", "BIOS_API_KEY": KEY_A,
           "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run([sys.executable, "-m", "bios.cli", "runs", "list"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "127.0.0.1:9" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_console_files_are_open_and_data_routes_are_not(keyed_server, run) -> None:
    """The dashboard's fixed files need no key; nothing else under /console is served, and
    its data routes need a key and keep tenants apart."""
    import httpx

    base = keyed_server.base_url
    page = httpx.get(f"{base}/console", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{base}/console/static/console.js", timeout=30).status_code == 200
    for path in ("/console/static/console_api.py", "/console/static/..%2Fconsole_api.py",
                 "/console/vendor/index.html", "/console/other"):
        assert httpx.get(f"{base}{path}", timeout=30).status_code in (401, 404), path
    history = f"{base}/api/v1/training_runs/{run['id']}/history"
    assert httpx.get(f"{base}/api/v1/console/status", timeout=30).status_code == 401
    assert httpx.get(history, timeout=30).status_code == 401
    assert httpx.get(history, headers={"X-API-Key": KEY_B}, timeout=30).status_code == 404
    mine = httpx.get(history, headers={"X-API-Key": KEY_A}, timeout=30).json()
    assert [s["step"] for s in mine["steps"]] == list(range(1, STEPS + 1))
    status = httpx.get(f"{base}/api/v1/console/status", headers={"X-API-Key": KEY_B},
                       timeout=30).json()
    assert status["models"][0]["base_model"] == TINY
