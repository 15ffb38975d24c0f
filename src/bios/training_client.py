"""`TrainingClient`: one LoRA training run.

Ordering: every operation takes the run's next `seq_id` synchronously, under a lock, when it is
called (1, 2, 3, ...; the run's creation is 0), so the order of calls is the order the server
executes them in, even from several threads. On the SDK loop, `Turns` lets submissions leave in
`seq_id` order; a retry resends the same `seq_id`, which the server deduplicates.

Made by `ServiceClient`; never imports torch except inside `forward_backward_custom`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pydantic

from bios import types
from bios.futures import APIFuture
from bios.rest_client import check_checkpoint_path
from bios.sampling_client import SamplingClient

if TYPE_CHECKING:
    from bios.service_client import ServiceClient
    from bios.tokenizer import Tokenizer

M = TypeVar("M", bound=pydantic.BaseModel)

# A client-side loss: (data, per-datum target logprobs as torch tensors) -> (loss, metrics).
CustomLossFn = Callable[[list[types.Datum], list[Any]], tuple[Any, dict[str, float]]]


class Turns:
    """Lets coroutines holding sequence numbers pass one at a time, in number order.

    Used only on the SDK loop (no locking). `release(n)` must be called for every number handed
    out, also when its request failed or was cancelled, or later numbers would wait forever.
    """

    def __init__(self, first: int = 1) -> None:
        self._next = first
        self._released: set[int] = set()
        self._waiters: dict[int, asyncio.Future[None]] = {}
        # Numbers whose request could not be submitted (the error went to its future) and
        # that the server has not been told of yet: the next submission lists them in
        # ABANDONED_HEADER, so the server fills their slots and the run's order moves on.
        self.abandoned: set[int] = set()

    async def wait(self, seq: int) -> None:
        """Return once every number before `seq` has been released."""
        if seq <= self._next:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[seq] = waiter
        try:
            await waiter
        finally:
            self._waiters.pop(seq, None)

    def release(self, seq: int) -> None:
        """Mark `seq` as sent; wake the next number's waiter."""
        self._released.add(seq)
        while self._next in self._released:
            self._released.remove(self._next)
            self._next += 1
        waiter = self._waiters.get(self._next)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def make_fb_input(data: Sequence[types.Datum | dict[str, Any]], loss_fn: str,
                  loss_fn_config: dict[str, float] | None) -> types.ForwardBackwardInput:
    """Validate a forward/forward_backward input before it takes a seq_id (errors raise here)."""
    if isinstance(data, types.Datum):
        raise TypeError("data must be a list of Datum, not a single Datum")
    fb = types.ForwardBackwardInput(data=list(data), loss_fn=loss_fn,  # type: ignore[arg-type]
                                    loss_fn_config=loss_fn_config)
    if not fb.data:
        raise ValueError("data is empty: pass at least one Datum")
    required = types.LOSS_REQUIRED_INPUTS.get(fb.loss_fn, ())
    for i, datum in enumerate(fb.data):
        missing = [k for k in required if k not in datum.loss_fn_inputs]
        if missing:
            raise ValueError(f"data[{i}].loss_fn_inputs lacks {missing}, which loss_fn="
                             f"{fb.loss_fn!r} needs (it needs {list(required)})")
    return fb


def custom_loss_weights(data: list[types.Datum], forward: types.ForwardBackwardOutput,
                        loss_fn: CustomLossFn) -> tuple[list[types.Datum], dict[str, float]]:
    """Run a client-side loss on the forward pass's logprobs; linearize it for the server.

    Returns the data to send to `forward_backward(..., "cross_entropy")`: the server's loss is
    sum(-logprob * weight), so weights = -dLoss/dlogprob give the custom loss's gradient. Also
    returns the metrics to report: the user's, with "loss:sum" set to the custom loss value.
    """
    import torch

    if len(forward.loss_fn_outputs) != len(data):
        raise ValueError(f"forward returned {len(forward.loss_fn_outputs)} outputs for "
                         f"{len(data)} data")
    logprobs = []
    for out in forward.loss_fn_outputs:
        lp = torch.tensor(out["logprobs"].to_numpy(), dtype=torch.float32, requires_grad=True)
        logprobs.append(lp)
    loss, metrics = loss_fn(data, logprobs)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("the custom loss_fn must return (loss, metrics) with loss a scalar "
                         "torch tensor computed from the logprobs it was given")
    loss.backward()
    backward_data = []
    for datum, lp in zip(data, logprobs, strict=True):
        grad = lp.grad if lp.grad is not None else torch.zeros_like(lp)
        weights = (-grad).detach().numpy().astype(np.float32).reshape(-1)
        backward_data.append(types.Datum(
            model_input=datum.model_input,
            loss_fn_inputs={"target_tokens": datum.loss_fn_inputs["target_tokens"],
                            "weights": weights}))
    report = {k: float(v) for k, v in (metrics or {}).items()}
    report.setdefault("loss:sum", float(loss.detach()))
    return backward_data, report


def merge_custom_metrics(output: types.ForwardBackwardOutput,
                         metrics: dict[str, float]) -> types.ForwardBackwardOutput:
    """The backward pass's output with the custom loss's metrics replacing the server's loss."""
    merged = {k: v for k, v in output.metrics.items() if not k.startswith("loss:")}
    merged.update(metrics)
    return output.model_copy(update={"metrics": merged})


class TrainingClient:
    """Client of one LoRA training run (made by ServiceClient).

    Training operations return an `APIFuture` at once (sync) or after the server has accepted
    and ordered the request (async, first await); `future.result()` / a second await gives the
    result. Operations run on the server in the order they were called.

    Attributes:
        model_id: the run's id, "<session_id>:train:<n>".
        base_model: the base model the run trains on.
    """

    def __init__(self, service: ServiceClient, model_id: str, base_model: str,
                 lora_config: types.LoraConfig | None = None) -> None:
        self._service = service
        self.model_id = model_id
        self.base_model = base_model
        self.lora_config = lora_config
        self._seq_lock = threading.Lock()
        self._last_seq = 0  # create_model was seq 0
        self._turns = Turns(first=1)

    def __repr__(self) -> str:
        return f"TrainingClient(model_id={self.model_id!r}, base_model={self.base_model!r})"

    def _op(self, path: str, request: pydantic.BaseModel, result_type: type[M]) -> APIFuture[M]:
        """Submit one training op with the run's next seq_id; returns at once."""
        with self._seq_lock:  # seq order = call order; serialized (pydantic, fast) under it
            self._last_seq += 1
            body = request.model_copy(update={"seq_id": self._last_seq}).model_dump_json(
                exclude_none=True).encode()
            return self._service._start_op(path, body, result_type, (self._turns, self._last_seq),
                                           slot=(self.model_id, self._last_seq))

    # ------------------------------------------------------------------ futures (the one copy)

    def _forward(self, data: Sequence[types.Datum], loss_fn: str,
                 loss_fn_config: dict[str, float] | None
                 ) -> APIFuture[types.ForwardBackwardOutput]:
        fb = make_fb_input(data, loss_fn, loss_fn_config)
        return self._op("/forward", types.ForwardRequest(forward_input=fb, model_id=self.model_id,
                                                         seq_id=0),
                        types.ForwardBackwardOutput)

    def _forward_backward(self, data: Sequence[types.Datum], loss_fn: str,
                          loss_fn_config: dict[str, float] | None
                          ) -> APIFuture[types.ForwardBackwardOutput]:
        fb = make_fb_input(data, loss_fn, loss_fn_config)
        return self._op("/forward_backward",
                        types.ForwardBackwardRequest(forward_backward_input=fb,
                                                     model_id=self.model_id, seq_id=0),
                        types.ForwardBackwardOutput)

    def _custom_forward_data(self, data: Sequence[types.Datum]) -> list[types.Datum]:
        data = make_fb_input(data, "cross_entropy", None).data
        return [types.Datum(model_input=d.model_input,
                            loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items()
                                            if k in ("target_tokens", "weights")})
                for d in data]

    def _custom_backward(self, data: list[types.Datum], forward: types.ForwardBackwardOutput,
                         loss_fn: CustomLossFn) -> APIFuture[types.ForwardBackwardOutput]:
        backward_data, metrics = custom_loss_weights(data, forward, loss_fn)
        return self._forward_backward(backward_data, "cross_entropy", None)._then(
            lambda out: merge_custom_metrics(out, metrics))

    def _save_and_sample(self) -> APIFuture[SamplingClient]:
        sampling_seq = self._service._next_sampling_seq()
        request = types.SaveWeightsForSamplerRequest(model_id=self.model_id, seq_id=0,
                                                     sampling_session_seq_id=sampling_seq)
        fut = self._op("/save_weights_for_sampler", request, types.SaveWeightsForSamplerResponse)
        return fut._then(self._sampler_for_snapshot)

    def _sampler_for_snapshot(self, reply: types.SaveWeightsForSamplerResponse) -> SamplingClient:
        if reply.sampling_session_id is None:
            raise ValueError("the server did not return a sampling_session_id for the snapshot")
        return SamplingClient(self._service, reply.sampling_session_id,
                              base_model=self.base_model)

    def _info(self) -> APIFuture[types.GetInfoResponse]:
        body = types.GetInfoRequest(model_id=self.model_id).model_dump(mode="json")
        return self._service._call(self._service._query("POST", "/get_info",
                                                        types.GetInfoResponse, json_body=body))

    def _load(self, path: str, optimizer: bool) -> APIFuture[types.LoadWeightsResponse]:
        check_checkpoint_path(path)
        return self._op("/load_weights",
                        types.LoadWeightsRequest(model_id=self.model_id, path=path, seq_id=0,
                                                 optimizer=optimizer),
                        types.LoadWeightsResponse)

    # ------------------------------------------------------------------ public API

    def forward(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                loss_fn_config: dict[str, float] | None = None
                ) -> APIFuture[types.ForwardBackwardOutput]:
        """Compute the loss and per-token logprobs without gradients.

        Args:
            data: the examples (`Datum`s).
            loss_fn: "cross_entropy", "importance_sampling", "ppo", "cispo" or "dro".
            loss_fn_config: the loss's options (e.g. PPO clip thresholds).

        Returns:
            APIFuture of ForwardBackwardOutput (`loss_fn_outputs[i]["logprobs"]`, `metrics`).
        """
        return self._forward(data, loss_fn, loss_fn_config)

    async def forward_async(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                            loss_fn_config: dict[str, float] | None = None
                            ) -> APIFuture[types.ForwardBackwardOutput]:
        """Async version of forward: returns the APIFuture once the server accepted it."""
        return await self._forward(data, loss_fn, loss_fn_config)._submitted()

    def forward_backward(self, data: Sequence[types.Datum], loss_fn: types.LossFnType,
                         loss_fn_config: dict[str, float] | None = None
                         ) -> APIFuture[types.ForwardBackwardOutput]:
        """Compute the loss and accumulate its gradients (applied by the next optim_step).

        Args:
            data: the examples (`Datum`s).
            loss_fn: "cross_entropy", "importance_sampling", "ppo", "cispo" or "dro".
            loss_fn_config: the loss's options (e.g. PPO clip thresholds).

        Returns:
            APIFuture of ForwardBackwardOutput; `.loss` is the mean loss per loss token.
        """
        return self._forward_backward(data, loss_fn, loss_fn_config)

    async def forward_backward_async(self, data: Sequence[types.Datum],
                                     loss_fn: types.LossFnType,
                                     loss_fn_config: dict[str, float] | None = None
                                     ) -> APIFuture[types.ForwardBackwardOutput]:
        """Async version of forward_backward: returns the APIFuture once the server accepted
        and ordered it (double await: `fut = await ...; result = await fut`)."""
        return await self._forward_backward(data, loss_fn, loss_fn_config)._submitted()

    def forward_backward_custom(self, data: Sequence[types.Datum], loss_fn: CustomLossFn
                                ) -> APIFuture[types.ForwardBackwardOutput]:
        """Train on a loss computed on this machine from the target-token logprobs (needs torch).

        Runs `forward` (blocking), calls `loss_fn(data, logprobs)` with one leaf tensor per
        datum, backpropagates, then submits forward_backward with weights = -dLoss/dlogprobs.
        Each datum needs `loss_fn_inputs["target_tokens"]`.

        Args:
            data: the examples.
            loss_fn: `(data, logprobs_list) -> (loss_tensor, metrics_dict)`.

        Returns:
            APIFuture of the backward pass's ForwardBackwardOutput; `metrics` holds the
            loss_fn's metrics and "loss:sum" = the custom loss.
        """
        fwd_data = self._custom_forward_data(data)
        forward = self._forward(fwd_data, "cross_entropy", None).result()
        return self._custom_backward(fwd_data, forward, loss_fn)

    async def forward_backward_custom_async(self, data: Sequence[types.Datum],
                                            loss_fn: CustomLossFn
                                            ) -> APIFuture[types.ForwardBackwardOutput]:
        """Async version of forward_backward_custom (awaits the forward pass, then returns the
        backward pass's APIFuture once submitted)."""
        fwd_data = self._custom_forward_data(data)
        forward = await self._forward(fwd_data, "cross_entropy", None)
        return await self._custom_backward(fwd_data, forward, loss_fn)._submitted()

    def optim_step(self, adam_params: types.AdamParams | None = None
                   ) -> APIFuture[types.OptimStepResponse]:
        """Apply the accumulated gradients with AdamW, then zero them.

        Args:
            adam_params: learning rate, betas, eps, weight decay, grad clipping; None uses
                `AdamParams()` defaults (learning_rate=1e-4).

        Returns:
            APIFuture of OptimStepResponse.
        """
        request = types.OptimStepRequest(adam_params=adam_params or types.AdamParams(),
                                         model_id=self.model_id, seq_id=0)
        return self._op("/optim_step", request, types.OptimStepResponse)

    async def optim_step_async(self, adam_params: types.AdamParams | None = None
                               ) -> APIFuture[types.OptimStepResponse]:
        """Async version of optim_step (double await)."""
        return await self.optim_step(adam_params)._submitted()

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False
                   ) -> APIFuture[types.SaveWeightsResponse]:
        """Save weights and optimizer state as a training checkpoint.

        Args:
            name: the checkpoint's name within the run.
            ttl_seconds: delete the checkpoint after this long (None keeps it).
            overwrite: replace an existing checkpoint of the same name.

        Returns:
            APIFuture of SaveWeightsResponse; `path` is "bios://<run_id>/weights/<name>".
        """
        request = types.SaveWeightsRequest(model_id=self.model_id, path=name, seq_id=0,
                                           ttl_seconds=ttl_seconds, overwrite=overwrite)
        return self._op("/save_weights", request, types.SaveWeightsResponse)

    async def save_state_async(self, name: str, ttl_seconds: int | None = None,
                               overwrite: bool = False) -> APIFuture[types.SaveWeightsResponse]:
        """Async version of save_state (double await)."""
        return await self.save_state(name, ttl_seconds, overwrite)._submitted()

    def load_state(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load a checkpoint's weights into this run; the optimizer state is reset.

        Args:
            path: "bios://<run_id>/weights/<name>" (or sampler weights).

        Returns:
            APIFuture of LoadWeightsResponse.
        """
        return self._load(path, optimizer=False)

    async def load_state_async(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Async version of load_state (double await)."""
        return await self._load(path, optimizer=False)._submitted()

    def load_state_with_optimizer(self, path: str) -> APIFuture[types.LoadWeightsResponse]:
        """Load a training checkpoint's weights and Adam state into this run.

        Args:
            path: "bios://<run_id>/weights/<name>".

        Returns:
            APIFuture of LoadWeightsResponse.
        """
        return self._load(path, optimizer=True)

    async def load_state_with_optimizer_async(self, path: str
                                              ) -> APIFuture[types.LoadWeightsResponse]:
        """Async version of load_state_with_optimizer (double await)."""
        return await self._load(path, optimizer=True)._submitted()

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None
                                 ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Save the current weights for sampling (a persistent sampler checkpoint).

        Args:
            name: the checkpoint's name within the run.
            ttl_seconds: delete it after this long (None keeps it).

        Returns:
            APIFuture of SaveWeightsForSamplerResponse; `path` is
            "bios://<run_id>/sampler_weights/<name>" (use with create_sampling_client).
        """
        request = types.SaveWeightsForSamplerRequest(model_id=self.model_id, seq_id=0, path=name,
                                                     ttl_seconds=ttl_seconds)
        return self._op("/save_weights_for_sampler", request,
                        types.SaveWeightsForSamplerResponse)

    async def save_weights_for_sampler_async(self, name: str, ttl_seconds: int | None = None
                                             ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Async version of save_weights_for_sampler (double await)."""
        return await self.save_weights_for_sampler(name, ttl_seconds)._submitted()

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Snapshot the current weights and return a sampler bound to them (blocks).

        The snapshot is ephemeral (it lives with the session and is not listed as a
        checkpoint); later training does not change what this sampler samples from. Use
        save_weights_for_sampler for a persistent, named checkpoint.

        Args:
            name: accepted for compatibility; the snapshot is unnamed.

        Returns:
            A SamplingClient for the snapshot.
        """
        return self._save_and_sample().result()

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None
                                                         ) -> SamplingClient:
        """Async version of save_weights_and_get_sampling_client (one await)."""
        return await self._save_and_sample()

    def create_sampling_client(self, model_path: str) -> SamplingClient:
        """A sampler for saved weights (blocks); same as ServiceClient.create_sampling_client.

        Args:
            model_path: "bios://<run_id>/sampler_weights/<name>" or ".../weights/<name>".

        Returns:
            A SamplingClient.
        """
        return self._service._create_sampler(model_path, None).result()

    async def create_sampling_client_async(self, model_path: str) -> SamplingClient:
        """Async version of create_sampling_client."""
        return await self._service._create_sampler(model_path, None)

    def get_info(self) -> types.GetInfoResponse:
        """The run's model and LoRA details.

        Returns:
            GetInfoResponse (model_id, lora_rank, model_data.model_name, ...).
        """
        return self._info().result()

    async def get_info_async(self) -> types.GetInfoResponse:
        """Async version of get_info."""
        return await self._info()

    def get_tokenizer(self) -> Tokenizer:
        """The base model's tokenizer, fetched from the server (never from a model hub).

        Returns:
            A transformers tokenizer if transformers is installed, else a small
            `bios.tokenizer.Tokenizer` with encode/decode over the `tokenizers` library.
        """
        return self._service._call(self._service._tokenizer(self.base_model)).result()

    async def get_tokenizer_async(self) -> Tokenizer:
        """Async version of get_tokenizer."""
        return await self._service._call(self._service._tokenizer(self.base_model))
