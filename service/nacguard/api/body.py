"""Reading ``/predict`` requests: the body (streamed, size-limited) and the three input forms
(raw image, multipart, JSON base64), with the per-request count and size limits.

Decoding, the limits and where the work runs are :mod:`nacguard.imaging.decode`'s.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from nacguard.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from nacguard.imaging.decode import InputLimits, RawImage

from .schemas import IMAGE_MEDIA_TYPES, PredictJSON

__all__ = ["parse_images", "read_body"]

_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


async def read_body(request: Request, limit: int) -> bytes:
    """Read the request body, refusing it as soon as it exceeds ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading anything; the
    streamed size is checked as well, since a chunked body declares none and a declared one may
    lie.

    Raises:
        PayloadTooLarge: the body is larger than ``limit``.
        InvalidRequest: a malformed ``Content-Length``.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidRequest(f"malformed Content-Length {declared!r}") from None
        if size > limit:
            raise PayloadTooLarge(f"body of {size} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"body larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _raw(data: bytes, limits: InputLimits, index: int) -> RawImage:
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(
            f"image {index}: {len(data)} bytes; the limit is {limits.max_image_bytes} bytes"
        )
    return RawImage(data=data, sha256=hashlib.sha256(data).hexdigest())


def _check_count(count: int, limits: InputLimits) -> None:
    if count > limits.max_images:
        raise PayloadTooLarge(
            f"more than {limits.max_images} images in one request (max_images_per_request)"
        )


def _check_image_type(media_type: str, where: str) -> None:
    """Refuse declared image types we cannot decode (``image/svg+xml``, ``image/avif``...)."""
    if media_type.startswith("image/") and media_type not in IMAGE_MEDIA_TYPES:
        accepted = ", ".join(IMAGE_MEDIA_TYPES)
        raise UnsupportedMediaType(f"{where}: {media_type} is not accepted; use one of {accepted}")


def _parse_multipart(body: bytes, boundary: bytes, limits: InputLimits) -> list[RawImage]:
    parts: list[bytearray] = []
    part_types: list[str] = []
    header_field = bytearray()
    header_value = bytearray()
    ended = False

    def on_part_begin() -> None:
        _check_count(len(parts) + 1, limits)
        parts.append(bytearray())
        part_types.append("")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1] += data[start:end]
        if len(parts[-1]) > limits.max_image_bytes:
            raise PayloadTooLarge(
                f"image {len(parts) - 1}: larger than {limits.max_image_bytes} bytes"
            )

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        if header_field.strip().lower() == b"content-type":
            part_types[-1] = parse_options_header(bytes(header_value))[0].decode("latin-1")
        header_field.clear()
        header_value.clear()

    def on_end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_end": on_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}") from None
    if not ended:
        raise InvalidRequest("malformed multipart body: no closing boundary")
    if not parts:
        raise InvalidRequest("the multipart body holds no parts (one part per image)")
    for i, media_type in enumerate(part_types):
        _check_image_type(media_type, f"part {i}")
    return [_raw(bytes(data), limits, i) for i, data in enumerate(parts)]


def _b64(text: str, limits: InputLimits, index: int) -> RawImage:
    text = _DATA_URL.sub("", text, count=1)
    # 4 base64 characters carry 3 bytes: refuse oversized images before decoding them.
    if len(text) // 4 * 3 > limits.max_image_bytes + 3:
        raise PayloadTooLarge(
            f"image {index}: larger than {limits.max_image_bytes} bytes (after base64 decoding)"
        )
    try:
        data = base64.b64decode(_WHITESPACE.sub(b"", text.encode("ascii")), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InvalidRequest(f"images[{index}] is not valid base64") from None
    return _raw(data, limits, index)


def _parse_json(body: bytes, limits: InputLimits) -> list[RawImage]:
    try:
        request = PredictJSON.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise InvalidRequest(f"invalid JSON body: {problems}") from None
    _check_count(len(request.images), limits)
    return [_b64(text, limits, i) for i, text in enumerate(request.images)]


def parse_images(body: bytes, content_type: str | None, limits: InputLimits) -> list[RawImage]:
    """Split a ``/predict`` body into its encoded images, enforcing the count and size limits.

    Args:
        body: the whole body (already bounded by ``max_body_bytes``).
        content_type: the request's ``Content-Type`` header.
        limits: the request limits.

    Returns:
        The images in request order (at least one).

    Raises:
        UnsupportedMediaType: a content type other than multipart/form-data, application/json
            or an accepted image type.
        InvalidRequest: malformed multipart or JSON, bad base64, no images.
        PayloadTooLarge: too many images, or one image over ``max_image_bytes``.
    """
    raw_type, params = parse_options_header(content_type or "")
    media_type = raw_type.decode("latin-1")
    if media_type == "multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise InvalidRequest("multipart/form-data without a boundary parameter")
        return _parse_multipart(body, boundary, limits)
    if media_type == "application/json" or media_type.endswith("+json"):
        return _parse_json(body, limits)
    if media_type in IMAGE_MEDIA_TYPES:
        return [_raw(body, limits, 0)]
    _check_image_type(media_type, "Content-Type")
    raise UnsupportedMediaType(
        f"Content-Type {media_type or '(none)'} is not accepted; send multipart/form-data, "
        "application/json or an image type such as image/png"
    )
