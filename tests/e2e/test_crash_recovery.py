"""SIGKILL the server mid training loop, restart it on the same data dir and port: the loop
goes on by itself (the SDK retries), and the weights equal a run that never crashed."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

import bios
from bios import types
from server_process import ServerProcess, free_port

TINY = "bios/tiny-llama"
STEPS = 8
KILL_AT = 5  # the server is killed as step 6 is submitted (A's snapshot is after step 3)
ADAM = types.AdamParams(learning_rate=2e-2)
TOL = 2e-2  # bf16 / batching differences between the replay and the original passes


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:]})


def batch(step: int) -> list[types.Datum]:
    """A different batch every step, so that order and count of steps both show."""
    return [datum([5 + step, 17, 923, 40, 71 + 3 * step, 88, 1024, 3]),
            datum([9, 8, 7 + step, 6, 5, 4, 3, 2, 1])]


PROBE = [datum([11, 12, 13, 14, 15, 16, 17, 18]), datum([300, 200, 100, 50, 25, 12, 6])]


def probe(client: bios.TrainingClient) -> np.ndarray:
    out = client.forward(PROBE, "cross_entropy").result(timeout=120)
    return np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


def step(client: bios.TrainingClient, i: int, submitted: threading.Event | None = None) -> None:
    """One pipelined step: both requests submitted, then both waited for."""
    fb = client.forward_backward(batch(i), "cross_entropy")
    opt = client.optim_step(ADAM)
    if submitted is not None:
        submitted.set()
    fb.result(timeout=300)
    opt.result(timeout=300)


def test_sigkill_mid_loop_then_restart_continues_with_exact_state(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    args = ["--snapshot-steps", "3"]  # run A: snapshot + replay; run B: replay from create
    server = ServerProcess(data_dir, [TINY], extra_args=args, port=port).start()
    try:
        service = bios.ServiceClient(base_url=server.base_url)
        a = service.create_lora_training_client(base_model=TINY, rank=8, seed=5)
        b = service.create_lora_training_client(base_model=TINY, rank=8, seed=5)
        for i in range(2):  # B: two steps, no snapshot (fewer than 3 steps)
            step(b, i)

        done: list[int] = []
        saved: list[str] = []
        errors: list[BaseException] = []
        in_flight = threading.Event()

        def loop() -> None:
            try:
                for i in range(STEPS):
                    step(a, i, in_flight if i == KILL_AT else None)
                    done.append(i + 1)
                    if i == 1:
                        saved.append(a.save_state(name="step2").result(timeout=300).path)
            except BaseException as e:  # surfaced by the main thread
                errors.append(e)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        assert in_flight.wait(timeout=120), errors
        server.kill()  # SIGKILL while step 6's requests are being submitted or run
        killed_at = len(done)
        server = ServerProcess(data_dir, [TINY], extra_args=args, port=port).start()

        # A reference run with the same seed and data that never crashed, trained meanwhile.
        ref = service.create_lora_training_client(base_model=TINY, rank=8, seed=5)
        expected: dict[int, np.ndarray] = {}
        for i in range(STEPS + 1):
            step(ref, i)
            if i + 1 in (2, STEPS - 1, STEPS, STEPS + 1):
                expected[i + 1] = probe(ref)

        thread.join(timeout=300)
        assert not thread.is_alive() and not errors, errors
        assert done == list(range(1, STEPS + 1)) and killed_at < STEPS

        # Every optim_step applied exactly once: A is at step 8, not 7 or 9 (which differ).
        got = probe(a)
        for n in (STEPS - 1, STEPS + 1):
            assert np.abs(expected[n] - expected[STEPS]).max() > 2 * TOL
        np.testing.assert_allclose(got, expected[STEPS], atol=TOL)
        np.testing.assert_allclose(probe(b), expected[2], atol=TOL)  # pure replay
        # The checkpoint saved before the kill loads (with its optimizer state) after it.
        resumed = service.create_training_client_from_state_with_optimizer(saved[0])
        np.testing.assert_allclose(probe(resumed), expected[2], atol=TOL)
        # B goes on training after the restart.
        step(b, 2)

        log = server.log()
        assert f"recovered run {a.model_id}: snapshot@seq" in log
        assert f"recovered run {b.model_id}: created + replayed 4 ops" in log
    finally:
        server.stop()
