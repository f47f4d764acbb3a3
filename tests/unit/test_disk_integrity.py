"""DiskStore integrity on the read path: every read checks the digest, zstd frames carry a checksum,
a reader drops bad shards up to a limit, and a torn writer manifest costs only that writer's shards."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import zstandard
from _stores_fixtures import META, assert_same_example, expected_counts, make_example

from specops.stores import manifest as mf
from specops.stores.disk import DiskStore, TooManyDroppedShardsError
from specops.stores.manifest import ManifestError
from specops.stores.shards import CorruptShardError


def _store(root: Path, n: int = 12, *, writer: int = 0, writers: int = 1, **kw: object) -> DiskStore:
    store = DiskStore(
        root / "store",
        meta=META,
        shard_size=4,
        writer_index=writer,
        num_writers=writers,
        allowed_roots=[root],
        **kw,  # type: ignore[arg-type]
    )
    store.write([make_example(i) for i in range(n) if i % writers == writer])
    store.close()
    return store


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("compression", "digest"), [("none", "xxh3-128"), ("none", "sha256"), ("zstd", "xxh3-128")]
)
def test_a_flipped_tensor_byte_is_never_served(tmp_path: Path, compression: str, digest: str) -> None:
    parts = _store(tmp_path, compression=compression, digest=digest).partitions()
    root = tmp_path / "store"
    # The last byte belongs to the last tensor's data: a same-size change the size check cannot see.
    _flip(root / parts[1], (root / parts[1]).stat().st_size - 1)
    view = DiskStore.open(root, [tmp_path])  # the trainer's open: verify="size"
    assert view.partitions() == parts
    with pytest.raises(CorruptShardError, match=rf"{parts[1]}: digest {digest}:[0-9a-f]+ differs"):
        list(view.read(parts[1]))
    intact = list(view.read(parts[0]))
    for got, i in zip(intact, range(4), strict=True):
        assert_same_example(got, make_example(i))


def test_zstd_shards_carry_a_frame_checksum(tmp_path: Path) -> None:
    parts = _store(tmp_path, compression="zstd").partitions()
    frame = (tmp_path / "store" / parts[0]).read_bytes()
    assert zstandard.get_frame_parameters(frame).has_checksum
    # So a reader without the manifest (`zstd -d`) sees damage too.
    damaged = bytearray(frame)
    damaged[len(frame) // 2] ^= 0x01
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(bytes(damaged))


def test_a_tolerant_reader_drops_bad_shards_up_to_its_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = _store(tmp_path, n=16).partitions()
    root = tmp_path / "store"
    header_byte = 20  # inside the safetensors JSON header
    _flip(root / parts[1], header_byte)
    (root / parts[3]).unlink()  # dropped at open by the size check: counts against the same limit
    view = DiskStore.open(root, [tmp_path], max_dropped=2)
    assert view.dropped == [(parts[3], "missing")]
    with caplog.at_level(logging.WARNING, logger="specops.stores.disk"):
        served = {ex["id"] for p in view.partitions() for ex in view.read(p)}
    assert served == {f"d/{i}/0" for i in (*range(4), *range(8, 12))}
    assert [f for f, _ in view.dropped] == [parts[3], parts[1]]
    assert "digest" in view.dropped[1][1]
    assert f"dropping shard {parts[1]}" in caplog.text
    assert list(view.read(parts[1])) == [], "a dropped shard stays dropped in later epochs"
    _flip(root / parts[2], header_byte)
    with pytest.raises(
        TooManyDroppedShardsError, match=r"3 shards failed their checks, more than data\.max_dropped_shards=2"
    ):
        list(view.read(parts[2]))
    with pytest.raises(TooManyDroppedShardsError):
        DiskStore.open(root, [tmp_path], max_dropped=0)  # the missing shard alone is one too many


def test_a_tolerant_reader_counting_tokens_drops_a_bad_shard_too(tmp_path: Path) -> None:
    parts = _store(tmp_path, n=12).partitions()
    root = tmp_path / "store"
    (root / "tokens-w00000.json").unlink()  # no cache: the counts come from the shards themselves
    _flip(root / parts[1], 20)
    view = DiskStore.open(root, [tmp_path], max_dropped=1)
    assert view.token_counts() == expected_counts(make_example(i) for i in (*range(4), *range(8, 12)))
    assert [f for f, _ in view.dropped] == [parts[1]]
    assert list(view.read(parts[1])) == []


def _tear(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_torn_writer_manifest_is_skipped_by_readers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for w in range(2):
        _store(tmp_path, writer=w, writers=2)
    root = tmp_path / "store"
    _tear(root / "manifest-w00001.json")
    with caplog.at_level(logging.WARNING, logger="specops.stores.disk"):
        view = DiskStore.open(root, [tmp_path])
    assert {mf.shard_sort_key(p)[0] for p in view.partitions()} == {0}
    assert view.done_ids() == {f"d/{i}/0" for i in range(0, 12, 2)}
    assert [name for name, _ in view.skipped_manifests] == ["manifest-w00001.json"]
    assert "skipping manifest-w00001.json" in caplog.text
    # Another writer resumes over it undisturbed, and reports it too.
    other = DiskStore(root, meta=META, shard_size=4, writer_index=0, num_writers=2, allowed_roots=[tmp_path])
    assert [name for name, _ in other.skipped_manifests] == ["manifest-w00001.json"]
    assert other.done_ids() == view.done_ids()


def test_a_torn_own_manifest_is_a_crash_before_commit(tmp_path: Path) -> None:
    for w in range(2):
        _store(tmp_path, writer=w, writers=2)
    root = tmp_path / "store"
    _tear(root / "manifest-w00001.json")
    resumed = DiskStore(
        root, meta=META, shard_size=4, writer_index=1, num_writers=2, allowed_roots=[tmp_path]
    )
    assert resumed.done_ids() == {f"d/{i}/0" for i in range(0, 12, 2)}, "its shards are to be redone"
    assert not [p for p in root.iterdir() if p.name.startswith("shard-w00001")], "unlisted shards removed"
    assert resumed.skipped_manifests == []
    resumed.write([make_example(i) for i in range(1, 12, 2)])
    resumed.finalize()
    final = DiskStore.open(root, [tmp_path], verify="digest")
    assert final.dropped == [] and final.skipped_manifests == []
    served = [ex for p in final.partitions() for ex in final.read(p)]
    assert sorted(ex["id"] for ex in served) == sorted(f"d/{i}/0" for i in range(12)), "each id once"
    for ex in served:
        assert torch.equal(ex["hidden_states"], make_example(int(ex["id"].split("/")[1]))["hidden_states"])


def test_a_store_with_no_readable_manifest_names_them(tmp_path: Path) -> None:
    _store(tmp_path)
    _tear(tmp_path / "store" / "manifest-w00000.json")
    with pytest.raises(
        ManifestError, match=r"data\.path: .* has no readable manifest \(.*manifest-w00000\.json"
    ):
        DiskStore.open(tmp_path / "store", [tmp_path])
