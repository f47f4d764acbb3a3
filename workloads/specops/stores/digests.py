"""Shard checksums as self-describing `<algorithm>:<hex>` strings (like OCI digests).

The digest catches torn, truncated and corrupted shards, not tampering: whoever can rewrite a
shard can rewrite the manifest next to it. So the default is XXH3-128, a non-cryptographic hash
that runs at several GB/s, far above the disk; sha256 stays selectable (`sync.digest`) for a
digest that `sha256sum` reproduces, at the cost of write speed on CPUs without SHA extensions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Protocol, cast, get_args

Algorithm = Literal["xxh3-128", "sha256"]
ALGORITHMS: tuple[Algorithm, ...] = get_args(Algorithm)
_HEX_LENGTHS: dict[Algorithm, int] = {"xxh3-128": 32, "sha256": 64}
DIGEST_PATTERN = "^(" + "|".join(f"{a}:[0-9a-f]{{{n}}}" for a, n in _HEX_LENGTHS.items()) + ")$"
"""What a manifest accepts as a shard digest."""
_READ_CHUNK = 1 << 20


class Hasher(Protocol):
    """The part of hashlib's and xxhash's hash objects the stores use."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: Algorithm) -> Hasher:
    """A fresh incremental hash; both kinds release the GIL on large buffers."""
    if algorithm == "sha256":
        return cast(Hasher, hashlib.sha256())
    if algorithm == "xxh3-128":
        import xxhash

        return cast(Hasher, xxhash.xxh3_128())
    raise ValueError(f"unknown digest algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}")


def algorithm_of(digest: str) -> Algorithm:
    """The algorithm a digest string names (manifests validate the string's form)."""
    name = digest.partition(":")[0]
    if name not in ALGORITHMS:
        raise ValueError(f"digest {digest!r} names no known algorithm ({list(ALGORITHMS)})")
    return cast(Algorithm, name)


def file_digest(path: Path, algorithm: Algorithm) -> str:
    """The `<algorithm>:<hex>` digest of a file's bytes."""
    hasher, buf = new_hasher(algorithm), memoryview(bytearray(_READ_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(buf[:n])
    return f"{algorithm}:{hasher.hexdigest()}"


def digest_mismatch(found: str | None, expected: str | None) -> str:
    """The reason a file is dropped when its digest is not the recorded one."""
    return f"digest {found} differs from the manifest's {expected}"
