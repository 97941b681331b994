"""Request and response bodies of the HTTP API, as declared in the OpenAPI document.

``/predict`` reads its body itself (three content types, streamed with a size limit), so its
request body is declared by hand in :data:`PREDICT_REQUEST_BODY`; the JSON variant is
:class:`PredictJSON`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "IMAGE_MEDIA_TYPES",
    "PREDICT_REQUEST_BODY",
    "DriftOut",
    "ErrorDetail",
    "ErrorResponse",
    "HealthOut",
    "PredictJSON",
    "PredictResponse",
    "PredictionOut",
    "ProfileOut",
    "ReadyOut",
    "TopKEntry",
]

#: Media types accepted as a raw image body, and the Pillow format each announces.
#: ``application/octet-stream`` leaves the format to the bytes.
IMAGE_MEDIA_TYPES: dict[str, str | None] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
    "image/bmp": "BMP",
    "image/x-ms-bmp": "BMP",
    "image/tiff": "TIFF",
    "application/octet-stream": None,
}


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable code, e.g. `bad_image`, `overloaded`.")
    message: str = Field(description="Human-readable explanation; never a stack trace.")


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class TopKEntry(BaseModel):
    """One of the most probable classes."""

    label: str
    confidence: float = Field(ge=0, le=1)


class PredictionOut(BaseModel):
    """The answer for one image."""

    label: str = Field(description="Predicted class.")
    class_index: int = Field(ge=0)
    confidence: float = Field(ge=0, le=1, description="Softmax probability of the class.")
    nac_score: float | None = Field(
        description="NAC-UE score in [0, 1]; higher = more in-distribution. "
        "Null when the server runs with scoring off."
    )
    p_value: float | None = Field(
        description="Conformal p-value in (0, 1]: the share of held-out InD calibration images "
        "scoring at or below this one (plus one, over n + 1). Small = unusual. Null when not "
        "scored."
    )
    ood: bool = Field(
        description="The image looks out-of-distribution: nac_score < threshold, or "
        "p_value < alpha when the server flags by alpha."
    )
    threshold: float | None = Field(
        description="The NAC threshold that applied (the predicted class's under per-class "
        "calibration); null under the fused detector."
    )
    top_k: list[TopKEntry] = Field(description="Most probable classes, most probable first.")
    layers: dict[str, float] | None = Field(
        None,
        description="explain=true: per-layer NAC scores (their mean is nac_score).",
    )
    least_covered_layer: str | None = Field(
        None, description="explain=true: the layer with the lowest per-layer score."
    )
    p_values: dict[str, float] | None = Field(
        None,
        description="explain=true: every detector's p-value (nac, and with a profile that "
        "stores them msp, energy, fused).",
    )


class PredictResponse(BaseModel):
    """One prediction per image, in request order."""

    model: str = Field(
        description="The model that answered: its repository name (with a single --profile, "
        "the architecture's name)."
    )
    version: int = Field(description="The model version that answered.")
    profile: str
    predictions: list[PredictionOut]


class PredictJSON(BaseModel):
    """JSON request body of ``/predict``."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        min_length=1,
        description="Base64-encoded image files (standard alphabet, padded); a "
        "`data:image/...;base64,` prefix is accepted.",
    )


class HealthOut(BaseModel):
    """Liveness, plus what a human debugging a pod wants to see at a glance."""

    status: str = Field(description="Always `alive`.")
    ready: bool
    draining: bool
    predict_requests_in_progress: int = Field(
        description="/predict requests received and not yet answered."
    )
    pid: int = Field(description="Process id of the worker that answered.")
    workers: int = Field(description="Worker processes of this server (`workers` setting).")


class ReadyOut(BaseModel):
    """Readiness."""

    status: str = Field(description="`ready`.")
    profile: str
    model: str


class ProfileOut(BaseModel):
    """The served profile: model, classes, monitored layers, threshold and calibration."""

    model_config = ConfigDict(extra="allow")

    name: str
    identity: str
    served_model: str = Field(description="The model's repository name.")
    version: int = Field(description="The version described.")
    model: dict[str, Any]
    classes: list[str]
    preprocess: dict[str, Any]
    layers: list[dict[str, Any]]
    threshold: float | None
    calibration: dict[str, Any] | None
    sanity: dict[str, Any] | None = None


class DriftOut(BaseModel):
    """Drift of recent NAC scores against the profile's calibration scores."""

    scope: str = Field(description="`local` (this replica) or `fleet` (all, via Redis).")
    window_s: float
    samples: int
    min_samples: int
    enough_samples: bool
    ood_rate: float | None
    expected_ood_rate: float
    psi: float | None
    psi_threshold: float
    ks: float | None
    ks_threshold: float
    drifting: bool


def _predict_request_body() -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "images": {
                        "type": "array",
                        "items": binary,
                        "description": "One part per image (any part name), in order.",
                    }
                },
                "required": ["images"],
            },
            "encoding": {"images": {"contentType": "image/*"}},
        },
        "application/json": {"schema": PredictJSON.model_json_schema()},
    }
    for media_type in IMAGE_MEDIA_TYPES:
        content[media_type] = {"schema": binary}
    return {
        "required": True,
        "description": "One or more images: multipart parts, one raw image, or base64 in JSON.",
        "content": content,
    }


#: OpenAPI ``requestBody`` of ``/predict``.
PREDICT_REQUEST_BODY: dict[str, Any] = _predict_request_body()
