"""Checkpoint archives through a real keyed server: the 302 to a signed URL, download and safe
extraction by the SDK, PEFT loading of the result, tenant rules, bad/expired tokens, deletion."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import tarfile
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import bios
from bios import types
from bios.exceptions import NotFoundError
from bios.rest_client import parse_checkpoint_path
from bios.server.archives import SECRET_FILE, ArchiveClaims, ArchiveSigner
from bios.server.service import run_dir_name
from peft_check import PEFT_ATOL, TINY_DIR, peft_logprobs
from server_process import KEY_A, KEY_B, ServerProcess

TINY = "bios/tiny-llama"
TOKENS = [5, 17, 923, 40, 71, 88, 1024, 3]
BATCH = [types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]),
                     loss_fn_inputs={"target_tokens": TOKENS[1:]})]
SAMPLER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
TRAINING_FILES = [*SAMPLER_FILES, "bios_state.json", "optimizer.safetensors"]


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIOS_API_KEY", raising=False)


def client(server: ServerProcess, key: str) -> bios.ServiceClient:
    return bios.ServiceClient(base_url=server.base_url, api_key=key)


def archive_route(path: str) -> str:
    run, kind, name = parse_checkpoint_path(path)
    return f"/api/v1/training_runs/{run}/checkpoints/{kind}/{name}/archive"


def get(server: ServerProcess, path: str, key: str | None = None) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.get(server.base_url + path, headers=headers, timeout=60,
                     follow_redirects=False)


def server_dir(server: ServerProcess, path: str) -> Path:
    run, kind, name = parse_checkpoint_path(path)
    return server.data_dir / "checkpoints" / run_dir_name(run) / kind / name


def assert_same_files(extracted: Path, original: Path) -> None:
    assert sorted(os.listdir(extracted)) == sorted(os.listdir(original))
    for name in os.listdir(original):
        assert (extracted / name).read_bytes() == (original / name).read_bytes(), name


@pytest.fixture(scope="module")
def alice(keyed_server: ServerProcess) -> dict[str, Any]:
    """Alice's briefly trained run with a training and a sampler checkpoint."""
    sc = client(keyed_server, KEY_A)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=11)
    for _ in range(2):
        tc.forward_backward(BATCH, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2))
    state = tc.save_state("arch-state").result(timeout=120).path
    sampler = tc.save_weights_for_sampler("arch-sampler").result(timeout=120).path
    return {"client": sc, "rest": sc.create_rest_client(), "tc": tc, "run": tc.model_id,
            "state": state, "sampler": sampler}


def test_archive_route_is_a_302_to_a_signed_url_that_streams_a_tar(
        keyed_server: ServerProcess, alice: dict[str, Any]) -> None:
    assert get(keyed_server, archive_route(alice["sampler"])).status_code == 401  # needs a key
    r = get(keyed_server, archive_route(alice["sampler"]), KEY_A)
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    assert location.startswith(f"{keyed_server.base_url}/api/v1/archives/")
    expires = parsedate_to_datetime(r.headers["expires"])
    left = expires - datetime.now(UTC)
    assert timedelta(minutes=14) < left <= timedelta(minutes=15, seconds=1)
    assert r.headers["cache-control"] == "no-store"

    dl = httpx.get(location, timeout=60)  # no API key: the URL is the credential
    assert dl.status_code == 200, dl.text
    assert dl.headers["content-type"] == "application/x-tar"
    assert int(dl.headers["content-length"]) == len(dl.content)
    assert "arch-sampler.tar" in dl.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(dl.content)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == SAMPLER_FILES
        assert all(m.isreg() and m.mode == 0o644 for m in members)
        original = server_dir(keyed_server, alice["sampler"])
        for m in members:
            f = tar.extractfile(m)
            assert f is not None and f.read() == (original / m.name).read_bytes()

    # The SDK reads the redirect without following it, by id or by path.
    rest = alice["rest"]
    run, kind, name = parse_checkpoint_path(alice["state"])
    for got in (rest.get_checkpoint_archive_url(run, f"{kind}/{name}"),
                rest.get_checkpoint_archive_url_from_tinker_path(alice["state"])):
        assert got.url.startswith(f"{keyed_server.base_url}/api/v1/archives/")
        assert timedelta(minutes=14) < got.expires - datetime.now(UTC) <= timedelta(minutes=16)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT: merge only
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_downloaded_adapters_equal_the_server_files_and_load_in_peft(
        keyed_server: ServerProcess, alice: dict[str, Any], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors.torch import load_file

    rest = alice["rest"]
    sampler_dir = rest.download_checkpoint_archive_from_tinker_path(alice["sampler"],
                                                                    tmp_path / "sampler")
    assert sampler_dir == tmp_path / "sampler"
    assert sorted(os.listdir(sampler_dir)) == SAMPLER_FILES
    assert_same_files(sampler_dir, server_dir(keyed_server, alice["sampler"]))
    state_dir = rest.download_checkpoint_archive_from_tinker_path(alice["state"],
                                                                  tmp_path / "state")
    assert sorted(os.listdir(state_dir)) == TRAINING_FILES  # optimizer state included
    assert_same_files(state_dir, server_dir(keyed_server, alice["state"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sampler", "state"]  # no temp files

    # PEFT scores tokens as the server does (the run has not changed since both saves) ...
    served = alice["tc"].forward(BATCH, "cross_entropy").result(timeout=120)
    ours = served.loss_fn_outputs[0]["logprobs"].to_numpy()
    for adapter_dir in (sampler_dir, state_dir):
        np.testing.assert_allclose(peft_logprobs(adapter_dir, TOKENS), ours, atol=PEFT_ATOL)
    # ... with exactly the weights in the archive, which are not a zero adapter.
    hf = transformers.AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(hf, str(sampler_dir))
    loaded = peft.get_peft_model_state_dict(model, save_embedding_layers=False)
    saved = load_file(str(sampler_dir / "adapter_model.safetensors"))
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in saved.items())

    with pytest.raises(FileExistsError):  # never into a non-empty directory
        rest.download_checkpoint_archive_from_tinker_path(alice["sampler"], sampler_dir)


async def test_async_download(alice: dict[str, Any], tmp_path: Path) -> None:
    rest = alice["rest"]
    got = await rest.get_checkpoint_archive_url_from_tinker_path_async(alice["sampler"])
    assert "/api/v1/archives/" in got.url
    dest = await rest.download_checkpoint_archive_from_tinker_path_async(alice["sampler"],
                                                                         tmp_path / "a")
    assert sorted(os.listdir(dest)) == SAMPLER_FILES


def test_other_tenants_get_404_until_it_is_published(
        keyed_server: ServerProcess, alice: dict[str, Any], tmp_path: Path) -> None:
    path = alice["tc"].save_weights_for_sampler("arch-pub").result(timeout=120).path
    bob = client(keyed_server, KEY_B).create_rest_client()
    assert get(keyed_server, archive_route(path), KEY_B).status_code == 404
    with pytest.raises(NotFoundError):
        bob.get_checkpoint_archive_url_from_tinker_path(path)
    with pytest.raises(NotFoundError):
        bob.download_checkpoint_archive_from_tinker_path(path, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()

    alice["rest"].publish_checkpoint_from_tinker_path(path)
    url = bob.get_checkpoint_archive_url_from_tinker_path(path).url
    dest = bob.download_checkpoint_archive_from_tinker_path(path, tmp_path / "bob")
    assert_same_files(dest, server_dir(keyed_server, path))

    # Unpublishing revokes the URLs other tenants got; the owner's keep working.
    own_url = alice["rest"].get_checkpoint_archive_url_from_tinker_path(path).url
    alice["rest"].unpublish_checkpoint_from_tinker_path(path)
    assert httpx.get(url, timeout=60).status_code == 404
    assert httpx.get(own_url, timeout=60).status_code == 200
    assert get(keyed_server, archive_route(path), KEY_B).status_code == 404


def test_tampered_malformed_and_expired_tokens_get_403(
        keyed_server: ServerProcess, alice: dict[str, Any]) -> None:
    url = alice["rest"].get_checkpoint_archive_url_from_tinker_path(alice["sampler"]).url
    prefix, token = url.rsplit("/", 1)
    version, payload, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["name"] == "arch-sampler" and claims["tenant"] == "alice"

    def forged(**changes: Any) -> str:
        body = json.dumps({**claims, **changes}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(body).rstrip(b"=").decode()

    bad_mac = mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")
    for bad in (f"{version}.{forged(name='arch-state', seg='weights')}.{mac}",  # other ckpt
                f"{version}.{forged(exp=claims['exp'] + 3600)}.{mac}",  # longer life
                f"{version}.{payload}.{bad_mac}",  # altered signature
                f"v2.{payload}.{mac}", "not-a-token", "a" * 5000):
        r = httpx.get(f"{prefix}/{bad}", timeout=60)
        assert r.status_code == 403, (bad[:40], r.status_code, r.text)
        assert "archive URL" in r.json()["detail"]

    # A genuine signature (the server's own secret) on an expired claim.
    secret = keyed_server.data_dir / SECRET_FILE
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    signer = ArchiveSigner(secret)
    expired = signer.sign(ArchiveClaims(**{**claims, "exp": int(time.time()) - 1}))
    r = httpx.get(f"{prefix}/{expired}", timeout=60)
    assert r.status_code == 403 and "expired" in r.json()["detail"]
    fresh = signer.sign(ArchiveClaims(**claims))
    assert httpx.get(f"{prefix}/{fresh}", timeout=60).status_code == 200

    # Only that one path segment is open without a key.
    for path in ("/api/v1/archives", "/api/v1/archives/", "/api/v1/archives/a%2F..%2F..%2F"
                 "training_runs", f"/api/v1/archives/{token}/x"):
        assert get(keyed_server, path).status_code in (401, 404), path


def test_archive_of_a_deleted_or_replaced_checkpoint_is_404(
        keyed_server: ServerProcess, alice: dict[str, Any]) -> None:
    tc, rest = alice["tc"], alice["rest"]
    path = tc.save_weights_for_sampler("arch-del").result(timeout=120).path
    url = rest.get_checkpoint_archive_url_from_tinker_path(path).url
    rest.delete_checkpoint_from_tinker_path(path)
    r = httpx.get(url, timeout=60)
    assert r.status_code == 404 and "deleted" in r.json()["detail"]
    with pytest.raises(NotFoundError):
        rest.get_checkpoint_archive_url_from_tinker_path(path)

    path = tc.save_state("arch-over").result(timeout=120).path
    url = rest.get_checkpoint_archive_url_from_tinker_path(path).url
    tc.save_state("arch-over", overwrite=True).result(timeout=120)
    assert httpx.get(url, timeout=60).status_code == 404  # a new checkpoint, a new URL
    url = rest.get_checkpoint_archive_url_from_tinker_path(path).url
    assert httpx.get(url, timeout=60).status_code == 200
