"""The model repository on a real server under steady load: versions dropped in are served
without a failed request, broken ones are refused while the old one serves, a profile-only
update does not read the weights again; and repositories with junk in them."""

from __future__ import annotations

import asyncio
import base64
import inspect
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import build_tiny_bundle, encoded_images
from tests.fixtures.repository import corrupt, drop_version, with_threshold

MODEL = "tiny"
POLL_S = 0.5
CLIENTS = 4
IMAGES = encoded_images(16, seed=7)


@dataclass
class Load:
    """What the load clients saw."""

    statuses: dict[int, int] = field(default_factory=dict)
    versions: list[list[int]] = field(default_factory=lambda: [[] for _ in range(CLIENTS)])
    thresholds: dict[int, set[float]] = field(default_factory=dict)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    readyz: list[int] = field(default_factory=list)  # /readyz statuses seen across the change

    @property
    def count(self) -> int:
        return sum(self.statuses.values())

    async def wait_for(self, n: int) -> None:
        """Until ``n`` answers have come (any status)."""
        while self.count < n:
            self.answered.clear()
            await self.answered.wait()


async def _client(client: httpx.AsyncClient, index: int, load: Load, stop: asyncio.Event) -> None:
    i = index
    while not stop.is_set():
        body = IMAGES[i % len(IMAGES)]
        i += CLIENTS
        r = await client.post("/predict", content=body, headers={"Content-Type": "image/png"})
        assert r.status_code != 401, r.text
        load.statuses[r.status_code] = load.statuses.get(r.status_code, 0) + 1
        load.answered.set()
        if r.status_code == 200:
            answer = r.json()
            load.versions[index].append(answer["version"])
            load.thresholds.setdefault(answer["version"], set()).add(
                answer["predictions"][0]["threshold"]
            )


async def _under_load(
    url: str, change: object, until: str, within: float = 60.0, headers: dict | None = None
) -> Load:
    """Run the load clients, make ``change`` (a callable, maybe async), and keep the load on
    until ``/metrics`` matches ``until`` (bounded), then a little longer: 20 more answers."""
    load = Load()
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=30.0, headers=headers) as client:
        tasks = [asyncio.create_task(_client(client, k, load, stop)) for k in range(CLIENTS)]
        try:
            await load.wait_for(20)  # steady load before the change
            assert callable(change)
            result = change()
            if inspect.isawaitable(result):
                await result
            deadline = time.monotonic() + within
            while not re.search(until, (await client.get("/metrics")).text, re.M):
                assert time.monotonic() < deadline, f"/metrics never matched {until!r}"
                assert not any(t.done() for t in tasks), "a load client died"
                load.readyz.append((await client.get("/readyz")).status_code)
                await asyncio.sleep(0.05)
            load.readyz.append((await client.get("/readyz")).status_code)
            await load.wait_for(load.count + 20)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    return load


def _value(text: str, pattern: str) -> float:
    match = re.search(rf"^{pattern} (\S+)$", text, re.M)
    assert match, f"no series {pattern!r}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    return {"a": build_tiny_bundle(root / "a", seed=0), "b": build_tiny_bundle(root / "b", seed=1)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("repository")
    (root / MODEL).mkdir()
    shutil.copytree(bundles["a"], root / MODEL / "1")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("e2e") / "repository.log"
    proc = start_server(
        None, log, repository=repo, poll_interval_s=POLL_S, cache_enabled=False, max_wait_ms=1
    )
    yield proc
    proc.stop()


def _stage(repo: Path, name: str) -> Path:
    (repo / ".stage").mkdir(exist_ok=True)
    return repo / ".stage" / name


def _check_clean(load: Load, before: int, after: int) -> None:
    assert set(load.statuses) == {200}, load.statuses
    # The pod stays in its Service: readiness answered 200 all through the change.
    assert load.readyz and set(load.readyz) == {200}, load.readyz
    for seen in load.versions:
        assert seen == sorted(seen), "a client got the old version after the new one"
        assert seen[0] == before and seen[-1] == after, (seen[0], seen[-1])


def test_profile_only_swap_under_load(server: ServerProcess, repo: Path) -> None:
    """v2 = v1 with another threshold: served within the poll period plus warm-up, zero
    non-200 answers across the swap, and the weights are not read again."""
    staged = with_threshold(repo / MODEL / "1", _stage(repo, "2"), threshold=0.25)
    load = asyncio.run(
        _under_load(
            server.url,
            lambda: drop_version(staged, repo, MODEL, 2),
            rf'^nacguard_model_swaps_total\{{model="{MODEL}"\}} 1\.0$',
        )
    )
    _check_clean(load, before=1, after=2)
    assert load.thresholds[2] == {0.25} and 0.25 not in load.thresholds[1]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert _value(metrics, rf'nacguard_model_weight_loads_total\{{model="{MODEL}"\}}') == 1.0
    assert not re.search(r'^nacguard_model_versions_loaded\{.*version="1"', metrics, re.M)
    assert "profile only: weights shared" in server.logs()


def test_new_weights_swap_under_load(server: ServerProcess, repo: Path, bundles: dict) -> None:
    """v3 has other weights: read once more, served with zero non-200 answers."""
    staged = _stage(repo, "3")
    shutil.copytree(bundles["b"], staged)
    load = asyncio.run(
        _under_load(
            server.url,
            lambda: drop_version(staged, repo, MODEL, 3),
            rf'^nacguard_model_swaps_total\{{model="{MODEL}"\}} 2\.0$',
        )
    )
    _check_clean(load, before=2, after=3)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert _value(metrics, rf'nacguard_model_weight_loads_total\{{model="{MODEL}"\}}') == 2.0
    profile = httpx.get(f"{server.url}/v1/profile").json()
    assert (profile["served_model"], profile["version"]) == (MODEL, 3)


def test_broken_versions_refused_while_old_serves(
    server: ServerProcess, repo: Path, bundles: dict
) -> None:
    """Bad sha256, a missing file, an unknown schema: each refused with a log line and a
    count; version 3 answers throughout."""
    staged = {
        4: corrupt(bundles["a"], _stage(repo, "4"), "sha256"),
        5: corrupt(bundles["a"], _stage(repo, "5"), "missing"),
        6: corrupt(bundles["a"], _stage(repo, "6"), "schema"),
    }

    def drop_all() -> None:
        for version, path in staged.items():
            drop_version(path, repo, MODEL, version)

    failures = "".join(
        rf'(?=[\s\S]*^nacguard_model_load_failures_total\{{model="{MODEL}",reason="\w+",'
        rf'version="{v}"\}} 1\.0$)'
        for v in staged
    )
    load = asyncio.run(_under_load(server.url, drop_all, failures))
    _check_clean(load, before=3, after=3)
    logs = server.logs()
    assert "sha256 does not match" in logs
    assert "bundle file missing" in logs
    assert "schema version 99 is not supported" in logs
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_addressing_by_name_and_version(server: ServerProcess) -> None:
    body, png = IMAGES[0], {"Content-Type": "image/png"}
    ok = httpx.post(f"{server.url}/predict?model={MODEL}&version=3", content=body, headers=png)
    assert ok.status_code == 200 and ok.json()["version"] == 3
    for query in ("model=nope", f"model={MODEL}&version=1"):
        r = httpx.post(f"{server.url}/predict?{query}", content=body, headers=png)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    # The Open Inference Protocol addresses the same models and versions.
    infer = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(body).decode()],
            }
        ]
    }
    v2 = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/3/infer", json=infer)
    assert v2.status_code == 200, v2.text
    assert (v2.json()["model_name"], v2.json()["model_version"]) == (MODEL, "3")
    assert httpx.get(f"{server.url}/v2/models/{MODEL}").json()["versions"] == ["3"]
    gone = httpx.post(f"{server.url}/v2/models/{MODEL}/versions/1/infer", json=infer)
    assert gone.status_code == 404, gone.text


def test_bad_repository_serves_what_is_valid(tmp_path: Path, bundles: dict[str, Path]) -> None:
    """Junk beside one valid model: one line per problem, the valid model serves."""
    repo = tmp_path / "repo"
    shutil.copytree(bundles["a"], repo / "Good" / "1")
    (repo / "README.txt").parent.mkdir(exist_ok=True)
    (repo / "README.txt").write_text("not a model")
    (repo / "bad name!").mkdir()
    (repo / "good" / "1").mkdir(parents=True)  # "Good" ignoring case (sorted later: ignored)
    (repo / "Good" / "latest").mkdir()  # not a version number
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "bundle.json").mkdir()  # unreadable: a directory
    proc = start_server(None, tmp_path / "bad.log", repository=repo)
    try:
        r = httpx.post(
            f"{proc.url}/predict?model=Good",
            content=IMAGES[0],
            headers={"Content-Type": "image/png"},
        )
        assert r.status_code == 200
        logs = proc.logs()
    finally:
        proc.stop()
    for needle in (
        "README.txt: not a model folder",
        "bad name!: not a valid model name",
        "good: duplicate model name",
        "latest: not a version folder",
        "broken version 1 refused",
    ):
        assert logs.count(needle) == 1, needle


def test_repository_with_nothing_valid_exits_1(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "empty").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="exited with 1") as info:
        start_server(None, tmp_path / "none.log", repository=repo)
    assert "no valid model to serve" in str(info.value)


CLIENT_KEY, ADMIN_KEY = "client-key-0123456789", "admin-key-0123456789"


@pytest.fixture(scope="module")
def explicit(
    tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]
) -> Iterator[tuple[ServerProcess, Path]]:
    """Explicit mode, client keys and admin keys; versions 1 and 2 on disk, 1 loaded."""
    root = tmp_path_factory.mktemp("explicit")
    shutil.copytree(bundles["a"], root / MODEL / "1")
    with_threshold(bundles["a"], _stage(root, "2"), threshold=0.3)
    drop_version(root / ".stage" / "2", root, MODEL, 2)
    log = tmp_path_factory.mktemp("e2e") / "explicit.log"
    proc = start_server(
        None,
        log,
        repository=root,
        repository_mode="explicit",
        version_policy="pinned:1",
        cache_enabled=False,
        api_keys=f'["{CLIENT_KEY}"]',
        admin_keys=f'["{ADMIN_KEY}"]',
    )
    yield proc, root
    proc.stop()


def test_admin_api_load_promote_rollback_under_load(
    explicit: tuple[ServerProcess, Path],
) -> None:
    server, _ = explicit
    admin = {"X-Admin-Key": ADMIN_KEY}
    base = f"{server.url}/v1/admin/models/{MODEL}"
    # The admin API takes only the admin key; a client key is not one.
    assert httpx.get(f"{server.url}/v1/admin/models").status_code == 401
    assert (
        httpx.get(f"{server.url}/v1/admin/models", headers={"X-Admin-Key": CLIENT_KEY}).status_code
        == 401
    )
    assert httpx.get(f"{server.url}/v1/admin/models", headers=admin).json()["models"] == [
        {"name": MODEL, "versions": [1], "served": 1, "promoted": None, "shadow": None}
    ]

    async def load_v2() -> None:
        async with httpx.AsyncClient(timeout=60.0) as client:
            r = await client.post(f"{base}/versions/2/load", headers=admin)
            assert r.status_code == 200, r.text

    load = asyncio.run(
        _under_load(
            server.url,
            load_v2,
            rf'^nacguard_model_swaps_total\{{model="{MODEL}"\}} 1\.0$',
            headers={"X-API-Key": CLIENT_KEY},
        )
    )
    _check_clean(load, before=1, after=2)
    assert load.thresholds[2] == {0.3}
    # Rollback serves 1 again, promote serves 2; both are one call and both stay loaded.
    r = httpx.post(f"{base}/rollback", headers=admin)
    assert r.status_code == 200 and r.json()["models"][0]["served"] == 1, r.text
    ask = httpx.post(
        f"{server.url}/predict",
        content=IMAGES[0],
        headers={"Content-Type": "image/png", "X-API-Key": CLIENT_KEY},
    )
    assert ask.json()["version"] == 1
    assert (
        httpx.post(f"{base}/versions/2/promote", headers=admin).json()["models"][0]["served"] == 2
    )
    conflict = httpx.post(f"{base}/versions/2/load", headers=admin)
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "repository_conflict"
    assert httpx.post(f"{base}/versions/9/load", headers=admin).status_code == 404
    r = httpx.post(f"{base}/versions/1/unload", headers=admin)
    assert r.status_code == 200 and r.json()["models"][0]["versions"] == [2], r.text
    last = httpx.post(f"{base}/versions/2/unload", headers=admin)
    assert last.status_code == 409


def test_admin_load_of_a_broken_version_is_refused(
    explicit: tuple[ServerProcess, Path], bundles: dict[str, Path]
) -> None:
    server, root = explicit
    corrupt(bundles["a"], _stage(root, "3"), "sha256")
    drop_version(root / ".stage" / "3", root, MODEL, 3)
    r = httpx.post(
        f"{server.url}/v1/admin/models/{MODEL}/versions/3/load",
        headers={"X-Admin-Key": ADMIN_KEY},
    )
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"], r.text
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(
        rf'^nacguard_model_load_failures_total\{{model="{MODEL}",reason="load",version="3"\}} 1',
        metrics,
        re.M,
    )
    ok = httpx.post(
        f"{server.url}/predict",
        content=IMAGES[0],
        headers={"Content-Type": "image/png", "X-API-Key": CLIENT_KEY},
    )
    assert ok.status_code == 200 and ok.json()["version"] == 2
