"""The Dockerfiles lint clean and keep the properties the deployment relies on.

CI has no Docker engine, so the images are never built here: hadolint checks the Dockerfiles,
and the tests below read them (and .dockerignore) to check what a build would produce.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from nacguard.settings import Settings
from tests.unit.deploy.conftest import Render
from tests.unit.deploy.manifests import DOCKER, ROOT, one, require_tool

DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
BAKED_PROFILE = "/opt/nacguard/profiles/fashion-mnist"
PINNED = ("torch", "torchvision")


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    value: str


@dataclass(frozen=True)
class Stage:
    """One build stage: its base image (ARG defaults substituted), name and instructions."""

    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.all("ENV"):
            tokens = shlex.split(value)
            if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
                env[tokens[0]] = " ".join(tokens[1:])
                continue
            for token in tokens:
                key, _, val = token.partition("=")
                env[key] = val
        return env


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order; comments dropped, backslash continuations joined."""
    instructions, buffer = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, rest = buffer.partition(" ")
        instructions.append(Instruction(keyword.upper(), rest.strip()))
        buffer = ""
    return instructions


def stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in parse_dockerfile(path.read_text(encoding="utf-8")):
        if ins.keyword == "ARG" and not result:
            key, _, default = ins.value.partition("=")
            args[key] = default
        elif ins.keyword == "FROM":
            words = [w for w in ins.value.split() if not w.startswith("--platform")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(image, name, []))
        elif result:
            result[-1].instructions.append(ins)
    return result


def _pins(text: str) -> dict[str, str]:
    return {name: m.group(1) for name in PINNED if (m := re.search(rf"\b{name}==([\w.+]+)", text))}


@pytest.fixture(params=sorted(DOCKERFILES))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- hadolint -----------------------------------------------------------------------------------


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    hadolint = require_tool("hadolint")
    return subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dockerfile_passes_hadolint(variant: str) -> None:
    proc = _hadolint(DOCKERFILES[variant])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    # The lint step must be able to fail: an untagged base image and a root user are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nUSER root\nCMD python -m x\n")
    proc = _hadolint(bad)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout  # untagged image


# --- image properties ---------------------------------------------------------------------------


def test_multi_stage_with_pinned_bases(variant: str) -> None:
    all_stages = stages(DOCKERFILES[variant])
    assert len(all_stages) >= 2, "build tools must stay out of the runtime image"
    for stage in all_stages:
        tag = stage.image.partition(":")[2]
        digest = "@sha256:" in stage.image
        assert digest or (tag and tag != "latest" and re.search(r"\d", tag)), stage.image
    final = all_stages[-1]
    builders = {s.name for s in all_stages[:-1]}
    copied_from = {m.group(1) for c in final.all("COPY") if (m := re.match(r"--from=(\S+)", c))}
    assert copied_from and copied_from <= builders, "the runtime stage copies the build's output"
    assert not any("pip install" in r for r in final.all("RUN")), "install in the build stage"


def test_runs_as_numeric_non_root_user(variant: str, render: Render) -> None:
    final = stages(DOCKERFILES[variant])[-1]
    users = final.all("USER")
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid"
    # Kubernetes runs the server with the same uid, so file ownership in the image matches.
    deploy = one(render("cpu"), "Deployment", "nacguard")
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_healthcheck_probes_the_server(variant: str) -> None:
    final = stages(DOCKERFILES[variant])[-1]
    [check] = final.all("HEALTHCHECK")
    assert "--start-period=" in check, "a slow model load must not count as unhealthy"
    command = check.split(" CMD ", 1)[1]
    assert json.loads(command), "exec form: no shell needed in the image"
    assert re.search(r"/(readyz|healthz)", command)


def test_server_is_pid_1_in_exec_form(variant: str) -> None:
    final = stages(DOCKERFILES[variant])[-1]
    entrypoint = json.loads(final.all("ENTRYPOINT")[-1])
    cmd = json.loads(final.all("CMD")[-1])
    assert entrypoint + cmd[:3] == ["nacguard", "serve", "--host", "0.0.0.0"]
    assert final.all("STOPSIGNAL") in ([], ["SIGTERM"])
    exposed = " ".join(final.all("EXPOSE")).split()
    for field in ("port", "grpc_port"):  # HTTP, and gRPC (Open Inference Protocol)
        port = int(
            final.env().get(f"NACGUARD_{field.upper()}", Settings.model_fields[field].default)
        )
        assert str(port) in exposed, field


def test_demo_profile_is_baked_in_where_the_env_points(variant: str) -> None:
    final = stages(DOCKERFILES[variant])[-1]
    assert final.env()["NACGUARD_PROFILE"] == BAKED_PROFILE
    copies = [c.split() for c in final.all("COPY") if not c.startswith("--from")]
    assert ["profiles/fashion-mnist", BAKED_PROFILE] in copies


def test_writable_paths_are_under_tmp(variant: str) -> None:
    # The root filesystem is read-only in Kubernetes; only /tmp (an emptyDir) is writable.
    env = stages(DOCKERFILES[variant])[-1].env()
    assert env["HOME"].startswith("/tmp")
    for key, value in env.items():
        if key.endswith(("_CACHE_DIR", "_CACHE_HOME", "CONFIGDIR")):
            assert value.startswith("/tmp"), key


def test_device_defaults_match_the_variant() -> None:
    cpu = stages(DOCKERFILES["cpu"])[-1].env()
    cuda = stages(DOCKERFILES["cuda"])[-1].env()
    assert cpu.get("NACGUARD_DEVICE", "cpu") == "cpu"
    assert cuda["NACGUARD_DEVICE"].startswith("cuda")
    assert cuda["NACGUARD_PRECISION"] == "fp16"
    cuda_text = DOCKERFILES["cuda"].read_text()
    assert "whl/cpu" not in cuda_text, "the CUDA image must not install the CPU-only wheels"


# --- install steps ------------------------------------------------------------------------------


def test_torch_pins_are_the_same_everywhere() -> None:
    pins = {variant: _pins(path.read_text()) for variant, path in DOCKERFILES.items()}
    assert pins["cpu"] == pins["cuda"]
    assert set(pins["cpu"]) == set(PINNED)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dependency in pyproject["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.name in PINNED:
            assert requirement.specifier.contains(pins["cpu"][requirement.name]), requirement


def test_torch_pins_match_the_readme_install_step() -> None:
    pins = _pins((ROOT / "README.md").read_text())
    assert pins, "the README's install step pins no torch version"
    assert pins == _pins(DOCKERFILES["cpu"].read_text())


def test_package_is_installed_non_editable(variant: str) -> None:
    build = stages(DOCKERFILES[variant])[0]
    installs = [r for r in build.all("RUN") if "pip install" in r]
    assert any(re.search(r"pip install (--no-cache-dir )?\.(\s|$)", r) for r in installs), installs
    assert not any(" -e " in r for r in installs)


# --- build context --------------------------------------------------------------------------


def _dockerignore() -> list[tuple[bool, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((negate, line.lstrip("!").strip("/")))
    return rules


def _ignored(relative: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder covers it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, pattern in rules:
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            ignored = not negate
    return ignored


@functools.cache
def _tracked() -> frozenset[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return frozenset(out.splitlines())


def test_everything_copied_exists_and_is_in_the_build_context(variant: str) -> None:
    rules = _dockerignore()
    for stage in stages(DOCKERFILES[variant]):
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            *sources, _ = copy.split()
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"COPY {source}: missing from the repository"
                files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
                # Only what a clean clone has: local build state (egg-info, caches) may be
                # excluded from the context, and should be.
                kept = [f for f in files if f.relative_to(ROOT).as_posix() in _tracked()]
                assert kept, f"COPY {source}: nothing to copy"
                for file in kept:
                    rel = file.relative_to(ROOT).as_posix()
                    assert not _ignored(rel, rules), f"{rel} is excluded by .dockerignore"


def test_build_context_leaves_local_state_out() -> None:
    rules = _dockerignore()
    for rel in (".git/config", "tests/unit/__init__.py", ".venv/bin/python", "docs/x.md"):
        assert _ignored(rel, rules), rel
    assert _ignored("service/nacguard/__pycache__/x.pyc", rules)
