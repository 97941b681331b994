"""Tensors of the Open Inference Protocol, shared by its REST and gRPC adapters.

The wire forms: JSON ``data`` (a flat or nested list; BYTES elements are base64 strings, the
KServe convention, since image bytes are not text), the binary tensor data extension and gRPC's
``raw_*_contents`` (little-endian, row-major; a BYTES element is a 4-byte little-endian length
and its bytes), and gRPC's typed ``contents``. Whatever the form, inputs become the encoded
images :meth:`Service.predict` takes, under the same limits as ``/predict``; predictions become
the model's output tensors.

The model's tensors:

* inputs (exactly one per request): ``image``, BYTES ``[B]``, encoded images (PNG, JPEG, ...);
  or ``pixels``, UINT8 ``[B, H, W, C]`` with C = 1 (grey), 3 (RGB) or 4 (RGBA).
* outputs, all ``[B]``: ``label`` BYTES, ``class_index`` INT64, ``confidence`` FP32,
  ``nac_score`` FP32 (NaN with scoring off), ``p_value`` FP64 (the conformal p-value of
  ``/predict``; NaN with scoring off), ``ood`` BOOL; and, only when requested,
  ``probabilities`` FP32 ``[B, classes]``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from nacguard.bundle import Prediction
from nacguard.errors import InvalidRequest, PayloadTooLarge
from nacguard.imaging import InputLimits, RawImage

__all__ = [
    "DEFAULT_OUTPUTS",
    "INPUTS",
    "OUTPUTS",
    "InputTensor",
    "OutputTensor",
    "TensorSpec",
    "check_outputs",
    "images_from_inputs",
    "join_bytes",
    "outputs_for",
    "split_bytes",
]

#: Bytes per element of each fixed-size datatype of the protocol.
_ITEM_SIZE = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "FP32": 4,
    "FP64": 8,
}
_DATATYPES = frozenset({*_ITEM_SIZE, "BYTES", "BF16"})
_LENGTH = struct.Struct("<I")
# Pixel layouts an image of that size decodes to (what the preprocessing then normalizes).
_PIXEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor in the model's metadata (``-1``: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


INPUTS = (
    TensorSpec("image", "BYTES", (-1,)),
    TensorSpec("pixels", "UINT8", (-1, -1, -1, -1)),
)
#: Every output; ``probabilities`` has the number of classes as its second dimension.
OUTPUTS = (
    TensorSpec("label", "BYTES", (-1,)),
    TensorSpec("class_index", "INT64", (-1,)),
    TensorSpec("confidence", "FP32", (-1,)),
    TensorSpec("nac_score", "FP32", (-1,)),
    TensorSpec("p_value", "FP64", (-1,)),
    TensorSpec("ood", "BOOL", (-1,)),
    TensorSpec("probabilities", "FP32", (-1, -1)),
)
#: Outputs answered when a request names none.
DEFAULT_OUTPUTS = ("label", "class_index", "confidence", "nac_score", "p_value", "ood")


@dataclass(frozen=True)
class InputTensor:
    """One input as received, in exactly one of two forms.

    Attributes:
        name: the input's name.
        datatype: the protocol datatype (``BYTES``, ``UINT8``, ...).
        shape: the declared shape.
        raw: the binary form (binary extension, ``raw_input_contents``).
        elements: the elements, flattened row-major (JSON ``data``, gRPC ``contents``); BYTES
            elements are ``bytes`` (gRPC) or base64 ``str`` (JSON).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes | None = None
    elements: Sequence[Any] | None = None


@dataclass(frozen=True)
class OutputTensor:
    """One output: shape, datatype and values (``bytes`` items for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray | list[bytes]

    def raw(self) -> bytes:
        """The binary form (binary extension, ``raw_output_contents``)."""
        if isinstance(self.values, list):
            return join_bytes(self.values)
        return self.values.tobytes()

    def json_data(self) -> list[Any]:
        """The JSON form: a flat list (NaN, which JSON lacks, as ``null``)."""
        if isinstance(self.values, list):
            return [v.decode("utf-8", "replace") for v in self.values]
        flat = self.values.reshape(-1).tolist()
        if self.values.dtype.kind == "f":
            return [None if v != v else v for v in flat]
        return flat


def split_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    """Split a binary BYTES tensor into its ``count`` elements.

    Raises:
        InvalidRequest: the length prefixes do not add up to exactly ``count`` elements filling
            ``raw`` (truncated, overlong, trailing bytes).
    """
    items: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidRequest(f"{where}: element {i} has no 4-byte length (data truncated)")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequest(
                f"{where}: element {i} declares {size} bytes; only {len(raw) - offset} follow"
            )
        items.append(bytes(view[offset : offset + size]))
        offset += size
    if offset != len(raw):
        raise InvalidRequest(f"{where}: {len(raw) - offset} bytes after the last of {count} items")
    return items


def join_bytes(items: Iterable[bytes]) -> bytes:
    """The binary form of BYTES elements: each as a 4-byte little-endian length and its bytes."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def _count(shape: Sequence[int], where: str) -> int:
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"{where}: negative dimension in shape {list(shape)}")
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _flatten(data: Any) -> list[Any]:
    """JSON ``data`` may be nested like the shape; the protocol reads it row-major."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    out: list[Any] = []
    for x in data:
        out.extend(_flatten(x))
    return out


def _image(data: bytes, limits: InputLimits, index: int) -> RawImage:
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"image {index}: {len(data)} bytes; the limit is {limits.max_image_bytes} bytes"
        )
    return RawImage(data=data, sha256=hashlib.sha256(data).hexdigest())


def _encoded_images(tensor: InputTensor, limits: InputLimits) -> list[RawImage]:
    where = "input 'image'"
    if len(tensor.shape) != 1:
        raise InvalidRequest(f"{where}: shape must be [B], got {list(tensor.shape)}")
    count = _count(tensor.shape, where)
    _check_count(count, limits)
    if tensor.raw is not None:
        items = split_bytes(tensor.raw, count, where)
    else:
        elements = _flatten(tensor.elements) if tensor.elements is not None else []
        if len(elements) != count:
            raise InvalidRequest(f"{where}: {len(elements)} elements for shape [{count}]")
        items = [_element_bytes(e, limits, i) for i, e in enumerate(elements)]
    return [_image(data, limits, i) for i, data in enumerate(items)]


def _element_bytes(element: Any, limits: InputLimits, index: int) -> bytes:
    if isinstance(element, bytes):
        return element
    if not isinstance(element, str):
        raise InvalidRequest(f"input 'image': element {index} must be a base64 string")
    # 4 base64 characters carry 3 bytes: refuse an oversized image before decoding it.
    if len(element) // 4 * 3 > limits.max_image_bytes + 3:
        raise PayloadTooLarge(f"image {index}: larger than {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"input 'image': element {index} is not valid base64") from None


def _pixel_images(tensor: InputTensor, limits: InputLimits) -> list[RawImage]:
    where = "input 'pixels'"
    if len(tensor.shape) != 4:
        raise InvalidRequest(f"{where}: shape must be [B, H, W, C], got {list(tensor.shape)}")
    count = _count(tensor.shape, where)
    batch, height, width, channels = tensor.shape
    _check_count(batch, limits)
    mode = _PIXEL_MODES.get(channels)
    if mode is None or height == 0 or width == 0:
        raise InvalidRequest(f"{where}: need H, W >= 1 and C of 1, 3 or 4; got {tensor.shape}")
    if height * width > limits.max_pixels:
        raise PayloadTooLarge(
            f"{where}: {width}x{height} pixels; the limit is {limits.max_pixels} pixels"
        )
    if tensor.raw is not None:
        if len(tensor.raw) != count:
            raise InvalidRequest(f"{where}: {len(tensor.raw)} bytes for {count} UINT8 elements")
        array = np.frombuffer(tensor.raw, dtype=np.uint8)
    else:
        elements = _flatten(tensor.elements) if tensor.elements is not None else []
        if len(elements) != count:
            raise InvalidRequest(f"{where}: {len(elements)} elements for shape {tensor.shape}")
        try:
            wide = np.asarray(elements, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise InvalidRequest(f"{where}: elements must be integers 0-255") from None
        if wide.size and (wide.min() < 0 or wide.max() > 255):
            raise InvalidRequest(f"{where}: elements must be integers 0-255")
        array = wide.astype(np.uint8)
    array = array.reshape(batch, height, width, channels)
    # Wrapped losslessly (PNG, stored uncompressed) so they take the path of an image of that
    # size: the same decode policy, preprocessing, limits and result-cache key.
    images = []
    for i in range(batch):
        pixels = array[i, :, :, 0] if channels == 1 else array[i]
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels), mode).save(
            buffer, format="PNG", compress_level=0
        )
        images.append(_image(buffer.getvalue(), limits, i))
    return images


def _check_count(count: int, limits: InputLimits) -> None:
    if count < 1:
        raise InvalidRequest("the request holds no images (B must be at least 1)")
    if count > limits.max_images:
        raise PayloadTooLarge(
            f"more than {limits.max_images} images in one request (max_images_per_request)"
        )


def images_from_inputs(inputs: Sequence[InputTensor], limits: InputLimits) -> list[RawImage]:
    """The encoded images of a request's inputs, enforcing the ``/predict`` limits.

    Raises:
        InvalidRequest: not exactly one input, an unknown name, a wrong datatype or shape, or
            data that does not match the shape.
        PayloadTooLarge: too many images, or one over a size limit.
    """
    names = ", ".join(f"'{t.name}' ({t.datatype} {list(t.shape)})" for t in INPUTS)
    if len(inputs) != 1:
        raise InvalidRequest(f"expected exactly one input, one of {names}; got {len(inputs)}")
    tensor = inputs[0]
    spec = next((t for t in INPUTS if t.name == tensor.name), None)
    if spec is None:
        raise InvalidRequest(f"unknown input {tensor.name!r}; the model takes one of {names}")
    if tensor.datatype != spec.datatype:
        known = "" if tensor.datatype in _DATATYPES else " (not a protocol datatype)"
        raise InvalidRequest(
            f"input {tensor.name!r} must be {spec.datatype}, got {tensor.datatype!r}{known}"
        )
    if tensor.name == "image":
        return _encoded_images(tensor, limits)
    return _pixel_images(tensor, limits)


def check_outputs(requested: Sequence[str] | None) -> list[str]:
    """The output names to answer (the default ones when ``requested`` is ``None``).

    Raises:
        InvalidRequest: an unknown or repeated output name.
    """
    names = list(DEFAULT_OUTPUTS if requested is None else requested)
    known = {t.name for t in OUTPUTS}
    for name in names:
        if name not in known:
            raise InvalidRequest(
                f"unknown output {name!r}; the model has {', '.join(sorted(known))}"
            )
    if len(set(names)) != len(names):
        raise InvalidRequest("an output is requested twice")
    return names


def outputs_for(
    predictions: Sequence[Prediction], requested: Sequence[str] | None
) -> list[OutputTensor]:
    """The output tensors of ``predictions`` (``requested`` names, default ones when ``None``).

    Raises:
        InvalidRequest: an unknown or repeated output name.
    """
    names = check_outputs(requested)
    batch = (len(predictions),)
    out = []
    for name in names:
        values: np.ndarray | list[bytes]
        if name == "label":
            values, datatype = [p.label.encode("utf-8") for p in predictions], "BYTES"
        elif name == "class_index":
            values, datatype = np.array([p.class_index for p in predictions], "<i8"), "INT64"
        elif name == "ood":
            values, datatype = np.array([p.ood for p in predictions], np.bool_), "BOOL"
        elif name == "p_value":  # FP64: the same number /predict answers
            values, datatype = np.array([p.p_value for p in predictions], "<f8"), "FP64"
        elif name == "probabilities":
            values = np.array([p.probabilities for p in predictions], "<f4")
            values, datatype = values.reshape(len(predictions), -1), "FP32"
        else:  # confidence, nac_score
            values = np.array([getattr(p, name) for p in predictions], "<f4")
            datatype = "FP32"
        shape = batch if isinstance(values, list) else tuple(values.shape)
        out.append(OutputTensor(name, datatype, shape, values))
    return out
