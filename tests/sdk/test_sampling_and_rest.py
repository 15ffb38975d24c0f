"""SamplingClient (the seeds' gather-of-gathers, seq_ids, logprobs) and RestClient requests."""

from __future__ import annotations

import asyncio

import pytest
from fake_server import FakeBios

import bios
from bios import types
from bios.rest_client import parse_checkpoint_path


def prompt(n: int = 3) -> types.ModelInput:
    return types.ModelInput.from_ints(list(range(1, n + 1)))


async def test_gather_sample_async_then_gather_the_futures(
        training_client: bios.TrainingClient) -> None:
    # async-and-futures.txt, "Concurrent Operations with asyncio.gather".
    sampling_client = training_client.save_weights_and_get_sampling_client(
        name="eval_checkpoint")
    sampling_tasks = []
    for p in [prompt(2), prompt(3), prompt(4)]:
        task = sampling_client.sample_async(prompt=p,
                                            sampling_params=types.SamplingParams(max_tokens=256))
        sampling_tasks.append(task)
    futures = await asyncio.gather(*sampling_tasks)
    results = await asyncio.gather(*futures)
    assert [len(r.sequences) for r in results] == [1, 1, 1]  # num_samples defaults to 1
    assert all(r.sequences[0].tokens[:2] == [7, 8] for r in results)


def test_each_sample_takes_the_samplers_next_seq_id(fake: FakeBios,
                                                    service: bios.ServiceClient) -> None:
    sampler = service.create_sampling_client(base_model="base")
    futs = [sampler.sample(prompt(), num_samples=2) for _ in range(5)]
    assert [len(f.result(timeout=5).sequences) for f in futs] == [2] * 5
    sent = [b for p, b in fake.submits if p == "/asample"]
    assert sorted(b["seq_id"] for b in sent) == [1, 2, 3, 4, 5]
    assert {b["sampling_session_id"] for b in sent} == {"sess1:sample:0"}
    assert sent[0]["sampling_params"] == types.SamplingParams().model_dump(exclude_none=True)


async def test_compute_logprobs_is_a_one_token_sample_with_prompt_logprobs(
        fake: FakeBios, service: bios.ServiceClient) -> None:
    sampler = await service.create_sampling_client_async(base_model="base")
    assert sampler.compute_logprobs(prompt(3)).result(timeout=5) == [None, -1.0, -1.0]
    fut = await sampler.compute_logprobs_async(prompt(2))
    assert await fut == [None, -1.0]
    body = fake.submits[-1][1]
    assert body["prompt_logprobs"] is True and body["sampling_params"]["max_tokens"] == 1


def test_sampler_from_a_checkpoint_path(fake: FakeBios, service: bios.ServiceClient) -> None:
    sampler = service.create_sampling_client(model_path="bios://r:train:0/sampler_weights/s")
    assert sampler.model_path == "bios://r:train:0/sampler_weights/s"
    assert fake.calls[-1][2]["model_path"] == "bios://r:train:0/sampler_weights/s"
    assert sampler.get_base_model() == "base"  # asked from the server
    with pytest.raises(ValueError, match="bios://"):
        service.create_sampling_client(model_path="/tmp/weights")


def test_list_training_run_ids_reads_every_page(fake: FakeBios,
                                                service: bios.ServiceClient) -> None:
    fake.runs = [f"s:train:{i}" for i in range(250)]
    rest = service.create_rest_client()
    assert rest.list_training_run_ids() == fake.runs
    assert asyncio.run(rest.list_training_run_ids_async()) == fake.runs
    page = rest.list_training_runs(limit=20, offset=40)
    assert [r.training_run_id for r in page.training_runs] == fake.runs[40:60]
    assert page.cursor is not None and page.cursor.total_count == 250


def test_rest_queries_hit_the_documented_routes(fake: FakeBios,
                                                service: bios.ServiceClient) -> None:
    rest = service.create_rest_client()
    assert rest.get_training_run("s:train:1").training_run_id == "s:train:1"
    assert rest.list_checkpoints("s:train:1").checkpoints[0].checkpoint_id == "weights/a"
    rest.delete_checkpoint("s:train:1", "weights/a")
    rest.delete_checkpoint_from_tinker_path("bios://s:train:1/sampler_weights/b")
    assert rest.get_weights_info_by_tinker_path("bios://s:train:1/weights/a").lora_rank == 8
    assert rest.get_sampler("s:sample:0").base_model == "base"
    assert [(m, p) for m, p, _ in fake.calls] == [
        ("GET", "/training_runs/s:train:1"),
        ("GET", "/training_runs/s:train:1/checkpoints"),
        ("DELETE", "/training_runs/s:train:1/checkpoints/weights/a"),
        ("DELETE", "/training_runs/s:train:1/checkpoints/sampler_weights/b"),
        ("POST", "/weights_info"),
        ("GET", "/samplers/s:sample:0"),
    ]
    assert fake.sessions == 0  # the REST client needs no session
    with pytest.raises(ValueError, match="weights/<name>"):
        rest.delete_checkpoint("s:train:1", "a")


def test_checkpoint_paths_parse_into_run_kind_and_name() -> None:
    assert parse_checkpoint_path("bios://sess:train:3/weights/step-10") == (
        "sess:train:3", "weights", "step-10")
    assert parse_checkpoint_path("bios://r/sampler_weights/x")[1] == "sampler_weights"
    for bad in ("tinker://r/weights/x", "bios://r/optimizer/x", "bios://r/weights",
                "bios://r/weights/a/b", "bios:///weights/x"):
        with pytest.raises(ValueError, match="bios://<run_id>"):
            parse_checkpoint_path(bad)
