"""How the CLI names the bundle a command runs: ``--profile BUNDLE``, or a model of a model
repository, ``--repository DIR --model NAME [--version V]`` (the layout ``nacguard serve
--repository`` serves; see docs/repository.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nacguard.serving.repository import resolve

__all__ = ["add_bundle_flags", "bundle_path"]


def add_bundle_flags(parser: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """``--profile`` (or a positional ``profile``), ``--repository``, ``--model``,
    ``--version``; :func:`bundle_path` reads them."""
    if positional:
        parser.add_argument("profile", nargs="?", help="a bundle directory")
    else:
        parser.add_argument("--profile", help="a bundle directory")
    parser.add_argument("--repository", type=Path, help="a model repository (with --model)")
    parser.add_argument("--model", dest="repo_model", help="a model of --repository")
    parser.add_argument(
        "--version",
        dest="repo_version",
        type=int,
        help="its version (default: the highest valid one, not the shadow)",
    )


def bundle_path(args: argparse.Namespace) -> Path:
    """The bundle directory the flags name.

    Raises:
        ValueError: the flags name no bundle, or name it twice.
        ModelNotFound: no such model or version in the repository.
    """
    profile, repo = args.profile, args.repository
    if repo is None:
        if args.repo_model is not None or args.repo_version is not None:
            raise ValueError("--model and --version need --repository DIR")
        if profile is None:
            raise ValueError("name the bundle: --profile BUNDLE, or --repository DIR --model NAME")
        return Path(profile)
    if profile is not None:
        raise ValueError("give --profile or --repository, not both")
    if args.repo_model is None:
        raise ValueError("--repository needs --model NAME")
    return resolve(repo, args.repo_model, args.repo_version).path
