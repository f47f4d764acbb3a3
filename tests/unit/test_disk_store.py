"""DiskStore: round trips, validation, resume, multi-writer merge, corruption, path policy."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch
from _stores_fixtures import META, assert_same_example, expected_counts, make_example
from safetensors import safe_open

from specops.config import RunConfig, SyncConfig
from specops.example import ExampleDict
from specops.paths import PathNotAllowedError
from specops.stores import manifest as mf
from specops.stores.base import DataSink, DataSource
from specops.stores.disk import DiskStore, StoreMetaMismatchError
from specops.stores.shards import CorruptShardError, ShardError


def _writer(root: Path, **kw: object) -> DiskStore:
    kw.setdefault("meta", META)
    kw.setdefault("shard_size", 4)
    return DiskStore(root / "store", allowed_roots=[root], **kw)  # type: ignore[arg-type]


def _read_all(store: DiskStore) -> dict[str, ExampleDict]:
    return {ex["id"]: ex for p in store.partitions() for ex in store.read(p)}


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip(tmp_path: Path, compression: str) -> None:
    examples = [make_example(i) for i in range(10)]
    store = _writer(tmp_path, compression=compression)
    assert isinstance(store, DataSink) and isinstance(store, DataSource)
    store.write(examples[:5])
    store.write(examples[5:])
    assert store.finalize() is True
    view = DiskStore.open(tmp_path / "store", [tmp_path])
    suffix = ".safetensors.zst" if compression == "zstd" else ".safetensors"
    assert view.partitions() == [f"shard-w00000-0000{k}{suffix}" for k in range(3)]
    assert view.meta == META and len(view) == 10
    got = _read_all(view)
    for ex in examples:
        assert_same_example(got[ex["id"]], ex)
    assert view.done_ids() == {ex["id"] for ex in examples}


def test_optional_fields_and_bf16_odd_sizes_round_trip(tmp_path: Path) -> None:
    meta = dataclasses.replace(META, dtype="bfloat16", hidden_size=3, layer_ids=(0, 1, 2))
    examples = [make_example(i, meta, extras=True) for i in range(5)]
    store = _writer(tmp_path, meta=meta)
    store.write(examples)
    store.close()
    got = _read_all(DiskStore.open(tmp_path / "store", [tmp_path]))
    for ex in examples:
        assert_same_example(got[ex["id"]], ex)


def test_shards_are_plain_safetensors(tmp_path: Path) -> None:
    examples = [make_example(i) for i in range(3)]
    store = _writer(tmp_path)
    store.write(examples)
    store.close()
    with safe_open(str(tmp_path / "store" / store.partitions()[0]), framework="pt") as f:
        assert json.loads(f.metadata()["ids"]) == [ex["id"] for ex in examples]
        offsets = f.get_tensor("offsets")
        hidden = f.get_tensor("hidden_states")
    lengths = [ex["token_ids"].shape[0] for ex in examples]
    assert offsets.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert torch.equal(hidden, torch.cat([ex["hidden_states"] for ex in examples]))


def test_manifest_is_the_commit_marker(tmp_path: Path) -> None:
    store = _writer(tmp_path)
    store.write([make_example(i) for i in range(6)])
    listed = mf.load_manifest(tmp_path / "store" / "manifest-w00000.json")
    assert [e.ids for e in listed.shards] == [tuple(f"d/{i}/0" for i in range(4))]
    entry = listed.shards[0]
    assert entry.nbytes == (tmp_path / "store" / entry.file).stat().st_size
    assert entry.fields == ("token_ids", "loss_mask", "hidden_states")
    assert listed.meta == META and not listed.complete
    assert store.done_ids() == {f"d/{i}/0" for i in range(4)}, "buffered examples are not done yet"
    store.close()
    assert store.done_ids() == {f"d/{i}/0" for i in range(6)}


def test_large_examples_commit_before_shard_size(tmp_path: Path) -> None:
    store = _writer(tmp_path, shard_size=100, max_shard_bytes=1)
    store.write([make_example(i) for i in range(3)])
    assert len(store.partitions()) == 3


def test_token_counts_count_loss_masked_tokens_only(tmp_path: Path) -> None:
    examples = [make_example(i) for i in range(9)]
    a = _writer(tmp_path, writer_index=0, num_writers=2)
    b = _writer(tmp_path, writer_index=1, num_writers=2)
    a.write(examples[:5])
    b.write(examples[5:])
    a.close()
    b.close()
    view = DiskStore.open(tmp_path / "store", [tmp_path])
    assert view.token_counts() == expected_counts(examples)
    # The per-writer caches are only a shortcut: without them the shards give the same answer.
    for cache in (tmp_path / "store").glob("tokens-w*.json"):
        cache.unlink()
    assert DiskStore.open(tmp_path / "store", [tmp_path]).token_counts() == expected_counts(examples)


def test_token_counts_ignore_a_stale_cache(tmp_path: Path) -> None:
    root, _ = _one_shard_store(tmp_path)
    examples = [make_example(i) for i in range(8)]
    cache = root / "tokens-w00000.json"
    data = json.loads(cache.read_text())
    data["counts"] = {"1": 999}
    data["shards"]["shard-w00000-00000.safetensors"] = "0" * 64
    cache.write_text(json.dumps(data))
    assert DiskStore.open(tmp_path / "store", [tmp_path]).token_counts() == expected_counts(examples)


def test_token_counts_survive_a_torn_cache(tmp_path: Path) -> None:
    """The caches are written without fsync; a power cut can leave zeros where the JSON was."""
    root, _ = _one_shard_store(tmp_path)
    cache = root / "tokens-w00000.json"
    cache.write_bytes(b"\0" * 64)
    assert DiskStore.open(root, [tmp_path]).token_counts() == expected_counts(
        make_example(i) for i in range(8)
    )
    resumed = _writer(tmp_path)
    resumed.write([make_example(8)])
    resumed.close()
    assert mf.load_token_counts(cache) is not None, "the next commit rewrites the cache"
    assert resumed.token_counts() == expected_counts(make_example(i) for i in range(9))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("token_ids", torch.zeros(4, dtype=torch.int64), "token_ids must be int32"),
        ("loss_mask", torch.ones(3, dtype=torch.uint8), "loss_mask must be uint8 [4]"),
        ("loss_mask", torch.ones(4, dtype=torch.bool), "loss_mask must be uint8"),
        ("hidden_states", torch.zeros(4, 3, 8), "hidden_states must be float32 [4, 2, 8]"),
        ("hidden_states", torch.zeros(4, 2, 8, dtype=torch.float16), "hidden_states must be float32"),
        ("logits", torch.zeros(4, 10), "logits must be float [4, 64]"),
    ],
)
def test_write_rejects_bad_examples_naming_id_and_field(
    tmp_path: Path, field: str, value: torch.Tensor, message: str
) -> None:
    ex = make_example(0, seq=4)
    ex[field] = value  # type: ignore[literal-required]
    with pytest.raises(ValueError, match=re.escape(f"d/0/0: {message}")):
        _writer(tmp_path).write([ex])


def test_write_rejects_missing_id_and_mixed_fields(tmp_path: Path) -> None:
    store = _writer(tmp_path)
    bad = make_example(0)
    bad["id"] = ""
    with pytest.raises(ValueError, match="example id"):
        store.write([bad])
    store.write([make_example(1)])
    with pytest.raises(ValueError, match="d/2/0: carries"):
        store.write([make_example(2, extras=True)])


def test_duplicates_are_skipped_not_stored_twice(tmp_path: Path) -> None:
    store = _writer(tmp_path)
    store.write([make_example(i) for i in range(5)])
    store.write([make_example(4), make_example(0), make_example(5)])
    store.close()
    ids = [i for e in mf.load_manifest(tmp_path / "store" / "manifest-w00000.json").shards for i in e.ids]
    assert sorted(ids) == sorted(f"d/{i}/0" for i in range(6))


def test_closed_and_read_only_stores_refuse_writes(tmp_path: Path) -> None:
    store = _writer(tmp_path)
    store.close()
    with pytest.raises(RuntimeError, match="after close"):
        store.write([make_example(0)])
    store2 = _writer(tmp_path)
    store2.write([make_example(0)])
    store2.close()
    ro = DiskStore.open(tmp_path / "store", [tmp_path])
    with pytest.raises(RuntimeError, match="read-only"):
        ro.write([make_example(1)])
    with pytest.raises(RuntimeError, match="read-only"):
        ro.finalize()


def test_resume_skips_committed_and_continues_numbering(tmp_path: Path) -> None:
    first = _writer(tmp_path)
    first.write([make_example(i) for i in range(6)])
    del first  # killed without close: examples 4 and 5 were only buffered
    second = _writer(tmp_path)
    assert second.done_ids() == {f"d/{i}/0" for i in range(4)}
    second.write([make_example(i) for i in range(8) if f"d/{i}/0" not in second.done_ids()])
    second.close()
    assert second.partitions() == ["shard-w00000-00000.safetensors", "shard-w00000-00001.safetensors"]
    assert len(DiskStore.open(tmp_path / "store", [tmp_path])) == 8


def test_resume_with_another_producer_fails_clearly(tmp_path: Path) -> None:
    store = _writer(tmp_path)
    store.write([make_example(0)])
    store.close()
    other = dataclasses.replace(META, layer_ids=(0, 2))
    with pytest.raises(StoreMetaMismatchError, match=r"manifest-w00000.json.*layer_ids: stored \(1, 2\)"):
        _writer(tmp_path, meta=other)
    with pytest.raises(StoreMetaMismatchError, match="verifier: stored 'tiny-verifier', this run 'big'"):
        _writer(tmp_path, meta=dataclasses.replace(META, verifier="big"), writer_index=1, num_writers=2)


def test_open_refuses_writers_with_different_producers(tmp_path: Path) -> None:
    store = _writer(tmp_path)
    store.write([make_example(0)])
    store.close()
    other = mf.load_manifest(tmp_path / "store" / "manifest-w00000.json").model_copy(
        update={"meta": dataclasses.replace(META, hidden_size=16), "shards": []}
    )
    (tmp_path / "store" / "manifest-w00001.json").write_text(other.model_dump_json())
    with pytest.raises(StoreMetaMismatchError, match=r"manifest-w00001\.json.*hidden_size"):
        DiskStore.open(tmp_path / "store", [tmp_path])


def test_writer_without_meta_adopts_the_stored_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass meta"):
        _writer(tmp_path, meta=None)
    store = _writer(tmp_path)
    store.write([make_example(0)])
    store.close()
    assert _writer(tmp_path, meta=None).meta == META


def test_paths_outside_allowed_roots_are_refused(tmp_path: Path) -> None:
    (tmp_path / "allowed").mkdir()
    with pytest.raises(PathNotAllowedError, match=r"sync\.path"):
        DiskStore(tmp_path / "elsewhere", meta=META, allowed_roots=[tmp_path / "allowed"])
    with pytest.raises(PathNotAllowedError, match=r"data\.path"):
        DiskStore.open(tmp_path / "allowed" / ".." / "elsewhere", [tmp_path / "allowed"])
    os.symlink(tmp_path, tmp_path / "allowed" / "escape")
    with pytest.raises(PathNotAllowedError):
        DiskStore(tmp_path / "allowed" / "escape" / "x", meta=META, allowed_roots=[tmp_path / "allowed"])
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists()


def test_open_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.path: .*missing is not a directory"):
        DiskStore.open(tmp_path / "missing", [tmp_path])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        DiskStore.open(tmp_path / "empty", [tmp_path])
    (tmp_path / "empty" / "manifest-w00000.json").write_text("{not json")
    with pytest.raises(mf.ManifestError, match=r"manifest-w00000\.json"):
        DiskStore.open(tmp_path / "empty", [tmp_path])


def test_from_config_writes_as_the_slice_writer(tmp_path: Path) -> None:
    sync = SyncConfig(kind="disk", path=str(tmp_path / "store"), shard_size=2, compression="zstd")
    run = RunConfig(shard_index=3, num_shards=4, allowed_roots=[str(tmp_path)])
    store = DiskStore.from_config(sync, run, META)
    store.write([make_example(i) for i in range(3)])
    store.close()
    assert (tmp_path / "store" / "manifest-w00003.json").exists()
    assert store.partitions()[0] == "shard-w00003-00000.safetensors.zst"
    assert mf.load_manifest(tmp_path / "store" / "manifest-w00003.json").num_writers == 4
    outside = RunConfig(allowed_roots=[str(tmp_path / "other")])
    with pytest.raises(PathNotAllowedError, match=r"sync\.path"):
        DiskStore.from_config(sync, outside, META)


def test_writers_merge_and_finalize_when_all_complete(tmp_path: Path) -> None:
    writers = [_writer(tmp_path, writer_index=w, num_writers=3) for w in range(3)]
    for i in range(15):
        writers[i % 3].write([make_example(i)])
    assert writers[0].finalize() is False
    assert writers[2].finalize() is False
    assert not (tmp_path / "store" / "manifest.json").exists()
    assert writers[1].finalize() is True
    merged = mf.load_manifest(tmp_path / "store" / "manifest.json")
    assert merged.complete and len({i for e in merged.shards for i in e.ids}) == 15
    view = DiskStore.open(tmp_path / "store", [tmp_path])
    assert [mf.shard_sort_key(p)[0] for p in view.partitions()] == [0, 0, 1, 1, 2, 2]
    # A writer that resumes and commits again makes the merged summary stale: it is removed.
    again = _writer(tmp_path, writer_index=0, num_writers=3)
    again.write([make_example(100)])
    again.close()
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_merged_manifest_alone_is_readable(tmp_path: Path) -> None:
    with _writer(tmp_path) as store:
        store.write([make_example(i) for i in range(5)])
    for name in ("manifest-w00000.json", "tokens-w00000.json"):
        (tmp_path / "store" / name).unlink()
    view = DiskStore.open(tmp_path / "store", [tmp_path])
    assert len(view) == 5
    assert view.token_counts() == expected_counts(make_example(i) for i in range(5))
    with pytest.raises(ValueError, match=r"only a merged manifest\.json"):
        _writer(tmp_path)


def test_context_manager_does_not_finalize_on_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError), _writer(tmp_path) as store:
        store.write([make_example(i) for i in range(2)])
        raise KeyError("boom")
    manifest = mf.load_manifest(tmp_path / "store" / "manifest-w00000.json")
    assert len(manifest.shards) == 1 and not manifest.complete


def test_same_id_in_two_writers_is_served_once(tmp_path: Path) -> None:
    a = _writer(tmp_path, writer_index=0, num_writers=2)
    b = _writer(tmp_path, writer_index=1, num_writers=2)
    a.write([make_example(0), make_example(1)])
    b.write([make_example(1), make_example(2)])
    a.close()
    b.close()
    view = DiskStore.open(tmp_path / "store", [tmp_path])
    ids = [ex["id"] for p in view.partitions() for ex in view.read(p)]
    assert sorted(ids) == ["d/0/0", "d/1/0", "d/2/0"]


# --------------------------------------------------------------------------- corruption


def _one_shard_store(tmp_path: Path, n: int = 8, **kw: object) -> tuple[Path, list[str]]:
    store = _writer(tmp_path, **kw)
    store.write([make_example(i) for i in range(n)])
    store.close()
    return tmp_path / "store", store.partitions()


def test_truncated_shard_is_dropped_and_regenerated(tmp_path: Path) -> None:
    root, parts = _one_shard_store(tmp_path)
    with open(root / parts[0], "r+b") as f:
        f.truncate(100)
    view = DiskStore.open(root, [tmp_path])
    assert view.partitions() == parts[1:]
    assert view.dropped[0][0] == parts[0] and "size 100" in view.dropped[0][1]
    assert view.done_ids() == {f"d/{i}/0" for i in range(4, 8)}
    resumed = _writer(tmp_path)
    assert resumed.done_ids() == {f"d/{i}/0" for i in range(4, 8)}
    assert not (root / parts[0]).exists(), "the bad shard is removed by its writer"
    resumed.write([make_example(i) for i in range(8)])
    resumed.close()
    final = DiskStore.open(root, [tmp_path], verify="digest")
    assert final.dropped == [] and len(final) == 8
    assert final.token_counts() == expected_counts(make_example(i) for i in range(8))


@pytest.mark.parametrize("digest", ["xxh3-128", "sha256"])
def test_flipped_byte_is_caught_by_the_digest(tmp_path: Path, digest: str) -> None:
    root, parts = _one_shard_store(tmp_path, digest=digest)
    data = bytearray((root / parts[1]).read_bytes())
    data[-1] ^= 0xFF
    (root / parts[1]).write_bytes(bytes(data))
    quick = DiskStore.open(root, [tmp_path])
    assert quick.partitions() == parts, "a same-size change passes the size check"
    thorough = DiskStore.open(root, [tmp_path], verify="digest")
    assert thorough.partitions() == parts[:1]
    assert thorough.dropped[0][0] == parts[1]
    assert re.match(
        f"digest {digest}:[0-9a-f]+ differs from the manifest's {digest}:", thorough.dropped[0][1]
    )
    resumed = _writer(tmp_path)
    assert resumed.done_ids() == {f"d/{i}/0" for i in range(4)}


def test_shard_changed_after_open_fails_naming_the_file(tmp_path: Path) -> None:
    root, parts = _one_shard_store(tmp_path)
    view = DiskStore.open(root, [tmp_path])
    with open(root / parts[0], "r+b") as f:
        f.truncate(200)
    with pytest.raises(CorruptShardError, match=f"{parts[0]}: truncated: 200 of"):
        list(view.read(parts[0]))
    with open(root / parts[1], "ab") as f:
        f.write(b"extra")
    with pytest.raises(CorruptShardError, match=f"{parts[1]}: longer than"):
        list(view.read(parts[1]))
    data = bytearray((root / parts[1]).read_bytes()[:-5])
    data[10] ^= 0xFF
    (root / parts[1]).write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"{parts[1]}: digest xxh3-128:[0-9a-f]+ differs"):
        list(view.read(parts[1]))


def test_missing_shard_is_dropped(tmp_path: Path) -> None:
    root, parts = _one_shard_store(tmp_path)
    (root / parts[0]).unlink()
    view = DiskStore.open(root, [tmp_path])
    assert view.dropped == [(parts[0], "missing")]
    with pytest.raises(KeyError, match="no committed shard"):
        list(view.read(parts[0]))


def test_shard_disagreeing_with_meta_fails_naming_the_file(tmp_path: Path) -> None:
    root, parts = _one_shard_store(tmp_path)
    path = root / "manifest-w00000.json"
    manifest = mf.load_manifest(path)
    path.write_text(
        manifest.model_copy(update={"meta": dataclasses.replace(META, dtype="float16")}).model_dump_json()
    )
    view = DiskStore.open(root, [tmp_path])
    with pytest.raises(ShardError, match=f"{parts[0]}: hidden_states must be float16"):
        list(view.read(parts[0]))


def test_shard_with_other_ids_than_manifest_fails(tmp_path: Path) -> None:
    root, parts = _one_shard_store(tmp_path)
    path = root / "manifest-w00000.json"
    manifest = mf.load_manifest(path)
    entry = manifest.shards[0].model_copy(update={"ids": ("x/0/0", "x/1/0", "x/2/0", "x/3/0")})
    path.write_text(manifest.model_copy(update={"shards": [entry, *manifest.shards[1:]]}).model_dump_json())
    with pytest.raises(ShardError, match=f"{parts[0]}: example ids in the file differ"):
        list(DiskStore.open(root, [tmp_path]).read(parts[0]))


def test_garbage_with_matching_checksum_fails_as_malformed(tmp_path: Path) -> None:
    root, parts = _one_shard_store(tmp_path)
    garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 100
    (root / parts[0]).write_bytes(garbage)
    path = root / "manifest-w00000.json"
    manifest = mf.load_manifest(path)
    entry = manifest.shards[0].model_copy(
        update={
            "digest": "sha256:" + hashlib.sha256(garbage).hexdigest(),
            "nbytes": len(garbage),
            "raw_nbytes": len(garbage),
        }
    )
    path.write_text(manifest.model_copy(update={"shards": [entry, *manifest.shards[1:]]}).model_dump_json())
    with pytest.raises(ShardError, match=f"{parts[0]}: malformed shard"):
        list(DiskStore.open(root, [tmp_path]).read(parts[0]))


def test_leftover_temp_and_orphan_files_are_cleaned_only_for_own_writer(tmp_path: Path) -> None:
    root, _ = _one_shard_store(tmp_path)
    (root / ".tmp-w00000-123-abc-shard-w00000-00005.safetensors").write_bytes(b"partial")
    (root / "shard-w00000-00009.safetensors").write_bytes(b"renamed, never listed")
    (root / ".tmp-w00001-1-x-manifest-w00001.json").write_bytes(b"another writer's")
    store = _writer(tmp_path)
    names = set(os.listdir(root))
    assert ".tmp-w00000-123-abc-shard-w00000-00005.safetensors" not in names
    assert "shard-w00000-00009.safetensors" not in names
    assert ".tmp-w00001-1-x-manifest-w00001.json" in names
    store.write([make_example(i) for i in range(8, 12)])
    assert store.partitions()[-1] == "shard-w00000-00002.safetensors"
