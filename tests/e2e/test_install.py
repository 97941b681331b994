"""``pip install .`` into a fresh virtual environment outside the checkout, then ``nacguard
serve`` with no arguments serves the bundled demo profile.

The environment reuses the installed dependencies (``--system-site-packages``; nothing is
downloaded) but gets its own, non-editable copy of nacguard, built from a copy of the sources:
the test checks that this copy, not the checkout, is what runs.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.e2e.server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEMO_FILES = ("bundle.json", "model.safetensors", "nac.safetensors")


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on the import path or NACGUARD_* settings."""
    return {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("NACGUARD_")
    }


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with nacguard installed from a copy of the sources."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    shutil.copytree(ROOT / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (src / "profiles" / "fashion-mnist").mkdir(parents=True)
    for name in DEMO_FILES:
        shutil.copy(ROOT / "profiles" / "fashion-mnist" / name, src / "profiles" / "fashion-mnist")
    env = base / "venv"
    # Without a pip of its own: the venv runs the installed pip and setuptools (a venv's bundled
    # setuptools may predate bdist_wheel, and nothing may be downloaded).
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)],
        check=True,
    )
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    done = subprocess.run(
        [*pip, "--no-deps", "--no-index", "--no-build-isolation", str(src)],
        cwd=base,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    shutil.rmtree(src)  # the installed copy must not lean on the sources it was built from
    return env


def test_the_installed_copy_is_imported_and_finds_the_demo(venv: Path) -> None:
    code = (
        "import nacguard, nacguard.settings as s\n"
        "print(nacguard.__file__)\n"
        "print(s.Settings().profile)\n"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=venv.parent,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    module, profile = done.stdout.split()
    assert Path(module).is_relative_to(venv), module
    assert not Path(module).is_relative_to(ROOT)
    assert Path(profile).is_relative_to(venv), profile
    assert sorted(p.name for p in Path(profile).iterdir()) == sorted(DEMO_FILES)


def test_nacguard_serve_without_arguments_serves_the_demo(venv: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**_clean_env(), "NACGUARD_HOST": "127.0.0.1", "NACGUARD_PORT": str(port)}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "nacguard"), "serve"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
            deadline = time.monotonic() + 90
            ready = None
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)  # a process we do not control: nothing to wait on but polling
            assert ready is not None and ready.status_code == 200, log.read_text()[-4000:]
            assert ready.json()["profile"] == "fashion-mnist"
            pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels, "L").save(buf, format="PNG")
            r = client.post(
                "/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"}
            )
            assert r.status_code == 200, r.text
            (prediction,) = r.json()["predictions"]
            assert r.json()["model"] == "fashion-cnn"
            assert 0.0 <= prediction["confidence"] <= 1.0
            assert isinstance(prediction["ood"], bool)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-4000:]
