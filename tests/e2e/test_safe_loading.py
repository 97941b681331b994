"""Only safe formats are loaded, and a bundle that fails its integrity check is never served.

``nacguard serve`` on a bundle whose weights (or NAC tables) were altered after it was built
must exit non-zero with a message naming the file and the failed sha256 check. A bundle whose
weights file was replaced by a pickle (with ``bundle.json`` rewritten to match, as an attacker
holding the directory could) must be refused without unpickling it: the pickle's payload, which
would create a file, never runs. The same holds for ``.pt`` state dicts read when building a
profile (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nacguard.bundle import sha256_file
from nacguard.bundle.refs import load_state_dict
from tests.e2e.server import free_port

pytestmark = pytest.mark.slow


class _Payload:
    """Unpickling this creates ``path``: proof that untrusted code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (builtins.open, (str(self.path), "w"))


def _serve(profile: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NACGUARD_")}
    env["NACGUARD_PORT"] = str(free_port())
    env["NACGUARD_GRPC_PORT"] = "0"  # the default port may be taken on a shared machine
    return subprocess.run(
        [sys.executable, "-m", "nacguard.cli", "serve", "--profile", str(profile)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


@pytest.mark.parametrize("name", ["model.safetensors", "nac.safetensors"])
def test_tampered_files_stop_serve(tiny_bundle: Path, tmp_path: Path, name: str) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    data = bytearray((bundle / name).read_bytes())
    data[-5] ^= 0x01  # one bit of one tensor: still a valid safetensors file
    (bundle / name).write_bytes(bytes(data))
    result = _serve(bundle)
    assert result.returncode != 0
    assert "cannot serve" in result.stderr
    assert name in result.stderr and "sha256 does not match" in result.stderr


def test_a_pickle_in_place_of_the_weights_is_never_unpickled(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    marker = tmp_path / "pwned"
    weights = bundle / "model.safetensors"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["model"]["sha256"] = sha256_file(weights)  # the integrity check passes...
    (bundle / "bundle.json").write_text(json.dumps(meta))
    result = _serve(bundle)
    # ...and the file is still refused, as not safetensors, without running the pickle.
    assert result.returncode != 0
    assert "cannot serve" in result.stderr
    assert not marker.exists()


def test_pt_state_dicts_are_read_without_unpickling_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    # The weights-only unpickler refuses the payload; the loader reports it as one clear line.
    with pytest.raises(ValueError, match=r"cannot read weights .*UnpicklingError"):
        load_state_dict(path)
    assert not marker.exists()
