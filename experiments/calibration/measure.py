"""Does a bundle's calibration keep its false-alarm promise on Fashion-MNIST test images? (#18)

Scores the 10,000 test images (and the bundle's calibration images, named by ``--cal``) with
the bundle, in-process on CPU, and reports for NAC, MSP, energy and the fused detector:

- the share of test images with ``p_value < alpha`` at alpha in {0.01, 0.05, 0.1}, its exact
  (Clopper-Pearson) 95% interval, and whether alpha lies in it (the test in
  ``tests/unit/bundle/test_calibration_demo.py`` asks this of NAC);
- how unusual that share is for a calibration set exchangeable with the test images: a
  permutation test that pools the calibration and test scores, re-splits them at random and
  recomputes the share (one-sided p, ``--permutations`` draws);
- the AUROC of calibration vs test scores (0.5 when exchangeable).

    PYTHONPATH=service python experiments/calibration/measure.py \
        [--profile profiles/fashion-mnist] [--cal fashion-mnist:train-calibration] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nacguard.bundle import Bundle, load_bundle
from nacguard.nac.conformal import binomial_interval, fisher_statistic, p_values, self_p_values
from nacguard.nac.detection import auroc
from nacguard.offline.build import batches
from nacguard.offline.datasets import load_source

ALPHAS = (0.01, 0.05, 0.1)


def scores(bundle: Bundle, name: str) -> dict[str, np.ndarray]:
    """NAC, MSP and energy of every image of a source."""
    out: dict[str, list[np.ndarray]] = {"nac": [], "msp": [], "energy": []}
    for x in batches(load_source(name).images, bundle.preprocess, 500):
        r = bundle.score(x)
        for k in out:
            out[k].append(getattr(r, k).numpy().astype(np.float64))
    return {k: np.concatenate(v) for k, v in out.items()}


def flagged(cal: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per detector, the p-values of the test scores against the calibration scores."""
    out = {k: p_values(np.sort(cal[k]), test[k]) for k in ("nac", "msp", "energy")}
    cal_stat = fisher_statistic(np.stack([self_p_values(cal[k]) for k in out], axis=1))
    out["fused"] = p_values(np.sort(cal_stat), fisher_statistic(np.stack(list(out.values()), 1)))
    return out


def shares(p: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for a in ALPHAS:
        k = int(np.count_nonzero(p < a))
        lo, hi = binomial_interval(k, p.size)
        rows.append({"alpha": a, "flagged": k, "share": k / p.size, "ci95": [lo, hi],
                     "alpha_inside": bool(lo <= a <= hi)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", type=Path, default=Path("profiles/fashion-mnist"))
    ap.add_argument("--cal", default="fashion-mnist:train-calibration")
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.profile)
    assert bundle.calibration is not None
    cal, test = scores(bundle, args.cal), scores(bundle, "fashion-mnist:test")
    stored = bundle.calibration.scores
    same = stored.size == cal["nac"].size and np.allclose(np.sort(cal["nac"]), stored)
    observed = flagged(cal, test)
    report: dict[str, Any] = {
        "profile": str(args.profile),
        "calibration_source": bundle.calibration.source,
        "cal_scored": args.cal,
        "cal_matches_bundle": bool(same),
        "auroc_cal_vs_test": {k: auroc(test[k], cal[k]) for k in cal},
        "shipped_nac": shares(p_values(stored, test["nac"])),
        "detectors": {k: shares(v) for k, v in observed.items()},
    }
    rng = np.random.default_rng(0)
    n_cal = cal["nac"].size
    pooled = {k: np.concatenate([cal[k], test[k]]) for k in cal}
    sims: dict[str, list[list[float]]] = {k: [] for k in observed}
    for _ in range(args.permutations):
        perm = rng.permutation(n_cal + test["nac"].size)
        c = {k: v[perm[:n_cal]] for k, v in pooled.items()}
        t = {k: v[perm[n_cal:]] for k, v in pooled.items()}
        for k, p in flagged(c, t).items():
            sims[k].append([float(np.mean(p < a)) for a in ALPHAS])
    report["permutation_p"] = {
        k: [float(np.mean(np.array(sims[k])[:, i] >= row["share"])) for i, row in
            enumerate(report["detectors"][k])]
        for k in observed
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
