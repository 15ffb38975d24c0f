"""The routes only Tinker's official SDK calls: its feature flags, telemetry, session finish.

`/client/config` advertises only what Bios really does: every flag that would make the SDK use
a route or an encoding Bios lacks (parallel forward_backward chunks, server-side custom losses,
`/retrieve_futures`, `/join_sampling_session`, the 0.25-era create-via-load_weights switch) is
off, so the SDK takes the path Bios serves. Telemetry is accepted and dropped (Bios keeps its
own metrics). `/sessions/{id}/finish` (0.38's `ServiceClient.close`) ends the session's
heartbeats; the session's runs and checkpoints stay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request

from bios.server.service import BiosService
from bios.server.validation import APIError

# The SDK zstd-compresses protobuf forward_backward bodies when this is set; Bios reads them
# either way, and on loopback (its usual deployment) compressing costs more than it saves.
PROTO_COMPRESS_FWDBWD = False

CLIENT_CONFIG: dict[str, Any] = {
    "pjwt_auth_enabled": False,
    "credential_default_source": "api_key",
    # One request per forward_backward: Bios batches across runs itself, and split chunks of
    # one call would take several seq slots the SDK does not expect to be ordered.
    "parallel_fwdbwd_chunks": False,
    "proto_compress_fwdbwd": PROTO_COMPRESS_FWDBWD,
    "create_model_via_load_weights": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}
DYNAMIC_CONFIG: dict[str, Any] = {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


def add_tinker_routes(app: FastAPI, svc: BiosService, owner_of: Callable[[Request], str]
                      ) -> None:
    """Register the Tinker-SDK-only routes on `app`."""
    api = "/api/v1"

    @app.post(f"{api}/client/config")
    def client_config(request: Request) -> dict[str, Any]:
        owner_of(request)
        return dict(CLIENT_CONFIG)

    @app.post(f"{api}/client/dynamic_config")
    def client_dynamic_config(request: Request) -> dict[str, Any]:
        owner_of(request)
        return dict(DYNAMIC_CONFIG)

    @app.post(f"{api}/telemetry")
    def telemetry(request: Request) -> dict[str, str]:
        owner_of(request)
        return {"status": "accepted"}

    @app.post(f"{api}/sessions/{{session_id}}/finish")
    def finish_session(request: Request, session_id: str) -> dict[str, str]:
        owner = owner_of(request)
        s = svc.db.get_session(session_id)
        if s is None or s.owner != owner:
            raise APIError(404, f"session {session_id!r} not found", "session_id")
        return {"status": "finished", "session_id": session_id}
