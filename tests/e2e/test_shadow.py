"""Shadow profiles on a real server: a version marked shadow scores every computed image, its
flag counts match an offline computation with the Python API, the answers are the primary's,
and on equal weights it runs no forward of its own."""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from nacguard.bundle import load_bundle
from tests.e2e.server import ServerProcess, start_server
from tests.fixtures.bundles import build_tiny_bundle, encoded_images
from tests.fixtures.repository import drop_version, with_threshold

MODEL = "tiny"
IMAGES = encoded_images(12, seed=11) + encoded_images(12, kind="uniform", seed=12)
PNG = {"Content-Type": "image/png"}
ADMIN_KEY = "admin-key-0123456789"


def _offline(bundle: Path) -> list[tuple[float, bool]]:
    """(NAC score, OOD flag) of every image with the Python API, one image per batch (as the
    sequential requests below are computed)."""
    loaded = load_bundle(bundle)
    out = []
    for data in IMAGES:
        (p,) = loaded.predict([Image.open(io.BytesIO(data))], batch_size=1)
        out.append((p.nac_score, p.ood))
    return out


def _value(text: str, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 when there is none)."""
    found = []
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            found.append(float(match.group(2)))
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def _ask_all(url: str, query: str = "") -> list[dict]:
    """Every image in turn, one request each; the answers' predictions."""
    answers = []
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for data in IMAGES:
            r = client.post(f"/predict{query}", content=data, headers=PNG)
            assert r.status_code == 200, r.text
            answers.append(r.json())
    return answers


def _wait_metrics(url: str, pattern: str, within: float = 60.0) -> str:
    deadline = time.monotonic() + within
    while True:
        text = httpx.get(f"{url}/metrics").text
        if re.search(pattern, text, re.M):
            return text
        assert time.monotonic() < deadline, f"/metrics never matched {pattern!r}"
        time.sleep(0.05)  # polling another process's state: there is no event to wait on


def _mark_shadow(repo: Path, version: int | None) -> None:
    """Write (in one rename) or remove the model's ``shadow`` file."""
    marker = repo / MODEL / "shadow"
    if version is None:
        marker.unlink()
        return
    staged = repo / ".shadow.tmp"
    staged.write_text(f"{version}\n")
    staged.rename(marker)


def _middle_threshold(bundle: Path) -> float:
    """The middle of the widest gap among the images' central scores: about half of them are
    flagged, and no image sits near the threshold."""
    scores = sorted(s for s, _ in _offline(bundle))
    _, i = max((scores[i + 1] - scores[i], i) for i in range(6, len(scores) - 7))
    return (scores[i] + scores[i + 1]) / 2


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 (primary); v1 with the threshold in the middle of the images' scores (a
    profile-only change); other weights, also with such a threshold."""
    root = tmp_path_factory.mktemp("shadow-bundles")
    a = build_tiny_bundle(root / "a", seed=0)
    b = build_tiny_bundle(root / "b", seed=1)
    return {
        "a": a,
        "a-shadow": with_threshold(a, root / "a-shadow", threshold=_middle_threshold(a)),
        "b-shadow": with_threshold(b, root / "b-shadow", threshold=_middle_threshold(b)),
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("shadow-repo")
    shutil.copytree(bundles["a"], root / MODEL / "1")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("e2e") / "shadow.log"
    proc = start_server(None, log, repository=repo, poll_interval_s=0.5, cache_enabled=False)
    yield proc
    proc.stop()


def _flags(answers: list[dict]) -> list[bool]:
    return [a["predictions"][0]["ood"] for a in answers]


def test_shadow_on_equal_weights(server: ServerProcess, repo: Path, bundles: dict) -> None:
    """Both flag counts on /metrics match the offline ones; the answers are those of the
    server without the shadow; the shadow scored the primary's states (no forward)."""
    primary_offline = _offline(bundles["a"])
    shadow_offline = _offline(bundles["a-shadow"])
    primary_flags = sum(f for _, f in primary_offline)
    shadow_flags = sum(f for _, f in shadow_offline)
    assert primary_flags != shadow_flags, "the thresholds must flag differently"
    without = _ask_all(server.url)
    assert _flags(without) == [f for _, f in primary_offline]

    staged = repo / ".stage-2"
    shutil.copytree(bundles["a-shadow"], staged)
    drop_version(staged, repo, MODEL, 2)
    _mark_shadow(repo, 2)
    loaded = rf'^nacguard_model_versions_loaded\{{model="{MODEL}",role="shadow",version="2"\}} 1'
    before = _wait_metrics(server.url, loaded)
    batches_before = _value(before, "nacguard_batch_size_images_count", role="primary")

    with_shadow = _ask_all(server.url)
    assert with_shadow == without  # the answers: the primary's, unchanged, version 1
    assert {a["version"] for a in with_shadow} == {1}

    text = httpx.get(f"{server.url}/metrics").text
    n = len(IMAGES)
    common = {"model": MODEL}
    assert _value(text, "nacguard_images_scored_total", role="primary", **common) == 2 * n
    assert _value(text, "nacguard_images_ood_total", role="primary", **common) == 2 * primary_flags
    assert _value(text, "nacguard_images_scored_total", role="shadow", **common) == n
    assert _value(text, "nacguard_images_ood_total", role="shadow", **common) == shadow_flags
    assert _value(text, "nacguard_drift_samples", role="shadow", scope="local") == n
    shadow_threshold = _value(text, "nacguard_ood_threshold", role="shadow", version="2")
    assert shadow_threshold != _value(text, "nacguard_ood_threshold", role="primary")
    # One forward per batch: the shadow scored every primary batch from its states.
    batches = _value(text, "nacguard_batch_size_images_count", role="primary") - batches_before
    assert batches >= 1
    shared = {"model": MODEL, "version": "2"}
    assert _value(text, "nacguard_shadow_batches_total", forward="shared", **shared) == batches
    assert _value(text, "nacguard_shadow_batches_total", forward="separate", **shared) == 0
    assert _value(text, "nacguard_model_weight_loads_total", model=MODEL) == 1


def test_shadow_on_other_weights(server: ServerProcess, repo: Path, bundles: dict) -> None:
    """A shadow with weights of its own runs a forward of its own; its flags still match."""
    staged = repo / ".stage-3"
    shutil.copytree(bundles["b-shadow"], staged)
    drop_version(staged, repo, MODEL, 3)
    _mark_shadow(repo, 3)
    # v2, no longer the shadow, is an ordinary version now: the latest, so it serves (on v1's
    # weights); v3 shadows it.
    for role, version in (("primary", 2), ("shadow", 3)):
        _wait_metrics(server.url, rf'^nacguard_model_versions_loaded\{{model="{MODEL}",'
                      rf'role="{role}",version="{version}"\}} 1')  # fmt: skip
    answers = _ask_all(server.url)
    assert {a["version"] for a in answers} == {2}
    assert _flags(answers) == [f for _, f in _offline(bundles["a-shadow"])]
    text = httpx.get(f"{server.url}/metrics").text
    expected = sum(f for _, f in _offline(bundles["b-shadow"]))
    assert 0 < expected < len(IMAGES)
    v3 = {"model": MODEL, "version": "3"}
    assert _value(text, "nacguard_images_scored_total", role="shadow", **v3) == len(IMAGES)
    assert _value(text, "nacguard_images_ood_total", role="shadow", **v3) == expected
    assert _value(text, "nacguard_shadow_batches_total", forward="separate", **v3) >= 1
    assert _value(text, "nacguard_shadow_batches_total", forward="shared", **v3) == 0
    assert _value(text, "nacguard_model_weight_loads_total", model=MODEL) == 2
    assert not re.search(r'role="shadow",version="2"', text)  # the old shadow is unloaded


def _loaded(url: str, role: str, version: int) -> None:
    _wait_metrics(url, rf'^nacguard_model_versions_loaded\{{model="{MODEL}",'
                  rf'role="{role}",version="{version}"\}} 1')  # fmt: skip


def test_promotion_by_moving_the_directory(server: ServerProcess, repo: Path) -> None:
    """The shadow's folder moved to a new version number: the shadow is gone, and the new
    version, the latest, serves on the weights the shadow had loaded."""
    (repo / MODEL / "3").rename(repo / MODEL / "4")
    _loaded(server.url, "primary", 4)
    assert {a["version"] for a in _ask_all(server.url)} == {4}
    text = httpx.get(f"{server.url}/metrics").text
    assert 'role="shadow"' not in text
    assert _value(text, "nacguard_model_weight_loads_total", model=MODEL) == 2  # none read
    assert server.logs().count("the shadow file names version 3, not a valid version") == 1


def test_promotion_by_removing_the_shadow_file(
    server: ServerProcess, repo: Path, bundles: dict
) -> None:
    """A new shadow (v5, on weights no loaded version has: read once); without the file, v5 is
    an ordinary version, the latest, so it serves, on the weights the shadow had loaded."""
    staged = repo / ".stage-5"
    shutil.copytree(bundles["a-shadow"], staged)
    drop_version(staged, repo, MODEL, 5)
    _mark_shadow(repo, 5)
    _loaded(server.url, "shadow", 5)
    assert {a["version"] for a in _ask_all(server.url)} == {4}
    text = httpx.get(f"{server.url}/metrics").text
    assert _value(text, "nacguard_images_scored_total", role="shadow", version="5") == len(IMAGES)
    assert _value(text, "nacguard_model_weight_loads_total", model=MODEL) == 3
    _mark_shadow(repo, None)
    _loaded(server.url, "primary", 5)
    answers = _ask_all(server.url)
    assert {a["version"] for a in answers} == {5}
    assert _flags(answers) == [f for _, f in _offline(bundles["a-shadow"])]
    text = httpx.get(f"{server.url}/metrics").text
    assert 'role="shadow"' not in text
    assert _value(text, "nacguard_model_weight_loads_total", model=MODEL) == 3


def test_admin_shadow_and_promotion(tmp_path: Path, bundles: dict) -> None:
    """Explicit mode: shadow a version with one call, promote it with one more (its weights
    are the primary's: not read again)."""
    repo = tmp_path / "repo"
    shutil.copytree(bundles["a"], repo / MODEL / "1")
    shutil.copytree(bundles["a-shadow"], repo / MODEL / "2")
    proc = start_server(
        None,
        tmp_path / "admin.log",
        repository=repo,
        repository_mode="explicit",
        version_policy="pinned:1",
        cache_enabled=False,
        admin_keys=f'["{ADMIN_KEY}"]',
    )
    admin = {"X-Admin-Key": ADMIN_KEY}
    base = f"{proc.url}/v1/admin/models/{MODEL}"
    try:
        assert httpx.post(f"{base}/shadow/promote", headers=admin).status_code == 404
        r = httpx.post(f"{base}/versions/2/shadow", headers=admin, timeout=60.0)
        assert r.status_code == 200, r.text
        assert r.json()["models"][0] == {
            "name": MODEL, "versions": [1], "served": 1, "promoted": None, "shadow": 2
        }  # fmt: skip
        assert httpx.post(f"{base}/versions/1/shadow", headers=admin).status_code == 409
        answers = _ask_all(proc.url)
        text = httpx.get(f"{proc.url}/metrics").text
        assert _value(text, "nacguard_images_scored_total", role="shadow") == len(IMAGES)
        r = httpx.post(f"{base}/shadow/promote", headers=admin, timeout=60.0)
        assert r.status_code == 200, r.text
        assert r.json()["models"][0]["served"] == 2 and r.json()["models"][0]["shadow"] is None
        promoted = _ask_all(proc.url)
        assert {a["version"] for a in promoted} == {2} and {a["version"] for a in answers} == {1}
        assert _flags(promoted) == [f for _, f in _offline(bundles["a-shadow"])]
        text = httpx.get(f"{proc.url}/metrics").text
        assert _value(text, "nacguard_model_weight_loads_total", model=MODEL) == 1
        assert httpx.post(f"{base}/shadow/unload", headers=admin).status_code == 404
    finally:
        proc.stop()


def test_workers_export_every_version_and_role(tmp_path: Path, bundles: dict) -> None:
    """Two worker processes: a scrape of either shows every model, version and role, summed
    over the workers, and each version's drift window counts its own images only."""
    repo = tmp_path / "repo"
    shutil.copytree(bundles["a"], repo / "m1" / "1")
    shutil.copytree(bundles["a-shadow"], repo / "m1" / "2")
    (repo / "m1" / "shadow").write_text("2")
    shutil.copytree(bundles["b-shadow"], repo / "m2" / "1")
    proc = start_server(None, tmp_path / "workers.log", repository=repo, workers=2)
    sent = {"m1": 6, "m2": 4}
    try:
        for model, n in sent.items():
            for data in IMAGES[:n]:  # a connection each: the kernel spreads them over workers
                r = httpx.post(f"{proc.url}/predict?model={model}", content=data, headers=PNG)
                assert r.status_code == 200, r.text
        text = httpx.get(f"{proc.url}/metrics").text
    finally:
        proc.stop()
    expected = [("m1", "1", "primary", 6), ("m1", "2", "shadow", 6), ("m2", "1", "primary", 4)]
    for model, version, role, n in expected:
        labels = {"model": model, "version": version, "role": role}
        assert _value(text, "nacguard_images_scored_total", **labels) == n, labels
        assert _value(text, "nacguard_drift_samples", scope="local", **labels) == n, labels
        loaded = _value(text, "nacguard_model_versions_loaded", **labels)
        assert loaded == 1, labels
    assert "pid=" not in text
