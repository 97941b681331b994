"""``_unless_disconnected``: the work in the request's task, cancelled when the client leaves,
and nothing else changed (an outside cancellation stays one, a finished answer stands)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from nacguard.api.routes import _unless_disconnected


def _request(messages: asyncio.Queue[Message]) -> Request:
    return Request({"type": "http", "method": "POST", "headers": []}, messages.get)


async def test_answer_while_connected() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()

    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await _unless_disconnected(_request(messages), work()) == 7
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_disconnect_cancels_the_work() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> int:
        started.set()
        try:
            await asyncio.Event().wait()  # queued until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return 0

    async def leave() -> None:
        await started.wait()
        messages.put_nowait({"type": "http.disconnect"})

    leaving = asyncio.create_task(leave())
    with pytest.raises(ClientDisconnect):
        await _unless_disconnected(_request(messages), work())
    await leaving
    assert cancelled.is_set()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_outside_cancellation_is_not_a_disconnect() -> None:
    messages: asyncio.Queue[Message] = asyncio.Queue()
    started = asyncio.Event()

    async def work() -> int:
        started.set()
        await asyncio.Event().wait()
        return 0

    request_task = asyncio.create_task(_unless_disconnected(_request(messages), work()))
    await started.wait()
    request_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request_task
    assert request_task.cancelled()
