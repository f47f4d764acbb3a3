"""The generation driver's pure parts: slicing, worker slices, overrides, reports, OOM isolation, sinks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from specops.config import ConfigError, DataGenConfig
from specops.data.records import TokenizedExample
from specops.example import ExampleDict
from specops.generate import (
    GenerateError,
    GenerateReport,
    generate_examples,
    in_slice,
    resolve_config,
    tokenized_slice,
    worker_config,
)
from specops.generate_progress import GenerationProgress
from specops.stores import factory
from specops.stores.base import StoreMeta
from specops.testing.synthetic import make_conversations, write_jsonl
from specops.verifier import load_tokenizer


def base_config(tmp_path: Path, **run: Any) -> DataGenConfig:
    return DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": str(tmp_path / "verifier")},
            "datasets": [{"path": str(tmp_path / "data.jsonl")}],
            "sync": {"path": str(tmp_path / "out")},
            "engine": {"batch_size": 2, "max_tokens_per_batch": 128},
            "run": {"allowed_roots": [str(tmp_path)], **run},
        }
    )


def test_slices_are_disjoint_and_complete() -> None:
    ids = [f"sharegpt/{row}/0" for row in range(2000)]
    owners = [[k for k in range(5) if in_slice(i, k, 5)] for i in ids]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o == [k] for o in owners) for k in range(5)]
    assert min(sizes) > 300, sizes  # a hash, not a skew
    assert all(in_slice(i, 0, 1) for i in ids)


def test_worker_slices_nest_inside_the_process_slice(tmp_path: Path) -> None:
    """Slice k of K with W workers -> worker slices k*W+w of K*W, which together are exactly slice k."""
    config = base_config(tmp_path, shard_index=1, num_shards=3, num_workers=2)
    subs = [worker_config(config, w).run for w in range(2)]
    assert [(r.shard_index, r.num_shards, r.num_workers) for r in subs] == [(2, 6, 1), (3, 6, 1)]
    served = resolve_config(config, {"metrics.port": 9400})
    assert [worker_config(served, w).metrics.port for w in range(2)] == [9400, 9401]  # as ranks do
    assert worker_config(config, 1).metrics.port is None
    ids = [f"d/{row}/0" for row in range(600)]
    parts = [{i for i in ids if in_slice(i, r.shard_index, r.num_shards)} for r in subs]
    assert parts[0] and parts[1] and parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == {i for i in ids if in_slice(i, 1, 3)}


def test_overrides_apply_to_files_and_models(tmp_path: Path) -> None:
    config = base_config(tmp_path)
    out = resolve_config(config, {"engine.batch_size": 5, "run__num_workers": 3})
    assert (out.engine.batch_size, out.run.num_workers) == (5, 3)
    path = tmp_path / "gen.yaml"
    path.write_text(
        f"verifier: {{nameOrPath: {tmp_path}}}\ndatasets: [{{path: x.jsonl}}]\nsync: {{path: {tmp_path}/o}}\n"
    )
    assert resolve_config(path, {"sync.shard_size": 7}).sync.shard_size == 7
    with pytest.raises(ConfigError, match=r"engine\.batch_size"):
        resolve_config(config, {"engine.batch_size": 0})
    with pytest.raises(ConfigError, match=r"engine\.bogus"):
        resolve_config(config, {"engine.bogus": 1})


def test_report_merges_and_round_trips() -> None:
    total = GenerateReport(seconds=2.0)
    total.add(GenerateReport(written=3, tokens=30, skipped=1, seconds=9.0))
    total.add(GenerateReport(written=1, tokens=10, failed=1, failed_ids=["a/1/0"]))
    assert (total.written, total.tokens, total.skipped, total.failed) == (4, 40, 1, 1)
    assert total.tokens_per_s == 20.0 and not total.ok
    again = GenerateReport.from_json(total.to_json())
    assert again == total
    message = str(GenerateError(total))
    assert "1 example(s) failed: a/1/0" in message


class FakeEngine:
    """Echoes token ids as a one-slot hidden state; runs out of memory on batches or on chosen ids."""

    num_layers = 1
    hidden_size = 1

    def __init__(self, oom_batches: bool = False, oom_ids: frozenset[str] = frozenset()) -> None:
        self.layer_ids = [1]
        self.oom_batches = oom_batches
        self.oom_ids = oom_ids
        self.calls: list[list[str]] = []

    def forward(self, batch: Sequence[TokenizedExample]) -> list[ExampleDict]:
        self.calls.append([e.id for e in batch])
        if (self.oom_batches and len(batch) > 1) or any(e.id in self.oom_ids for e in batch):
            raise torch.OutOfMemoryError("fake")
        return [
            {
                "id": e.id,
                "token_ids": torch.tensor(e.token_ids, dtype=torch.int32),
                "loss_mask": torch.tensor(e.loss_mask, dtype=torch.uint8),
                "hidden_states": torch.tensor(e.token_ids, dtype=torch.float32)[:, None, None],
            }
            for e in batch
        ]


class ListSink:
    def __init__(self) -> None:
        self.examples: list[ExampleDict] = []

    def done_ids(self) -> set[str]:
        return set()

    def write(self, examples: Sequence[ExampleDict]) -> None:
        self.examples.extend(examples)

    def close(self) -> None:
        pass


def examples(lengths: list[int]) -> list[TokenizedExample]:
    return [TokenizedExample(f"d/{i}/0", list(range(n)), [1] * n) for i, n in enumerate(lengths)]


def test_batches_are_length_grouped_and_everything_is_written(tmp_path: Path) -> None:
    engine, sink, report = FakeEngine(), ListSink(), GenerateReport()
    inputs = examples([5, 40, 6, 41, 7, 3])
    generate_examples(engine, sink, inputs, base_config(tmp_path), GenerationProgress(report, 0, 1))
    assert sorted(e["id"] for e in sink.examples) == sorted(e.id for e in inputs)
    assert engine.calls == [["d/1/0", "d/3/0"], ["d/0/0", "d/2/0"], ["d/4/0", "d/5/0"]]
    assert (report.written, report.tokens, report.failed) == (6, 102, 0)


def test_out_of_memory_isolates_the_example_that_cannot_fit(tmp_path: Path) -> None:
    engine, sink, report = (
        FakeEngine(oom_batches=True, oom_ids=frozenset({"d/2/0"})),
        ListSink(),
        GenerateReport(),
    )
    generate_examples(
        engine, sink, examples([5, 6, 7, 8]), base_config(tmp_path), GenerationProgress(report, 0, 1)
    )
    assert sorted(e["id"] for e in sink.examples) == ["d/0/0", "d/1/0", "d/3/0"]
    assert (report.written, report.failed, report.failed_ids) == (3, 1, ["d/2/0"])
    assert not report.ok


META = StoreMeta(verifier="v", layer_ids=(1,), num_layers=1, hidden_size=1, vocab_size=8, dtype="float32")


def test_sink_kind_without_its_module_names_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(factory.SINKS, "zmq", ("specops.stores._not_built_yet", "ZmqStore"))
    config = base_config(tmp_path).model_copy(
        update={"sync": base_config(tmp_path).sync.model_copy(update={"kind": "zmq", "url": "tcp://x:1"})}
    )
    with pytest.raises(ConfigError, match=r"sync\.kind: 'zmq' is not available"):
        factory.open_sink(config, META)


def test_disk_sink_is_opened_for_this_slice(tmp_path: Path) -> None:
    config = base_config(tmp_path, shard_index=1, num_shards=2)
    sink = factory.open_sink(config, META)
    sink.write(
        [
            {
                "id": "d/0/0",
                "token_ids": torch.tensor([1, 2], dtype=torch.int32),
                "loss_mask": torch.tensor([0, 1], dtype=torch.uint8),
                "hidden_states": torch.zeros(2, 1, 1),
            }
        ]
    )
    assert isinstance(sink, factory.FinalizingSink)
    sink.close()
    assert sink.done_ids() == {"d/0/0"}
    assert sorted(p.name for p in (tmp_path / "out").glob("manifest-w*.json")) == ["manifest-w00001.json"]


def _source_config(tmp_path: Path, verifier: Path, rows: int, **extra: Any) -> DataGenConfig:
    data = write_jsonl(tmp_path / "syn.jsonl", make_conversations(rows, seed=2))
    return DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": str(verifier)},
            "datasets": [{"path": str(data), "name": "syn"}],
            "sync": {"path": str(tmp_path / "out")},
            "run": {"allowed_roots": [str(tmp_path), str(verifier)], "shard_index": 1, "num_shards": 2},
            **extra,
        }
    )


def test_tokenized_slice_takes_its_slice_and_skips_done_ids(tmp_path: Path, tiny_verifier_dir: Path) -> None:
    config = _source_config(tmp_path, tiny_verifier_dir, 40)
    mine = [f"syn/{i}/0" for i in range(40) if in_slice(f"syn/{i}/0", 1, 2)]
    done = {mine[0], mine[1], "syn/not-mine/0"}
    report = GenerateReport()
    tokenizer = load_tokenizer(config.verifier, config.run.allowed_roots)
    out = list(tokenized_slice(config, tokenizer, done, report))
    assert [e.id for e in out] == mine[2:]
    assert (report.skipped, report.dropped) == (2, 0)
    assert all(sum(e.loss_mask) > 0 for e in out)


def test_tokenized_slice_cuts_to_the_engine_length_and_counts_drops(
    tmp_path: Path, tiny_verifier_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _source_config(tmp_path, tiny_verifier_dir, 10, engine={"max_seq_len": 40})
    tokenizer = load_tokenizer(config.verifier, config.run.allowed_roots)
    out = list(tokenized_slice(config, tokenizer, set(), GenerateReport()))
    assert out and max(len(e.token_ids) for e in out) == 40

    picky = _source_config(tmp_path, tiny_verifier_dir, 10, processor={"min_loss_tokens": 10_000})
    report = GenerateReport()
    assert list(tokenized_slice(picky, tokenizer, set(), report)) == []
    assert report.dropped == sum(in_slice(f"syn/{i}/0", 1, 2) for i in range(10))

    broken = _source_config(tmp_path, tiny_verifier_dir, 10, chat_template="{{ raise_exception('nope') }}")
    report = GenerateReport()
    assert list(tokenized_slice(broken, tokenizer, set(), report)) == []
    assert report.dropped == sum(in_slice(f"syn/{i}/0", 1, 2) for i in range(10))
    assert "dropped: chat_template: cannot render" in caplog.text
