"""`ServiceClient`: the entry point. It holds the connection settings and the session, and makes
training, sampling and REST clients.

Every operation is written once, as a coroutine run on the SDK loop (`bios._loop`); the sync
method returns `APIFuture.result()` of it and the `_async` twin awaits the same future. The
client's session is created lazily (on the first client creation), never in the constructor.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import pydantic

from bios import types
from bios._loop import get_loop
from bios.futures import APIFuture
from bios.rest_client import RestClient, check_checkpoint_path
from bios.sampling_client import SamplingClient
from bios.training_client import TrainingClient, Turns
from bios.transport import RetryPolicy, Transport, parse_result

if TYPE_CHECKING:
    from bios.tokenizer import Tokenizer

log = logging.getLogger("bios")

M = TypeVar("M", bound=pydantic.BaseModel)
T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0


def _sdk_version() -> str:
    from bios import __version__

    return __version__


class ServiceClient:
    """Connection to a Bios server: makes training, sampling and REST clients.

    The constructor does no I/O. A session is created on the server when the first training or
    sampling client is made.

    Args:
        base_url: the server, e.g. "http://127.0.0.1:8000". Defaults to `$BIOS_BASE_URL`, else
            "http://127.0.0.1:8000".
        api_key: sent as `X-API-Key`. Defaults to `$BIOS_API_KEY` (none if unset).
        timeout: seconds for one HTTP call (long-polls for results use at least 60 s).
        max_retries: retries of one HTTP call on connection errors, 408, 429 and 5xx (with
            exponential backoff and jitter, at most ~5 minutes in all). Other 4xx never retry.
        http_transport: an httpx async transport to send requests through (proxies, tests).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, max_retries: int = RetryPolicy.max_retries,
                 http_transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url or os.environ.get("BIOS_BASE_URL") or DEFAULT_BASE_URL
        key = api_key if api_key is not None else os.environ.get("BIOS_API_KEY")
        self._transport = Transport(self.base_url, key or None, timeout=timeout,
                                    policy=RetryPolicy(max_retries=max_retries),
                                    http_transport=http_transport,
                                    user_agent=f"bios-python/{_sdk_version()}")
        self._counter_lock = threading.Lock()
        self._model_seq = 0  # session-scoped ids of training runs made by this client
        self._sampling_seq = 0  # ... of sampling sessions (incl. ephemeral snapshots)
        self._session_id: str | None = None
        self._session_task: asyncio.Future[str] | None = None  # only touched on the SDK loop
        self._tokenizers: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"ServiceClient(base_url={self.base_url!r})"

    # ------------------------------------------------------------------ shared machinery

    def _next_model_seq(self) -> int:
        with self._counter_lock:
            seq = self._model_seq
            self._model_seq += 1
            return seq

    def _next_sampling_seq(self) -> int:
        with self._counter_lock:
            seq = self._sampling_seq
            self._sampling_seq += 1
            return seq

    @staticmethod
    def _call(coro: Coroutine[Any, Any, T]) -> APIFuture[T]:
        """Run a coroutine on the SDK loop; its APIFuture is returned at once."""
        return APIFuture._run(coro)

    def _start_op(self, path: str, body: bytes, result_type: type[M],
                  turn: tuple[Turns, int] | None = None,
                  slot: tuple[str, int] | None = None) -> APIFuture[M]:
        """Submit a request whose result arrives through a server-side future.

        Returns at once. The APIFuture's submission completes once the server has accepted the
        request (after `turn`, if given, lets it go: per-run order), its result once polling
        returns the result. `slot` (model_id, seq_id) is sent in headers, so the server can
        fill the run's slot even when it rejects the body unread (413, bad JSON).
        """
        submitted: concurrent.futures.Future[str] = concurrent.futures.Future()
        fut = APIFuture._run(self._run_op(path, body, result_type, submitted, turn, slot),
                             submitted)
        get_loop().track_submission(submitted)
        return fut

    async def _run_op(self, path: str, body: bytes, result_type: type[M],
                      submitted: concurrent.futures.Future[str],
                      turn: tuple[Turns, int] | None, slot: tuple[str, int] | None) -> M:
        try:
            try:
                if turn is not None:
                    await turn[0].wait(turn[1])
                headers = None
                told: set[int] = set()
                if slot is not None:
                    headers = {types.SLOT_RUN_HEADER: slot[0], types.SLOT_SEQ_HEADER: str(slot[1])}
                    if turn is not None and turn[0].abandoned:
                        told = set(sorted(turn[0].abandoned)[:types.MAX_ABANDONED_SEQS])
                        headers[types.ABANDONED_SEQS_HEADER] = ",".join(map(str, sorted(told)))
                try:
                    accepted = await self._transport.submit(path, body, headers)
                except BaseException:
                    if turn is not None:
                        turn[0].abandoned.add(turn[1])
                    raise
                if turn is not None:
                    turn[0].abandoned -= told
            finally:
                if turn is not None:
                    turn[0].release(turn[1])
        except BaseException as e:
            submitted.set_exception(e)
            raise
        submitted.set_result(accepted.request_id)
        result = await self._transport.wait_result(accepted.request_id)
        return parse_result(result_type, result, path)

    async def _query(self, method: str, path: str, result_type: type[M], *,
                     json_body: Any = None, params: dict[str, Any] | None = None) -> M:
        """A synchronous server call (no server-side future)."""
        reply = await self._transport.request(method, path, json_body=json_body, params=params)
        return parse_result(result_type, reply, path)

    async def _session(self) -> str:
        """This client's session id, created on first need (once, even if raced)."""
        if self._session_id is not None:
            return self._session_id
        if self._session_task is None:
            self._session_task = asyncio.ensure_future(self._create_session())
        task = self._session_task
        try:
            return await asyncio.shield(task)
        except Exception:
            if self._session_task is task:
                self._session_task = None  # let the next call try again
            raise

    async def _create_session(self) -> str:
        body = types.CreateSessionRequest(sdk_version=_sdk_version())
        reply = await self._query("POST", "/create_session", types.CreateSessionResponse,
                                  json_body=body.model_dump(mode="json", exclude_none=True))
        for level, msg in ((logging.INFO, reply.info_message),
                           (logging.WARNING, reply.warning_message),
                           (logging.ERROR, reply.error_message)):
            if msg:
                log.log(level, "bios server: %s", msg)
        self._session_id = reply.session_id
        return reply.session_id

    async def _new_training_client(self, base_model: str, lora_config: types.LoraConfig,
                                   user_metadata: dict[str, str] | None,
                                   model_seq_id: int) -> TrainingClient:
        session_id = await self._session()
        body = types.CreateModelRequest(session_id=session_id, model_seq_id=model_seq_id,
                                        base_model=base_model, lora_config=lora_config,
                                        user_metadata=user_metadata)
        accepted = await self._transport.submit(
            "/create_model", body.model_dump_json(exclude_none=True).encode())
        reply = parse_result(types.CreateModelResponse,
                             await self._transport.wait_result(accepted.request_id),
                             "/create_model")
        return TrainingClient(self, reply.model_id, base_model, lora_config)

    async def _training_client_from_state(self, path: str, user_metadata: dict[str, str] | None,
                                          optimizer: bool, model_seq_id: int) -> TrainingClient:
        info = await self._query("POST", "/weights_info", types.WeightsInfoResponse,
                                 json_body={"tinker_path": path})
        config = types.LoraConfig(
            rank=info.lora_rank if info.lora_rank is not None else 32,
            train_mlp=info.train_mlp if info.train_mlp is not None else True,
            train_attn=info.train_attn if info.train_attn is not None else True,
            train_unembed=info.train_unembed if info.train_unembed is not None else True)
        client = await self._new_training_client(info.base_model, config, user_metadata,
                                                 model_seq_id)
        load = client.load_state_with_optimizer if optimizer else client.load_state
        await load(path)
        return client

    async def _new_sampling_client(self, model_path: str | None, base_model: str | None,
                                   seq: int) -> SamplingClient:
        session_id = await self._session()
        body = types.CreateSamplingSessionRequest(session_id=session_id,
                                                  sampling_session_seq_id=seq,
                                                  base_model=base_model, model_path=model_path)
        reply = await self._query("POST", "/create_sampling_session",
                                  types.CreateSamplingSessionResponse,
                                  json_body=body.model_dump(mode="json", exclude_none=True))
        return SamplingClient(self, reply.sampling_session_id, base_model=base_model,
                              model_path=model_path)

    async def _tokenizer(self, base_model: str) -> Tokenizer:
        """The tokenizer of `base_model`, fetched from the server once per client."""
        if base_model not in self._tokenizers:
            from bios.tokenizer import load_tokenizer_files

            reply = await self._transport.request("GET", "/tokenizer",
                                                  params={"base_model": base_model})
            files = reply.get("files") if isinstance(reply, dict) else None
            if not isinstance(files, dict) or not files:
                raise ValueError(f"the server sent no tokenizer files for {base_model!r}")
            self._tokenizers[base_model] = await asyncio.to_thread(
                load_tokenizer_files, base_model, files)
        return self._tokenizers[base_model]

    # ------------------------------------------------------------------ public API

    def _create_lora(self, base_model: str, rank: int, seed: int | None, train_mlp: bool,
                     train_attn: bool, train_unembed: bool,
                     user_metadata: dict[str, str] | None) -> APIFuture[TrainingClient]:
        if not (train_mlp or train_attn or train_unembed):
            raise ValueError("at least one of train_mlp, train_attn, train_unembed must be True")
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        config = types.LoraConfig(rank=rank, seed=seed, train_mlp=train_mlp,
                                  train_attn=train_attn, train_unembed=train_unembed)
        return self._call(self._new_training_client(base_model, config, user_metadata,
                                                    self._next_model_seq()))

    def _from_state(self, path: str, user_metadata: dict[str, str] | None,
                    optimizer: bool) -> APIFuture[TrainingClient]:
        check_checkpoint_path(path)
        return self._call(self._training_client_from_state(path, user_metadata, optimizer,
                                                           self._next_model_seq()))

    def _create_sampler(self, model_path: str | None,
                        base_model: str | None) -> APIFuture[SamplingClient]:
        if (model_path is None) == (base_model is None):
            raise ValueError("create_sampling_client needs exactly one of model_path "
                             "(a bios://<run>/... checkpoint) or base_model")
        if model_path is not None:
            check_checkpoint_path(model_path)
        return self._call(self._new_sampling_client(model_path, base_model,
                                                    self._next_sampling_seq()))

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        """List the base models the server serves.

        Returns:
            GetServerCapabilitiesResponse with `supported_models` (name, context length,
            aliases).
        """
        return self._call(self._query("GET", "/get_server_capabilities",
                                      types.GetServerCapabilitiesResponse)).result()

    async def get_server_capabilities_async(self) -> types.GetServerCapabilitiesResponse:
        """Async version of get_server_capabilities."""
        return await self._call(self._query("GET", "/get_server_capabilities",
                                            types.GetServerCapabilitiesResponse))

    def create_lora_training_client(self, base_model: str, rank: int = 32,
                                    seed: int | None = None, train_mlp: bool = True,
                                    train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None
                                    ) -> TrainingClient:
        """Create a new LoRA training run and return its client (blocks until it exists).

        Args:
            base_model: a served model name or alias (see get_server_capabilities).
            rank: LoRA rank.
            seed: seed of the adapter's initialization (random if None).
            train_mlp, train_attn, train_unembed: which layers get adapters (at least one).
            user_metadata: free-form string pairs stored with the run.

        Returns:
            A TrainingClient for the new run.
        """
        return self._create_lora(base_model, rank, seed, train_mlp, train_attn, train_unembed,
                                 user_metadata).result()

    async def create_lora_training_client_async(self, base_model: str, rank: int = 32,
                                                seed: int | None = None, train_mlp: bool = True,
                                                train_attn: bool = True,
                                                train_unembed: bool = True,
                                                user_metadata: dict[str, str] | None = None
                                                ) -> TrainingClient:
        """Async version of create_lora_training_client (one await returns the client)."""
        return await self._create_lora(base_model, rank, seed, train_mlp, train_attn,
                                       train_unembed, user_metadata)

    def create_training_client_from_state(self, path: str,
                                          user_metadata: dict[str, str] | None = None
                                          ) -> TrainingClient:
        """Start a new run from a checkpoint's weights, with a fresh optimizer (blocks).

        Args:
            path: a training checkpoint, "bios://<run_id>/weights/<name>".
            user_metadata: free-form string pairs stored with the new run.

        Returns:
            A TrainingClient shaped like the checkpoint (base model, rank, trained layers)
            whose weights are loaded.
        """
        return self._from_state(path, user_metadata, optimizer=False).result()

    async def create_training_client_from_state_async(self, path: str,
                                                      user_metadata: dict[str, str] | None = None
                                                      ) -> TrainingClient:
        """Async version of create_training_client_from_state."""
        return await self._from_state(path, user_metadata, optimizer=False)

    def create_training_client_from_state_with_optimizer(
            self, path: str, user_metadata: dict[str, str] | None = None) -> TrainingClient:
        """Like create_training_client_from_state, but also restores the Adam state (blocks).

        Args:
            path: a training checkpoint, "bios://<run_id>/weights/<name>".
            user_metadata: free-form string pairs stored with the new run.

        Returns:
            A TrainingClient with the checkpoint's weights and optimizer state loaded.
        """
        return self._from_state(path, user_metadata, optimizer=True).result()

    async def create_training_client_from_state_with_optimizer_async(
            self, path: str, user_metadata: dict[str, str] | None = None) -> TrainingClient:
        """Async version of create_training_client_from_state_with_optimizer."""
        return await self._from_state(path, user_metadata, optimizer=True)

    def create_sampling_client(self, model_path: str | None = None,
                               base_model: str | None = None) -> SamplingClient:
        """Create a sampler for saved weights or for a base model (blocks).

        Args:
            model_path: sampler or training weights, "bios://<run_id>/sampler_weights/<name>"
                or "bios://<run_id>/weights/<name>".
            base_model: a served base model (no adapter). Give exactly one of the two.

        Returns:
            A SamplingClient.

        Raises:
            ValueError: neither (or both) of model_path and base_model given.
        """
        return self._create_sampler(model_path, base_model).result()

    async def create_sampling_client_async(self, model_path: str | None = None,
                                           base_model: str | None = None) -> SamplingClient:
        """Async version of create_sampling_client."""
        return await self._create_sampler(model_path, base_model)

    def create_rest_client(self) -> RestClient:
        """A client for runs, checkpoints and samplers (no I/O; needs no session).

        Returns:
            A RestClient using this client's connection settings.
        """
        return RestClient(self)

    async def create_rest_client_async(self) -> RestClient:
        """Async version of create_rest_client."""
        return self.create_rest_client()
