"""Upstream speculators hs_{i}.safetensors layout: read directly, import, export, round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from _stores_fixtures import META, assert_same_example, make_example
from safetensors.torch import load_file, save_file

from specops.paths import PathNotAllowedError
from specops.stores.base import DataSource, StoreMeta
from specops.stores.disk import DiskStore
from specops.stores.shards import ShardError
from specops.stores.speculators_layout import (
    SpeculatorsSource,
    export_speculators,
    import_speculators,
)


def _store(tmp_path: Path, n: int = 7, meta: StoreMeta = META) -> DiskStore:
    store = DiskStore(tmp_path / "store", meta=meta, shard_size=3, allowed_roots=[tmp_path])
    store.write([make_example(i, meta) for i in range(n)])
    store.finalize()
    return DiskStore.open(tmp_path / "store", [tmp_path])


def _upstream_dir(tmp_path: Path, n: int, *, with_mask: bool = False) -> Path:
    """What vLLM's extraction writes: token_ids int64 and hidden_states, no loss mask."""
    hs = tmp_path / "up" / "hidden_states"
    hs.mkdir(parents=True)
    for i in range(n):
        ex = make_example(i)
        tensors = {"token_ids": ex["token_ids"].to(torch.int64), "hidden_states": ex["hidden_states"]}
        if with_mask:
            tensors["loss_mask"] = ex["loss_mask"]
        save_file(tensors, hs / f"hs_{i}.safetensors")
    return tmp_path / "up"


def test_export_writes_the_upstream_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert export_speculators(store, tmp_path / "out", allowed_roots=[tmp_path]) == 7
    order = [ex["id"] for p in store.partitions() for ex in store.read(p)]
    for i, ex_id in enumerate(order):
        want = make_example(int(ex_id.split("/")[1]))
        data = load_file(tmp_path / "out" / "hidden_states" / f"hs_{i}.safetensors")
        assert data["token_ids"].dtype == torch.int64
        assert torch.equal(data["token_ids"], want["token_ids"].long())
        assert torch.equal(data["hidden_states"], want["hidden_states"])
        assert torch.equal(data["loss_mask"], want["loss_mask"])
    from datasets import load_from_disk

    rows = load_from_disk(str(tmp_path / "out"))
    assert rows.column_names == ["input_ids", "loss_mask", "seq_len"] and len(rows) == 7
    assert rows[2]["input_ids"].tolist() == make_example(int(order[2].split("/")[1]))["token_ids"].tolist()
    assert rows[2]["seq_len"] == len(rows[2]["input_ids"])


def test_round_trip_disk_to_upstream_and_back(tmp_path: Path) -> None:
    meta = dataclasses.replace(META, dtype="bfloat16")
    store = _store(tmp_path, meta=meta)
    export_speculators(store, tmp_path / "out", allowed_roots=[tmp_path], arrow=False)
    source = SpeculatorsSource(tmp_path / "out", [tmp_path])
    assert isinstance(source, DataSource)
    assert source.meta == meta
    direct = {ex["id"]: ex for p in source.partitions() for ex in source.read(p)}
    assert (
        import_speculators(tmp_path / "out", tmp_path / "back", allowed_roots=[tmp_path], shard_size=2) == 7
    )
    back = DiskStore.open(tmp_path / "back", [tmp_path])
    assert back.meta == meta
    again = {ex["id"]: ex for p in back.partitions() for ex in back.read(p)}
    for i in range(7):
        want = make_example(i, meta)
        assert_same_example(direct[want["id"]], want)
        assert_same_example(again[want["id"]], want)


def test_upstream_files_without_mask_or_index(tmp_path: Path) -> None:
    root = _upstream_dir(tmp_path, 4)
    source = SpeculatorsSource(root, [tmp_path], meta=META)
    assert source.partitions() == ["hs_0", "hs_1", "hs_2", "hs_3"]
    ex = next(source.read("hs_2"))
    assert ex["id"] == "speculators/2/0"
    assert ex["token_ids"].dtype == torch.int32
    assert torch.equal(ex["loss_mask"], torch.ones_like(ex["loss_mask"])), "no mask anywhere: train on all"
    with pytest.raises(ValueError, match="pass meta"):
        import_speculators(root, tmp_path / "x", allowed_roots=[tmp_path])


def test_loss_mask_from_the_preprocessed_arrow_dataset(tmp_path: Path) -> None:
    from datasets import Dataset

    root = _upstream_dir(tmp_path, 3)
    rows = [make_example(i) for i in range(3)]
    Dataset.from_dict(
        {
            "input_ids": [r["token_ids"].tolist() for r in rows],
            "loss_mask": [r["loss_mask"].tolist() for r in rows],
            "seq_len": [len(r["token_ids"]) for r in rows],
        }
    ).save_to_disk(str(root))
    assert import_speculators(root, tmp_path / "imp", meta=META, allowed_roots=[tmp_path]) == 3
    got = {
        ex["id"]: ex
        for ex in DiskStore.open(tmp_path / "imp", [tmp_path]).read("shard-w00000-00000.safetensors")
    }
    for i, want in enumerate(rows):
        assert torch.equal(got[f"speculators/{i}/0"]["loss_mask"], want["loss_mask"])


def test_mask_in_the_hs_file_wins_and_import_resumes(tmp_path: Path) -> None:
    root = _upstream_dir(tmp_path, 5, with_mask=True)
    assert import_speculators(root, tmp_path / "imp", meta=META, allowed_roots=[tmp_path], shard_size=2) == 5
    save_file(
        {"token_ids": torch.tensor([1, 2], dtype=torch.int64), "hidden_states": torch.zeros(2, 2, 8)},
        root / "hidden_states" / "hs_5.safetensors",
    )
    assert import_speculators(root, tmp_path / "imp", meta=META, allowed_roots=[tmp_path], shard_size=2) == 6
    view = DiskStore.open(tmp_path / "imp", [tmp_path])
    ex = {e["id"]: e for p in view.partitions() for e in view.read(p)}["speculators/1/0"]
    assert torch.equal(ex["loss_mask"], make_example(1)["loss_mask"])


def test_bad_upstream_files_fail_naming_the_file(tmp_path: Path) -> None:
    root = _upstream_dir(tmp_path, 2)
    hs = root / "hidden_states"
    save_file(
        {"token_ids": torch.zeros(3, dtype=torch.int64), "hidden_states": torch.zeros(4, 2, 8)},
        hs / "hs_2.safetensors",
    )
    save_file({"hidden_states": torch.zeros(4, 2, 8)}, hs / "hs_3.safetensors")
    (hs / "hs_4.safetensors").write_bytes(b"not safetensors")
    save_file(
        {"token_ids": torch.zeros(4, dtype=torch.int64), "hidden_states": torch.zeros(4, 3, 8)},
        hs / "hs_5.safetensors",
    )
    source = SpeculatorsSource(root, [tmp_path], meta=META)
    with pytest.raises(ShardError, match=r"hs_2.safetensors: hidden_states must be \[S=3"):
        list(source.read("hs_2"))
    with pytest.raises(ShardError, match=r"hs_3.safetensors: missing \['token_ids'\]"):
        list(source.read("hs_3"))
    with pytest.raises(ShardError, match=r"hs_4\.safetensors: unreadable"):
        list(source.read("hs_4"))
    with pytest.raises(
        ShardError, match=r"hs_5.safetensors: hidden_states is float32 \[4, 3, 8\].*\[4, 2, 8\]"
    ):
        list(source.read("hs_5"))
    with pytest.raises(KeyError, match="hs_9"):
        list(source.read("hs_9"))


def test_directory_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no hs_"):
        SpeculatorsSource(tmp_path / "empty", [tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SpeculatorsSource(tmp_path / "nope", [tmp_path])
    with pytest.raises(PathNotAllowedError, match=r"data\.path"):
        SpeculatorsSource(tmp_path, [tmp_path / "empty"])
    store = _store(tmp_path, n=2)
    export_speculators(store, tmp_path / "out", allowed_roots=[tmp_path], arrow=False)
    with pytest.raises(FileExistsError, match="already holds"):
        export_speculators(store, tmp_path / "out", allowed_roots=[tmp_path], arrow=False)
    with pytest.raises(PathNotAllowedError, match="export path"):
        export_speculators(store, tmp_path / "out2", allowed_roots=[tmp_path / "empty"])
    (tmp_path / "out" / "specops-index.json").write_text('{"meta": 1}')
    with pytest.raises(ValueError, match=r"specops-index\.json"):
        SpeculatorsSource(tmp_path / "out", [tmp_path])
