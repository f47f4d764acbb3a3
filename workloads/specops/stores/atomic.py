"""Crash-safe file replacement: write a temp file, fsync it, rename it, fsync the directory.

A reader (or a restarted writer after kill -9 or a full disk) then sees either the old file or
the complete new one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from specops.exitcodes import NO_SPACE_ERRNOS, DiskFull, out_of_space

_RUST_NO_SPACE = re.compile(r"\(os error (?:" + "|".join(str(e) for e in NO_SPACE_ERRNOS) + r")\)")
"""How Rust writers (safetensors) report a full disk: their own exception, this in its text."""


def _no_space(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return out_of_space(exc)
    return bool(_RUST_NO_SPACE.search(str(exc)))


@contextlib.contextmanager
def disk_full_as_error(path: Path, what: str) -> Iterator[None]:
    """Turn running out of space while writing `what` at `path` into one `DiskFull` line.

    The callers clean their temp files up on the way out, so what stays behind is the last
    committed state, which a rerun resumes from once space is freed.
    """
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not _no_space(exc):
            raise
        raise DiskFull(
            f"{path}: no space left on the device while writing {what}; nothing committed is lost: "
            "free space and rerun to resume"
        ) from None


def temp_path(final: Path, prefix: str) -> Path:
    """A unique hidden name beside `final`; `prefix` lets its owner find and clean it later."""
    return final.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:12]}-{final.name}"


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file's contents durable (for files written by code that does not fsync them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (and `root`), before renaming it into place."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_dir(Path(directory))


def write_bytes_atomic(path: Path, data: bytes, prefix: str = ".tmp-", *, durable: bool = True) -> None:
    """Replace `path` with `data` so that it is never seen half written.

    `durable=False` skips both fsyncs: for caches that readers check and can rebuild, where a
    power cut may cost the new version (or leave an unparsable file) but must not cost a stall.
    """
    tmp = temp_path(path, prefix)
    with disk_full_as_error(path, "it"):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if durable:
            fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any, prefix: str = ".tmp-") -> None:
    """Atomically replace `path` with the JSON encoding of `obj`."""
    write_bytes_atomic(path, json.dumps(obj, separators=(",", ":")).encode(), prefix)
