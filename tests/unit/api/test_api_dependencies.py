"""Route dependencies run on the event loop: FastAPI runs a *sync* dependency in its thread pool,
which costs a hop to a worker thread and back on every request (measured: about a quarter of the
event loop's time per /predict on the 2-core benchmark machine)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from nacguard.api.routes import router


def _calls(dependant: Dependant) -> Iterator[object]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def test_every_route_dependency_is_async() -> None:
    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert any(r.path == "/predict" for r in routes)
    checked = 0
    for route in routes:
        for call in _calls(route.dependant):
            checked += 1
            assert inspect.iscoroutinefunction(call), f"{route.path}: sync dependency {call!r}"
    assert checked > 0
