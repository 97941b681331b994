"""The .proto written here speaks the same wire format as tritonclient's copy of the protocol,
and every domain error has one status in each transport."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as triton

from nacguard import errors
from nacguard.openinference import grpc_predict_v2_pb2 as ours
from nacguard.openinference.errors import grpc_status, is_v2_path, rest_status

MESSAGES = [
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerReadyResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ServerMetadataResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "InferParameter",
    "InferTensorContents",
    "ModelInferRequest",
    "ModelInferResponse",
]


def _fields(d: Descriptor) -> dict[str, object]:
    out: dict[str, object] = {f.name: (f.number, f.type, f.is_repeated) for f in d.fields}
    for nested in d.nested_types:
        out[nested.name] = _fields(nested)
    return out


@pytest.mark.parametrize("name", MESSAGES)
def test_messages_match_tritonclients(name: str) -> None:
    mine = ours.DESCRIPTOR.message_types_by_name[name]
    theirs = triton.DESCRIPTOR.message_types_by_name[name]
    assert mine.full_name == theirs.full_name
    mine_fields, their_fields = _fields(mine), _fields(theirs)
    # Triton's copy is a superset (more parameters); every field here must mean the same there.
    for field, spec in mine_fields.items():
        assert their_fields.get(field) == spec, (name, field)


def test_service_methods_exist_in_the_protocol() -> None:
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    for method in service.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name


def test_a_request_crosses_between_the_two_copies() -> None:
    request = ours.ModelInferRequest(model_name="m", id="7")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(b"\x01\x00\x00\x00x")
    request.parameters["timeout"].int64_param = 5
    parsed = triton.ModelInferRequest.FromString(request.SerializeToString())
    assert parsed.inputs[0].name == "image" and list(parsed.inputs[0].shape) == [1]
    assert parsed.raw_input_contents == [b"\x01\x00\x00\x00x"]
    assert parsed.parameters["timeout"].int64_param == 5


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.BadImage, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidRequest, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.UnsupportedMediaType, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.PayloadTooLarge, 413, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AuthenticationRequired, 401, grpc.StatusCode.UNAUTHENTICATED),
        (errors.NotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.Overloaded, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.NotReady, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.ShuttingDown, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, 504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.InferenceFailed, 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_has_one_status_per_transport(
    error: type[errors.NacguardError], status: int, code: grpc.StatusCode
) -> None:
    assert rest_status(error.status) == status
    assert grpc_status(error("x")) == code


def test_v2_paths() -> None:
    assert is_v2_path("/v2") and is_v2_path("/v2/models/m/infer")
    assert not is_v2_path("/v2x") and not is_v2_path("/predict")
