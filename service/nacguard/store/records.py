"""How a review record is written down: Redis Stream fields, and the JSON/CSV row that both the
local review folder and ``export_review`` produce (one format for reviewers, whatever the
backend)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, runtime_checkable

from nacguard.store.base import ReviewRecord

__all__ = [
    "INDEX_COLUMNS",
    "REVIEW_MARKS",
    "ReviewEntry",
    "ReviewItem",
    "ReviewLog",
    "ReviewMark",
    "entry_from_fields",
    "entry_from_row",
    "image_extension",
    "safe_name",
    "stream_fields",
]

# The formats the API accepts (settings.allowed_formats); anything else is kept as .bin.
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/bmp": "bmp",
    "image/x-ms-bmp": "bmp",
    "image/tiff": "tiff",
}

#: Column order of index.csv (and key order of each index.json object).
INDEX_COLUMNS = (
    "id",
    "request_id",
    "profile",
    "model",
    "version",
    "label",
    "class_index",
    "score",
    "threshold",
    "time",
    "time_utc",
    "content_type",
    "image_size",
    "image_file",
)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def image_extension(content_type: str) -> str:
    """File extension (no dot) for a media type; ``bin`` when unknown."""
    return _EXTENSIONS.get(content_type.split(";")[0].strip().lower(), "bin")


def safe_name(text: str, limit: int = 64) -> str:
    """``text`` reduced to characters safe in a file name on any OS (request ids are client
    supplied, so they must never steer a path)."""
    return _UNSAFE.sub("_", text)[:limit].strip("._") or "x"


def stream_fields(
    record: ReviewRecord, profile: str, max_image_bytes: int, *, model: str = "", version: int = 0
) -> dict[str, Any]:
    """The fields of one stream entry. ``image`` is present only when the bytes are known and
    within ``max_image_bytes``; ``image_size`` always gives the original size (0 = unknown);
    ``model`` and ``version`` name the served version that scored it (the model repository's)."""
    size = len(record.image) if record.image is not None else 0
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "profile": profile,
        "model": model,
        "version": version,
        "label": record.label,
        "class_index": record.class_index,
        # repr keeps every bit of a float; str() of a numpy float would too, but not of all.
        "score": repr(float(record.score)),
        "threshold": repr(float(record.threshold)),
        "time": repr(float(record.time)),
        "content_type": record.content_type,
        "image_size": size,
    }
    if record.image is not None and size <= max_image_bytes:
        fields["image"] = record.image
    return fields


@dataclass(frozen=True)
class ReviewEntry:
    """One record as read back from the stream (or the local folder).

    Attributes:
        id: the stream entry id (``<ms>-<seq>``) or, locally, the file stem.
        profile: identity of the profile that scored the image.
        record: the record; ``record.image`` is ``None`` where the bytes were not kept.
        image_size: size of the original image in bytes (0 = unknown).
        model: the model that scored it (empty in records from before the model repository).
        version: that model's version (0 when unknown).
    """

    id: str
    profile: str
    record: ReviewRecord
    image_size: int
    model: str = ""
    version: int = 0

    def row(self, image_file: str | None) -> dict[str, Any]:
        """The index row for this entry (``image_file`` relative to the index, or ``None``)."""
        rec = self.record
        return {
            "id": self.id,
            "request_id": rec.request_id,
            "profile": self.profile,
            "model": self.model,
            "version": self.version,
            "label": rec.label,
            "class_index": rec.class_index,
            "score": rec.score,
            "threshold": rec.threshold,
            "time": rec.time,
            "time_utc": (
                datetime.fromtimestamp(rec.time, UTC).isoformat() if math.isfinite(rec.time) else ""
            ),
            "content_type": rec.content_type,
            "image_size": self.image_size,
            "image_file": image_file,
        }


def _text(fields: dict[bytes, bytes], name: str, default: str = "") -> str:
    raw = fields.get(name.encode())
    return raw.decode("utf-8", "replace") if raw is not None else default


def entry_from_fields(entry_id: bytes | str, fields: dict[bytes, bytes]) -> ReviewEntry:
    """Decode one raw stream entry (``decode_responses=False``) into a :class:`ReviewEntry`.

    Missing or malformed numbers decode as NaN / -1 rather than failing the whole export: a
    stream may hold entries written by another version.
    """

    def number(name: str) -> float:
        try:
            return float(_text(fields, name, "nan"))
        except ValueError:
            return float("nan")

    def integer(name: str, default: int) -> int:
        try:
            return int(_text(fields, name, str(default)))
        except ValueError:
            return default

    ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    record = ReviewRecord(
        request_id=_text(fields, "request_id"),
        score=number("score"),
        label=_text(fields, "label"),
        class_index=integer("class_index", -1),
        threshold=number("threshold"),
        time=number("time"),
        image=fields.get(b"image"),
        content_type=_text(fields, "content_type", "application/octet-stream"),
    )
    return ReviewEntry(
        id=ident,
        profile=_text(fields, "profile"),
        record=record,
        image_size=integer("image_size", 0),
        model=_text(fields, "model"),
        version=integer("version", 0),
    )


def entry_from_row(row: dict[str, Any], image: bytes | None) -> ReviewEntry:
    """The inverse of :meth:`ReviewEntry.row` (a local review folder's ``<stem>.json``), with
    the image bytes read beside it. Malformed numbers decode as NaN / -1, as from the stream."""

    def number(name: str) -> float:
        try:
            return float(row.get(name, "nan"))
        except (TypeError, ValueError):
            return float("nan")

    def integer(name: str, default: int) -> int:
        try:
            return int(row.get(name, default))
        except (TypeError, ValueError):
            return default

    record = ReviewRecord(
        request_id=str(row.get("request_id", "")),
        score=number("score"),
        label=str(row.get("label", "")),
        class_index=integer("class_index", -1),
        threshold=number("threshold"),
        time=number("time"),
        image=image,
        content_type=str(row.get("content_type") or "application/octet-stream"),
    )
    return ReviewEntry(
        id=str(row.get("id", "")),
        profile=str(row.get("profile", "")),
        record=record,
        image_size=integer("image_size", 0),
        model=str(row.get("model") or ""),
        version=integer("version", 0),
    )


#: What an operator can say about a flagged image: it was in-distribution after all (a false
#: alarm), or it really is out-of-distribution.
ReviewMark = Literal["ind", "ood"]
REVIEW_MARKS: tuple[ReviewMark, ...] = ("ind", "ood")


@dataclass(frozen=True)
class ReviewItem:
    """A review entry with the operator's mark.

    Attributes:
        entry: the flagged image's record.
        mark: ``"ind"``, ``"ood"``, or ``None`` (not reviewed yet).
    """

    entry: ReviewEntry
    mark: ReviewMark | None


@runtime_checkable
class ReviewLog(Protocol):
    """A review sink that can be read back and marked (both backends provide it).

    Reads return ``None`` when the backend cannot answer now (Redis down); they never raise.
    """

    async def recent(self, limit: int) -> list[ReviewItem] | None:
        """The ``limit`` most recent entries, newest first."""
        ...

    async def get(self, entry_id: str) -> ReviewItem | None:
        """One entry by id, or ``None`` (unknown, malformed id, trimmed, or backend down)."""
        ...

    async def mark(self, entry_id: str, mark: ReviewMark | None) -> bool | None:
        """Mark an entry (``None`` clears the mark): ``True`` when done, ``False`` when there is
        no such entry, ``None`` when the backend cannot answer now."""
        ...

    async def marked(self, limit: int) -> list[ReviewItem] | None:
        """Up to ``limit`` marked entries still in the log, newest first."""
        ...
