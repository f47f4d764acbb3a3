"""Shard digests: the configured algorithm reaches the manifest, mixed stores, bad digests, version 1."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import xxhash
from _stores_fixtures import META, expected_counts, make_example
from pydantic import ValidationError

from specops.config import RunConfig, SyncConfig
from specops.stores import manifest as mf
from specops.stores.digests import algorithm_of, file_digest, new_hasher
from specops.stores.disk import DiskStore

MANIFEST = "manifest-w00000.json"


def _write(root: Path, ids: range, **kw: Any) -> DiskStore:
    store = DiskStore(root / "store", meta=META, shard_size=4, allowed_roots=[root], **kw)
    store.write([make_example(i) for i in ids])
    store.close()
    return store


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _manifest_json(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "store" / MANIFEST).read_text())
    return data


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ({}, lambda data: "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)),
        ({"digest": "sha256"}, lambda data: "sha256:" + hashlib.sha256(data).hexdigest()),
    ],
)
def test_sync_digest_reaches_the_manifest(tmp_path: Path, configured: dict[str, str], expected: Any) -> None:
    sync = SyncConfig.model_validate(
        {"kind": "disk", "path": str(tmp_path / "store"), "shardSize": 4, **configured}
    )
    store = DiskStore.from_config(sync, RunConfig(allowed_roots=[str(tmp_path)]), META)
    store.write([make_example(i) for i in range(6)])
    store.close()
    entries = mf.load_manifest(tmp_path / "store" / MANIFEST).shards
    assert len(entries) == 2
    for entry in entries:
        # The recorded digest is what the standard tools print for the file.
        assert entry.digest == expected((tmp_path / "store" / entry.file).read_bytes())
    cache = mf.load_token_counts(tmp_path / "store" / "tokens-w00000.json")
    assert cache is not None and cache.shards == {e.file: e.digest for e in entries}


def test_sync_digest_rejects_unknown_algorithms() -> None:
    with pytest.raises(ValidationError, match="digest"):
        SyncConfig.model_validate({"kind": "disk", "path": "/x", "digest": "md5"})


def test_file_digest_matches_streamed_hash(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 20_000  # spans several read chunks
    path.write_bytes(data)
    for algorithm in ("xxh3-128", "sha256"):
        hasher = new_hasher(algorithm)
        hasher.update(data)
        assert file_digest(path, algorithm) == f"{algorithm}:{hasher.hexdigest()}"
    assert algorithm_of("sha256:ab") == "sha256"
    with pytest.raises(ValueError, match="no known algorithm"):
        algorithm_of("md5:ab")


def test_mixed_store_verifies_each_shard_with_its_own_algorithm(tmp_path: Path) -> None:
    _write(tmp_path, range(8), digest="sha256")
    resumed = _write(tmp_path, range(16))  # the default algorithm for the new shards
    parts = resumed.partitions()
    digests = [e.digest for e in mf.load_manifest(tmp_path / "store" / MANIFEST).shards]
    assert [d.split(":")[0] for d in digests] == ["sha256", "sha256", "xxh3-128", "xxh3-128"]
    root = tmp_path / "store"
    assert DiskStore.open(root, [tmp_path], verify="digest").dropped == []

    _flip_last_byte(root / parts[0])
    _flip_last_byte(root / parts[3])
    view = DiskStore.open(root, [tmp_path], verify="digest")
    assert [f for f, _ in view.dropped] == [parts[0], parts[3]]
    # A writer resuming with the other algorithm still checks each shard with the recorded one.
    again = DiskStore(root, meta=META, shard_size=4, allowed_roots=[tmp_path], digest="sha256")
    assert again.partitions() == parts[1:3]
    again.write([make_example(i) for i in range(16)])
    again.close()
    final = DiskStore.open(root, [tmp_path], verify="digest")
    assert final.dropped == [] and len(final) == 16
    assert final.token_counts() == expected_counts(make_example(i) for i in range(16))


@pytest.mark.parametrize(
    "bad",
    [
        "md5:" + "0" * 32,
        "xxh3-128:" + "0" * 64,
        "sha256:" + "0" * 32,
        "sha256:" + "A" * 64,
        "0" * 64,
    ],
)
def test_bad_digest_in_a_manifest_fails_naming_the_file(tmp_path: Path, bad: str) -> None:
    _write(tmp_path, range(4))
    data = _manifest_json(tmp_path)
    data["shards"][0]["digest"] = bad
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(mf.ManifestError, match=rf"{MANIFEST}.*shards\[0\]\.digest"):
        DiskStore.open(tmp_path / "store", [tmp_path])


def test_unknown_manifest_version_fails_naming_the_file(tmp_path: Path) -> None:
    _write(tmp_path, range(4))
    data = _manifest_json(tmp_path)
    data["version"] = 3
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(mf.ManifestError, match=rf"{MANIFEST}.*version"):
        DiskStore.open(tmp_path / "store", [tmp_path])


def _as_version_1(root: Path) -> None:
    """Rewrite a sha256 store's manifest and token cache the way version 1 wrote them."""
    data = _manifest_json(root)
    data["version"] = 1
    for entry in data["shards"]:
        entry["sha256"] = entry.pop("digest").removeprefix("sha256:")
    (root / "store" / MANIFEST).write_text(json.dumps(data))
    cache_path = root / "store" / "tokens-w00000.json"
    cache = json.loads(cache_path.read_text())
    cache["shards"] = {f: d.removeprefix("sha256:") for f, d in cache["shards"].items()}
    cache_path.write_text(json.dumps(cache))


def test_version_1_store_is_read_verified_and_resumed(tmp_path: Path) -> None:
    first = _write(tmp_path, range(8), digest="sha256")
    expected = mf.load_manifest(tmp_path / "store" / MANIFEST).shards
    _as_version_1(tmp_path)
    root = tmp_path / "store"
    assert mf.load_manifest(root / MANIFEST).shards == expected
    cache = mf.load_token_counts(root / "tokens-w00000.json")
    assert cache is not None and cache.shards == {e.file: e.digest for e in expected}
    view = DiskStore.open(root, [tmp_path], verify="digest")
    assert view.dropped == [] and len(view) == 8

    _flip_last_byte(root / first.partitions()[1])
    assert [f for f, _ in DiskStore.open(root, [tmp_path], verify="digest").dropped] == [
        first.partitions()[1]
    ]
    resumed = _write(tmp_path, range(12))
    data = _manifest_json(tmp_path)
    assert data["version"] == 2
    assert [e["digest"].split(":")[0] for e in data["shards"]] == ["sha256", "xxh3-128", "xxh3-128"]
    assert resumed.done_ids() == {f"d/{i}/0" for i in range(12)}
