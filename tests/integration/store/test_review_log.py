"""Reading back and marking flagged images (``ReviewLog``), the same behaviour on both backends:
the Redis stream on a real redis-server, and the local review folder. Plus the zip export."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from nacguard.settings import Settings
from nacguard.store import ReviewRecord, Store, make_store
from nacguard.store.records import ReviewLog
from nacguard.store.redis_backend import REVIEW_PAGE
from nacguard.store.review_zip import ZIP_COLUMNS, write_review_zip
from tests.fixtures.redis_server import RedisServer

PROFILE = "fashion-mnist@0123abcd"


def _record(n: int, image: bytes | None = None) -> ReviewRecord:
    data = image if image is not None else b"\x89PNG-" + str(n).encode()
    return ReviewRecord(
        f"req-{n}", 0.1 + n / 100, "Sandal", 5, 0.5, 1_700_000_000.0 + n, data, "image/png"
    )


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The settings that pick one backend: a real redis-server, or a local review folder."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        # Exact trimming on a tiny stream: one entry per internal node.
        server.client().config_set("stream-node-max-entries", 1)
        return {"redis_url": server.url, "redis_timeout_s": 2.0}
    return {"review_dir": tmp_path / "review"}


@asynccontextmanager
async def _store(backend: dict[str, Any], maxlen: int) -> AsyncIterator[Store]:
    settings = Settings(review_maxlen=maxlen, review_max_image_bytes=64, **backend)
    s = make_store(settings, PROFILE)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def store(backend: dict[str, Any]) -> AsyncIterator[Store]:
    async with _store(backend, maxlen=5) as s:
        yield s


def _log(store: Store) -> ReviewLog:
    assert isinstance(store.review, ReviewLog)
    return store.review


@pytest.mark.redis
async def test_recent_lists_newest_first_with_every_field(store: Store) -> None:
    for n in range(3):
        await store.review.append(_record(n))
    items = await _log(store).recent(10)
    assert items is not None
    assert [i.entry.record.request_id for i in items] == ["req-2", "req-1", "req-0"]
    first = items[0]
    assert first.entry.record.image == b"\x89PNG-2"
    assert first.entry.record.score == pytest.approx(0.12)
    assert first.entry.record.label == "Sandal" and first.entry.record.class_index == 5
    assert first.entry.profile == PROFILE
    assert first.mark is None
    assert [i.entry.record.request_id for i in await _log(store).recent(2) or []] == [
        "req-2",
        "req-1",
    ]


@pytest.mark.redis
async def test_mark_set_change_clear_and_read_back(store: Store) -> None:
    for n in range(3):
        await store.review.append(_record(n))
    log = _log(store)
    items = await log.recent(10)
    assert items is not None
    target = items[1].entry.id
    assert await log.mark(target, "ind") is True
    assert (await log.get(target)).mark == "ind"  # type: ignore[union-attr]
    assert await log.mark(target, "ood") is True
    listed = {i.entry.id: i.mark for i in await log.recent(10) or []}
    assert listed[target] == "ood"
    assert sum(m is not None for m in listed.values()) == 1
    marked = await log.marked(10)
    assert [i.entry.id for i in marked or []] == [target]
    assert await log.mark(target, None) is True
    assert await log.marked(10) == []


@pytest.mark.redis
async def test_unknown_or_hostile_ids_are_refused(store: Store) -> None:
    await store.review.append(_record(0))
    log = _log(store)
    for bad in ["../../etc/passwd", "0-0", "9999999999999-000000-x", "", "a" * 300]:
        assert await log.get(bad) is None
        assert await log.mark(bad, "ood") is False
    items = await log.recent(1)
    assert items is not None
    assert await log.mark(items[0].entry.id, "maybe") is False  # type: ignore[arg-type]


@pytest.mark.redis
async def test_marks_of_trimmed_entries_disappear(store: Store) -> None:
    await store.review.append(_record(0))
    log = _log(store)
    oldest = (await log.recent(1) or [])[0].entry.id
    assert await log.mark(oldest, "ood") is True
    for n in range(1, 12):  # past review_maxlen = 5
        await store.review.append(_record(n))
    assert await log.get(oldest) is None
    assert await log.marked(10) == []
    assert await log.mark(oldest, "ind") is False


@pytest.mark.redis
async def test_zip_export_of_the_marked_set(store: Store) -> None:
    for n in range(4):
        await store.review.append(_record(n))
    # Bigger than review_max_image_bytes: metadata only.
    await store.review.append(_record(9, image=b"x" * 100))
    log = _log(store)
    items = await log.recent(10) or []
    by_request = {i.entry.record.request_id: i.entry.id for i in items}
    await log.mark(by_request["req-1"], "ind")
    await log.mark(by_request["req-3"], "ood")
    await log.mark(by_request["req-9"], "ood")
    out = io.BytesIO()
    images = write_review_zip(await log.marked(100) or [], out)
    assert images == 2
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        rows = json.loads(archive.read("index.json"))
        assert [r["request_id"] for r in rows] == ["req-9", "req-3", "req-1"]
        assert [r["mark"] for r in rows] == ["ood", "ood", "ind"]
        assert rows[0]["image_file"] is None and rows[0]["image_size"] == 100
        assert archive.read(rows[1]["image_file"]) == b"\x89PNG-3"
        table = list(csv.DictReader(io.StringIO(archive.read("index.csv").decode())))
        assert tuple(table[0]) == ZIP_COLUMNS
        assert [r["mark"] for r in table] == ["ood", "ood", "ind"]
        assert all(name.startswith(("images/", "index.")) for name in archive.namelist())


@pytest.mark.redis
async def test_reads_page_through_many_entries(backend: dict[str, Any]) -> None:
    n = 2 * REVIEW_PAGE + 10
    async with _store(backend, maxlen=1000) as store:
        for i in range(n):
            await store.review.append(_record(i))
        log = _log(store)
        items = await log.recent(n + 5)
        assert [i.entry.record.request_id for i in items or []] == [
            f"req-{i}" for i in reversed(range(n))
        ]
        every_other = [item.entry.id for item in (items or [])[::2]]
        for entry_id in every_other:
            assert await log.mark(entry_id, "ood") is True
        marked = await log.marked(1000)
        assert [i.entry.id for i in marked or []] == every_other
        assert [i.entry.id for i in await log.marked(3) or []] == every_other[:3]
