"""Drive a Bios server with Tinker's official SDK, as a user's script would.

Run by tests/tinker_sdk/test_official_sdk.py with the interpreter of one SDK version's virtual
environment (so this file imports `tinker`, never `bios`). Only the base URL and a `tml-` key
differ from code written for Tinker: both come from $TINKER_BASE_URL / $TINKER_API_KEY, the
variables the SDK itself reads. Each step prints one JSON line
`{"step": ..., "ok": true|false, ...}` so the test can report every failure at once; a step
that fails does not stop the later ones that do not depend on it.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import tinker
from tinker import types

BASE_MODEL = os.environ["BIOS_BASE_MODEL"]
VERSION = tuple(int(p) for p in tinker.__version__.split(".")[:2])
results: dict[str, Any] = {}


def step(name: str, fn: Callable[[], Any]) -> Any:
    """Run one step; print its outcome as a JSON line; return its value (None on failure)."""
    try:
        value = fn()
    except BaseException as e:  # report and go on: the test names every failing step
        print(json.dumps({"step": name, "ok": False,
                          "error": f"{type(e).__name__}: {e}"[:2000],
                          "trace": traceback.format_exc()[-3000:]}), flush=True)
        return None
    info = value if isinstance(value, dict) else {}
    print(json.dumps({"step": name, "ok": True, **info}, default=str), flush=True)
    return value


def result(future: Any) -> Any:
    """The value of an SDK future (0.25's and 0.38's both have .result())."""
    return future.result(timeout=60) if hasattr(future, "result") else future


# A sequence the tiny model can learn: tokens 10..41, as next-token prediction.
SEQ = list(range(10, 42))


def datum(weights: bool = True) -> types.Datum:
    inputs: dict[str, Any] = {"target_tokens": np.array(SEQ[1:], dtype=np.int64)}
    if weights:
        inputs["weights"] = np.ones(len(SEQ) - 1, dtype=np.float32)
    return types.Datum(model_input=types.ModelInput.from_ints(SEQ[:-1]),
                       loss_fn_inputs=inputs)


def main() -> None:
    kwargs: dict[str, Any] = {"user_metadata": {"purpose": "bios-compat"}}
    if VERSION >= (0, 38):
        kwargs["display_name"] = "bios compatibility test"
    service = tinker.ServiceClient(**kwargs)

    def capabilities() -> dict:
        caps = service.get_server_capabilities()
        names = [m.model_name for m in caps.supported_models]
        assert BASE_MODEL in names, names
        return {"models": names}

    step("capabilities", capabilities)

    tc = step("create_lora_training_client", lambda: service.create_lora_training_client(
        base_model=BASE_MODEL, rank=8, seed=0))
    if tc is None:
        return

    def forward() -> dict:
        out = result(tc.forward([datum(), datum()], "cross_entropy"))
        lp = out.loss_fn_outputs[0]["logprobs"]
        assert len(out.loss_fn_outputs) == 2, out
        assert len(lp.tolist()) == len(SEQ) - 1, lp
        return {"loss_sum": out.metrics["loss:sum"]}

    step("forward", forward)

    def train() -> dict:
        losses = []
        for _ in range(4):
            fb = tc.forward_backward([datum(), datum()], "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=5e-3))
            out = result(fb)
            result(opt)
            losses.append(out.metrics["loss:sum"])
        assert losses[-1] < losses[0], losses
        return {"losses": losses}

    step("train", train)

    def rl_loss() -> dict:
        n = len(SEQ) - 1
        d = types.Datum(model_input=types.ModelInput.from_ints(SEQ[:-1]), loss_fn_inputs={
            "target_tokens": np.array(SEQ[1:], dtype=np.int64),
            "logprobs": np.full(n, -2.0, dtype=np.float32),
            "advantages": np.ones(n, dtype=np.float32)})
        out = result(tc.forward_backward([d], "ppo", loss_fn_config={"clip_low_threshold": 0.7,
                                                                      "clip_high_threshold": 1.3}))
        return {"metrics": out.metrics}

    step("forward_backward_ppo_config", rl_loss)

    def gspo() -> dict:
        n = len(SEQ) - 1
        d = types.Datum(model_input=types.ModelInput.from_ints(SEQ[:-1]), loss_fn_inputs={
            "target_tokens": np.array(SEQ[1:], dtype=np.int64),
            "logprobs": np.full(n, -2.0, dtype=np.float32),
            "advantages": np.ones(n, dtype=np.float32),
            "sequence_ratio_mask": np.ones(n, dtype=np.float32)})
        out = result(tc.forward_backward([d], "gspo"))
        return {"metrics": out.metrics}

    if VERSION >= (0, 38):  # the loss and its input key arrived in the SDK after 0.25
        step("forward_backward_gspo", gspo)

    def custom() -> dict:
        def loss_fn(data: list, logprobs: list) -> tuple:
            total = sum(-lp.sum() for lp in logprobs)
            return total, {"custom_loss": float(total)}

        out = result(tc.forward_backward_custom([datum()], loss_fn))
        return {"metrics": out.metrics}

    # Client-side in both generations: Bios does not offer custom_loss_server_side.
    step("forward_backward_custom", custom)

    def save_state() -> dict:
        kw: dict[str, Any] = {"ttl_seconds": 3600} if VERSION >= (0, 33) else {}
        if VERSION >= (0, 38):
            kw["user_metadata"] = {"stage": "test"}
        path = result(tc.save_state("ckpt-1", **kw)).path
        assert path.startswith("tinker://"), path
        results["state_path"] = path
        return {"path": path}

    step("save_state", save_state)

    def sampler_save() -> dict:
        path = result(tc.save_weights_for_sampler("sampler-1")).path
        assert path.startswith("tinker://"), path
        results["sampler_path"] = path
        return {"path": path}

    step("save_weights_for_sampler", sampler_save)

    def sample_from(client: Any, n: int = 2) -> dict:
        prompt = types.ModelInput.from_ints(SEQ[:8])
        params = types.SamplingParams(max_tokens=6, temperature=0.0, seed=1)
        res = result(client.sample(prompt=prompt, num_samples=n, sampling_params=params))
        assert len(res.sequences) == n, res
        toks = [list(s.tokens) for s in res.sequences]
        assert all(len(t) >= 1 for t in toks), toks
        ids = [getattr(s, "sequence_id", None) for s in res.sequences]
        return {"tokens": toks, "sequence_ids": ids}

    def sample_saved() -> dict:
        sc = tc.save_weights_and_get_sampling_client()
        return sample_from(sc)

    step("save_weights_and_get_sampling_client", sample_saved)

    def inflight() -> dict:
        sc = tc.save_weights_and_get_sampling_client(kind="inflight")
        first = sample_from(sc, 1)
        result(tc.forward_backward([datum()], "cross_entropy"))
        result(tc.optim_step(types.AdamParams(learning_rate=5e-3)))
        tc.save_weights_and_get_sampling_client(kind="inflight")  # the old client follows it
        return {"before": first, "after": sample_from(sc, 1)}

    if VERSION >= (0, 38):
        step("inflight_sampling_client", inflight)

    def sample_path() -> dict:
        sc = service.create_sampling_client(model_path=results["sampler_path"])
        return sample_from(sc, 1)

    if "sampler_path" in results:
        step("create_sampling_client_from_path", sample_path)

    def sample_base() -> dict:
        sc = service.create_sampling_client(base_model=BASE_MODEL)
        out = sample_from(sc, 1)
        lps = result(sc.compute_logprobs(types.ModelInput.from_ints(SEQ[:8])))
        assert len(lps) == 8 and lps[0] is None, lps
        out["logprobs"] = lps
        return out

    step("sample_base_and_compute_logprobs", sample_base)

    def from_state() -> dict:
        tc2 = service.create_training_client_from_state_with_optimizer(results["state_path"])
        out = result(tc2.forward([datum()], "cross_entropy"))
        return {"model_id": tc2.model_id if hasattr(tc2, "model_id") else None,
                "loss_sum": out.metrics["loss:sum"]}

    if "state_path" in results:
        step("create_training_client_from_state_with_optimizer", from_state)

    def load_state() -> dict:
        result(tc.load_state(results["state_path"]))
        result(tc.load_state_with_optimizer(results["state_path"]))
        out = result(tc.forward([datum()], "cross_entropy"))
        return {"loss_sum": out.metrics["loss:sum"]}

    if "state_path" in results:
        step("load_state", load_state)

    def rest() -> dict:
        rc = service.create_rest_client()
        runs = result(rc.list_training_runs())
        assert runs.training_runs, runs
        run_id = results["state_path"].removeprefix("tinker://").split("/")[0]
        run = result(rc.get_training_run(run_id))
        assert run.training_run_id == run_id, run
        cks = result(rc.list_checkpoints(run_id))
        paths = [c.tinker_path for c in cks.checkpoints]
        assert results["state_path"] in paths, paths
        result(rc.publish_checkpoint_from_tinker_path(results["state_path"]))
        result(rc.unpublish_checkpoint_from_tinker_path(results["state_path"]))
        result(rc.delete_checkpoint_from_tinker_path(results["sampler_path"]))
        left = [c.tinker_path for c in result(rc.list_checkpoints(run_id)).checkpoints]
        assert results["sampler_path"] not in left, left
        return {"runs": len(runs.training_runs), "checkpoints": paths}

    step("rest_client", rest)

    def close() -> dict:
        if VERSION >= (0, 38):
            result(service.close("success", detail="done"))
        return {}

    step("close", close)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # do not wait on the SDK's background threads
