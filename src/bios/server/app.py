"""HTTP: Tinker's `/api/v1` routes over `BiosService`. Routes are thin: parse, call, return.

Submit routes are plain `def` (FastAPI runs them in its thread pool, since they do a short
SQL transaction). `retrieve_future` is async and long-polls: it parks on an asyncio.Event that
the clock thread sets when the request finishes, so no thread and no busy loop is held while a
client waits.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import pydantic
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.exc import DBAPIError

from bios import types as T
from bios.server.auth import KeyRing
from bios.server.config import ServerConfig
from bios.server.console_api import console_router
from bios.server.http_guard import ORDERED_ROUTES, RequestGuard, error_response, slot_of
from bios.server.openai_api import OpenAIRoutes
from bios.server.path_scheme import TinkerPathScheme
from bios.server.proto_bodies import ProtobufBodies
from bios.server.service import BiosService
from bios.server.tinker_routes import add_tinker_routes
from bios.server.validation import INT32_MAX, APIError
from bios.server.wire_proto import PROTOBUF, encode_result

# The SDK lists in this header the seq ids of a run whose submission it gave up on (a
# disk-full period longer than its retry window, say): the server fills those slots before
# it stores this request, so the run's order moves on.
ABANDONED_HEADER = T.ABANDONED_SEQS_HEADER
MAX_ABANDONED = T.MAX_ABANDONED_SEQS

log = logging.getLogger("bios.server")

M = TypeVar("M", bound=pydantic.BaseModel)
# Bodies above this are parsed in a worker thread, so a large one never blocks the event
# loop (healthz, long-polls) while it is parsed.
PARSE_IN_THREAD_BYTES = 256 * 1024


async def parse_body(request: Request, model: type[M]) -> M:
    """The request body validated as `model`, parsed as FastAPI would (json.loads, then
    validation) but, for a large body, in a worker thread: parsing a 50 MB batch takes
    seconds of CPU, and on the event loop it stalled /healthz and every long-poll. Errors
    are raised as RequestValidationError, the same 400 as FastAPI's own parsing gives.
    """
    raw = await request.body()
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await run_in_threadpool(_parse, raw, model)
    return _parse(raw, model)


def _parse(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        pos = getattr(e, "pos", getattr(e, "start", 0))
        why = getattr(e, "msg", None) or getattr(e, "reason", "JSON decode error")
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", pos),
                                       "msg": "JSON decode error",
                                       "ctx": {"error": why}}]) from None
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors(
                include_url=False, include_input=False)]) from None


class Waiter(asyncio.Event):
    """A long-poll's wake-up; `body` carries the finished response when the notifier had it."""

    body: str | None = None


class Waiters:
    """request id -> the long-polls waiting for it; woken from any thread."""

    def __init__(self) -> None:
        self._events: dict[str, set[Waiter]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def register(self, request_id: str) -> Waiter:
        ev = Waiter()
        self._events.setdefault(request_id, set()).add(ev)
        return ev

    def unregister(self, request_id: str, ev: Waiter) -> None:
        evs = self._events.get(request_id)
        if evs is not None:
            evs.discard(ev)
            if not evs:
                del self._events[request_id]

    def _set(self, finished: dict[str, str | None]) -> None:
        for rid, body in finished.items():
            for ev in self._events.get(rid, ()):
                ev.body = body
                ev.set()

    def notify_threadsafe(self, finished: dict[str, str | None]) -> None:
        """Wake the long-polls of these finished requests (id -> response body, or None to
        have them read it from the store)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._set, dict(finished))


def store_error(e: DBAPIError) -> APIError:
    """The client's error for a failed database call: 507 when the disk (or database) is
    full, 503 otherwise (locked, I/O error, connection lost), each with a retryable reason."""
    text = str(e.orig if e.orig is not None else e).lower()
    pgcode = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    if "disk is full" in text or "no space left" in text or pgcode == "53100":
        return APIError(507, "the server's storage is full, so it cannot store this request; "
                        "nothing was stored. Retry later (an operator must free disk space); "
                        "reads still work.", None, "storage_full")
    return APIError(503, "the server's database is unavailable for this request "
                    f"({type(e.orig).__name__ if e.orig is not None else 'error'}); nothing "
                    "was stored. Retry later.", None, "store_unavailable")


def owner_of(request: Request) -> str:
    """The tenant of a request (usable as a FastAPI dependency).

    The auth middleware sets it for every route but healthz: the API key's tenant, or "local"
    when the server has no keys. A request that reached a route without one fails closed (401).
    """
    owner = getattr(request.state, "owner", None)
    if not owner:
        raise APIError(401, "this request is not authenticated", None, "unauthorized")
    return str(owner)


def create_app(config: ServerConfig, service: BiosService | None = None) -> FastAPI:
    """Build the FastAPI app; the service starts (models load) in the app's lifespan."""
    waiters = Waiters()
    svc = service or BiosService(config, notify=waiters.notify_threadsafe)
    openai_routes = OpenAIRoutes(svc, owner_of)

    def notify(finished: dict[str, str | None]) -> None:
        waiters.notify_threadsafe(finished)
        openai_routes.notify(finished)

    svc.notify = notify

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        waiters.loop = asyncio.get_running_loop()
        await run_in_threadpool(svc.start)
        log.info("Bios ready on http://%s:%d (models: %s; clock period: %s)", config.host,
                 config.port, ", ".join(svc.registry.names()),
                 f"{config.clock_period}s" if config.clock_period else "continuous")
        try:
            yield
        finally:
            await run_in_threadpool(svc.stop)

    app = FastAPI(title="Bios", version="0.1.0", lifespan=lifespan)
    keyring = KeyRing(tuple((str(t), str(h)) for t, h in config.api_keys))

    async def reject_body(owner: str, run_id: str | None, seq_id: int | None, kind: str,
                          err: APIError) -> None:
        await run_in_threadpool(svc.reject, owner, run_id, seq_id, kind, err)

    async def reject_slot(owner: str, run_id: str, seq_id: int, kind: str, detail: str) -> None:
        await reject_body(owner, run_id, seq_id, kind, APIError(413, detail, None, "too_large"))

    # Added first, so it runs inside RequestGuard (key and size are checked before decoding).
    app.add_middleware(ProtobufBodies, max_body_bytes=config.max_body_bytes, reject=reject_body)
    app.add_middleware(TinkerPathScheme)
    app.add_middleware(RequestGuard, keyring=keyring, max_body_bytes=config.max_body_bytes,
                       reject_slot=reject_slot,
                       body_bytes_in_flight=config.max_body_bytes_in_flight)
    app.state.service = svc

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(e.status, e.detail, e.field, e.code, headers, e.extra)

    @app.exception_handler(DBAPIError)
    async def _store_error(request: Request, e: DBAPIError) -> JSONResponse:
        """The database failed under a request: 507 when it is out of space, else 503 with
        the reason; never a bare 500. Reads keep working while writes fail."""
        err = store_error(e)
        log.warning("%s %s: %s (%s)", request.method, request.url.path, err.detail,
                    type(e.orig).__name__ if e.orig is not None else type(e).__name__)
        return error_response(err.status, err.detail, err.field, err.code, {"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            # pydantic's loc here is ("body", <character offset>): say so, name no field.
            loc = first.get("loc", ())
            why = str((first.get("ctx") or {}).get("error", "JSON decode error"))
            where = f" at character {loc[1]}" if len(loc) > 1 else ""  # else: in `why`
            err = APIError(400, f"the request body is not valid JSON: {why}{where}", None,
                           "invalid_json")
        else:
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            field = ".".join(loc) or None
            msg = first.get("msg", "invalid request")
            err = APIError(400, f"{field}: {msg}" if field else msg, field, "invalid_request")
        await _fill_rejected_slot(request, err)
        return error_response(err.status, err.detail, err.field, err.code)

    async def _fill_rejected_slot(request: Request, err: APIError) -> None:
        """A body that fails to parse or validate but names its run and seq_id (in the
        SDK's slot headers, or in the body) still takes its slot, so the run's later
        requests do not wait for it forever."""
        kind = ORDERED_ROUTES.get(request.url.path)
        try:
            owner = owner_of(request)
        except APIError:
            return
        slot = slot_of({k: request.headers.get(k, "")
                        for k in (T.SLOT_RUN_HEADER, T.SLOT_SEQ_HEADER)})
        if slot is None:
            try:
                body = await request.json()
            except Exception:
                return
            if not isinstance(body, dict):
                return
            run_id, seq_id = body.get("model_id"), body.get("seq_id")
            if not (isinstance(run_id, str) and isinstance(seq_id, int)
                    and not isinstance(seq_id, bool)):
                return
            slot = (run_id, seq_id)
        await run_in_threadpool(svc.reject, owner, slot[0], slot[1],
                                kind or request.url.path.rsplit("/", 1)[-1], err)

    def submit(kind: str, fn: Callable[[str, Any], Any]) -> Callable[[Request, Any], Any]:
        """Wrap a submit call so a rejected request still fills its seq slot."""

        def call(request: Request, body: Any) -> Any:
            owner = owner_of(request)
            abandoned = request.headers.get(ABANDONED_HEADER)
            if abandoned:
                fill_abandoned(owner, body.model_id, abandoned, kind)
            try:
                return fn(owner, body)
            except APIError as e:
                # Fill the seq slot so the run's later requests do not wait for this one,
                # except on 429: the SDK retries that same seq_id. (reject() is a no-op when
                # the run is unknown or the slot is already taken.)
                if 400 <= e.status < 500 and e.status != 429:
                    svc.reject(owner, getattr(body, "model_id", None),
                               getattr(body, "seq_id", None), kind, e)
                raise

        return call

    def fill_abandoned(owner: str, run_id: str, header: str, kind: str) -> None:
        seqs = [p.strip() for p in header.split(",")][:MAX_ABANDONED]
        for p in seqs:
            if not p.isdigit() or len(p) > 10:
                raise APIError(400, f"{ABANDONED_HEADER} must list seq ids (comma-separated "
                               f"integers), got {header[:80]!r}", ABANDONED_HEADER)
        for p in seqs:
            svc.reject(owner, run_id, int(p), kind, APIError(
                400, "the client gave up submitting this request (it raised an error there); "
                "its slot was filled so the run's later requests go on", None, "abandoned"))

    api = "/api/v1"

    @app.get(f"{api}/healthz")
    def healthz() -> dict[str, str]:
        if not svc.ready:
            raise APIError(503, "the server is still loading its models", None, "starting")
        return {"status": "ok"}

    @app.get(f"{api}/get_server_capabilities")
    def capabilities() -> T.GetServerCapabilitiesResponse:
        return svc.capabilities()

    add_tinker_routes(app, svc, owner_of)

    @app.post(f"{api}/create_session")
    def create_session(request: Request, body: T.CreateSessionRequest) -> T.CreateSessionResponse:
        return svc.create_session(owner_of(request), body)

    @app.post(f"{api}/session_heartbeat")
    def heartbeat(request: Request, body: T.SessionHeartbeatRequest) -> dict[str, str]:
        svc.heartbeat(owner_of(request), body.session_id)
        return {"type": "session_heartbeat"}

    @app.post(f"{api}/create_model")
    def create_model(request: Request, body: T.CreateModelRequest) -> T.UntypedAPIFuture:
        return svc.create_model(owner_of(request), body)

    @app.post(f"{api}/get_info")
    def get_info(request: Request, body: T.GetInfoRequest) -> T.GetInfoResponse:
        return svc.get_info(owner_of(request), body.model_id)

    fb = submit("forward_backward", svc.forward_backward)
    fwd = submit("forward", svc.forward_backward)
    opt = submit("optim_step", svc.optim_step)
    save = submit("save_weights", svc.save_weights)
    save_s = submit("save_weights_for_sampler", svc.save_weights_for_sampler)
    load = submit("load_weights", svc.load_weights)

    @app.post(f"{api}/forward_backward", response_model=T.UntypedAPIFuture)
    async def forward_backward(request: Request) -> Any:
        return await run_in_threadpool(fb, request,
                                       await parse_body(request, T.ForwardBackwardRequest))

    @app.post(f"{api}/forward", response_model=T.UntypedAPIFuture)
    async def forward(request: Request) -> Any:
        return await run_in_threadpool(fwd, request,
                                       await parse_body(request, T.ForwardRequest))

    @app.post(f"{api}/optim_step", response_model=T.UntypedAPIFuture)
    async def optim_step(request: Request) -> Any:
        return await run_in_threadpool(opt, request,
                                       await parse_body(request, T.OptimStepRequest))

    @app.post(f"{api}/save_weights", response_model=T.UntypedAPIFuture)
    async def save_weights(request: Request) -> Any:
        return await run_in_threadpool(save, request,
                                       await parse_body(request, T.SaveWeightsRequest))

    @app.post(f"{api}/save_weights_for_sampler", response_model=T.UntypedAPIFuture)
    async def save_weights_for_sampler(request: Request) -> Any:
        return await run_in_threadpool(save_s, request, await parse_body(
            request, T.SaveWeightsForSamplerRequest))

    @app.post(f"{api}/load_weights", response_model=T.UntypedAPIFuture)
    async def load_weights(request: Request) -> Any:
        return await run_in_threadpool(load, request,
                                       await parse_body(request, T.LoadWeightsRequest))

    @app.post(f"{api}/weights_info")
    def weights_info(request: Request, body: T.WeightsInfoRequest) -> T.WeightsInfoResponse:
        return svc.weights_info(owner_of(request), body.tinker_path)

    @app.post(f"{api}/retrieve_future")
    async def retrieve_future(request: Request, body: T.FutureRetrieveRequest) -> Response:
        owner = owner_of(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.long_poll_seconds
        ev = waiters.register(body.request_id)  # before the first read: no lost wake-up
        try:
            # The first read also checks that the request is this owner's (404 if not).
            state = await run_in_threadpool(svc.future_state, owner, body.request_id)
            while state is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return JSONResponse(T.TryAgainResponse(
                        request_id=body.request_id, queue_state="active").model_dump())
                with suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), timeout=remaining)
                ev.clear()
                # The clock hands over the body it just stored; read it back only if not.
                state = ev.body if ev.body is not None else await run_in_threadpool(
                    svc.future_state, owner, body.request_id)
            if PROTOBUF in request.headers.get("accept", ""):
                # Tinker's SDK reads ForwardBackwardOutput and SampleResponse only as protobuf.
                proto = encode_result(state, json.loads)
                if proto is not None:
                    return Response(proto, media_type=PROTOBUF)
            return Response(state, media_type="application/json")
        finally:
            waiters.unregister(body.request_id, ev)

    @app.get(f"{api}/training_runs")
    def list_training_runs(request: Request, limit: int = Query(20, ge=1, le=1000),
                           offset: int = Query(0, ge=0, le=INT32_MAX)
                           ) -> T.TrainingRunsResponse:
        return svc.list_runs(owner_of(request), limit, offset)

    @app.get(f"{api}/training_runs/{{run_id}}")
    def get_training_run(request: Request, run_id: str) -> T.TrainingRun:
        return svc.get_run(owner_of(request), run_id)

    @app.get(f"{api}/training_runs/{{run_id}}/checkpoints")
    def list_checkpoints(request: Request, run_id: str) -> T.CheckpointsListResponse:
        return svc.list_checkpoints(owner_of(request), run_id)

    @app.get(f"{api}/training_runs/{{run_id}}/metrics")
    def get_run_metrics(request: Request, run_id: str) -> T.RunMetrics:
        return svc.run_metrics(owner_of(request), run_id)

    @app.get(f"{api}/engine/utilization")
    def engine_utilization(request: Request, base_model: str | None = None,
                           last: int = Query(100, ge=1, le=10000)
                           ) -> T.EngineUtilizationResponse:
        owner_of(request)  # authenticated like every other query
        return svc.engine_utilization(base_model, last)

    @app.post(f"{api}/training_runs/{{run_id}}/checkpoints/{{seg}}/{{name}}/publish")
    def publish_checkpoint(request: Request, run_id: str, seg: str, name: str) -> T.Checkpoint:
        return svc.publish_checkpoint(owner_of(request), run_id, seg, name, True)

    @app.delete(f"{api}/training_runs/{{run_id}}/checkpoints/{{seg}}/{{name}}/publish")
    def unpublish_checkpoint(request: Request, run_id: str, seg: str, name: str
                             ) -> T.Checkpoint:
        return svc.publish_checkpoint(owner_of(request), run_id, seg, name, False)

    @app.get(f"{api}/training_runs/{{run_id}}/checkpoints/{{seg}}/{{name}}/archive")
    def checkpoint_archive(request: Request, run_id: str, seg: str, name: str) -> Response:
        """302 to a signed download URL (valid 15 minutes; `Expires` says until when)."""
        token, expires = svc.archive_token(owner_of(request), run_id, seg, name)
        url = str(request.url_for("download_archive", token=token))
        return RedirectResponse(url, status_code=302, headers={
            "Expires": email.utils.formatdate(expires, usegmt=True),
            "Cache-Control": "no-store"})

    @app.get(f"{api}/archives/{{token}}", name="download_archive")
    def download_archive(token: str) -> Response:
        """The checkpoint as a tar; the signed token is the credential (no API key)."""
        stream, filename = svc.open_archive(token)
        return StreamingResponse(iter(stream), media_type="application/x-tar", headers={
            "Content-Length": str(stream.size),
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store"})

    @app.delete(f"{api}/training_runs/{{run_id}}/checkpoints/{{seg}}/{{name}}")
    def delete_checkpoint(request: Request, run_id: str, seg: str, name: str) -> dict[str, str]:
        svc.delete_checkpoint(owner_of(request), run_id, seg, name)
        return {"status": "deleted"}

    @app.post(f"{api}/create_sampling_session")
    def create_sampling_session(request: Request, body: T.CreateSamplingSessionRequest
                                ) -> T.CreateSamplingSessionResponse:
        return svc.create_sampling_session(owner_of(request), body)

    @app.post(f"{api}/asample")
    def asample(request: Request, body: T.SampleRequest) -> T.UntypedAPIFuture:
        return svc.sample(owner_of(request), body)

    @app.get(f"{api}/samplers/{{sampler_id}}")
    def get_sampler(request: Request, sampler_id: str) -> T.GetSamplerResponse:
        return svc.get_sampler(owner_of(request), sampler_id)

    @app.get(f"{api}/tokenizer")
    def tokenizer(base_model: str) -> dict[str, Any]:
        return svc.tokenizer_files(base_model)

    app.include_router(console_router(svc, owner_of))  # run history, status, /console
    # OpenAI-compatible sampling at Tinker's path, and at /v1 where OpenAI clients look.
    for prefix in ("/oai/api/v1", "/v1"):
        app.include_router(openai_routes.router(), prefix=prefix)
    return app
