"""Where a result came from: the code, the configs, the verifier and the data a report was made with.

A figure in a report is only worth what a reader can trace back: which SpecOps and library versions
ran, at which git revision, with which resolved configs, against which verifier snapshot, on which
stored data. Every value here is read from the run itself (files, installed packages, git); none
needs torch, so it stays cheap to import.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from specops.config import VerifierConfig

LIBRARIES = ("torch", "transformers")
"""The libraries whose versions change the numbers (kernels, model code)."""


def versions() -> dict[str, str | None]:
    """SpecOps, Python and `LIBRARIES` versions (None for a library that is not installed)."""
    from specops import __version__

    found: dict[str, str | None] = {"specops": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_revision(path: Path) -> dict[str, Any] | None:
    """The commit of the git checkout holding `path` and whether it has uncommitted changes; None
    outside a checkout (an installed wheel) or without git."""
    try:
        commit = _git(path, "rev-parse", "HEAD")
        changes = _git(path, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(changes)}


def _git(path: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(path), *args], capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


def files_sha256(paths: Sequence[Path]) -> str:
    """`sha256:<hex>` of the files' bytes in order: `cat FILES | sha256sum` gives the same hex."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def texts_sha256(texts: Sequence[str]) -> str:
    """`sha256:<hex>` of the texts' UTF-8 bytes in order (what `files_sha256` gives once they are written)."""
    return f"sha256:{hashlib.sha256(''.join(texts).encode()).hexdigest()}"


def verifier_provenance(cfg: VerifierConfig, resolved: str) -> dict[str, Any]:
    """The verifier as configured, the revision that ran and where it was read from.

    A Hub id resolves to a snapshot directory named after its commit, so `revision` is that commit
    even when the config asked for a branch or nothing; a local model has no revision (None) and is
    identified by its path (and GGUF file).
    """
    from specops.verifier import is_local

    local = is_local(cfg.name_or_path)
    return {
        "id": cfg.name_or_path,
        "requested_revision": cfg.revision,
        "revision": None if local else Path(resolved).name,
        "gguf_file": cfg.gguf_file,
        "path": resolved,
    }
