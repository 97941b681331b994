"""The NAC-ME experiment on Fashion-MNIST, end to end, with one command.

Usage (from the repository root; about 5 minutes on one CPU thread, most of it evaluation)::

    python experiments/nac_me/run.py [--retrain] [--threads 1]

1. Checkpoints: reuses ``experiments/nac_me/checkpoints`` when every file matches the sha256 in
   its ``checkpoints.json``; otherwise (or with ``--retrain``) trains them with ``train.py``.
2. Shifted test sets: writes the five shifts of ``shifts.py`` of the full Fashion-MNIST test split
   as labelled image folders under ``experiments/nac_me/data`` (git-ignored, regenerated when
   missing or made with other settings).
3. Evaluation: ``nacguard model-eval`` with the paper's NAC-ME settings (avgpool, O = 500,
   M = 50, beta = 0.1) on ``fashion-mnist:train-holdout`` (5,000 train-split images no checkpoint
   was trained on), and the accuracy of every checkpoint on each shifted set.
   Writes ``results/results.json``, ``results/report.md``, ``results/scatter.png`` and
   ``results/run.json`` (timings, versions, the exact command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # train.py and shifts.py sit next to this script

import shifts  # noqa: E402
import train  # noqa: E402

from nacguard.cli import main as nacguard_main  # noqa: E402
from nacguard.imaging.preprocess import PreprocessSpec  # noqa: E402
from nacguard.nac import LayerConfig  # noqa: E402
from nacguard.offline.datasets import load_fashion_mnist, load_source  # noqa: E402
from nacguard.offline.ranking import (  # noqa: E402
    evaluate_checkpoints,
    parse_checkpoint,
    spearman,
)

log = logging.getLogger("nac_me.run")

SHIFT_SEED = 0
IND_DATA = "fashion-mnist:train-holdout"

#: Other NAC-ME settings of the avgpool layer (NAME:O:M:BETA) whose rank correlations are
#: reported next to the paper's default, as a sensitivity check: never used to pick anything.
SENSITIVITY = (
    "avgpool:500:50:0.01",
    "avgpool:500:50:1",
    "avgpool:500:50:10",
    "avgpool:50:50:0.1",
    "avgpool:5000:50:0.1",
)


def _checkpoints_ok(manifest_path: Path) -> bool:
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    expected = {(r.name, e) for r in train.RUNS for e in range(1, r.epochs + 1)}
    listed = {(c["run"]["name"], c["epoch"]) for c in manifest["checkpoints"]}
    if listed != expected:
        return False
    for c in manifest["checkpoints"]:
        path = manifest_path.parent / c["file"]
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != c["sha256"]:
            return False
    return True


def ensure_checkpoints(ckpt_dir: Path, retrain: bool, threads: int) -> dict[str, Any]:
    """The checkpoint manifest, training the checkpoints first if needed."""
    manifest_path = ckpt_dir / "checkpoints.json"
    if retrain or not _checkpoints_ok(manifest_path):
        log.info("training %d runs into %s", len(train.RUNS), ckpt_dir)
        train.train_all(ckpt_dir, threads)
    else:
        log.info("reusing the checkpoints in %s (sha256 verified)", ckpt_dir)
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    return manifest


def ensure_shifted_sets(data_dir: Path) -> dict[str, Path]:
    """Write (or reuse) one labelled folder per shift of the test split."""
    code = hashlib.sha256(Path(shifts.__file__).read_bytes()).hexdigest()
    stamp = {"shifts": list(shifts.SHIFTS), "seed": SHIFT_SEED, "shifts_py_sha256": code}
    stamp_path = data_dir / "shifted.json"
    folders = {name: data_dir / name for name in shifts.SHIFTS}
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        log.info("reusing the shifted sets in %s", data_dir)
        return folders
    images, labels = load_fashion_mnist("test")
    for name, folder in folders.items():
        if folder.exists():
            for old in folder.rglob("*.png"):
                old.unlink()
        shifted = shifts.make_shift(name, images, SHIFT_SEED)
        shifts.write_folder(shifted, labels, folder)
        log.info("wrote %s (%d images)", folder, len(labels))
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return folders


def _fmt(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:+.3f}"


def sensitivity(
    manifest: dict[str, Any], checkpoint_args: list[str], results: dict[str, Any], out: Path
) -> list[dict[str, Any]]:
    """Spearman rho of NAC-ME under other avgpool settings with the main run's accuracies.

    Each :data:`SENSITIVITY` setting costs one pass over the InD data only; the shifted
    accuracies are the main run's. Writes ``sensitivity.json`` and ``sensitivity.md`` (the
    paper's default setting first, from the main run).
    """
    checkpoints = [parse_checkpoint(a, None) for a in checkpoint_args]
    ind = load_source(IND_DATA)
    preprocess = PreprocessSpec.from_dict(manifest["preprocess"])
    entries = results["checkpoints"]
    targets = list(results["spearman"]["nac_me"])
    truth = {
        t: [
            e["mean_shifted_accuracy"] if t == "mean" else e["shifted_accuracy"][t] for e in entries
        ]
        for t in targets
    }
    rows = [
        {
            "layer": results["layers"][0],
            "default": True,
            "nac_me": {e["name"]: e["nac_me"] for e in entries},
            "spearman": results["spearman"]["nac_me"],
        }
    ]
    for text in SENSITIVITY:
        layer = LayerConfig.parse(text)
        res = evaluate_checkpoints(checkpoints, ind, preprocess, layers=[layer])
        assert [c.name for c in res.checkpoints] == [e["name"] for e in entries]
        values = [c.nac_me for c in res.checkpoints]
        rho = {t: spearman(values, ys) for t, ys in truth.items()}
        rows.append(
            {
                "layer": layer.to_dict(),
                "default": False,
                "nac_me": {c.name: c.nac_me for c in res.checkpoints},
                "spearman": {t: None if math.isnan(r) else r for t, r in rho.items()},
            }
        )
        log.info("sensitivity %s: rho with mean shifted accuracy %+.3f", text, rho["mean"])
    (out / "sensitivity.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = [
        "| avgpool setting (O / M / beta) | " + " | ".join(targets) + " |",
        "|---" * (1 + len(targets)) + "|",
    ]
    for row in rows:
        layer = row["layer"]
        label = f"{layer['saturation']:g} / {layer['n_edges']} / {layer['beta']:g}"
        label += " (paper default)" if row["default"] else ""
        md.append(f"| {label} | " + " | ".join(_fmt(row["spearman"][t]) for t in targets) + " |")
    acc = results["spearman"]["ind_accuracy"]
    md.append(
        "| *InD accuracy, for reference* | " + " | ".join(_fmt(acc[t]) for t in targets) + " |"
    )
    (out / "sensitivity.md").write_text("\n".join(md) + "\n")
    return rows


def _compare(entries: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
    """Both predictors' rho with the mean shifted accuracy, p-values, bootstrap of the gap."""
    ys = np.array([e["mean_shifted_accuracy"] for e in entries])
    xs = {p: np.array([e[p] for e in entries]) for p in ("nac_me", "ind_accuracy")}
    report: dict[str, Any] = {"checkpoints": [e["name"] for e in entries]}
    for p, x in xs.items():
        rho = spearman(x, ys)
        perms = np.array([spearman(x, rng.permutation(ys)) for _ in range(10_000)])
        # (hits + 1) / (shuffles + 1): never an impossible p = 0 from a finite sample.
        p_value = float(((np.abs(perms) >= abs(rho) - 1e-12).sum() + 1) / (len(perms) + 1))
        report[p] = {"rho": rho, "permutation_p": p_value}
    diffs = []
    for _ in range(5_000):
        idx = rng.integers(0, len(ys), len(ys))
        d = spearman(xs["nac_me"][idx], ys[idx]) - spearman(xs["ind_accuracy"][idx], ys[idx])
        if not math.isnan(d):
            diffs.append(d)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    report["rho_difference"] = {
        "nac_me_minus_ind_accuracy": report["nac_me"]["rho"] - report["ind_accuracy"]["rho"],
        "bootstrap_95": [float(lo), float(hi)],
        "bootstrap_resamples": len(diffs),
    }
    return report


def statistics(results: dict[str, Any], out: Path, seed: int = 0) -> dict[str, Any]:
    """How much a few checkpoints can tell, for the mean shifted accuracy.

    For all checkpoints, and for each architecture with at least 5 of them: a two-sided
    permutation p-value of each predictor's Spearman rho (10,000 seeded shuffles) and a 95%
    percentile interval of rho(NAC-ME) - rho(InD accuracy) over 5,000 bootstrap resamples of
    the checkpoints. Writes ``statistics.json``.
    """
    rng = np.random.default_rng(seed)
    entries = results["checkpoints"]
    report: dict[str, Any] = {"target": "mean shifted accuracy", "all": _compare(entries, rng)}
    for spec in sorted({e["model"] for e in entries}):
        group = [e for e in entries if e["model"] == spec]
        if len(group) >= 5:
            report[spec] = _compare(group, rng)
    (out / "statistics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> int:
    """Run the experiment; returns the CLI's exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrain", action="store_true", help="train even if checkpoints exist")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--checkpoint-dir", type=Path, default=HERE / "checkpoints")
    parser.add_argument(
        "--skip-sensitivity", action="store_true", help="only the paper's default setting"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    manifest = ensure_checkpoints(args.checkpoint_dir, args.retrain, args.threads)
    t1 = time.perf_counter()
    folders = ensure_shifted_sets(args.data_dir)
    t2 = time.perf_counter()

    root = Path.cwd()

    def rel(p: Path) -> str:
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    checkpoint_args = [
        f"{rel(args.checkpoint_dir / c['file'])}@{c['model']}" for c in manifest["checkpoints"]
    ]
    argv = [
        "model-eval",
        "--checkpoints",
        *checkpoint_args,
        "--preprocess",
        json.dumps(manifest["preprocess"], separators=(",", ":")),
        "--data",
        IND_DATA,
        "--shifted",
        *[f"{name}={rel(folder)}" for name, folder in folders.items()],
        "--json",
        rel(args.out / "results.json"),
        "--report",
        rel(args.out),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    log.info("nacguard %s", " ".join(argv))
    rc = nacguard_main(argv)
    t3 = time.perf_counter()
    if rc == 0 and not args.skip_sensitivity:
        results = json.loads((args.out / "results.json").read_text())
        sensitivity(manifest, checkpoint_args, results, args.out)
        statistics(results, args.out)
    t4 = time.perf_counter()
    run_info = {
        "command": "python experiments/nac_me/run.py",
        "nacguard_argv": argv,
        "seconds": {
            "checkpoints": round(t1 - t0, 1),
            "shifted_sets": round(t2 - t1, 1),
            "model_eval": round(t3 - t2, 1),
            "sensitivity": round(t4 - t3, 1),
            "total": round(t4 - t0, 1),
        },
        "threads": args.threads,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }
    (args.out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    log.info("done in %.0f s; results in %s", t4 - t0, args.out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
