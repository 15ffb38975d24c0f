"""forward_backward_custom (Tinker §4.3). The only SDK test file that imports torch."""

from __future__ import annotations

import numpy as np
import pytest
from fake_server import FakeBios, make_datum

import bios
from bios import types
from bios.training_client import custom_loss_weights, merge_custom_metrics

torch = pytest.importorskip("torch")


def forward_output(*logprobs: list[float]) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(loss_fn_outputs=[
        {"logprobs": types.TensorData(data=lp, dtype="float32", shape=[len(lp)])}
        for lp in logprobs])


def test_weights_are_minus_the_gradient_of_the_custom_loss() -> None:
    data = [make_datum(3), make_datum(2)]
    fwd = forward_output([-1.0, -2.0, -0.5], [-0.25, -3.0])

    def loss_fn(data, logprobs):
        loss = sum((lp ** 2).sum() for lp in logprobs)
        return loss, {"custom:mean": 1.5}

    backward_data, metrics = custom_loss_weights(data, fwd, loss_fn)
    assert np.allclose(backward_data[0].loss_fn_inputs["weights"].to_numpy(), [2.0, 4.0, 1.0])
    assert np.allclose(backward_data[1].loss_fn_inputs["weights"].to_numpy(), [0.5, 6.0])
    assert backward_data[0].loss_fn_inputs["target_tokens"] == data[0].loss_fn_inputs[
        "target_tokens"]
    assert metrics == {"custom:mean": 1.5, "loss:sum": pytest.approx(1 + 4 + 0.25 + 0.0625 + 9)}


def test_cross_entropy_written_as_a_custom_loss_gives_back_its_weights() -> None:
    w = [1.0, 0.0, 0.5]
    data = [make_datum(3, weights=w)]

    def loss_fn(data, logprobs):
        weights = torch.tensor(data[0].loss_fn_inputs["weights"].data)
        return -(logprobs[0] * weights).sum(), {}

    backward_data, _ = custom_loss_weights(data, forward_output([-1.0, -1.0, -1.0]), loss_fn)
    assert np.allclose(backward_data[0].loss_fn_inputs["weights"].to_numpy(), w)


def test_a_loss_that_ignores_the_logprobs_is_rejected() -> None:
    with pytest.raises(ValueError, match="scalar torch tensor"):
        custom_loss_weights([make_datum(2)], forward_output([-1.0, -1.0]),
                            lambda d, lp: (torch.tensor(1.0), {}))


def test_merged_metrics_report_the_custom_loss() -> None:
    out = types.ForwardBackwardOutput(metrics={"loss:sum": 9.0, "loss:mean": 3.0, "tokens": 3})
    merged = merge_custom_metrics(out, {"loss:sum": 0.7, "dpo:acc": 1.0})
    assert merged.metrics == {"tokens": 3, "loss:sum": 0.7, "dpo:acc": 1.0}
    assert merged.loss == 0.7


def test_forward_backward_custom_runs_forward_then_a_weighted_backward(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    def loss_fn(data, logprobs):
        return -2.0 * sum(lp.sum() for lp in logprobs), {"n": float(len(logprobs))}

    result = training_client.forward_backward_custom(
        [make_datum(3, advantages=[1.0, 1.0, 1.0])], loss_fn).result(timeout=5)
    (p1, fwd), (p2, bwd) = fake.submits[-2:]
    assert (p1, fwd["seq_id"], p2, bwd["seq_id"]) == ("/forward", 1, "/forward_backward", 2)
    assert set(fwd["forward_input"]["data"][0]["loss_fn_inputs"]) == {"target_tokens"}
    sent = bwd["forward_backward_input"]
    assert sent["loss_fn"] == "cross_entropy"
    assert sent["data"][0]["loss_fn_inputs"]["weights"]["data"] == [2.0, 2.0, 2.0]
    assert result.metrics["n"] == 1.0
    assert result.loss == pytest.approx(3.0)  # -2 * (3 * -0.5)


async def test_forward_backward_custom_async_is_a_double_await(
        training_client: bios.TrainingClient) -> None:
    fut = await training_client.forward_backward_custom_async(
        [make_datum(2)], lambda d, lps: ((lps[0] ** 2).sum(), {}))
    assert isinstance(fut, bios.APIFuture)
    assert (await fut).loss == pytest.approx(0.5)
