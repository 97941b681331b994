"""The model repository on disk: ``DIR/<model>/<version>/`` each holding a profile bundle.

:func:`scan` walks the directory and returns what is servable, with one problem per thing it
refused (a junk folder, an unreadable or malformed bundle, a duplicate name); nothing here loads
weights. :class:`VersionPolicy` picks the versions of a model to load. A version is a positive
integer folder name; a model name is case-insensitively unique. Versions are immutable once
written: drop a new one in by writing it under a hidden name (``.tmp-3``) and renaming it, so a
scan never sees it half-written (hidden folders are skipped silently).

With ``profile`` instead of a repository, the one bundle is served as model
``<its architecture name>``, version 1 (:func:`single_bundle`).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from nacguard.bundle.format import BUNDLE_FILE, SCHEMA_VERSION
from nacguard.bundle.refs import model_name
from nacguard.errors import BundleError, ModelNotFound
from nacguard.settings import Settings

__all__ = [
    "SHADOW_FILE",
    "Scan",
    "VersionEntry",
    "VersionPolicy",
    "discover",
    "read_entry",
    "resolve",
    "scan",
    "single_bundle",
]

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_VERSION = re.compile(r"^[0-9]{1,9}$")

#: ``DIR/<model>/shadow``: a text file holding the version to load as the model's shadow.
SHADOW_FILE = "shadow"


@dataclass(frozen=True)
class VersionEntry:
    """One servable version, as found on disk (nothing loaded yet).

    Attributes:
        model: the model's name (its folder).
        version: the version number (its folder).
        path: the bundle directory.
        weights_sha256: sha256 of the weights recorded in ``bundle.json`` (equal weights are
            loaded once: a profile-only update).
        signature: the bundle files' sizes and modification times, so a version refused once
            is retried only when its files change.
    """

    model: str
    version: int
    path: Path
    weights_sha256: str
    signature: tuple[tuple[str, int, int], ...]

    @property
    def key(self) -> tuple[str, int]:
        """``(model, version)``."""
        return (self.model, self.version)


@dataclass
class Scan:
    """What one scan found.

    Attributes:
        models: servable versions by model, ascending.
        problems: one line per junk entry or unservable model.
        refused: one line per version that failed validation, by ``(model, version)`` (these
            count as load failures).
        shadows: the version each model's ``shadow`` file names (its shadow profile; that
            version is not served).
    """

    models: dict[str, list[VersionEntry]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    refused: dict[tuple[str, int], str] = field(default_factory=dict)
    shadows: dict[str, int] = field(default_factory=dict)


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for file in sorted(path.iterdir()):
        if file.is_file():
            st = file.stat()
            out.append((file.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_entry(model: str, version: int, path: Path) -> VersionEntry:
    """Read and check a version's ``bundle.json`` (schema, files present), without hashing or
    loading the weights (:func:`~nacguard.bundle.load_bundle` checks the sha256 later).

    Raises:
        BundleError: unreadable, malformed, a schema version this build does not serve, or a
            file it names is missing.
    """
    file = path / BUNDLE_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no {BUNDLE_FILE}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file}: unreadable ({exc.__class__.__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        found = meta.get("schema_version") if isinstance(meta, dict) else None
        raise BundleError(
            f"{file}: schema version {found!r} is not supported (expected {SCHEMA_VERSION})"
        )
    try:
        weights = path / meta["model"]["weights"]
        tables = path / meta["nac"]["file"]
        sha = str(meta["model"].get("sha256", ""))
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{file}: malformed bundle.json (missing {exc})") from None
    for needed in (weights, tables):
        if not needed.is_file():
            raise BundleError(f"{path}: bundle file missing: {needed.name}")
    return VersionEntry(model, version, path, sha, _signature(path))


def scan(root: Path) -> Scan:
    """Walk ``root`` and return the servable versions and the problems found.

    A problem never stops the scan: each refused thing gets one line and the rest is served.
    Hidden entries (names starting with ``.``) are skipped silently; they are how a version is
    written before being renamed into place.
    """
    result = Scan()
    try:
        children = sorted(root.iterdir())
    except OSError as exc:
        result.problems.append(f"repository {root}: unreadable ({exc})")
        return result
    seen: dict[str, str] = {}
    for child in children:
        if child.name.startswith("."):
            continue
        if not child.is_dir():
            result.problems.append(f"{child}: not a model folder (a file), ignored")
            continue
        if not _MODEL_NAME.match(child.name):
            result.problems.append(
                f"{child}: not a valid model name (letters, digits, '.', '_', '-'), ignored"
            )
            continue
        folded = child.name.casefold()
        if folded in seen:
            result.problems.append(
                f"{child}: duplicate model name (same as {seen[folded]!r} ignoring case), ignored"
            )
            continue
        seen[folded] = child.name
        versions = _scan_model(child, result)
        if versions:
            result.models[child.name] = versions
        elif not any(model == child.name for model, _ in result.refused):
            result.problems.append(f"{child}: no version folder, model not served")
    return result


def _scan_model(folder: Path, result: Scan) -> list[VersionEntry]:
    problems = result.problems
    try:
        children = sorted(folder.iterdir())
    except OSError as exc:
        problems.append(f"{folder}: unreadable ({exc})")
        return []
    found: dict[int, VersionEntry] = {}
    for child in children:
        if child.name.startswith("."):
            continue
        if child.name == SHADOW_FILE and child.is_file():
            _read_shadow(child, folder.name, result)
            continue
        if not child.is_dir() or not _VERSION.match(child.name) or int(child.name) < 1:
            problems.append(f"{child}: not a version folder (a positive integer), ignored")
            continue
        number = int(child.name)
        if number in found:
            problems.append(
                f"{child}: duplicate version {number} (also {found[number].path.name}), ignored"
            )
            continue
        try:
            found[number] = read_entry(folder.name, number, child)
        except (BundleError, OSError) as exc:
            result.refused[(folder.name, number)] = f"{folder.name} version {number} refused: {exc}"
    return [found[v] for v in sorted(found)]


def _read_shadow(file: Path, model: str, result: Scan) -> None:
    """``DIR/<model>/shadow`` names the version to load as the model's shadow profile."""
    try:
        text = file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        result.problems.append(f"{file}: unreadable ({exc}), no shadow")
        return
    if not _VERSION.match(text) or int(text) < 1:
        result.problems.append(f"{file}: not a version number ({text[:20]!r}), no shadow")
        return
    result.shadows[model] = int(text)


def resolve(root: Path, model: str, version: int | None = None) -> VersionEntry:
    """The valid version ``version`` of ``model`` in the repository ``root`` (default: the
    highest valid one that is not the model's shadow), checked as a scan checks it.

    Raises:
        ModelNotFound: no such model, or no such valid version (the message says which exist,
            or why the version was refused).
    """
    if not root.is_dir():
        raise ModelNotFound(f"repository {root}: not a directory")
    found = scan(root)
    entries = found.models.get(model, [])
    if not entries and not any(m == model for m, _ in found.refused):
        raise ModelNotFound(
            f"no model {model!r} in repository {root}; models: {sorted(found.models)}"
        )
    if version is None:
        usable = [e for e in entries if e.version != found.shadows.get(model)] or entries
        if usable:
            return usable[-1]
        raise ModelNotFound(f"model {model!r} in {root} has no valid version")
    for entry in entries:
        if entry.version == version:
            return entry
    if (model, version) in found.refused:
        raise ModelNotFound(found.refused[(model, version)])
    raise ModelNotFound(
        f"model {model!r} in {root} has no version {version}; "
        f"versions: {[e.version for e in entries]}"
    )


def single_bundle(path: Path) -> Scan:
    """The one-model repository of ``--profile``: the bundle as version 1 of a model named
    after its architecture (what the metrics' ``model`` label has always said)."""
    result = Scan()
    meta: object = None
    # Unreadable: the bundle's own loader reports what is wrong with a bad --profile.
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((path / BUNDLE_FILE).read_text())
    ref = meta.get("model") if isinstance(meta, dict) else None
    name = model_name(ref) if isinstance(ref, dict) else (path.name or "model")
    sha = str(ref.get("sha256", "")) if isinstance(ref, dict) else ""
    result.models[name] = [VersionEntry(name, 1, path, sha, ())]
    return result


def discover(settings: Settings) -> Scan:
    """What the settings serve: the ``repository`` scanned, or the one ``profile``."""
    if settings.repository is None:
        return single_bundle(settings.profile)
    return scan(settings.repository)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to load: the ``latest`` N, or the ``pinned`` ones.

    Parsed from the setting's text (``latest:2``, ``pinned:3,4``).
    """

    latest: int | None
    pinned: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """Parse ``latest:N`` or ``pinned:V[,V...]``.

        Raises:
            ValueError: anything else.
        """
        kind, _, value = text.partition(":")
        if kind == "latest" and value.isdigit() and int(value) >= 1:
            return cls(latest=int(value))
        if kind == "pinned" and value and all(v.isdigit() for v in value.split(",")):
            return cls(latest=None, pinned=tuple(sorted({int(v) for v in value.split(",")})))
        raise ValueError(f"version policy {text!r}: use latest:N or pinned:V[,V...]")

    def select(self, versions: list[int]) -> list[int]:
        """The versions to load among ``versions`` (the valid ones found), ascending."""
        ordered = sorted(set(versions))
        if self.latest is not None:
            return ordered[-self.latest :]
        return [v for v in ordered if v in self.pinned]
