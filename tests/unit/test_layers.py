"""The package's layering: the serving core has no web framework in it, the runtime never
imports the offline tools, FastAPI/Starlette stay under ``api/``, and modules stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "service" / "nacguard"
RUNTIME = (
    "accel",
    "api",
    "bundle",
    "engine",
    "imaging",
    "monitoring",
    "nac",
    "openinference",
    "serving",
    "store",
    "supervisor",
)
WEB = ("fastapi", "starlette")
#: HTTP adapters outside ``api/``: the Open Inference Protocol's REST router (an APIRouter the
#: app mounts; its gRPC side and protocol core import no web framework).
WEB_ADAPTERS = ("openinference/rest.py",)


def _modules(*packages: str) -> list[Path]:
    return sorted(p for name in packages for p in (PACKAGE / name).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names (relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = ".".join(("nacguard", *path.relative_to(PACKAGE).with_suffix("").parts))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_the_checks_see_imports() -> None:
    """The static checks below can fail: they find the imports a known module has."""
    assert "fastapi" in _imports(PACKAGE / "api" / "app.py")
    assert "nacguard.offline.build" in _imports(PACKAGE / "cli.py") or any(
        name.startswith("nacguard.offline") for name in _imports(PACKAGE / "cli.py")
    )


@pytest.mark.parametrize("path", _modules(*RUNTIME), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_runtime_never_imports_offline(path: Path) -> None:
    offline = {
        n for n in _imports(path) if n == "nacguard.offline" or n.startswith("nacguard.offline.")
    }
    assert not offline, f"{path.relative_to(PACKAGE)} imports {sorted(offline)}"


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in PACKAGE.rglob("*.py")
        if "api" not in p.relative_to(PACKAGE).parts[:1]
        and str(p.relative_to(PACKAGE)) not in WEB_ADAPTERS
    ],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_web_frameworks_only_under_api(path: Path) -> None:
    web = {n for n in _imports(path) if n.split(".")[0] in WEB}
    assert not web, f"{path.relative_to(PACKAGE)} imports {sorted(web)}"


def test_importing_the_serving_core_loads_no_web_framework() -> None:
    code = (
        "import sys, nacguard.serving, nacguard.serving.service\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {WEB!r})\n"
        "assert 'nacguard.serving' in sys.modules\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"loaded: {done.stdout.strip()}"


def test_modules_stay_small() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert max(sizes.values()) <= 500, {k: v for k, v in sizes.items() if v > 500}
    over = {k: v for k, v in sizes.items() if v > 400}
    assert not over, f"over 400 lines: {over}"


def test_tests_never_import_the_load_tools() -> None:
    """Benchmarks are run as scripts (subprocesses), never imported by a test."""
    tests = Path(__file__).resolve().parents[1]
    offenders = {
        str(p.relative_to(tests))
        for p in tests.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text(), str(p)))
        if (
            isinstance(node, ast.Import)
            and any(a.name.split(".")[0] == "loadtest" for a in node.names)
        )
        or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "loadtest")
    }
    assert not offenders, sorted(offenders)
