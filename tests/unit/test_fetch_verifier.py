"""`specops fetch-verifier`: the download step of `spec.modelCache`, through the real Hub client
against the local Hub stand-in; then pods resolve from the filled cache read-only, offline."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from specops import exitcodes
from specops.testing.hub import FakeHub
from specops.testing.tiny import tiny_verifier
from specops.verifier import MODEL_CACHE_ENV

REPO = "acme/tiny-llama"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "SPECOPS_MODEL"))}
    return {**env, **extra}


def _fetch(env: dict[str, str], cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "specops.cli", "fetch-verifier", "--cache-dir", str(cache), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _resolve(env: dict[str, str], name: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\nfrom specops.config import VerifierConfig\nfrom specops.verifier import resolve_verifier\n"
        "try:\n"
        f"    print(resolve_verifier(VerifierConfig(name_or_path={name!r})))\n"
        "except OSError as exc:\n"
        "    print(exc, file=sys.stderr); sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def _dead_endpoint() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def _read_only(tree: Path) -> None:
    for path in [tree, *tree.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_fetch_fills_the_cache_once_and_pods_resolve_from_it_offline(tmp_path: Path) -> None:
    source = tiny_verifier()
    cache = tmp_path / "models" / "hub"
    with FakeHub({REPO: source}, token="secret") as hub:
        env = _clean_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"))
        refused = _fetch(env, cache, "--verifier", REPO)
        assert refused.returncode == exitcodes.CONFIG, refused.stderr
        assert "specops fetch-verifier: error: verifier.name_or_path: 'acme/tiny-llama': access refused" in (
            refused.stderr
        )
        env["HF_TOKEN"] = "secret"
        wrong = _fetch(env, cache, "--verifier", REPO, "--revision", "no-such-tag")
        assert wrong.returncode == exitcodes.CONFIG and "no such revision" in wrong.stderr, wrong.stderr
        local = _fetch(env, cache, "--verifier", "/etc")
        assert local.returncode == exitcodes.CONFIG and "not a Hub model id" in local.stderr
        assert hub.downloads[REPO] == 0
        done = _fetch(env, cache, "--verifier", REPO)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        wanted = sorted(p for p in source.iterdir() if p.is_file())
        assert report["revision"] == hub.repos[REPO].commit and report["files"] == len(wanted)
        assert report["bytes"] == sum(p.stat().st_size for p in wanted)
        assert hub.downloads[REPO] == len(wanted)
        again = _fetch(env, cache, "--verifier", REPO)  # a rerun (retry, a second run on the claim)
        assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1]) == report
        assert hub.downloads[REPO] == len(wanted), "files already in the cache were downloaded again"
    # The Hub is gone, the cache is read-only (as mounted into pods): pods resolve from it alone.
    _read_only(cache)
    pod = _clean_env(
        HF_ENDPOINT=_dead_endpoint(), HF_HOME=str(tmp_path / "pod"), **{MODEL_CACHE_ENV: str(cache)}
    )
    found = _resolve(pod, REPO)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == report["path"]
    other = _resolve(pod, "acme/other")
    assert other.returncode == 2 and "not in the shared model cache" in other.stderr, other.stderr
    down = _fetch(
        _clean_env(HF_ENDPOINT=_dead_endpoint(), HF_HOME=str(tmp_path / "x")),
        tmp_path / "c2",
        "--verifier",
        REPO,
    )
    assert down.returncode == exitcodes.FAILED and "cannot be reached" in down.stderr, down.stderr
