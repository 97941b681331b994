"""The GPU benchmark script (loadtest/gpu_bench.py) in its CPU smoke mode, as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_gpu_bench_cpu_smoke(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    # A generous budget: on a busy CI machine the compiled sections must still fit.
    cmd = [sys.executable, "loadtest/gpu_bench.py", "--cpu-smoke", "--budget-s", "150"]
    done = subprocess.run(
        [*cmd, "--json", str(out)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    for name in ("plain", "nac-avgpool", "nac-4", "reference"):
        assert sections["eager"]["images_per_s"][name] > 0
    assert sections["eager"]["fast_vs_reference_max_abs_fp32"] < 1e-5
    assert sections["compiled:forward"]["nac_path"] == "analytic"
    assert sections["compiled:nac4"]["nac_path"] == "probe"
    for name in ("compiled:forward", "compiled:nac4"):
        assert sections[name]["still_compiled"]
        assert sections[name]["max_abs_nac_vs_eager"] < 1e-5
        assert all(v > 0 for v in sections[name]["images_per_s"].values())
    assert sections["decode"]["pil_decode_1_thread"] > 0
    assert sections["decode"]["torchvision_cpu_decoded"] == 8
    assert 0 < sections["fidelity"]["bf16/nac-4"]["correlation"] <= 1
    fidelity = sections["decode_fidelity"]
    for key in ("native/full", "native/scaled", "upscaled/full", "upscaled/scaled"):
        assert fidelity[key]["gpu_decoded"] == 7 * fidelity["per_set"]  # every JPEG taken
        assert fidelity[key]["score_std"] > 0  # the scores vary, so agreement means something
    # On CPU both paths decode with libjpeg-turbo: without a resize the scores are identical.
    assert fidelity["native/full"]["max_abs_diff"] == 0
    assert 0 < fidelity["upscaled/full"]["correlation"] <= 1
    server = sections["server"]
    assert server["images_per_s"] > 0 and server["errors"] == 0, server
    assert server["exit_status"] == 0
    assert "| plain forward |" in done.stdout
