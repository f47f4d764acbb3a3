"""The trainer under damaged inputs and a full disk: bad shards are dropped up to
data.maxDroppedShards, a damaged newest checkpoint falls back to the newest intact one, and a
full disk stops the run with one line (exit 1) and a rerun resumes once space is freed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _train_support import small_world, train_config
from test_disk_full import fill, small_disk

from specops import cli, exitcodes
from specops.train.checkpoint import FILES, CheckpointError, complete_checkpoints
from specops.train.distributed import DistEnv
from specops.train.trainer import Trainer, train

__all__ = ["small_disk"]  # the tmpfs fixture, shared with the store tests


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return small_world(tmp_path_factory.mktemp("train-integrity"), 24)


@pytest.fixture
def damaged_data(world: dict[str, Any]) -> Iterator[Path]:
    """A copy of the store with a byte flipped in the safetensors header of its second shard."""
    copy = world["root"] / "damaged"
    shutil.copytree(world["data"], copy)
    shard = copy / "shard-w00000-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[20] ^= 0x01
    shard.write_bytes(bytes(data))
    yield copy
    shutil.rmtree(copy)


def config(world: dict[str, Any], output: str, data: Path | None = None, **overrides: Any) -> Any:
    return train_config(world["root"], world["verifier"], data or world["data"], output, **overrides)


def run_cli(
    world: dict[str, Any], name: str, cfg: Any, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    path = world["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    code = cli.main(["train", "--config", str(path)])
    return code, capsys.readouterr().err


def test_a_shard_with_a_damaged_header_is_dropped_and_training_goes_on(
    world: dict[str, Any], damaged_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = Trainer(config(world, "drop", damaged_data, epochs=1, data__max_dropped_shards=1), DistEnv())
    result = trainer.run()
    assert not result.interrupted and result.final is not None
    dropped = trainer.data.source.dropped
    assert [f for f, _ in dropped] == ["shard-w00000-00001.safetensors"] and "digest" in dropped[0][1]
    assert "dropped 1 damaged shard(s)" in capsys.readouterr().out


def test_more_damaged_shards_than_allowed_fail_the_run_with_exit_3(
    world: dict[str, Any], damaged_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(world, "strict", damaged_data, epochs=1, data__max_dropped_shards=0)
    code, err = run_cli(world, "strict", cfg, capsys)
    assert code == exitcodes.DATA
    line = err.strip().splitlines()[-1]
    assert line.startswith("specops train: error: ") and "data.max_dropped_shards=0" in line
    assert "shard-w00000-00001.safetensors" in line


def test_max_dropped_shards_is_refused_for_upstream_files(world: dict[str, Any]) -> None:
    with pytest.raises(Exception, match=r"max_dropped_shards applies to SpecOps shards"):
        config(world, "x", data__kind="speculators", data__max_dropped_shards=3)


def _checkpointed_run(world: dict[str, Any], name: str) -> Path:
    out = world["root"] / name
    shutil.rmtree(out, ignore_errors=True)
    train(config(world, name, max_steps=3, checkpoint_every=1, keep_checkpoints=5))
    return out / "checkpoints"


def test_checkpoints_record_every_file(world: dict[str, Any]) -> None:
    newest = _checkpointed_run(world, "recorded") / "step-00000003"
    files = json.loads((newest / "state" / "trainer.json").read_text())[FILES]
    on_disk = {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {"state/trainer.json"}
    assert files["model.safetensors"]["nbytes"] == (newest / "model.safetensors").stat().st_size
    assert not list(newest.parent.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [("truncate", "model.safetensors holds 100 bytes"), ("flip", "state/optimizer.safetensors has digest")],
)
def test_resume_falls_back_to_the_newest_intact_checkpoint(
    world: dict[str, Any], damage: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoints = _checkpointed_run(world, f"fallback-{damage}")
    newest = checkpoints / "step-00000003"
    if damage == "truncate":
        with open(newest / "model.safetensors", "r+b") as f:
            f.truncate(100)
    else:
        target = newest / "state" / "optimizer.safetensors"
        data = bytearray(target.read_bytes())
        data[-1] ^= 0x01
        target.write_bytes(bytes(data))
    result = train(config(world, f"fallback-{damage}", max_steps=4, checkpoint_every=1, keep_checkpoints=5))
    assert result.step == 4
    assert (
        "checkpoint" in caplog.text and reason in caplog.text and "resuming from step-00000002" in caplog.text
    )
    assert (checkpoints / "step-00000003.damaged").is_dir(), "kept for inspection, out of the listing"
    assert [p.name for p in complete_checkpoints(checkpoints.parent)] == [
        f"step-0000000{i}" for i in (1, 2, 3, 4)
    ]


def test_resume_with_every_checkpoint_damaged_fails_with_exit_3(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoints = _checkpointed_run(world, "all-damaged")
    for step in checkpoints.iterdir():
        (step / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from"):
        train(config(world, "all-damaged", max_steps=4))
    code, err = run_cli(world, "all-damaged", config(world, "all-damaged", max_steps=4), capsys)
    assert code == exitcodes.DATA and "step-00000003: model.safetensors holds 0 bytes" in err
    assert len(list(checkpoints.iterdir())) == 3, "nothing renamed or removed"


def test_a_full_disk_stops_training_cleanly_and_the_rerun_resumes(
    world: dict[str, Any], small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = small_disk / "out"
    cfg = train_config(
        world["root"],
        world["verifier"],
        world["data"],
        "unused",
        max_steps=12,
        checkpoint_every=1,
        keep_checkpoints=2,
    ).model_copy(update={"output_dir": str(out), "allowed_roots": [str(world["root"]), str(small_disk)]})
    ballast = fill(small_disk, 600 << 10)  # a checkpoint takes ~240 KiB: the third does not fit
    code, err = run_cli(world, "full", cfg, capsys)
    assert code == exitcodes.FAILED
    line = err.strip().splitlines()[-1]
    assert line.startswith("specops train: error: ") and "no space left" in line.lower()
    committed = [p.name for p in complete_checkpoints(out)]
    assert committed, "some checkpoints fit before the disk filled"
    assert not list((out / "checkpoints").glob(".tmp-*")), "a failed checkpoint leaves no temp directory"
    ballast.unlink()
    code, err = run_cli(world, "full", cfg, capsys)
    assert code == exitcodes.OK, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    assert steps[-1] == 12 and (out / "final" / "model.safetensors").is_file()
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000011", "step-00000012"]


def test_a_crash_inside_the_best_swap_is_undone_on_restart(world: dict[str, Any]) -> None:
    """`best` is replaced by two renames; a crash between them leaves only `.tmp-old-best` (and the
    unfinished `.tmp-best`). The next start puts the previous best back instead of losing it."""
    cfg = config(world, "swap", max_steps=8, eval_every=4, checkpoint_every=4, data__validation_fraction=0.3)
    result = train(cfg)
    assert result.best is not None
    out = result.best.parent
    weights = (out / "best" / "model.safetensors").read_bytes()
    (out / "best").rename(out / ".tmp-old-best")  # the first rename happened, the second did not
    (out / ".tmp-best").mkdir()
    Trainer(cfg, DistEnv())
    assert (out / "best" / "model.safetensors").read_bytes() == weights
    assert not (out / ".tmp-old-best").exists()
