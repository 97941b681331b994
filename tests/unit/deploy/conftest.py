"""Fixtures for the deployment tests: overlays rendered once per session."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from tests.unit.deploy.manifests import K8S, OVERLAYS, Obj, kustomize_build

Render = Callable[[str], list[Obj]]


@pytest.fixture(scope="session")
def render() -> Render:
    """Render ``k8s/overlays/<name>`` (once per session); each caller gets its own copy."""
    cache: dict[str, list[Obj]] = {}

    def _render(overlay: str) -> list[Obj]:
        if overlay not in cache:
            cache[overlay] = kustomize_build(K8S / "overlays" / overlay)
        return copy.deepcopy(cache[overlay])

    return _render


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    """Each overlay in turn."""
    return str(request.param)


@pytest.fixture
def objs(render: Render, overlay: str) -> list[Obj]:
    """The objects an overlay renders to."""
    return render(overlay)
