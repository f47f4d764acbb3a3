"""`train.reportTo`: each tracker gets the run's metrics and config, read back with the tool's own reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _train_support import build_verifier, make_examples, train_config, write_store

from specops.config import ConfigError
from specops.train import tracking
from specops.train.trainer import train

TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tracking")
    verifier = build_verifier(root / "verifier")
    write_store(root / "data", root / "verifier", make_examples(verifier, 24))
    return {"root": root, "verifier": root / "verifier", "data": root / "data"}


def _config(world: dict[str, Path], max_steps: int, output: str = "run", **overrides: Any) -> Any:
    return train_config(
        world["root"], world["verifier"], world["data"], output, max_steps=max_steps, **overrides
    )


def _unset(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Unset now, and unset again afterwards whatever the code under test sets."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _wandb_records(run_file: Path) -> list[Any]:
    """The protobuf records of a W&B transaction log: a 7-byte header, then 32 KiB blocks of
    chunks (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _wandb_history(run_file: Path) -> tuple[list[tuple[int, float]], dict[str, Any]]:
    history, config = [], {}
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = _wandb_items(record.history.item)
            if "train/loss" in items:
                history.append((items["_step"], items["train/loss"]))
        elif kind == "config":
            config.update(_wandb_items(record.config.update))
    return history, config


def test_every_tracker_gets_the_metrics_and_the_config_and_a_resume_continues_its_run(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    _unset(monkeypatch, "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TRACKIO_DIR", "WANDB_PROJECT")
    train(_config(world, 3, report_to=TRACKERS, run_tags=["nightly"]))
    train(_config(world, 5, report_to=TRACKERS, run_tags=["nightly"]))  # resumes at step 3

    out = world["root"] / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [step for step, _ in want] == [1, 2, 3, 4, 5]
    ids = json.loads((out / tracking.STATE_FILE).read_text())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "run"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == want

    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and {run.stem for run in runs} == {f"run-{ids['wandb']}"}  # one run, resumed
    (first, config), (second, again) = (_wandb_history(run) for run in runs)
    assert [(step, pytest.approx(loss)) for step, loss in first + second] == want
    assert config["optim.lr"] == 3e-3 and config["runTags"] == '["nightly"]' and again == {}

    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    history = client.get_metric_history(ids["mlflow"], "train/loss")
    assert [(m.step, pytest.approx(m.value)) for m in history] == want
    run = client.get_run(ids["mlflow"])
    assert run.data.params["optim.lr"] == "0.003" and run.data.tags["nightly"] == "true"
    assert run.info.run_name == "run"

    from trackio.sqlite_storage import SQLiteStorage

    assert (out / "trackio").is_dir()
    logs = SQLiteStorage.get_logs(tracking.PROJECT, "run")
    assert [(row["step"], pytest.approx(row["train/loss"])) for row in logs] == want


def test_a_missing_tracker_package_is_refused_before_any_work(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name)
    )
    with pytest.raises(
        ConfigError, match=r"train\.reportTo: wandb needs the `wandb` package .*specops\[tracking\]"
    ):
        train(_config(world, 1, "refused", report_to=["tensorboard", "wandb"]))
    assert not (world["root"] / "refused" / "metrics.jsonl").exists()


def test_a_tracker_named_twice_is_refused(world: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="report_to: Value error, lists mlflow more than once"):
        _config(world, 1, report_to=["mlflow", "mlflow"])


def test_flatten_gives_every_tracker_scalar_params() -> None:
    nested = {"optim": {"lr": 1e-4, "betas": [0.9, 0.95]}, "seed": 0, "runName": None, "on": True}
    assert tracking.flatten(nested) == {"optim.lr": 1e-4, "optim.betas": "[0.9, 0.95]", "seed": 0, "on": True}
