"""The Open Inference Protocol over REST: the ``/v2`` routes, an APIRouter the app mounts.

Requests come as JSON, or as the binary tensor data extension: a JSON header of
``Inference-Header-Content-Length`` bytes followed by the inputs' bytes, each input's share
declared by its ``binary_data_size`` parameter (``tritonclient`` sends this by default). An
output is answered in binary when its ``binary_data`` parameter (or the request's
``binary_data_output``) asks for it; the response is then a JSON header plus the outputs' bytes
in order, its length again in ``Inference-Header-Content-Length``.

Errors are the app's, in the protocol's shape (see :mod:`nacguard.openinference.errors`);
authentication, request ids, request metrics and shedding are the app's middleware, as for
``/predict``.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response

from nacguard.api.body import read_body
from nacguard.api.routes import _unless_disconnected
from nacguard.errors import InvalidRequest
from nacguard.serving import Service

from .protocol import InferCall, check_model, infer, model_metadata, server_metadata
from .tensors import InputTensor, OutputTensor

__all__ = ["BINARY_HEADER", "InferenceRequest", "InferenceResponse", "V2Error", "router"]

#: Header giving the JSON part's length in a binary tensor data body.
BINARY_HEADER = "Inference-Header-Content-Length"

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (KServe v2)"])


class _Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class _RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    """A v2 inference request (its JSON part)."""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[_Tensor]
    outputs: list[_RequestedOutput] | None = None


class InferenceResponse(BaseModel):
    """A v2 inference response (its JSON part)."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[_Tensor]


class V2Error(BaseModel):
    """The protocol's error body."""

    error: str = Field(description="What went wrong.")


_ERROR_TEXT: dict[int | str, str] = {
    400: "Malformed request, inputs or outputs; an image that does not decode.",
    404: "Unknown model or version.",
    413: "Body, image count, image size or pixel count over its limit.",
    429: "Queue full; retry after Retry-After seconds.",
    503: "Loading or draining; retry after Retry-After seconds.",
    504: "The deadline passed before compute.",
    # Also keeps FastAPI from declaring its 422 shape, which these routes never answer.
    "4XX": "Any other client error (401 without a valid API key, 405), in the same shape.",
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": V2Error, "description": text} for code, text in _ERROR_TEXT.items()
}
_ModelName = Annotated[str, Path(description="The model: the bundle's name.")]
_Version = Annotated[str, Path(description="The model's version (it has one, '1').")]


async def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _flag(parameters: dict[str, Any] | None, name: str, default: bool) -> bool:
    value = (parameters or {}).get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"parameter {name!r} must be true or false")
    return value


def _timeout_s(parameters: dict[str, Any] | None) -> float | None:
    """The request's ``timeout`` parameter (microseconds, tritonclient's convention)."""
    value = (parameters or {}).get("timeout")
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidRequest("parameter 'timeout' must be a positive integer (microseconds)")
    return value / 1e6


def _split(body: bytes, header: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON part, parsed, and the binary part of a request body."""
    binary = b""
    if header is not None:
        try:
            size = int(header)
        except ValueError:
            raise InvalidRequest(f"malformed {BINARY_HEADER} {header!r}") from None
        if not 0 <= size <= len(body):
            raise InvalidRequest(f"{BINARY_HEADER} {size} outside the body of {len(body)} bytes")
        body, binary = body[:size], body[size:]
    try:
        return InferenceRequest.model_validate_json(body), binary
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise InvalidRequest(f"invalid inference request: {problems}") from None


def _inputs(request: InferenceRequest, binary: bytes) -> list[InputTensor]:
    inputs = []
    offset = 0
    for item in request.inputs:
        size = (item.parameters or {}).get("binary_data_size")
        where = f"input {item.name!r}"
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidRequest(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidRequest(
                    f"{where}: binary_data_size {size} but only {len(binary) - offset} binary "
                    "bytes are left"
                )
            if item.data is not None:
                raise InvalidRequest(f"{where}: both data and binary_data_size")
            raw = binary[offset : offset + size]
            offset += size
            inputs.append(InputTensor(item.name, item.datatype, tuple(item.shape), raw=raw))
        elif isinstance(item.data, list):
            inputs.append(
                InputTensor(item.name, item.datatype, tuple(item.shape), elements=item.data)
            )
        else:
            raise InvalidRequest(f"{where}: needs data (a list) or binary_data_size")
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return inputs


def _encode(body: dict[str, Any], outputs: list[OutputTensor], binary: set[str]) -> Response:
    tails: list[bytes] = []
    items = []
    for tensor in outputs:
        item: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.name in binary:
            raw = tensor.raw()
            item["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            item["data"] = tensor.json_data()
        items.append(item)
    body["outputs"] = items
    # orjson, as /predict: the answer is built from typed outputs, nothing to validate.
    head = orjson.dumps(body)
    if not tails:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *tails]),
        media_type="application/octet-stream",
        headers={BINARY_HEADER: str(len(head))},
    )


@router.get("/health/live", summary="Liveness (v2)")
async def live() -> dict[str, bool]:
    """200 while the process runs."""
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Readiness (v2)",
    responses={503: {"description": "Loading or draining."}},
)
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 while starting or draining."""
    service = await _service(request)
    return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)


@router.get("", summary="Server metadata (v2)")
async def metadata() -> dict[str, Any]:
    """Server name, version and the protocol extensions it serves."""
    return server_metadata()


@router.get(
    "/models/{model_name}/versions/{model_version}",
    summary="Model metadata of a version (v2)",
    responses=_ERRORS,
)
async def model_version_metadata(
    request: Request, model_name: _ModelName, model_version: _Version
) -> Any:
    """The model's inputs and outputs, with datatype and shape."""
    return model_metadata(await _service(request), model_name, model_version)


@router.get("/models/{model_name}", summary="Model metadata (v2)", responses=_ERRORS)
async def model(request: Request, model_name: _ModelName) -> Any:
    """The model's inputs and outputs, with datatype and shape."""
    return await model_version_metadata(request, model_name, "")


@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    summary="Model readiness of a version (v2)",
    responses=_ERRORS,
)
async def model_version_ready(
    request: Request, model_name: _ModelName, model_version: _Version
) -> JSONResponse:
    """200 when the model is ready for inference, 503 while starting or draining."""
    service = await _service(request)
    check_model(service, model_name, model_version)
    return JSONResponse(
        {"name": model_name, "ready": service.ready}, status_code=200 if service.ready else 503
    )


@router.get("/models/{model_name}/ready", summary="Model readiness (v2)", responses=_ERRORS)
async def model_ready(request: Request, model_name: _ModelName) -> JSONResponse:
    """200 when the model is ready for inference, 503 while starting or draining."""
    return await model_version_ready(request, model_name, "")


_TENSOR_SCHEMA = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["image", "pixels"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
        "parameters": {"type": "object", "description": "binary_data_size: bytes in the tail"},
        "data": {"type": "array", "description": "BYTES: base64 strings; UINT8: integers"},
    },
}
_INFER_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _TENSOR_SCHEMA},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                },
            }
        },
        "application/octet-stream": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": f"Binary tensor data: a JSON header of {BINARY_HEADER} bytes, "
                "then the inputs' bytes.",
            }
        },
    },
    "required": True,
}


@router.post(
    "/models/{model_name}/infer",
    summary="Inference (v2)",
    response_model=InferenceResponse,
    responses=_ERRORS,
    openapi_extra={"requestBody": _INFER_BODY},
)
async def model_infer(request: Request, model_name: _ModelName) -> Response:
    """Predictions, NAC scores and OOD flags for the images of ``image`` or ``pixels``."""
    return await model_version_infer(request, model_name, "")


@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    summary="Inference on a version (v2)",
    response_model=InferenceResponse,
    responses=_ERRORS,
    openapi_extra={"requestBody": _INFER_BODY},
)
async def model_version_infer(
    request: Request, model_name: _ModelName, model_version: _Version
) -> Response:
    """Predictions, NAC scores and OOD flags for the images of ``image`` or ``pixels``."""
    service = await _service(request)
    admission = service.admit()
    try:
        body = await read_body(request, service.limits.max_body_bytes)
        parsed, binary = _split(body, request.headers.get(BINARY_HEADER.lower()))
        del body
        default_binary = _flag(parsed.parameters, "binary_data_output", False)
        requested = None if parsed.outputs is None else [o.name for o in parsed.outputs]
        binary_outputs = {
            o.name
            for o in parsed.outputs or ()
            if _flag(o.parameters, "binary_data", default_binary)
        }
        call = InferCall(
            model_name=model_name,
            model_version=model_version,
            request_id=parsed.id or "",
            inputs=_inputs(parsed, binary),
            outputs=requested,
        )
        # A client that leaves takes its images out of the queue, as with /predict.
        result = await _unless_disconnected(
            request,
            infer(
                service,
                call,
                admission=admission,
                timeout_s=_timeout_s(parsed.parameters),
                trace_id=request.state.request_id,
            ),
        )
    finally:
        admission.close()
    if parsed.outputs is None and default_binary:
        binary_outputs = {t.name for t in result.outputs}
    answer: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
    }
    if parsed.id is not None:
        answer["id"] = parsed.id
    response = _encode(answer, result.outputs, binary_outputs)
    outcome = result.outcome
    response.headers["X-Queue-Time-Ms"] = f"{outcome.queue_s * 1000:.3f}"
    response.headers["X-Inference-Time-Ms"] = f"{outcome.inference_s * 1000:.3f}"
    response.headers["X-Batch-Sizes"] = ",".join(str(b.size) for b in outcome.batches)
    if outcome.after_response is not None:
        response.background = BackgroundTask(outcome.after_response)
    return response
