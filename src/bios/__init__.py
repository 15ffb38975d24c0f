"""Bios Python SDK: train LoRA adapters on a Bios server and sample from them.

    import bios
    service_client = bios.ServiceClient()            # $BIOS_BASE_URL, $BIOS_API_KEY
    training_client = service_client.create_lora_training_client(base_model="...")
    future = training_client.forward_backward(data, "cross_entropy")
    print(future.result().loss)

Every method has an `_async` twin. The SDK depends on httpx, pydantic, numpy and tqdm only;
it never imports torch (except inside `forward_backward_custom`), fastapi, sqlalchemy or
`bios.server`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("bios")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

from bios import exceptions, types
from bios.exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BiosAPIError,
    BiosError,
    RequestFailedError,
)
from bios.futures import APIFuture
from bios.rest_client import RestClient
from bios.sampling_client import SamplingClient
from bios.service_client import ServiceClient
from bios.training_client import TrainingClient
from bios.training_loop import TrainingReport, train, train_async
from bios.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    LoraConfig,
    ModelInput,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__all__ = [
    "APIConnectionError",
    "APIFuture",
    "APIStatusError",
    "APITimeoutError",
    "AdamParams",
    "BiosAPIError",
    "BiosError",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "LoraConfig",
    "ModelInput",
    "RequestFailedError",
    "RestClient",
    "SampleResponse",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
    "TrainingReport",
    "__version__",
    "exceptions",
    "train",
    "train_async",
    "types",
]
