"""The process group's collective timeout comes from the config, raised above a stream's stall timeout."""

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from specops.config import ConfigError, TrainConfig, load_config
from specops.train import trainer


def _config(tmp_path: Path, data: dict[str, Any], **top: Any) -> TrainConfig:
    doc = {"verifier": {"nameOrPath": "m"}, "data": data, "outputDir": str(tmp_path / "out"), **top}
    return load_config(TrainConfig, doc)


def test_disk_data_keeps_the_configured_timeout(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"path": str(tmp_path)}, collectiveTimeoutS=120)
    assert cfg.process_group_timeout_s() == 120


def test_a_stream_raises_it_above_the_stall_timeout(tmp_path: Path) -> None:
    stream = {"kind": "zmq", "url": "tcp://broker:5555", "stallTimeoutS": 3600}
    cfg = _config(tmp_path, stream, maxSteps=10, collectiveTimeoutS=600)
    assert cfg.process_group_timeout_s() == 3660
    waits_forever = _config(tmp_path, {**stream, "stallTimeoutS": None}, maxSteps=10, collectiveTimeoutS=600)
    assert waits_forever.process_group_timeout_s() == 600


def test_out_of_range_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"collectiveTimeoutS"):
        _config(tmp_path, {"path": str(tmp_path)}, collectiveTimeoutS=5)


def test_train_hands_the_timeout_to_the_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (WORLD_SIZE 2) the group is created with the config's timeout, not a constant."""
    seen: dict[str, Any] = {}

    def fake_init(backend: str, timeout: timedelta) -> None:
        seen.update(backend=backend, timeout=timeout)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _config(tmp_path, {"path": str(tmp_path)}, collectiveTimeoutS=240, device="cpu")
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.train(cfg)
    assert seen == {"backend": "gloo", "timeout": timedelta(seconds=240)}
