"""What the Open Inference Protocol asks of the service, whatever the transport.

Health, server and model metadata, and inference, each over the one :class:`Service`: the
REST router and the gRPC servicer only translate their wire forms to these calls and back, so
both share ``/predict``'s admission (and so its 429/503 shedding and drain), batcher, limits,
result cache and prediction metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nacguard
from nacguard.errors import NotFound
from nacguard.serving import Admission, PredictOutcome, Service

from .tensors import (
    INPUTS,
    OUTPUTS,
    InputTensor,
    OutputTensor,
    check_outputs,
    images_from_inputs,
    outputs_for,
)

__all__ = [
    "EXTENSIONS",
    "MODEL_VERSION",
    "SERVER_NAME",
    "InferCall",
    "InferResult",
    "check_model",
    "infer",
    "model_metadata",
    "resolve_model",
    "server_metadata",
]

SERVER_NAME = "nacguard"
#: The version of a single ``--profile`` bundle (a one-model repository).
MODEL_VERSION = "1"
#: Protocol extensions served (REST): the binary tensor data extension.
EXTENSIONS = ("binary_tensor_data",)
_PLATFORM = "nacguard"
# Parsing a request this small (splitting, hashing) costs less than a hop to a thread and back.
_INLINE_PARSE_BYTES = 64 * 1024


@dataclass(frozen=True)
class InferCall:
    """One inference request, transport aside.

    Attributes:
        model_name: the model named in the request.
        model_version: the version named, ``""`` for any.
        request_id: the request's ``id`` (echoed; ``""`` when absent).
        inputs: the input tensors.
        outputs: the requested output names; ``None`` for the default outputs.
    """

    model_name: str
    model_version: str
    request_id: str
    inputs: Sequence[InputTensor]
    outputs: Sequence[str] | None


@dataclass
class InferResult:
    """The answer: output tensors, and the outcome (timings, side effects) of the prediction."""

    model_name: str
    outputs: list[OutputTensor]
    outcome: PredictOutcome
    model_version: str = MODEL_VERSION


def resolve_model(service: Service, name: str, version: str = "") -> tuple[str, int | None]:
    """The repository model and version a protocol name and version address.

    A model is named by its repository name, or by the profile name of its served bundle (what
    a single ``--profile`` server has always answered to); ``version`` is a loaded version
    number, ``""`` for the served one.

    Raises:
        NotReady: not loaded yet (names are unknown until then).
        NotFound: another model, or a version not loaded.
    """
    default = service.served()  # NotReady before loading
    table = service.table
    models = table.models()
    model = name if name in models else None
    if model is None:
        for candidate in models:
            served = table.served_or_none(candidate)
            if served is not None and served.bundle.name == name:
                model = candidate
                break
    if model is None:
        names = sorted({*models, default.bundle.name})
        raise NotFound(f"unknown model {name!r}; this server serves {names}")
    if version == "":
        return model, None
    if not version.isdigit() or int(version) not in models[model]:
        loaded = [str(v) for v in models[model]]
        raise NotFound(f"unknown version {version!r} of model {name!r}; it has {loaded}")
    return model, int(version)


def check_model(service: Service, name: str, version: str = "") -> None:
    """Raise unless ``name`` (and ``version``, when given) is a served model (version).

    Raises:
        NotReady: not loaded yet.
        NotFound: another model or version.
    """
    resolve_model(service, name, version)


def server_metadata() -> dict[str, Any]:
    """Server name, version and extensions."""
    return {"name": SERVER_NAME, "version": nacguard.__version__, "extensions": list(EXTENSIONS)}


def model_metadata(service: Service, name: str, version: str = "") -> dict[str, Any]:
    """The model's metadata: inputs and outputs with datatype and shape.

    Raises:
        NotReady: not loaded yet.
        NotFound: another model or version.
    """
    model, number = resolve_model(service, name, version)
    bundle = service.served(model, number).bundle
    classes = len(bundle.classes)

    def shape(spec_shape: tuple[int, ...], output: str) -> list[int]:
        return [-1, classes] if output == "probabilities" else list(spec_shape)

    return {
        "name": name,
        "versions": [str(v) for v in service.table.models()[model]],
        "platform": _PLATFORM,
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in INPUTS
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": shape(t.shape, t.name)}
            for t in OUTPUTS
        ],
    }


async def infer(
    service: Service,
    call: InferCall,
    *,
    admission: Admission,
    timeout_s: float | None = None,
    trace_id: str,
) -> InferResult:
    """Run one inference request through the service.

    Args:
        service: the service.
        call: the request.
        admission: the request's admission (:meth:`Service.admit`, taken by the caller before
            it read the request, as ``/predict`` does; the caller closes it).
        timeout_s: the client's deadline, capped by ``request_timeout_s``.
        trace_id: the id recorded with flagged images (the request id, else a generated one).

    Raises:
        NacguardError: unknown model, bad inputs or outputs, or what the batcher raises
            (overloaded, deadline, draining, inference failed).
    """
    model, number = resolve_model(service, call.model_name, call.model_version)
    timeout = service.settings.request_timeout_s
    if timeout_s is not None:
        timeout = min(timeout, timeout_s)
    deadline = time.monotonic() + timeout
    size = sum(len(t.raw or b"") + len(t.elements or ()) for t in call.inputs)
    if size <= _INLINE_PARSE_BYTES:
        images = images_from_inputs(call.inputs, service.limits)
    else:
        images = await asyncio.to_thread(images_from_inputs, call.inputs, service.limits)
    # Outputs are checked before any compute, so a bad name costs none.
    check_outputs(call.outputs)
    outcome = await service.predict(
        images,
        deadline=deadline,
        request_id=trace_id,
        admission=admission,
        model=model,
        version=number,
    )
    return InferResult(
        model_name=call.model_name,
        outputs=outputs_for(outcome.predictions, call.outputs),
        outcome=outcome,
        model_version=str(outcome.version),
    )
