"""Every public method `x` of every client has an `x_async` twin with identical parameters and
the same return annotation (one contract for all clients: an op that runs on the server returns
an APIFuture from both twins; queries and client creations return the value from both)."""

from __future__ import annotations

import inspect

import pytest

import bios

CLIENTS = [bios.ServiceClient, bios.TrainingClient, bios.SamplingClient, bios.RestClient]


def public_methods(cls: type) -> dict[str, object]:
    return {name: fn for name, fn in vars(cls).items()
            if not name.startswith("_") and inspect.isfunction(fn)}


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
def test_every_method_has_an_async_twin_with_identical_parameters(cls: type) -> None:
    methods = public_methods(cls)
    sync_names = [n for n in methods if not n.endswith("_async")]
    assert sync_names, cls
    for name in sync_names:
        twin = methods.get(f"{name}_async")
        assert twin is not None, f"{cls.__name__}.{name} has no {name}_async"
        assert inspect.iscoroutinefunction(twin), f"{cls.__name__}.{name}_async is not async"
        assert not inspect.iscoroutinefunction(methods[name])
        sync_sig = inspect.signature(methods[name])
        async_sig = inspect.signature(twin)
        assert list(sync_sig.parameters.values()) == list(async_sig.parameters.values()), name
        assert sync_sig.return_annotation == async_sig.return_annotation, name


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
def test_every_async_method_has_a_sync_twin(cls: type) -> None:
    methods = public_methods(cls)
    for name in methods:
        if name.endswith("_async"):
            assert name.removesuffix("_async") in methods, f"{cls.__name__}.{name}"


@pytest.mark.parametrize("cls", CLIENTS, ids=lambda c: c.__name__)
def test_public_methods_have_docstrings(cls: type) -> None:
    for name, fn in public_methods(cls).items():
        assert inspect.getdoc(fn), f"{cls.__name__}.{name} has no docstring"


def test_the_seeds_table_of_twins_exists() -> None:
    assert bios.ServiceClient.create_lora_training_client_async
    assert bios.TrainingClient.forward_backward_async
    assert bios.SamplingClient.sample_async
    assert bios.RestClient.list_training_run_ids_async
