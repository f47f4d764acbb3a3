"""The training loop on CPU: gradients, learning, exact resume, checkpoints, validation, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _train_support import VOCAB, build_verifier, make_examples, train_config, write_store

from specops.config import ConfigError
from specops.data.split import HeldOutSplit
from specops.example import ExampleDict
from specops.models.base import SpeculatorModel
from specops.models.ttt import step_targets
from specops.models.vocab import build_vocab_mapping
from specops.stores.base import StoreMeta
from specops.stores.disk import DiskStore
from specops.train.data import TrainData, count_tokens
from specops.train.distributed import DistEnv
from specops.train.losses import draft_loss, step_valid_counts
from specops.train.packing import batches
from specops.train.state_io import StateFormatError
from specops.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train")
    verifier = build_verifier(root / "verifier")
    examples = make_examples(verifier, 40)
    write_store(root / "data", root / "verifier", examples)
    return {"root": root, "verifier": root / "verifier", "data": root / "data", "examples": examples}


def config(world: dict[str, Any], output: str, **overrides: Any) -> Any:
    return train_config(world["root"], world["verifier"], world["data"], output, **overrides)


def losses(output: Path, kind: str = "train") -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == kind]


def test_gradients_reach_only_trainable_parameters(world: dict[str, Any]) -> None:
    trainer = Trainer(config(world, "grads", max_steps=1), DistEnv())
    batch = trainer._to_device(next(batches(trainer.data.epoch(0), "packed", 128, 64)).batch)
    targets = step_targets(batch, trainer.head, trainer.draft.t2d, 2)
    where = torch.stack([valid for _, valid in targets])
    logits = trainer.model(where, **{name: getattr(batch, name) for name in batch.__dataclass_fields__})
    loss, _ = draft_loss(logits, targets, step_valid_counts(targets), trainer.loss_spec)
    loss.backward()
    named = dict(trainer.draft.named_parameters())
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert frozen == {"embed_tokens.weight", "lm_head.weight"}
    assert all(named[n].grad is None for n in frozen)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if n not in frozen)
    assert not any(p.requires_grad for p in trainer.head.parameters())
    assert {id(p) for p in trainer.params} == {id(p) for n, p in named.items() if n not in frozen}


def test_init_from_verifier_reaches_the_draft(world: dict[str, Any]) -> None:
    from specops.models.safetensors_io import read_tensors

    trainer = Trainer(config(world, "warm", max_steps=1, draft__init_from_verifier=True), DistEnv())
    name = "model.layers.3.mlp.down_proj.weight"  # the verifier's last layer
    want = read_tensors(world["verifier"], [name])[name]
    assert torch.equal(trainer.draft.layers[0].mlp.down_proj.weight, want)


@pytest.mark.parametrize("algorithm", ["eagle3", "hass"])
def test_eagle3_and_hass_both_learn(world: dict[str, Any], algorithm: str) -> None:
    out = world["root"] / f"learn-{algorithm}"
    result = train(config(world, out.name, max_steps=24, draft__algorithm=algorithm))
    curve = [loss for _, loss in losses(out)]
    assert len(curve) == 24 and not result.interrupted
    assert sum(curve[-4:]) < 0.7 * sum(curve[:4])
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["speculators_config"]["algorithm"] == algorithm


def test_interrupted_then_resumed_run_reproduces_the_loss_curve_exactly(world: dict[str, Any]) -> None:
    # No max_steps: the schedule length comes from counting epoch 0's batches; 2 epochs cross a boundary.
    straight = train(config(world, "straight", epochs=2, data__prefetch=2))
    expected = losses(world["root"] / "straight")
    assert straight.step == len(expected) > 12

    cut = world["root"] / "cut"

    def sigterm_at(step: int) -> Callable[[dict[str, Any]], None]:
        def hook(record: dict[str, Any]) -> None:
            if record["kind"] == "train" and record["step"] == step:
                os.kill(os.getpid(), signal.SIGTERM)

        return hook

    for stop in (4, 13):
        result = train(config(world, cut.name, epochs=2, data__prefetch=2), on_log=sigterm_at(stop))
        assert result.interrupted and result.step == stop and result.final is None
        assert (cut / "checkpoints" / f"step-{stop:08d}" / "state" / "trainer.json").is_file()
    finished = train(config(world, cut.name, epochs=2, data__prefetch=2))
    assert not finished.interrupted and finished.step == straight.step
    assert losses(cut) == expected  # bit-exact, step for step
    a = SpeculatorModel.from_pretrained(world["root"] / "straight" / "final").state_dict()
    b = SpeculatorModel.from_pretrained(cut / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_after_the_checkpoint_leaves_each_step_once_in_metrics(world: dict[str, Any]) -> None:
    """A crash at step 7 (newest checkpoint: 5) with a record torn by it: the resumed run drops what
    steps 6-7 logged and the torn line, then logs them again, so the file is the straight run's."""
    train(config(world, "whole", max_steps=9, checkpoint_every=5))
    expected = losses(world["root"] / "whole")
    out = world["root"] / "crashed"

    def crash_at_7(record: dict[str, Any]) -> None:
        if record["kind"] == "train" and record["step"] == 7:
            raise KeyboardInterrupt  # not caught by the trainer's exception handling, like a kill

    with pytest.raises(KeyboardInterrupt):
        train(config(world, out.name, max_steps=9, checkpoint_every=5), on_log=crash_at_7)
    assert [s for s, _ in losses(out)] == list(range(1, 8))
    with (out / "metrics.jsonl").open("a") as torn:
        torn.write('{"kind": "train", "lo')
    train(config(world, out.name, max_steps=9, checkpoint_every=5))
    assert losses(out) == expected


def test_checkpoint_is_a_speculators_directory(world: dict[str, Any]) -> None:
    out = world["root"] / "ckpt"
    trainer = Trainer(config(world, out.name, max_steps=3, keep_checkpoints=1, checkpoint_every=1), DistEnv())
    result = trainer.run()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]  # older ones pruned
    for directory in (result.final, result.checkpoint):
        assert directory is not None
        loaded = SpeculatorModel.from_pretrained(directory)
        batch = next(batches(world["examples"][:2], "packed", 128, 64)).batch
        with torch.no_grad():
            mine = trainer.draft.forward_ttt(batch, 2)
            theirs = loaded.forward_ttt(batch, 2)  # type: ignore[attr-defined]
        assert all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True))
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["speculators_model_type"] == "eagle3" and saved["draft_vocab_size"] == 48
    assert saved["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert saved["speculators_config"]["verifier"]["name_or_path"] == str(world["verifier"])
    state = out / "checkpoints" / "step-00000003" / "state"
    assert sorted(p.name for p in state.iterdir()) == [
        "optimizer.json",
        "optimizer.safetensors",
        "rank-00000.json",
        "rank-00000.safetensors",
        "trainer.json",
    ]


def test_validation_split_picks_the_best_checkpoint(world: dict[str, Any]) -> None:
    out = world["root"] / "val"
    result = train(config(world, out.name, max_steps=12, eval_every=4, data__validation_fraction=0.3))
    evals = losses(out, "eval")
    assert [s for s, _ in evals] == [4, 8, 12]
    assert result.best_val_loss == min(v for _, v in evals)
    assert result.best is not None and (result.best / "model.safetensors").is_file()


def test_the_last_validation_is_checkpointed_and_never_run_twice(world: dict[str, Any]) -> None:
    """Step 10 is no multiple of evalEvery: the end validates it, before the last checkpoint, so
    rerunning the finished run (or resuming one stopped after that checkpoint) adds no second record."""
    out = world["root"] / "val-once"
    cfg = config(world, out.name, max_steps=10, eval_every=4, data__validation_fraction=0.3)
    first = train(cfg)
    assert [s for s, _ in losses(out, "eval")] == [4, 8, 10]
    saved = json.loads((out / "checkpoints" / "step-00000010" / "state" / "trainer.json").read_text())
    assert saved["validated_step"] == 10 and saved["best_val_loss"] == first.best_val_loss
    again = train(cfg)
    assert [s for s, _ in losses(out, "eval")] == [4, 8, 10]
    assert again.best_val_loss == first.best_val_loss and again.step == 10


def test_resume_refusals_and_partial_checkpoints(world: dict[str, Any]) -> None:
    out = world["root"] / "refuse"
    train(config(world, out.name, max_steps=2, checkpoint_every=1, keep_checkpoints=5))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(config(world, out.name, max_steps=2, resume="never"))
    # A process killed mid-checkpoint leaves a temp dir, or a dir without trainer.json: both ignored.
    (out / "checkpoints" / ".tmp-step-00000003").mkdir()
    partial = out / "checkpoints" / "step-00000004"
    shutil.copytree(out / "checkpoints" / "step-00000002", partial)
    (partial / "state" / "trainer.json").unlink()
    result = train(config(world, out.name, max_steps=5, checkpoint_every=1000))
    assert result.step == 5 and not (out / "checkpoints" / ".tmp-step-00000003").exists()
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]
    trainer_json = out / "checkpoints" / "step-00000005" / "state" / "trainer.json"
    data = json.loads(trainer_json.read_text())
    trainer_json.write_text(json.dumps({**data, "world_size": 2}))
    with pytest.raises(StateFormatError, match="world of 2"):
        train(config(world, out.name, max_steps=6))


def test_data_from_another_verifier_or_missing_is_rejected(world: dict[str, Any], tmp_path: Path) -> None:
    other = StoreMeta(
        verifier="x", layer_ids=(1, 2, 3, 4), num_layers=4, hidden_size=16, vocab_size=VOCAB, dtype="float32"
    )
    ex = {**world["examples"][0], "hidden_states": torch.zeros(10, 4, 16)}
    ex["token_ids"], ex["loss_mask"] = ex["token_ids"][:10], ex["loss_mask"][:10]
    with DiskStore(world["root"] / "other-data", meta=other, allowed_roots=[world["root"]]) as store:
        store.write([ex])
    bad = train_config(world["root"], world["verifier"], world["root"] / "other-data", "bad", max_steps=1)
    with pytest.raises(ValueError, match="hidden size 16 != verifier 32"):
        train(bad)
    missing = train_config(world["root"], world["verifier"], world["root"] / "nope", "bad2", max_steps=1)
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        train(missing)


class ListStream:
    """A StreamSource over a list, like a queue that delivers each example once."""

    def __init__(self, examples: list[ExampleDict], meta: StoreMeta | None = None) -> None:
        self.examples = examples
        self.meta = meta
        self.closed = False

    def __iter__(self) -> Iterator[ExampleDict]:
        return iter(self.examples)

    def close(self) -> None:
        self.closed = True


def test_stream_source_holds_out_by_id_and_trains(world: dict[str, Any]) -> None:
    examples: list[ExampleDict] = world["examples"]
    stream = ListStream(examples)
    data = TrainData(stream, DistEnv(), validation_fraction=0.25, seed=0, max_validation_examples=100)
    trained = [ex["id"] for ex in data.epoch(0)]
    held = [ex["id"] for ex in data.validation()]
    assert stream.closed and held and trained
    assert sorted(trained + held) == sorted(ex["id"] for ex in examples)
    split = HeldOutSplit(0.25, seed=0)
    assert all(split.held_out(i) for i in held) and not any(split.held_out(i) for i in trained)
    with pytest.raises(ValueError, match="second epoch"):
        data.epoch(1)

    out = world["root"] / "stream"
    cfg = config(
        world,
        out.name,
        max_steps=50,
        eval_every=3,
        data__validation_fraction=0.25,
        data__vocab_from=str(world["data"]),
    )
    result = train(cfg, source=ListStream(examples))
    assert 0 < result.step < 50 and not result.interrupted  # the stream ended first
    assert losses(out, "eval")


def test_stream_window_holds_its_examples_for_epoch_zero_once_each(world: dict[str, Any]) -> None:
    examples: list[ExampleDict] = world["examples"]
    data = TrainData(ListStream(examples), DistEnv(), validation_fraction=0.25, seed=0)
    trained = [ex for ex in examples if HeldOutSplit(0.25, seed=0).trained(ex["id"])]
    sizes = [int(ex["token_ids"].numel()) for ex in trained]
    budget = sum(sizes[:5]) - 1  # the fifth training example crosses it
    assert data.window_counts(budget) == count_tokens(trained[:5])
    assert [ex["id"] for ex in data.epoch(0)] == [ex["id"] for ex in trained]  # nothing lost or repeated
    with pytest.raises(ValueError, match="taken once"):
        data.window_counts(budget)


def test_a_stream_without_vocab_from_picks_its_vocabulary_from_the_first_window(
    world: dict[str, Any],
) -> None:
    """Streams used to fail at trainer start (no token counts) unless the whole vocab was drafted."""
    examples: list[ExampleDict] = world["examples"]
    out = world["root"] / "stream-window"
    budget = sum(int(ex["token_ids"].numel()) for ex in examples[:10])
    cfg = config(world, out.name, max_steps=500, data__vocab_window_tokens=budget)
    result = train(cfg, source=ListStream(examples))
    assert 0 < result.step < 500 and result.final is not None  # trained to the end of the stream
    saved = SpeculatorModel.from_pretrained(result.final)
    expected_t2d, expected_d2t = build_vocab_mapping(count_tokens(examples[:10]), VOCAB, 48)
    assert saved.config.draft_vocab_size == 48  # type: ignore[attr-defined]
    assert torch.equal(saved.d2t, expected_d2t) and torch.equal(saved.t2d, expected_t2d)  # type: ignore[attr-defined]
    assert not torch.equal(expected_t2d, build_vocab_mapping(count_tokens(examples), VOCAB, 48)[0])


def test_a_resumed_stream_keeps_its_checkpoint_vocabulary_and_takes_no_window(world: dict[str, Any]) -> None:
    """A restarted rank must not wait for (or hold) a new window: its checkpoint carries d2t/t2d."""
    examples: list[ExampleDict] = world["examples"]
    out = world["root"] / "stream-resume"
    first = train(config(world, out.name, max_steps=2, checkpoint_every=1), source=ListStream(examples[:20]))
    assert first.step == 2 and first.final is not None

    class Counted(ListStream):
        pulled = 0

        def __iter__(self) -> Iterator[ExampleDict]:
            for ex in self.examples:
                Counted.pulled += 1
                yield ex

    later = Counted(examples[20:])  # other examples: a window of them would choose other tokens
    assert not torch.equal(
        build_vocab_mapping(count_tokens(examples[20:]), VOCAB, 48)[0],
        build_vocab_mapping(count_tokens(examples[:20]), VOCAB, 48)[0],
    )
    trainer = Trainer(config(world, out.name, max_steps=4, checkpoint_every=1), DistEnv(), source=later)
    assert Counted.pulled == 0 and trainer.step == 2
    result = trainer.run()
    assert result.step == 4 and result.final is not None
    before = SpeculatorModel.from_pretrained(first.final)
    after = SpeculatorModel.from_pretrained(result.final)
    assert torch.equal(before.t2d, after.t2d) and torch.equal(before.d2t, after.d2t)  # type: ignore[attr-defined]


def test_a_draft_vocab_beyond_the_verifier_is_a_config_error(world: dict[str, Any]) -> None:
    with pytest.raises(
        ConfigError, match=rf"draft\.draftVocabSize: 1000 exceeds the verifier vocabulary \({VOCAB} tokens\)"
    ):
        train(config(world, "too-big", max_steps=1, draft__draft_vocab_size=1000))


def test_stream_then_cache_replays_the_first_pass(world: dict[str, Any]) -> None:
    root = world["root"]
    meta = DiskStore.open(world["data"], [root]).meta
    fields = {"data__validation_fraction": 0.25, "data__vocab_from": str(world["data"])}
    first = train(
        config(world, "cached", max_steps=12, data__cache_path=str(root / "cache"), **fields),
        source=ListStream(world["examples"], meta),
    )
    assert first.step == 12  # more than one pass over the stream: later epochs replay the cache
    assert len(DiskStore.open(root / "cache", [root])) == len(world["examples"])
    # Resumed in a replay epoch: the in-memory held-out set is gone and is recovered from the cache.
    stream = ListStream(world["examples"], meta)
    result = train(
        config(world, "cached", max_steps=25, data__cache_path=str(root / "cache"), **fields), source=stream
    )
    assert result.step == 25 and not stream.closed  # the live stream was not needed again
    records = [json.loads(line) for line in (root / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in records if r["kind"] == "train"} >= {0, 1, 2}
    assert [r["step"] for r in records if r["kind"] == "eval"] == [12, 25]
    no_meta = config(world, "cached2", max_steps=5, data__cache_path=str(root / "cache2"), **fields)
    with pytest.raises(ConfigError, match=r"data\.cache_path"):
        train(no_meta, source=ListStream(world["examples"]))
