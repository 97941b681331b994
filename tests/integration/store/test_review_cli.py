"""`nacguard review export` against a real redis-server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from nacguard.cli import main
from nacguard.settings import Settings
from nacguard.store import ReviewRecord, make_store
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.redis


async def _append_three(url: str) -> None:
    store = make_store(Settings(redis_url=url, review_stream="cli-test:ood"), "cli-test")
    await store.start()
    try:
        for n in range(3):
            image = b"\x89PNG fake" if n != 1 else None
            await store.review.append(
                ReviewRecord(
                    f"req-{n}", 0.1 * n, "Bag", 8, 0.5, 1_700_000_000.0 + n, image, "image/png"
                )
            )
    finally:
        await store.close()


def test_export_writes_images_and_index_once_per_group(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A plain test: the CLI runs its own event loop, as it does from a shell.
    asyncio.run(_append_three(redis_server.url))
    out = tmp_path / "export"
    args = ["review", "export", "--redis-url", redis_server.url, "--stream", "cli-test:ood"]
    assert main([*args, "--out", str(out), "--group", "g1"]) == 0
    assert "exported 3 entries (2 with image bytes)" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    entries = index if isinstance(index, list) else index["entries"]
    assert sorted(e["request_id"] for e in entries) == ["req-0", "req-1", "req-2"]
    assert len(list((out / "images").iterdir())) == 2
    # The group has acknowledged everything: a second run exports nothing new.
    assert main([*args, "--out", str(out), "--group", "g1"]) == 0
    assert "exported 0 entries" in capsys.readouterr().out


def test_export_needs_a_redis_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["review", "export", "--out", str(tmp_path)]) == 2
    assert "redis-url" in capsys.readouterr().err
