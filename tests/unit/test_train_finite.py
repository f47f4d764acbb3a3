"""Training never publishes garbage: a diverged run stops with an error, and no model with an inf
or NaN tensor is written, as a checkpoint or as an export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _train_support import small_world, train_config

from specops import exitcodes
from specops.train.checkpoint import NonFiniteError, complete_checkpoints
from specops.train.distributed import DistEnv
from specops.train.trainer import MAX_NONFINITE_STEPS, Trainer, train


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return small_world(tmp_path_factory.mktemp("finite"), 16)


def test_a_diverging_run_stops_with_an_error_and_publishes_nothing(world: dict[str, Any]) -> None:
    """`optim.weightDecay: .inf` (validation refuses it now; here it is forced past validation, as
    any divergence would be) used to exit 0 with `final/model.safetensors` full of inf."""
    cfg = train_config(world["root"], world["verifier"], world["data"], "diverge", max_steps=12)
    cfg.optim.weight_decay = float("inf")
    with pytest.raises(NonFiniteError, match=rf"not finite {MAX_NONFINITE_STEPS} steps in a row") as raised:
        train(cfg)
    assert exitcodes.classify(raised.value) == exitcodes.CONFIG, "a one-line error, exit 2: no retry"
    out = Path(cfg.output_dir)
    assert not (out / "final").exists() and not complete_checkpoints(out)


def test_a_model_with_a_non_finite_tensor_is_neither_checkpointed_nor_exported(world: dict[str, Any]) -> None:
    cfg = train_config(world["root"], world["verifier"], world["data"], "refuse", max_steps=1)
    trainer = Trainer(cfg, DistEnv())
    with torch.no_grad():
        trainer.draft.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"final: not written, the model is not finite in fc\.weight"):
        trainer.checkpointer.publish("final", trainer.draft)
    with pytest.raises(NonFiniteError, match=r"fc\.weight"):
        trainer._checkpoint()
    assert not (Path(cfg.output_dir) / "final").exists() and not complete_checkpoints(Path(cfg.output_dir))
