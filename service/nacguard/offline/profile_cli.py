"""The ``profile layers`` and ``profile tune`` commands (the CLI's other commands are in
:mod:`nacguard.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from nacguard.offline.model_setup import add_model_arguments

__all__ = ["add_calibrate_command", "add_layers_command", "add_tune_command"]


def add_layers_command(psub: Any) -> None:
    """``nacguard profile layers``."""
    lay = psub.add_parser("layers", help="list a model's candidate NAC layers, marking defaults")
    add_model_arguments(lay)
    lay.add_argument("--json", action="store_true")
    lay.set_defaults(func=_cmd_profile_layers)


def add_tune_command(psub: Any) -> None:
    """``nacguard profile tune``."""
    t = psub.add_parser(
        "tune", help="choose layers and O, M, beta on validation data; write the bundle"
    )
    add_model_arguments(t)
    t.add_argument("--data", required=True, help="InD training data (counted and held out)")
    t.add_argument("--validation-data", help="InD validation images (default: held out of --data)")
    t.add_argument(
        "--calibration-data",
        help="held-out InD images for the threshold and p-values, used for nothing else "
        "(default: the InD validation images, which the settings were also chosen on)",
    )
    t.add_argument("--calibration-samples", type=int, help="default: all --calibration-data")
    t.add_argument(
        "--ood", nargs="+", metavar="NAME=SOURCE", help="OOD validation data (never a test set)"
    )
    t.add_argument("--no-generated-ood", action="store_true", help="only the --ood sets")
    t.add_argument("--out", required=True)
    t.add_argument("--name")
    t.add_argument(
        "--layers", nargs="+", metavar="NAME", help="candidates (default: the default set)"
    )
    t.add_argument("--budget-s", type=float, default=600.0, help="time budget of the search")
    t.add_argument("--samples", type=int, default=1000, help="class-balanced images to count")
    t.add_argument("--validation-samples", type=int, default=2000, help="held-out InD images")
    t.add_argument("--ood-samples", type=int, default=1000, help="images per OOD validation set")
    t.add_argument("--tpr", type=float, default=0.95)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=_cmd_profile_tune)


def add_calibrate_command(psub: Any) -> None:
    """``nacguard profile calibrate``."""
    c = psub.add_parser(
        "calibrate", help="recalibrate a bundle's threshold and p-values on held-out InD images"
    )
    c.add_argument("--profile", required=True, help="the bundle directory (rewritten in place)")
    c.add_argument(
        "--data", required=True, help="held-out InD images: not trained on, counted or tuned on"
    )
    c.add_argument("--samples", type=int, help="a seeded class-balanced subset (default: all)")
    c.add_argument("--calibration", choices=["global", "per-class"], default="global",
                   help="one threshold, or one per predicted class with enough images")  # fmt: skip
    c.add_argument("--min-class-samples", type=int, default=200,
                   help="per-class: a class with fewer images uses the global one")  # fmt: skip
    c.add_argument("--tpr", type=float, default=0.95)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=_cmd_profile_calibrate)


def _cmd_profile_calibrate(args: argparse.Namespace) -> int:
    from nacguard.offline.calibrate import recalibrate_bundle
    from nacguard.offline.datasets import load_source
    from nacguard.offline.summary import sanity_lines

    if args.min_class_samples < 1:
        raise ValueError(f"--min-class-samples must be >= 1, got {args.min_class_samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    source = load_source(args.data)
    result = recalibrate_bundle(
        args.profile, source, samples=args.samples, mode=args.calibration, tpr=args.tpr,
        min_class_samples=args.min_class_samples, seed=args.seed, batch_size=args.batch_size,
        device=args.device, progress=sys.stderr.isatty(),
    )  # fmt: skip
    cal = result.calibration
    before = "" if result.previous_threshold is None else f" (was {result.previous_threshold:.4f})"
    print(f"recalibrated {result.path} on {cal.source}")
    print(f"threshold at TPR {cal.tpr:g}: {cal.threshold:.4f}{before}")
    if cal.class_thresholds is not None:
        own = sum(1 for t in cal.class_thresholds if t == t)
        print(f"per-class thresholds for {own} of {len(cal.class_thresholds)} classes")
    lines, warnings = sanity_lines(result.sanity)
    print("\n".join(lines))
    for warning in warnings:
        print(f"nacguard: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_profile_layers(args: argparse.Namespace) -> int:
    from nacguard.offline.layers import candidate_layers, format_layers
    from nacguard.offline.model_setup import setup_model

    setup = setup_model(args)
    candidates = candidate_layers(setup.model, setup.preprocess)
    if args.json:
        print(json.dumps([c.__dict__ for c in candidates], indent=2))
    else:
        print(format_layers(candidates))
    return 0


def _cmd_profile_tune(args: argparse.Namespace) -> int:
    from nacguard.nac.states import resolve_modules
    from nacguard.offline.build import BuildPlan, build_bundle
    from nacguard.offline.datasets import load_source
    from nacguard.offline.layers import candidate_layers
    from nacguard.offline.model_setup import copy_artifacts, setup_model
    from nacguard.offline.tune import ood_images, split_for_tuning, tune_layers, write_reports

    setup = setup_model(args)
    names = [t.split(":")[0] for t in args.layers or []] or [
        c.name for c in candidate_layers(setup.model, setup.preprocess) if c.default
    ]
    resolve_modules(setup.model, names)  # fails early, listing valid names
    source = load_source(args.data, seed=args.seed)
    validation = load_source(args.validation_data) if args.validation_data else None
    calibration = load_source(args.calibration_data) if args.calibration_data else None
    if calibration is not None and args.calibration_data in (args.data, args.validation_data):
        raise ValueError("--calibration-data must differ from --data and --validation-data")
    classes = setup.classes or source.classes or []
    if not classes:
        raise ValueError("neither the model nor the data has class names: give --classes")
    user = {}
    for item in args.ood or []:
        name, sep, spec = item.partition("=")
        if not sep or not name or name in user:
            raise ValueError(f"--ood expects distinct NAME=SOURCE, got {item!r}")
        user[name] = load_source(spec, limit=args.ood_samples, seed=args.seed)
    fit, val = split_for_tuning(
        source, validation, args.samples, args.validation_samples, args.seed
    )
    size = max(setup.preprocess.size)
    oods = ood_images(fit, user, args.ood_samples, args.seed, size, not args.no_generated_ood)
    progress = sys.stderr.isatty()
    result = tune_layers(
        setup.model, setup.preprocess, names, fit, val, oods, budget_s=args.budget_s,
        batch_size=args.batch_size, device=args.device, progress=progress, baseline=setup.layers,
    )  # fmt: skip
    val_name = validation.name if validation else f"{source.name} (held out)"
    result.info = {
        "model": args.model,
        "counted": f"{source.name}: {len(fit)} images, seed {args.seed}",
        "ind_validation": f"{val_name}: {len(val)} images",
        "candidates": names,
    }
    cal_samples = args.validation_samples
    if calibration is not None:
        cal_samples = min(args.calibration_samples or len(calibration), len(calibration))
        result.info["calibration"] = (
            f"{calibration.name}: {cal_samples} images, used for nothing else"
        )
    split = {"validation_data": val_name}
    if calibration is not None:
        split["calibration_data"] = calibration.name
    out = Path(args.out)
    plan = BuildPlan(
        name=args.name or out.name, model_ref=setup.ref, preprocess=setup.preprocess,
        classes=classes, layers=result.layers, samples=args.samples,
        calibration_samples=cal_samples, tpr=args.tpr, seed=args.seed,
        batch_size=args.batch_size, provenance={"tuning": "tuning.json", **split},
    )  # fmt: skip
    copy_artifacts(setup, out)
    build_bundle(plan, setup.model, source, out, calibration_source=calibration or validation,
                 device=args.device, progress=progress)  # fmt: skip
    json_file, md_file = write_reports(result, out)
    print(f"chosen --layers {' '.join(result.to_json()['layers'])}")
    print(f"mean AUROC {result.chosen['mean_auroc']:.4f} on {len(oods)} OOD validation sets")
    if result.baseline:
        print(f"baseline (the bundle's own layers): {result.baseline['mean_auroc']:.4f}")
    print(f"wrote {out} ({json_file.name}, {md_file.name}) in {result.seconds:.0f}s of search")
    return 0
