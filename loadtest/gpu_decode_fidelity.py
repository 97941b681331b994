"""How far GPU JPEG decoding moves NAC scores from CPU decoding: the measurement behind the
``gpu_decode`` setting (a section of ``loadtest/gpu_bench.py``; ``--cpu-smoke`` runs the same
code with libjpeg-turbo in place of nvjpeg).

The demo bundle scores its validation sets (Fashion-MNIST test images as in-distribution when
the Debian data package is installed, and the generated OOD families of
``profile eval``), each image JPEG-encoded at quality 90 in two forms:

* ``native``: 28x28, as the demo expects (no resize: only the decoders differ);
* ``upscaled``: 224x224 (bicubic), so the resize to 28x28 runs too: the CPU path decodes at a
  reduced DCT scale (``decode: scaled``) or fully (``decode: full``), the GPU path fully on the
  device, then resizes there.

For each form and CPU decode mode: Pearson correlation of the scores, their largest and mean
absolute difference, the share of images whose OOD flag changes, and each OOD set's AUROC
(against the in-distribution set) from CPU and from GPU decoding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["OOD_SETS", "decode_fidelity"]

log = logging.getLogger("nacguard.gpu_bench")

#: The generated OOD families scored (``synthetic:KIND``).
OOD_SETS = ("gaussian", "uniform", "shapes", "checkerboard", "stripes", "blobs")


def _jpegs(images: Any, side: int | None) -> list[bytes]:
    out = []
    for image in images:
        img = image.convert("L")
        if side is not None:
            img = img.resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _ind_images(n: int) -> tuple[str, Any]:
    from nacguard.offline.datasets import load_source

    try:
        return "fashion-mnist:test", load_source("fashion-mnist:test", limit=n).images
    except (OSError, ValueError) as exc:
        # No data package on this machine: the demo's own training family, generated, is the
        # next best in-distribution stand-in (said so in the result).
        log.warning("fashion-mnist not available (%s); using synthetic:blobs as InD", exc)
        return "synthetic:blobs (no fashion-mnist here)", load_source(
            f"synthetic:blobs?n={n}&seed=7"
        ).images


def decode_fidelity(device: str, per_set: int) -> dict[str, Any]:
    """Scores from GPU-decoded against CPU-decoded JPEGs on the demo's validation sets.

    Args:
        device: where the GPU path decodes (``cuda`` or, for a smoke run, ``cpu``).
        per_set: images per set.
    """
    from nacguard.bundle import load_bundle
    from nacguard.imaging.decode import InputLimits, RawImage, decode_images
    from nacguard.imaging.gpu_decode import GpuJpegDecoder
    from nacguard.nac.detection import auroc
    from nacguard.offline.datasets import load_source
    from nacguard.settings import DEMO_PROFILE

    bundle = load_bundle(DEMO_PROFILE, device)
    limits = InputLimits(1 << 26, 64, 1 << 24, 25_000_000, ("JPEG",))
    ind_name, ind = _ind_images(per_set)
    sets = {"ind": ind} | {
        k: load_source(f"synthetic:{k}?n={per_set}&seed=3").images for k in OOD_SETS
    }
    result: dict[str, Any] = {"ind": ind_name, "per_set": per_set, "device": device}
    for form, side in (("native", None), ("upscaled", 224)):
        encoded = {k: _jpegs(v, side) for k, v in sets.items()}
        for mode in ("full", "scaled"):
            spec = dataclasses.replace(bundle.preprocess, decode=mode)
            gpu = GpuJpegDecoder(device, max_pixels=limits.max_pixels)
            scores: dict[str, dict[str, np.ndarray]] = {"cpu": {}, "gpu": {}}
            flags: dict[str, list[bool]] = {"cpu": [], "gpu": []}
            for name, datas in encoded.items():
                raws = [RawImage(d, hashlib.sha256(d).hexdigest()) for d in datas]
                for path, decoder in (("cpu", None), ("gpu", gpu)):
                    tensors = []
                    for start in range(0, len(raws), 64):
                        part = decode_images(raws[start : start + 64], spec, limits, gpu=decoder)
                        tensors += [d.tensor for d in part]
                    preds = bundle.predict_batch(torch.stack(tensors))
                    scores[path][name] = np.array([p.nac_score for p in preds], dtype=np.float64)
                    flags[path] += [p.ood for p in preds]
            cpu_all = np.concatenate(list(scores["cpu"].values()))
            gpu_all = np.concatenate(list(scores["gpu"].values()))
            diff = np.abs(cpu_all - gpu_all)
            au = {
                path: {k: auroc(scores[path]["ind"], scores[path][k]) for k in OOD_SETS}
                for path in ("cpu", "gpu")
            }
            result[f"{form}/{mode}"] = {
                "gpu_decoded": gpu.decoded,
                "cpu_fallback": gpu.passed,
                "score_std": float(cpu_all.std()),
                "correlation": float(np.corrcoef(cpu_all, gpu_all)[0, 1]),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "ood_flag_changes": float(
                    np.mean(np.array(flags["cpu"]) != np.array(flags["gpu"]))
                ),
                "auroc_cpu": au["cpu"],
                "auroc_gpu": au["gpu"],
                "max_auroc_delta": max(abs(au["gpu"][k] - au["cpu"][k]) for k in OOD_SETS),
            }
            log.info("decode fidelity %s/%s: %s", form, mode, result[f"{form}/{mode}"])
    return result


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines for the gpu_bench report."""
    if "error" in result or "skipped" in result:
        return [f"GPU decode fidelity: {result.get('error') or result.get('skipped')}"]
    lines = [
        "",
        f"GPU JPEG decode vs CPU decode, NAC scores of the demo bundle ({result['per_set']} "
        f"images per set, InD {result['ind']}, decoded on {result['device']}):",
        "",
        "| JPEGs | CPU decode | on GPU | correlation | max abs diff | OOD flag changes | max AUROC delta |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in result.items():
        if "/" not in key:
            continue
        form, mode = key.split("/")
        lines.append(
            f"| {form} | {mode} | {r['gpu_decoded']} (+{r['cpu_fallback']} on CPU) | "
            f"{r['correlation']:.5f} | {r['max_abs_diff']:.4f} | {r['ood_flag_changes']:.2%} | "
            f"{r['max_auroc_delta']:.4f} |"
        )
    return lines
