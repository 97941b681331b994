"""Reading the OOD review stream: a consumer-group reader, and the export to a folder.

``export_review`` is what ``nacguard review export`` runs. Unlike the serving path, it is a
tool a person runs: a Redis that cannot be reached is an error it raises, not something to
degrade around.

Export layout (``out_dir``)::

    images/<entry id>.<ext>   the image bytes, where the stream kept them
    index.json                list of rows (see ``INDEX_COLUMNS``), merged across runs by id
    index.csv                 the same rows as CSV
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from nacguard.store.records import (
    INDEX_COLUMNS,
    ReviewEntry,
    entry_from_fields,
    image_extension,
    safe_name,
)

__all__ = ["DEFAULT_STREAM", "ExportResult", "ReviewReader", "export_review"]

#: Same default as ``Settings.review_stream``.
DEFAULT_STREAM = "nacguard:ood"

_RawEntry = tuple[bytes, dict[bytes, bytes] | None]


class ReviewReader:
    """One consumer of a consumer group on the review stream (at-least-once delivery).

    Read, process, then :meth:`ack`: an entry read but not acknowledged (the reader crashed)
    stays pending for this consumer and comes back from :meth:`read_pending`.

    Args:
        client: a redis-py asyncio client with ``decode_responses=False`` (images are bytes).
        stream: the stream key.
        group: consumer group name; created (from the start of the stream) if missing.
        consumer: this reader's name within the group.
    """

    def __init__(self, client: Redis, *, stream: str, group: str, consumer: str) -> None:
        self._client = client
        self._stream = stream
        self._group = group
        self._consumer = consumer

    async def ensure_group(self) -> None:
        """Create the group at the stream's first entry (and the stream, if missing)."""
        try:
            await self._client.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_new(self, count: int, *, block_ms: int | None = None) -> list[ReviewEntry]:
        """Up to ``count`` entries never delivered to this group before.

        Args:
            count: most entries to return.
            block_ms: wait this long for an entry when there is none (``None``: don't wait).
        """
        raw = await self._xreadgroup(">", count, block_ms)
        return [entry_from_fields(entry_id, fields) for entry_id, fields in raw if fields]

    async def read_pending(self, count: int, *, after: str = "0") -> list[ReviewEntry]:
        """Up to ``count`` entries delivered to this consumer earlier and never acknowledged,
        with ids above ``after`` (pass the last id returned to page through them)."""
        while True:
            raw = await self._xreadgroup(after, count, None)
            if not raw:
                return []
            # A pending entry trimmed off the stream comes back without fields: it can never
            # be processed, so it is acknowledged rather than left pending forever.
            gone = [entry_id for entry_id, fields in raw if fields is None]
            if gone:
                await self._client.xack(self._stream, self._group, *gone)
            entries = [entry_from_fields(entry_id, fields) for entry_id, fields in raw if fields]
            if entries:
                return entries
            after = raw[-1][0].decode()

    async def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[_RawEntry]:
        # RESP2 reply: [[stream, [(id, fields), ...]]] (one stream asked, so one element).
        reply: Any = await self._client.xreadgroup(
            self._group, self._consumer, {self._stream: start}, count=count, block=block_ms
        )
        return list(reply[0][1]) if reply else []

    async def ack(self, ids: Sequence[str]) -> int:
        """Acknowledge processed entries; returns how many were pending."""
        if not ids:
            return 0
        return int(await self._client.xack(self._stream, self._group, *ids))


@dataclass(frozen=True)
class ExportResult:
    """What one export run wrote.

    Attributes:
        out_dir: the export folder.
        exported: entries written by this run.
        images: of those, entries whose image bytes were written.
        index_json: path of the JSON index (all runs into this folder).
        index_csv: path of the CSV index (all runs into this folder).
    """

    out_dir: Path
    exported: int
    images: int
    index_json: Path
    index_csv: Path


async def export_review(
    redis_url: str,
    out_dir: Path | str,
    *,
    stream: str = DEFAULT_STREAM,
    group: str | None = None,
    consumer: str = "nacguard-export",
    count: int | None = None,
    batch_size: int = 100,
    timeout_s: float = 10.0,
) -> ExportResult:
    """Export review entries to ``out_dir`` (images + ``index.json`` + ``index.csv``).

    Without ``group`` the stream is copied and left as it is (a snapshot; run it again to get
    everything again). With ``group`` each entry is exported once per group: first this
    consumer's unacknowledged entries, then new ones, each acknowledged only after the index
    that lists it is on disk. Re-exporting an entry into the same folder overwrites it, so the
    folder's index is the union of all runs.

    Args:
        redis_url: ``redis://host:port/db``.
        out_dir: created if missing.
        stream: stream key (``Settings.review_stream``).
        group: consumer group (created at the start of the stream if missing), or ``None``.
        consumer: consumer name within ``group``.
        count: most entries to export; ``None`` = as many as the stream held when the export
            started.
        batch_size: entries per Redis read.
        timeout_s: socket timeout of each Redis call.

    Returns:
        What was written.

    Raises:
        redis.exceptions.RedisError: Redis unreachable or the stream key of another type.
        OSError: ``out_dir`` not writable.
    """
    writer = _ExportWriter(Path(out_dir))
    client = Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, driver_info=None
    )
    try:
        limit = count if count is not None else int(await client.xlen(stream))
        if group is None:
            await _export_snapshot(client, writer, stream, limit, batch_size)
        else:
            reader = ReviewReader(client, stream=stream, group=group, consumer=consumer)
            await reader.ensure_group()
            await _export_group(reader, writer, limit, batch_size)
    finally:
        await client.aclose()
    return writer.result()


async def _export_snapshot(
    client: Redis, writer: _ExportWriter, stream: str, limit: int, batch_size: int
) -> None:
    start = "-"
    while writer.exported < limit:
        raw = cast(
            list[_RawEntry],
            await client.xrange(stream, min=start, count=min(batch_size, limit - writer.exported)),
        )
        if not raw:
            return
        writer.write([entry_from_fields(entry_id, fields) for entry_id, fields in raw if fields])
        start = "(" + raw[-1][0].decode()


async def _export_group(
    reader: ReviewReader, writer: _ExportWriter, limit: int, batch_size: int
) -> None:
    # This consumer's unacknowledged entries first (an earlier export that died), then new
    # ones. Batch by batch, so memory holds one batch of images, not the whole stream.
    after = "0"
    while writer.exported < limit:
        entries = await reader.read_pending(min(batch_size, limit - writer.exported), after=after)
        if not entries:
            break
        writer.write(entries)
        await reader.ack([entry.id for entry in entries])
        after = entries[-1].id
    while writer.exported < limit:
        entries = await reader.read_new(min(batch_size, limit - writer.exported))
        if not entries:
            break
        writer.write(entries)
        await reader.ack([entry.id for entry in entries])


def _order(row: dict[str, Any]) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(row["id"]).split("-"))
    except ValueError:
        return (0,)


class _ExportWriter:
    """Images written as entries arrive; the index rewritten after each batch, before that
    batch is acknowledged (so an acknowledged entry is always in the index)."""

    def __init__(self, out: Path) -> None:
        self._out = out
        self._images_dir = out / "images"
        self._images_dir.mkdir(parents=True, exist_ok=True)
        self._index_json, self._index_csv = out / "index.json", out / "index.csv"
        self._rows: dict[str, dict[str, Any]] = {}
        if self._index_json.exists():
            self._rows = {str(r["id"]): r for r in json.loads(self._index_json.read_text())}
        self.exported = 0
        self._images = 0

    def write(self, entries: list[ReviewEntry]) -> None:
        for entry in entries:
            image_file: str | None = None
            if entry.record.image is not None:
                name = f"{safe_name(entry.id)}.{image_extension(entry.record.content_type)}"
                (self._images_dir / name).write_bytes(entry.record.image)
                image_file = f"images/{name}"
                self._images += 1
            self._rows[entry.id] = entry.row(image_file)
        self.exported += len(entries)
        self._write_index()

    def _write_index(self) -> None:
        ordered = sorted(self._rows.values(), key=_order)
        _replace(self._index_json, json.dumps(ordered, indent=1) + "\n")
        tmp_csv = self._index_csv.with_suffix(".csv.tmp")
        with tmp_csv.open("w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=INDEX_COLUMNS)
            out.writeheader()
            for row in ordered:
                out.writerow({k: "" if row.get(k) is None else row.get(k) for k in INDEX_COLUMNS})
        os.replace(tmp_csv, self._index_csv)

    def result(self) -> ExportResult:
        if not self._index_json.exists():
            self._write_index()  # an empty export still leaves a (possibly empty) index
        return ExportResult(
            self._out, self.exported, self._images, self._index_json, self._index_csv
        )


def _replace(path: Path, text: str) -> None:
    # Write-then-rename: an interrupted export never leaves a half-written index.
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
