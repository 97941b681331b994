"""``nacguard`` command line: serve, build/evaluate/inspect profiles, score files offline."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nacguard.errors import NacguardError
from nacguard.settings import Settings

__all__ = ["main"]

log = logging.getLogger("nacguard")


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per Settings field, same names as the NACGUARD_* variables."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=f"set_{name}", default=None, help=field.description)


def _settings_from(args: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(args, f"set_{name}", None)
        if value is None:
            continue
        if "list" in str(field.annotation):
            value = (
                json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
            )
        given[name] = value
    return Settings(**given)


def _cmd_serve(args: argparse.Namespace) -> int:
    from nacguard.supervisor import serve

    return serve(_settings_from(args))


def _cmd_profile_build(args: argparse.Namespace) -> int:
    from nacguard.nac import LayerConfig
    from nacguard.nac.states import resolve_modules
    from nacguard.offline.build import BuildPlan, build_bundle
    from nacguard.offline.datasets import load_source
    from nacguard.offline.layers import candidate_layers
    from nacguard.offline.model_setup import copy_artifacts, setup_model

    setup = setup_model(args)
    layers = setup.layers
    default = LayerConfig("default", args.beta, args.saturation, args.n_edges)
    if args.layers:
        layers = [LayerConfig.parse(text, default) for text in args.layers]
    if not layers:  # the default set (nacguard profile layers marks it)
        chosen = [c.name for c in candidate_layers(setup.model, setup.preprocess) if c.default]
        log.info("no --layers: monitoring the default set %s", chosen)
        layers = [LayerConfig.parse(name, default) for name in chosen]
    if not layers:
        raise ValueError("no default layers found: give --layers NAME[:O:M:BETA] ...")
    resolve_modules(setup.model, [c.name for c in layers])  # fails early, listing valid names
    source = load_source(args.data, seed=args.seed)
    classes = setup.classes or source.classes or []
    if not classes:
        raise ValueError("neither the model nor the data has class names: give --classes")
    plan = BuildPlan(
        name=args.name or Path(args.out).name,
        model_ref=setup.ref,
        preprocess=setup.preprocess,
        classes=classes,
        layers=layers,
        samples=args.samples,
        calibration_samples=args.calibration_samples,
        tpr=args.tpr,
        seed=args.seed,
        batch_size=args.batch_size,
        calibration=args.calibration,
        min_class_samples=args.min_class_samples,
    )
    cal_source = load_source(args.calibration_data) if args.calibration_data else None
    if len(source) < args.samples + (0 if cal_source else args.calibration_samples):
        raise ValueError(
            f"{source.name} has {len(source)} images; need {args.samples} to count"
            + ("" if cal_source else f" + {args.calibration_samples} to calibrate")
        )
    copy_artifacts(setup, Path(args.out))
    out = build_bundle(
        plan, setup.model, source, Path(args.out), calibration_source=cal_source, device=args.device
    )
    if out is not None:
        print(f"wrote {out}")
        _print_sanity(json.loads((out / "bundle.json").read_text()).get("sanity"))
    return 0


def _print_sanity(sanity: dict[str, Any] | None) -> None:
    """The profile sanity check in a line (its warnings on stderr)."""
    from nacguard.offline.summary import sanity_lines

    lines, warnings = sanity_lines(sanity)
    print("\n".join(lines))
    for warning in warnings:
        print(f"nacguard: warning: {warning}", file=sys.stderr)


def _cmd_profile_eval(args: argparse.Namespace) -> int:
    from nacguard.bundle import load_bundle
    from nacguard.offline.addressing import bundle_path
    from nacguard.offline.datasets import load_source
    from nacguard.offline.evaluate import evaluate, write_report

    bundle = load_bundle(bundle_path(args), args.device)
    ind = load_source(args.ind, limit=args.limit, seed=args.seed)
    oods = {}
    for item in args.ood:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--ood expects NAME=SOURCE, got {item!r}")
        if name in oods:
            raise ValueError(f"--ood: the name {name!r} is given twice")
        oods[name] = load_source(spec, limit=args.limit, seed=args.seed)
    result = evaluate(bundle, ind, oods, batch_size=args.batch_size, progress=sys.stderr.isatty())
    from nacguard.offline.summary import eval_lines

    lines, warnings = eval_lines(result)
    print("\n".join(lines))
    for warning in warnings:
        print(f"nacguard: warning: {warning}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if args.report:
        write_report(result, Path(args.report), bundle.threshold)
    return 0


def _cmd_profile_inspect(args: argparse.Namespace) -> int:
    from nacguard.bundle import load_bundle
    from nacguard.offline.addressing import bundle_path

    info = load_bundle(bundle_path(args)).describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from nacguard.offline.summary import inspect_lines

    print("\n".join(inspect_lines(info)))
    _print_sanity(info.get("sanity"))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from nacguard.bundle import load_bundle
    from nacguard.imaging.preprocess import decode_image
    from nacguard.offline.addressing import bundle_path
    from nacguard.offline.datasets import image_files
    from nacguard.offline.summary import score_line

    bundle = load_bundle(
        bundle_path(args), args.device, ood_alpha=args.alpha, ood_detector=args.detector
    )
    files = image_files(args.paths)
    limit = Settings().max_image_pixels
    images = [decode_image(f.read_bytes(), max_pixels=limit, spec=bundle.preprocess) for f in files]
    if args.explain and images:
        preds = bundle.explain_batch(bundle.preprocess.batch(images), top=args.explain)
    else:
        preds = bundle.predict(images)
    rows = [
        {"path": str(f), **p.to_dict(top_k=args.top_k, explain=bool(args.explain))}
        for f, p in zip(files, preds, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(score_line(r, explain=bool(args.explain)))
    return 0


def _cmd_model_eval(args: argparse.Namespace) -> int:
    from nacguard.imaging.preprocess import PRESETS, PreprocessSpec
    from nacguard.nac import LayerConfig
    from nacguard.offline.datasets import load_source
    from nacguard.offline.ranking import (
        DEFAULT_LAYER,
        evaluate_checkpoints,
        parse_checkpoint,
        write_report,
    )

    checkpoints = [parse_checkpoint(t, args.model, args.num_classes) for t in args.checkpoints]
    all_demo = all(c.model_ref["kind"] == "demo" for c in checkpoints)
    preset = args.preprocess or ("fashion-mnist" if all_demo else "imagenet")
    spec = PRESETS.get(preset) or PreprocessSpec.from_dict(json.loads(preset))
    layers = [LayerConfig.parse(t, DEFAULT_LAYER) for t in args.layers] if args.layers else None
    ind = load_source(args.data, limit=args.limit, seed=args.seed)
    shifted = {}
    for item in args.shifted or []:
        # NAME=SOURCE; a bare SOURCE (an existing folder, or a spec without "=") names itself.
        name, sep, source = item.partition("=")
        if Path(item).exists() or not sep:
            name, source = Path(item).name or item, item
        if not name or name in shifted:
            raise ValueError(f"--shifted: missing or repeated name in {item!r}")
        shifted[name] = load_source(source, limit=args.limit, seed=args.seed)
    result = evaluate_checkpoints(
        checkpoints,
        ind,
        spec,
        shifted,
        layers=layers,
        batch_size=args.batch_size,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if args.report:
        write_report(result, Path(args.report))
    return 0


def _cmd_review_export(args: argparse.Namespace) -> int:
    import asyncio

    from nacguard.offline.review_export import export_review

    url = args.redis_url or Settings().redis_url
    if not url:
        raise ValueError("give --redis-url (or set NACGUARD_REDIS_URL)")
    result = asyncio.run(
        export_review(
            url,
            Path(args.out),
            stream=args.stream,
            group=args.group,
            consumer=args.consumer,
            count=args.count,
        )
    )
    print(
        f"exported {result.exported} entries ({result.images} with image bytes) to "
        f"{result.out_dir}; index: {result.index_json.name}, {result.index_csv.name}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    from nacguard.offline import profile_cli
    from nacguard.offline.addressing import add_bundle_flags
    from nacguard.offline.model_setup import add_model_arguments

    p = argparse.ArgumentParser(prog="nacguard", description=__doc__)
    p.add_argument("--log-level", default="info")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (all settings also via NACGUARD_*)")
    _settings_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    profile = sub.add_parser("profile", help="build, evaluate and inspect profile bundles")
    psub = profile.add_subparsers(dest="profile_command", required=True)

    b = psub.add_parser("build", help="count NAC states on InD data and calibrate a threshold")
    add_model_arguments(b)
    b.add_argument("--data", required=True, help="fashion-mnist:train, a folder, ...")
    b.add_argument(
        "--calibration-data",
        help="held-out InD images for the threshold (default: held out of --data)",
    )
    b.add_argument("--out", required=True)
    b.add_argument("--name")
    b.add_argument("--layers", nargs="+", metavar="NAME[:O:M:BETA]")
    b.add_argument("--beta", type=float, default=1.0, help="default beta for bare layer names")
    b.add_argument("--saturation", type=float, default=50.0, help="default O for bare names")
    b.add_argument("--n-edges", type=int, default=50, help="default M for bare names")
    b.add_argument("--samples", type=int, default=1000, help="class-balanced images to count")
    b.add_argument("--calibration-samples", type=int, default=2000, help="held-out images")
    b.add_argument("--tpr", type=float, default=0.95)
    b.add_argument("--calibration", choices=["global", "per-class"], default="global",
                   help="one threshold, or one per predicted class with enough held-out images")  # fmt: skip
    b.add_argument("--min-class-samples", type=int, default=200,
                   help="per-class: a class with fewer held-out images uses the global one")  # fmt: skip
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--device", default="cpu")
    b.set_defaults(func=_cmd_profile_build)

    for add in (profile_cli.add_layers_command, profile_cli.add_tune_command,
                profile_cli.add_calibrate_command):  # fmt: skip
        add(psub)

    e = psub.add_parser("eval", help="AUROC / FPR95 / AUPR of NAC, MSP and energy")
    add_bundle_flags(e)
    e.add_argument("--ind", required=True)
    e.add_argument("--ood", nargs="+", action="extend", required=True, metavar="NAME=SOURCE",
                   help="OOD sets; repeat the flag or give several (every set is evaluated)")  # fmt: skip
    e.add_argument("--json")
    e.add_argument("--report")
    e.add_argument("--limit", type=int, help="at most N images per source (seeded subset)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_cmd_profile_eval)

    i = psub.add_parser("inspect", help="human-readable summary of a bundle")
    add_bundle_flags(i, positional=True)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_profile_inspect)

    review = sub.add_parser("review", help="the OOD review stream (flagged images in Redis)")
    rsub = review.add_subparsers(dest="review_command", required=True)
    r = rsub.add_parser("export", help="write flagged images + index.json/index.csv to a folder")
    r.add_argument("--redis-url", help="default: NACGUARD_REDIS_URL")
    r.add_argument("--out", required=True)
    r.add_argument("--stream", default=Settings.model_fields["review_stream"].default)
    r.add_argument("--group", help="consumer group: export each entry once per group, then ack")
    r.add_argument("--consumer", default="nacguard-export")
    r.add_argument("--count", type=int, help="at most N entries")
    r.set_defaults(func=_cmd_review_export)

    s = sub.add_parser("score", help="score image files or folders offline")
    add_bundle_flags(s)
    s.add_argument("paths", nargs="+")
    s.add_argument("--json", action="store_true")
    s.add_argument("--top-k", type=int, default=3)
    s.add_argument("--alpha", type=float, help="flag at p_value < ALPHA (default: threshold)")
    s.add_argument("--detector", choices=["nac", "fused"], default="nac")
    s.add_argument("--explain", type=int, nargs="?", const=5, default=0, metavar="N",
                   help="add per-layer scores and the N (default 5) least covered neurons")  # fmt: skip
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=_cmd_score)

    me = sub.add_parser(
        "model-eval",
        help="rank checkpoints by NAC-ME on InD data; compare with accuracy on shifted data",
    )
    me.add_argument("--model", help="architecture of the checkpoints: demo[:k=v], torchvision:NAME")
    me.add_argument(
        "--checkpoints",
        nargs="+",
        required=True,
        metavar="PATH[@SPEC]",
        help="state dicts (.safetensors, or .pt/.pth loaded weights-only); @SPEC overrides --model",
    )
    me.add_argument("--num-classes", type=int)
    me.add_argument("--preprocess", help="preset (imagenet, fashion-mnist) or a JSON spec")
    me.add_argument(
        "--data", required=True, help="labelled InD data the checkpoints were not trained on"
    )
    me.add_argument(
        "--shifted",
        nargs="+",
        action="extend",
        metavar="NAME=SOURCE",
        help="labelled shifted test sets (repeatable)",
    )
    me.add_argument(
        "--layers",
        nargs="+",
        metavar="NAME[:O:M:BETA]",
        help="monitored layers (default avgpool:500:50:0.1, the paper's NAC-ME settings)",
    )
    me.add_argument("--limit", type=int, help="at most N images per source (seeded subset)")
    me.add_argument("--seed", type=int, default=0)
    me.add_argument("--batch-size", type=int, default=256)
    me.add_argument("--device", default="cpu")
    me.add_argument("--json", help="write the results as JSON to this file")
    me.add_argument("--report", help="write report.md, results.json and scatter.png here")
    me.set_defaults(func=_cmd_model_eval)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nacguard`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (NacguardError, ValueError, FileNotFoundError, ValidationError) as exc:
        print(f"nacguard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
