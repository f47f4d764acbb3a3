"""Crash-safe file replacement: write a temp file, fsync it, rename it, fsync the directory.

A reader (or a restarted writer after kill -9) then sees either the old file or the complete
new one, never a torn mix.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


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


def write_bytes_atomic(path: Path, data: bytes, prefix: str = ".tmp-", *, durable: bool = True) -> None:
    """Replace `path` with `data` so that it is never seen half written.

    `durable=False` skips both fsyncs: for caches that readers check and can rebuild, where a
    power cut may cost the new version (or leave an unparsable file) but must not cost a stall.
    """
    tmp = temp_path(path, prefix)
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
