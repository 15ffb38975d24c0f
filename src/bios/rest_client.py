"""`RestClient`: training runs, checkpoints and samplers (queries; no session needed).

Also the pure parsing of checkpoint paths, `bios://<run_id>/weights/<name>` and
`bios://<run_id>/sampler_weights/<name>` (run ids look like "<session_id>:train:<n>").
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urljoin

import httpx

from bios import types
from bios.checkpoint_archive import (
    DEFAULT_MAX_ARCHIVE_BYTES,
    check_destination,
    extract_archive,
)
from bios.exceptions import APIResponseValidationError
from bios.futures import APIFuture
from bios.transport import parse_result

if TYPE_CHECKING:
    from bios.service_client import ServiceClient

PATH_SCHEME = "bios://"
CHECKPOINT_KINDS = ("weights", "sampler_weights")
_PAGE = 100
ARCHIVE_URL_DEFAULT_TTL = timedelta(minutes=15)  # when a server sends no Expires header
_TAR_OVERHEAD = 16 * 1024 * 1024  # headers and padding on top of the files' bytes


def parse_checkpoint_path(path: str) -> tuple[str, str, str]:
    """Split "bios://<run_id>/<weights|sampler_weights>/<name>" into (run_id, kind, name).

    Raises:
        ValueError: the path does not have that form.
    """
    if not isinstance(path, str) or not path.startswith(PATH_SCHEME):
        raise ValueError(f"checkpoint paths look like bios://<run_id>/weights/<name> or "
                         f"bios://<run_id>/sampler_weights/<name>; got {path!r}")
    parts = path[len(PATH_SCHEME):].split("/")
    if len(parts) != 3 or not all(parts) or parts[1] not in CHECKPOINT_KINDS:
        raise ValueError(f"checkpoint paths look like bios://<run_id>/weights/<name> or "
                         f"bios://<run_id>/sampler_weights/<name>; got {path!r}")
    return parts[0], parts[1], parts[2]


def check_checkpoint_path(path: str) -> str:
    """Return `path` if it is a well-formed checkpoint path, else raise ValueError."""
    parse_checkpoint_path(path)
    return path


def _seg(value: str) -> str:
    return quote(value, safe=":")


def _split_checkpoint_id(checkpoint_id: str) -> tuple[str, str]:
    kind, _, name = checkpoint_id.partition("/")
    if kind not in CHECKPOINT_KINDS or not name or "/" in name:
        raise ValueError(f"checkpoint_id looks like 'weights/<name>' or "
                         f"'sampler_weights/<name>'; got {checkpoint_id!r}")
    return kind, name


def archive_url_from_response(response: httpx.Response,
                              now: datetime | None = None) -> types.CheckpointArchiveUrlResponse:
    """Read a `.../archive` answer: 302 with `Location` (and `Expires`; else now + 15 min),
    or a 200 JSON `{url, expires}`."""
    if response.is_redirect:
        url = urljoin(str(response.request.url), response.headers["location"])
        expires: datetime | None = None
        if "expires" in response.headers:
            try:
                expires = email.utils.parsedate_to_datetime(response.headers["expires"])
            except (TypeError, ValueError):
                expires = None
        if expires is None or expires.tzinfo is None:
            expires = (now or datetime.now(UTC)) + ARCHIVE_URL_DEFAULT_TTL
        return types.CheckpointArchiveUrlResponse(url=url, expires=expires)
    try:
        body = response.json()
    except ValueError as e:
        raise APIResponseValidationError(
            f"the server's answer to {response.request.url} is neither a redirect nor JSON "
            f"(HTTP {response.status_code})") from e
    return parse_result(types.CheckpointArchiveUrlResponse, body, "get_checkpoint_archive_url")


class RestClient:
    """Queries about runs, checkpoints and samplers (made by ServiceClient.create_rest_client).

    Sync methods block and return the value; `_async` twins return it after one await.
    """

    def __init__(self, service: ServiceClient) -> None:
        self._service = service

    def _get(self, path: str, model: type[Any], params: dict[str, Any] | None = None
             ) -> APIFuture[Any]:
        return self._service._call(self._service._query("GET", path, model, params=params))

    def _runs(self, limit: int, offset: int) -> APIFuture[types.TrainingRunsResponse]:
        return self._get("/training_runs", types.TrainingRunsResponse,
                         {"limit": limit, "offset": offset})

    async def _all_run_ids(self) -> list[str]:
        ids: list[str] = []
        while True:
            page = await self._service._query("GET", "/training_runs", types.TrainingRunsResponse,
                                              params={"limit": _PAGE, "offset": len(ids)})
            ids.extend(r.training_run_id for r in page.training_runs)
            total = page.cursor.total_count if page.cursor else None
            if len(page.training_runs) < _PAGE or (total is not None and len(ids) >= total):
                return ids

    def _run(self, training_run_id: str) -> APIFuture[types.TrainingRun]:
        return self._get(f"/training_runs/{_seg(training_run_id)}", types.TrainingRun)

    def _checkpoints(self, training_run_id: str) -> APIFuture[types.CheckpointsListResponse]:
        return self._get(f"/training_runs/{_seg(training_run_id)}/checkpoints",
                         types.CheckpointsListResponse)

    def _delete(self, training_run_id: str, checkpoint_id: str) -> APIFuture[None]:
        kind, name = _split_checkpoint_id(checkpoint_id)
        path = f"/training_runs/{_seg(training_run_id)}/checkpoints/{kind}/{_seg(name)}"
        return self._service._call(self._delete_coro(path))

    async def _delete_coro(self, path: str) -> None:
        await self._service._transport.request("DELETE", path)

    def _delete_path(self, tinker_path: str) -> APIFuture[None]:
        run_id, kind, name = parse_checkpoint_path(tinker_path)
        return self._delete(run_id, f"{kind}/{name}")

    def _publish(self, tinker_path: str, public: bool) -> APIFuture[None]:
        run_id, kind, name = parse_checkpoint_path(tinker_path)
        path = f"/training_runs/{_seg(run_id)}/checkpoints/{kind}/{_seg(name)}/publish"
        return self._service._call(self._publish_coro("POST" if public else "DELETE", path))

    async def _publish_coro(self, method: str, path: str) -> None:
        await self._service._transport.request(method, path)

    def _archive_url(self, training_run_id: str, checkpoint_id: str
                     ) -> APIFuture[types.CheckpointArchiveUrlResponse]:
        kind, name = _split_checkpoint_id(checkpoint_id)
        return self._service._call(self._archive_url_coro(training_run_id, kind, name))

    def _archive_url_path(self, tinker_path: str
                          ) -> APIFuture[types.CheckpointArchiveUrlResponse]:
        return self._service._call(self._archive_url_coro(*parse_checkpoint_path(tinker_path)))

    async def _archive_url_coro(self, run_id: str, kind: str, name: str
                                ) -> types.CheckpointArchiveUrlResponse:
        path = f"/training_runs/{_seg(run_id)}/checkpoints/{kind}/{_seg(name)}/archive"
        response = await self._service._transport.request_redirect("GET", path)
        return archive_url_from_response(response)

    def _download(self, tinker_path: str, dest_dir: str | os.PathLike[str],
                  max_bytes: int) -> APIFuture[Path]:
        run_id, kind, name = parse_checkpoint_path(tinker_path)
        return self._service._call(self._download_coro(run_id, kind, name, Path(dest_dir),
                                                       max_bytes))

    async def _download_coro(self, run_id: str, kind: str, name: str, dest_dir: Path,
                             max_bytes: int) -> Path:
        dest = dest_dir.expanduser().absolute()
        check_destination(dest)  # before downloading anything
        info = await self._archive_url_coro(run_id, kind, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tar.part", dir=dest.parent)
        os.close(fd)
        try:
            await self._service._transport.download(info.url, tmp,
                                                    max_bytes=max_bytes + _TAR_OVERHEAD)
            # Extraction is disk- and CPU-bound: off the SDK loop, which other clients share.
            return await asyncio.to_thread(extract_archive, tmp, dest, max_bytes=max_bytes)
        finally:
            os.unlink(tmp)

    def _weights_info(self, tinker_path: str) -> APIFuture[types.WeightsInfoResponse]:
        return self._service._call(self._service._query(
            "POST", "/weights_info", types.WeightsInfoResponse,
            json_body={"tinker_path": check_checkpoint_path(tinker_path)}))

    def _sampler(self, sampler_id: str) -> APIFuture[types.GetSamplerResponse]:
        return self._get(f"/samplers/{_seg(sampler_id)}", types.GetSamplerResponse)

    def _metrics(self, training_run_id: str) -> APIFuture[types.RunMetrics]:
        return self._get(f"/training_runs/{_seg(training_run_id)}/metrics", types.RunMetrics)

    def _history(self, training_run_id: str, after_seq: int
                 ) -> APIFuture[types.RunHistory]:
        return self._get(f"/training_runs/{_seg(training_run_id)}/history", types.RunHistory,
                         {"after_seq": after_seq})

    def _utilization(self, base_model: str | None, last: int
                     ) -> APIFuture[types.EngineUtilizationResponse]:
        params: dict[str, Any] = {"last": last}
        if base_model:
            params["base_model"] = base_model
        return self._get("/engine/utilization", types.EngineUtilizationResponse, params)

    # ------------------------------------------------------------------ public API

    def list_training_runs(self, limit: int = 20, offset: int = 0
                           ) -> types.TrainingRunsResponse:
        """One page of your training runs.

        Args:
            limit: runs per page.
            offset: runs to skip.

        Returns:
            TrainingRunsResponse (`training_runs`, `cursor.total_count`).
        """
        return self._runs(limit, offset).result()

    async def list_training_runs_async(self, limit: int = 20, offset: int = 0
                                       ) -> types.TrainingRunsResponse:
        """Async version of list_training_runs."""
        return await self._runs(limit, offset)

    def list_training_run_ids(self) -> list[str]:
        """The ids of all your training runs (every page).

        Returns:
            Run ids, "<session_id>:train:<n>".
        """
        return self._service._call(self._all_run_ids()).result()

    async def list_training_run_ids_async(self) -> list[str]:
        """Async version of list_training_run_ids."""
        return await self._service._call(self._all_run_ids())

    def get_training_run(self, training_run_id: str) -> types.TrainingRun:
        """One training run.

        Args:
            training_run_id: "<session_id>:train:<n>" (a TrainingClient's model_id).

        Returns:
            TrainingRun (base model, rank, last checkpoints, metadata).
        """
        return self._run(training_run_id).result()

    async def get_training_run_async(self, training_run_id: str) -> types.TrainingRun:
        """Async version of get_training_run."""
        return await self._run(training_run_id)

    def get_training_run_by_tinker_path(self, tinker_path: str) -> types.TrainingRun:
        """The training run a checkpoint path belongs to.

        Args:
            tinker_path: "bios://<run_id>/weights/<name>" or ".../sampler_weights/<name>".

        Returns:
            TrainingRun.
        """
        return self._run(parse_checkpoint_path(tinker_path)[0]).result()

    async def get_training_run_by_tinker_path_async(self, tinker_path: str
                                                    ) -> types.TrainingRun:
        """Async version of get_training_run_by_tinker_path."""
        return await self._run(parse_checkpoint_path(tinker_path)[0])

    def list_checkpoints(self, training_run_id: str) -> types.CheckpointsListResponse:
        """The checkpoints of one run.

        Args:
            training_run_id: the run's id.

        Returns:
            CheckpointsListResponse (`checkpoints[i].tinker_path`, `.checkpoint_id`, ...).
        """
        return self._checkpoints(training_run_id).result()

    async def list_checkpoints_async(self, training_run_id: str
                                     ) -> types.CheckpointsListResponse:
        """Async version of list_checkpoints."""
        return await self._checkpoints(training_run_id)

    def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> None:
        """Delete a checkpoint.

        Args:
            training_run_id: the run's id.
            checkpoint_id: "weights/<name>" or "sampler_weights/<name>".
        """
        self._delete(training_run_id, checkpoint_id).result()

    async def delete_checkpoint_async(self, training_run_id: str, checkpoint_id: str) -> None:
        """Async version of delete_checkpoint."""
        await self._delete(training_run_id, checkpoint_id)

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> None:
        """Delete a checkpoint given its path.

        Args:
            tinker_path: "bios://<run_id>/weights/<name>" or ".../sampler_weights/<name>".
        """
        self._delete_path(tinker_path).result()

    async def delete_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        """Async version of delete_checkpoint_from_tinker_path."""
        await self._delete_path(tinker_path)

    def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> None:
        """Publish one of your checkpoints: other tenants who know its path may then load it
        (create_training_client_from_state, load_state) and sample it
        (create_sampling_client(model_path=...)); only you can delete or unpublish it.

        Args:
            tinker_path: "bios://<run_id>/weights/<name>" or ".../sampler_weights/<name>".

        Raises:
            ConflictError: it is already published.
            NotFoundError: no such checkpoint of yours.
        """
        self._publish(tinker_path, True).result()

    async def publish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        """Async version of publish_checkpoint_from_tinker_path."""
        await self._publish(tinker_path, True)

    def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> None:
        """Make a published checkpoint private again (others can no longer load or sample it).

        Args:
            tinker_path: "bios://<run_id>/weights/<name>" or ".../sampler_weights/<name>".

        Raises:
            ConflictError: it is not published.
            NotFoundError: no such checkpoint of yours.
        """
        self._publish(tinker_path, False).result()

    async def unpublish_checkpoint_from_tinker_path_async(self, tinker_path: str) -> None:
        """Async version of unpublish_checkpoint_from_tinker_path."""
        await self._publish(tinker_path, False)

    def get_checkpoint_archive_url(self, training_run_id: str, checkpoint_id: str
                                   ) -> types.CheckpointArchiveUrlResponse:
        """A signed URL that downloads a checkpoint as a tar, without an API key, until it
        expires (15 minutes on Bios). Yours, or one another tenant published.

        Args:
            training_run_id: the run's id.
            checkpoint_id: "weights/<name>" or "sampler_weights/<name>".

        Returns:
            CheckpointArchiveUrlResponse (`url`, `expires`).

        Raises:
            NotFoundError: no such checkpoint visible to you.
        """
        return self._archive_url(training_run_id, checkpoint_id).result()

    async def get_checkpoint_archive_url_async(self, training_run_id: str, checkpoint_id: str
                                               ) -> types.CheckpointArchiveUrlResponse:
        """Async version of get_checkpoint_archive_url."""
        return await self._archive_url(training_run_id, checkpoint_id)

    def get_checkpoint_archive_url_from_tinker_path(self, tinker_path: str
                                                    ) -> types.CheckpointArchiveUrlResponse:
        """A signed download URL for a checkpoint given its path (see
        get_checkpoint_archive_url).

        Args:
            tinker_path: "bios://<run_id>/weights/<name>" or ".../sampler_weights/<name>".

        Returns:
            CheckpointArchiveUrlResponse (`url`, `expires`).
        """
        return self._archive_url_path(tinker_path).result()

    async def get_checkpoint_archive_url_from_tinker_path_async(
            self, tinker_path: str) -> types.CheckpointArchiveUrlResponse:
        """Async version of get_checkpoint_archive_url_from_tinker_path."""
        return await self._archive_url_path(tinker_path)

    def download_checkpoint_archive_from_tinker_path(
            self, tinker_path: str, dest_dir: str | os.PathLike[str],
            max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES) -> Path:
        """Download a checkpoint and extract it safely into a new directory.

        Gets a signed URL, streams the archive to a temporary file beside `dest_dir`, and
        extracts it with `bios.checkpoint_archive.extract_archive`: links, devices, absolute or
        `..` paths, odd names, duplicates and more than `max_bytes` are refused before anything
        is written, and a failed extraction leaves nothing behind. A sampler checkpoint (or the
        adapter files of a training one) loads with `peft.PeftModel.from_pretrained(base,
        dest_dir)`.

        Args:
            tinker_path: "bios://<run_id>/weights/<name>" or ".../sampler_weights/<name>".
            dest_dir: the directory to create (it may exist if empty).
            max_bytes: the most bytes the extracted files may add up to.

        Returns:
            `dest_dir` as an absolute Path, holding `adapter_model.safetensors`,
            `adapter_config.json` and, for training checkpoints, `optimizer.safetensors` and
            `bios_state.json`.

        Raises:
            FileExistsError: `dest_dir` exists and is not empty.
            NotFoundError: no such checkpoint visible to you.
            UnsafeArchiveError: the archive was refused (names the member).
        """
        return self._download(tinker_path, dest_dir, max_bytes).result()

    async def download_checkpoint_archive_from_tinker_path_async(
            self, tinker_path: str, dest_dir: str | os.PathLike[str],
            max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES) -> Path:
        """Async version of download_checkpoint_archive_from_tinker_path."""
        return await self._download(tinker_path, dest_dir, max_bytes)

    def get_weights_info_by_tinker_path(self, tinker_path: str) -> types.WeightsInfoResponse:
        """What a checkpoint was trained as (base model, LoRA rank, trained layers).

        Args:
            tinker_path: "bios://<run_id>/weights/<name>" or ".../sampler_weights/<name>".

        Returns:
            WeightsInfoResponse.
        """
        return self._weights_info(tinker_path).result()

    async def get_weights_info_by_tinker_path_async(self, tinker_path: str
                                                    ) -> types.WeightsInfoResponse:
        """Async version of get_weights_info_by_tinker_path."""
        return await self._weights_info(tinker_path)

    def get_sampler(self, sampler_id: str) -> types.GetSamplerResponse:
        """One sampler (a SamplingClient's sampling_session_id).

        Args:
            sampler_id: "<session_id>:sample:<n>".

        Returns:
            GetSamplerResponse (base_model, model_path).
        """
        return self._sampler(sampler_id).result()

    async def get_sampler_async(self, sampler_id: str) -> types.GetSamplerResponse:
        """Async version of get_sampler."""
        return await self._sampler(sampler_id)

    def get_run_metrics(self, training_run_id: str) -> types.RunMetrics:
        """What the server did for one run: cycles it had work in and cycles it missed,
        queue wait, engine busy/idle time while it was active, tokens, compute and steps.

        Args:
            training_run_id: "<session_id>:train:<n>" (a TrainingClient's model_id).

        Returns:
            RunMetrics.
        """
        return self._metrics(training_run_id).result()

    async def get_run_metrics_async(self, training_run_id: str) -> types.RunMetrics:
        """Async version of get_run_metrics."""
        return await self._metrics(training_run_id)

    def get_run_history(self, training_run_id: str, after_seq: int = -1) -> types.RunHistory:
        """A run's requests (kind, status, when stored, claimed and finished, the cycle they
        ran in, loss), the training cycles it had work in or missed, and its loss per step.

        Args:
            training_run_id: "<session_id>:train:<n>" (a TrainingClient's model_id).
            after_seq: only requests with a larger seq id (for polling; -1: all, the run's
                creation, seq 0, included).

        Returns:
            RunHistory (`requests`, `cycles`, `steps`).
        """
        return self._history(training_run_id, after_seq).result()

    async def get_run_history_async(self, training_run_id: str, after_seq: int = -1
                                    ) -> types.RunHistory:
        """Async version of get_run_history."""
        return await self._history(training_run_id, after_seq)

    def get_engine_utilization(self, base_model: str | None = None, last: int = 100
                               ) -> types.EngineUtilizationResponse:
        """The engine's busy fraction over its last training cycles.

        Args:
            base_model: the base model whose engine to report (optional when the server
                serves one).
            last: how many of the most recent cycles.

        Returns:
            EngineUtilizationResponse (`cycles[i].busy_fraction`, overall `busy_fraction`).
        """
        return self._utilization(base_model, last).result()

    async def get_engine_utilization_async(self, base_model: str | None = None, last: int = 100
                                           ) -> types.EngineUtilizationResponse:
        """Async version of get_engine_utilization."""
        return await self._utilization(base_model, last)
