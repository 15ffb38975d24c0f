"""`SamplingClient`: generate from fixed weights (a checkpoint, a snapshot or a base model).

Each request carries the sampler's next `seq_id` (per sampler, increasing), so a retried request
is deduplicated by the server. Samples are independent: they are submitted concurrently.
Made by `ServiceClient` or `TrainingClient`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from urllib.parse import quote

from bios import types
from bios.exceptions import APIResponseValidationError
from bios.futures import APIFuture

if TYPE_CHECKING:
    from bios.service_client import ServiceClient
    from bios.tokenizer import Tokenizer


class SamplingClient:
    """Client of one sampler: weights that do not change while you sample from them.

    `sample` returns an `APIFuture` at once; `sample_async` returns it after the server has
    accepted the request (double await: `fut = await sc.sample_async(...)`, `await fut`).

    Attributes:
        sampling_session_id: the sampler's id on the server.
    """

    def __init__(self, service: ServiceClient, sampling_session_id: str,
                 base_model: str | None = None, model_path: str | None = None) -> None:
        self._service = service
        self.sampling_session_id = sampling_session_id
        self.model_path = model_path
        self._base_model = base_model
        self._seq_lock = threading.Lock()
        self._last_seq = 0

    def __repr__(self) -> str:
        return f"SamplingClient(sampling_session_id={self.sampling_session_id!r})"

    def _sample(self, prompt: types.ModelInput, num_samples: int,
                sampling_params: types.SamplingParams | None, include_prompt_logprobs: bool,
                topk_prompt_logprobs: int) -> APIFuture[types.SampleResponse]:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        request = types.SampleRequest(
            sampling_session_id=self.sampling_session_id, seq_id=0, num_samples=num_samples,
            prompt=prompt, sampling_params=sampling_params or types.SamplingParams(),
            prompt_logprobs=include_prompt_logprobs, topk_prompt_logprobs=topk_prompt_logprobs)
        with self._seq_lock:
            self._last_seq += 1
            seq = self._last_seq
        body = request.model_copy(update={"seq_id": seq}).model_dump_json(
            exclude_none=True).encode()
        return self._service._start_op("/asample", body, types.SampleResponse)

    def _logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        return self._sample(prompt, 1, types.SamplingParams(max_tokens=1), True, 0)._then(
            _prompt_logprobs)

    async def _get_base_model(self) -> str:
        if self._base_model is None:
            reply = await self._service._query(
                "GET", f"/samplers/{quote(self.sampling_session_id, safe=':')}",
                types.GetSamplerResponse)
            self._base_model = reply.base_model
        return self._base_model

    async def _get_tokenizer(self) -> Tokenizer:
        return await self._service._tokenizer(await self._get_base_model())

    def sample(self, prompt: types.ModelInput, num_samples: int = 1,
               sampling_params: types.SamplingParams | None = None,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0
               ) -> APIFuture[types.SampleResponse]:
        """Generate completions of `prompt`.

        Args:
            prompt: the prompt tokens (`types.ModelInput.from_ints(...)`).
            num_samples: how many completions.
            sampling_params: max_tokens, temperature, top_k, top_p, stop, seed
                (None: `SamplingParams()` defaults).
            include_prompt_logprobs: also return the logprob of each prompt token.
            topk_prompt_logprobs: also return the top-k alternatives at each prompt position.

        Returns:
            APIFuture of SampleResponse (`sequences[i].tokens`, `.logprobs`, `.stop_reason`).
        """
        return self._sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                            topk_prompt_logprobs)

    async def sample_async(self, prompt: types.ModelInput, num_samples: int = 1,
                           sampling_params: types.SamplingParams | None = None,
                           include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0
                           ) -> APIFuture[types.SampleResponse]:
        """Async version of sample: returns the APIFuture once the server accepted the request."""
        return await self._sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                  topk_prompt_logprobs)._submitted()

    def compute_logprobs(self, prompt: types.ModelInput) -> APIFuture[list[float | None]]:
        """The logprob of each prompt token given the tokens before it.

        Args:
            prompt: the tokens to score.

        Returns:
            APIFuture of a list with one entry per token; the first is None (nothing precedes
            it).
        """
        return self._logprobs(prompt)

    async def compute_logprobs_async(self, prompt: types.ModelInput
                                     ) -> APIFuture[list[float | None]]:
        """Async version of compute_logprobs (double await)."""
        return await self._logprobs(prompt)._submitted()

    def get_base_model(self) -> str:
        """The base model this sampler runs on.

        Returns:
            The model name.
        """
        return self._service._call(self._get_base_model()).result()

    async def get_base_model_async(self) -> str:
        """Async version of get_base_model."""
        return await self._service._call(self._get_base_model())

    def get_tokenizer(self) -> Tokenizer:
        """The base model's tokenizer, fetched from the server (never from a model hub).

        Returns:
            A transformers tokenizer if transformers is installed, else a small
            `bios.tokenizer.Tokenizer` with encode/decode.
        """
        return self._service._call(self._get_tokenizer()).result()

    async def get_tokenizer_async(self) -> Tokenizer:
        """Async version of get_tokenizer."""
        return await self._service._call(self._get_tokenizer())


def _prompt_logprobs(reply: types.SampleResponse) -> list[float | None]:
    if reply.prompt_logprobs is None:
        raise APIResponseValidationError("the server returned no prompt_logprobs")
    return list(reply.prompt_logprobs)
