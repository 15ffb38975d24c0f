"""Fixtures: a fake Bios API (fake_server.py) and clients wired to it."""

from __future__ import annotations

import pytest
from fake_server import FakeBios, make_service

import bios


@pytest.fixture
def fake() -> FakeBios:
    return FakeBios()


@pytest.fixture
def service(fake: FakeBios) -> bios.ServiceClient:
    return make_service(fake)


@pytest.fixture
def training_client(service: bios.ServiceClient) -> bios.TrainingClient:
    return service.create_lora_training_client(base_model="base", rank=8)
