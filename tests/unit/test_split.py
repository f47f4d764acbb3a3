"""The held-out split: by conversation, defined once, and honoured by every entry point that trains
or evaluates (trainer, `run --local`, the operator's evaluation Job, bench/quality.py); the
`specops evaluate` CLI is covered in test_evaluate.py."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _split_support import (
    ROWS,
    TURNS,
    conversation_examples,
    conversation_store,
    prompt_conversation,
    trained_conversations,
)

from specops.config import ConfigError, DataGenConfig, TrainConfig, load_config
from specops.data.split import HeldOutSplit, conversation_id
from specops.eval_inputs import held_out_of
from specops.evaluate import load_prompts
from specops.example import ExampleDict
from specops.local_run import LocalPlan, held_out_prompts
from specops.stores.disk import DiskStore
from specops.train.data import TrainData
from specops.train.distributed import DistEnv

ROOT = Path(__file__).resolve().parents[2]


def test_conversation_id_drops_the_turn_only() -> None:
    assert conversation_id("sharegpt/12/3") == "sharegpt/12"
    assert conversation_id("sharegpt/12/0") == "sharegpt/12"
    assert conversation_id("docs/readme") == "docs/readme", "a text-file id has no turn"
    assert conversation_id("a/b/c") == "a/b/c"
    assert conversation_id("plain") == "plain"


def test_membership_is_per_conversation_stable_proportional_and_seeded() -> None:
    split = HeldOutSplit(0.1, seed=0)
    rows = range(4000)
    held = {r for r in rows if split.held_out(f"sharegpt/{r}/0")}
    assert 300 < len(held) < 500
    assert all(split.held_out(f"sharegpt/{r}/{t}") == (r in held) for r in rows for t in (1, 5))
    assert held == {r for r in rows if HeldOutSplit(0.1, seed=0).held_out(f"sharegpt/{r}/0")}
    assert held <= {r for r in rows if HeldOutSplit(0.2, seed=0).held_out(f"sharegpt/{r}/0")}
    assert held != {r for r in rows if HeldOutSplit(0.1, seed=1).held_out(f"sharegpt/{r}/0")}
    assert not any(HeldOutSplit(0.0).held_out(f"sharegpt/{r}/0") for r in rows)
    with pytest.raises(ValueError, match="validation_fraction"):
        HeldOutSplit(1.0)


class IndexedSource:
    """A partitioned source that lists its ids and records which partitions were read."""

    def __init__(self, examples: list[ExampleDict], per_partition: int) -> None:
        self.parts = {
            f"p{i:03d}": examples[i * per_partition : (i + 1) * per_partition]
            for i in range((len(examples) + per_partition - 1) // per_partition)
        }
        self.reads: list[str] = []

    def partitions(self) -> list[str]:
        return list(self.parts)

    def ids(self, partition: str) -> list[str]:
        return [ex["id"] for ex in self.parts[partition]]

    def read(self, partition: str) -> Iterator[ExampleDict]:
        self.reads.append(partition)
        yield from self.parts[partition]


def test_trainer_holds_out_whole_conversations_even_from_one_shard(tmp_path: Path) -> None:
    """The demo's case: one shard, several turns per conversation (partitions held out none)."""
    store = conversation_store(tmp_path / "data")
    assert len(DiskStore.open(store, [tmp_path]).partitions()) == 1
    data = TrainData(DiskStore.open(store, [tmp_path]), DistEnv(), validation_fraction=0.25, seed=3)
    validation = {conversation_id(ex["id"]) for ex in data.validation()}
    trained = {conversation_id(ex["id"]) for ex in data.epoch(0)} | {
        conversation_id(ex["id"]) for ex in data.epoch(1)
    }
    assert validation and trained and not validation & trained
    assert validation | trained == {f"chat/{r}" for r in range(ROWS)}
    assert sum(1 for _ in data.validation()) == TURNS * len(validation), (
        "every turn of a held-out conversation"
    )
    assert trained == trained_conversations(store, 0.25, 3)


def test_validation_reads_only_the_shards_holding_held_out_examples() -> None:
    examples = conversation_examples()
    source = IndexedSource(examples, per_partition=4)
    split = HeldOutSplit(0.1, seed=0)
    data = TrainData(source, DistEnv(), validation_fraction=0.1, seed=0, max_validation_examples=3)
    held = [ex["id"] for ex in data.validation()]
    holding = [p for p in source.parts if any(split.held_out(i) for i in source.ids(p))]
    assert held and all(split.held_out(i) for i in held)
    assert set(source.reads) == set(holding[: len(set(source.reads))]) and len(set(source.reads)) < len(
        holding
    )


def test_disk_store_lists_a_shards_ids_without_reading_it(tmp_path: Path) -> None:
    store = DiskStore.open(conversation_store(tmp_path / "data", shard_size=16), [tmp_path])
    listed = [i for p in store.partitions() for i in store.ids(p)]
    assert listed == [ex["id"] for p in store.partitions() for ex in store.read(p)]
    assert len(listed) == ROWS * TURNS


def _train_config(store: Path, fraction: float = 0.25, seed: int = 3) -> TrainConfig:
    return load_config(
        TrainConfig,
        {
            "verifier": {"name_or_path": "unused"},
            "data": {"path": str(store), "validation_fraction": fraction},
            "seed": seed,
            "output_dir": str(store.parent / "train"),
            "allowed_roots": [str(store.parent)],
        },
    )


def test_run_local_evaluates_only_conversations_it_did_not_train_on(tmp_path: Path) -> None:
    store = conversation_store(tmp_path / "data")
    train = _train_config(store)
    plan = LocalPlan(
        name="t",
        out_dir=tmp_path,
        datagen=DataGenConfig.model_construct(),
        train=train,
        nproc=1,
        evaluate=True,
        max_prompts=100,
        max_new_tokens=4,
        online=False,
    )
    found = held_out_prompts(plan)
    evaluated = {prompt_conversation(p) for p in found.prompts}
    assert evaluated and not evaluated & trained_conversations(store, 0.25, 3)
    assert found.source["split"] == {"by": "conversation", "fraction": 0.25, "seed": 3}
    assert found.source["held_out"] is True and found.source["conversations"] == len(evaluated)
    assert found.source["prompts"] == len(found.prompts) == TURNS * len(evaluated)


def test_operator_evaluation_job_evaluates_what_its_trainer_held_out(tmp_path: Path) -> None:
    """The evaluation Job reads the trainer's own ConfigMap (`--train-config`): same data and split."""
    from specops_operator.api import load_resources
    from specops_operator.builders import common
    from specops_operator.builders.common import Defaults
    from specops_operator.builders.training import build_training, inline_source

    cr = load_resources((ROOT / "examples" / "eagle3-train.yaml").read_text(), "eagle3-train.yaml")[0]
    cr.metadata.namespace, cr.metadata.uid = "ml", "uid"
    done = {"conditions": [{"type": "ShardsComplete", "status": "True"}]}
    children = build_training(cr, Defaults(image="x"), inline_source(cr, done), trained=True)
    by_name = {(c["kind"], c["metadata"]["name"]): c for c in children}
    trainer, evaluator = (
        by_name["Job", f"{cr.metadata.name}-train"],
        by_name["Job", f"{cr.metadata.name}-eval"],
    )

    def config_map(job: dict[str, Any]) -> str:
        pod = job["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["config"] == common.CONFIG_DIR
        return next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "config")

    assert config_map(evaluator) == config_map(trainer)
    args = evaluator["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[args.index("--train-config") + 1] == common.CONFIG_FILE and "--data" not in args
    rendered = yaml.safe_load(by_name["ConfigMap", config_map(trainer)]["data"]["config.yaml"])
    # The pod's paths, moved under tmp_path: the store the trainer would read.
    store = conversation_store(tmp_path / "data")
    rendered["data"]["path"], rendered["allowedRoots"] = str(store), [str(tmp_path)]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(rendered))
    data, split = held_out_of(tmp_path / "config.yaml")
    fraction, seed = rendered["data"]["validationFraction"], rendered.get("seed", 0)
    assert split == HeldOutSplit(fraction, seed) and fraction > 0
    found = load_prompts(data, allowed_roots=[tmp_path], split=split)
    evaluated = {prompt_conversation(p) for p in found.prompts}
    trained = trained_conversations(store, fraction, seed)
    assert evaluated and not evaluated & trained


def test_operator_skips_evaluation_without_held_out_conversations(tmp_path: Path) -> None:
    from specops_operator.api import load_resources
    from specops_operator.builders.common import Defaults
    from specops_operator.builders.training import build_training, evaluation_skipped, inline_source

    text = (ROOT / "examples" / "eagle3-train.yaml").read_text()
    cr = load_resources(text, "eagle3-train.yaml")[0]
    cr.spec.data.validation_fraction = 0.0
    cr.metadata.namespace, cr.metadata.uid = "ml", "uid"
    source = inline_source(cr, {"conditions": [{"type": "ShardsComplete", "status": "True"}]})
    assert evaluation_skipped(cr.spec, source) == "NoHeldOutData"
    children = build_training(cr, Defaults(image="x"), source, trained=True)
    assert not [c for c in children if c["metadata"]["name"].endswith("-eval")]
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(_train_config(tmp_path / "data", fraction=0.0).model_dump(mode="json"))
    )
    with pytest.raises(ConfigError, match="validationFraction is 0"):
        held_out_of(tmp_path / "c.yaml")


def test_bench_quality_evaluates_only_conversations_it_did_not_train_on(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    assert spec is not None and spec.loader is not None
    quality = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = quality
    spec.loader.exec_module(quality)
    store = conversation_store(tmp_path / "data")
    setup = quality.Setup(
        name="t", verifier="unused", datasets=[], layers=[1], max_length=16,
        train={"seed": 5}, train_cpu_seconds=None, max_new_tokens=4, eval_prompts=1000,
    )  # fmt: skip
    cfg = quality.train_config(setup, "hass", store, tmp_path)
    found = quality.held_out_prompts(setup, store, tmp_path)
    evaluated = {prompt_conversation(p) for p in found.prompts}
    trained = trained_conversations(store, cfg.data.validation_fraction, cfg.seed)
    assert evaluated and not evaluated & trained and found.source["split"]["seed"] == 5
