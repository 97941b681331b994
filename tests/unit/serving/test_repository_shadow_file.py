"""The repository scan reads a model's ``shadow`` file: the version it names, or one problem
line when it names none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nacguard.serving.repository import scan
from tests.fixtures.bundles import build_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("b") / "a", seed=0)


def test_shadow_file_names_a_version(tmp_path: Path, bundle: Path) -> None:
    for v in (1, 2):
        shutil.copytree(bundle, tmp_path / "m" / str(v))
    (tmp_path / "m" / "shadow").write_text("2\n")
    found = scan(tmp_path)
    assert found.shadows == {"m": 2}
    assert [e.version for e in found.models["m"]] == [1, 2]
    assert found.problems == []


@pytest.mark.parametrize("text", ["two", "0", "", "1 2"])
def test_a_bad_shadow_file_is_one_problem(tmp_path: Path, bundle: Path, text: str) -> None:
    shutil.copytree(bundle, tmp_path / "m" / "1")
    (tmp_path / "m" / "shadow").write_text(text)
    found = scan(tmp_path)
    assert found.shadows == {}
    assert len(found.problems) == 1 and "not a version number" in found.problems[0]
    assert [e.version for e in found.models["m"]] == [1]
