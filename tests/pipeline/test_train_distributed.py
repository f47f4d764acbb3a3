"""`specops train` under torchrun: a gloo world of 2 matches one process seeing the same global batches.

Every example fills exactly one row and partitions are read unshuffled, so rank r of 2 trains on
examples 2s+r at step s while the single process trains on both in one batch of 2 rows: the
same tokens, the same global loss denominators, so the same updates up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from _train_support import build_verifier, make_examples, train_cli, write_store

from specops.models.base import SpeculatorModel

ROW = 48
STEPS = 5


def write_config(root: Path, name: str, **fields: Any) -> Path:
    cfg = {
        "verifier": {"nameOrPath": str(root / "verifier")},
        "data": {"path": str(root / "data"), "validationFraction": 0.0, "shuffle": False, "prefetch": 1},
        "draft": {"draftVocabSize": 48},
        "optim": {"lr": 3e-3, "warmupSteps": 1},
        "outputDir": str(root / name),
        "ttt_steps": 2,
        "maxSeqLen": ROW,
        "maxSteps": STEPS,
        "logEvery": 1,
        "device": "cpu",
        "allowedRoots": [str(root)],
        **fields,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(cmd: list[str], root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)


def curve(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    verifier = build_verifier(root / "verifier")
    write_store(
        root / "data", root / "verifier", make_examples(verifier, 2 * STEPS, lengths=[ROW]), shard_size=1
    )
    single = write_config(root, "single", tokensPerStep=2 * ROW)
    done = run([sys.executable, *train_cli(root), "--config", str(single)], root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_world_of_two_matches_one_process(root: Path, strategy: str) -> None:
    config = write_config(root, strategy, tokensPerStep=ROW, distributed=strategy)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = run([*torchrun, *train_cli(root), "--config", str(config)], root)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1 and reports[0]["step"] == STEPS  # rank 0 reports once
    torch.testing.assert_close(curve(root / strategy), curve(root / "single"), rtol=1e-4, atol=1e-5)
    ours = SpeculatorModel.from_pretrained(root / strategy / "final").state_dict()
    single = SpeculatorModel.from_pretrained(root / "single" / "final").state_dict()
    for name, value in single.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5, msg=name)
    # The world of 2 resumes its own checkpoint (per-rank data positions, sharded optimizer state).
    longer = write_config(root, strategy, tokensPerStep=ROW, distributed=strategy, maxSteps=STEPS + 2)
    more = run([*torchrun, *train_cli(root), "--config", str(longer)], root)
    assert more.returncode == 0, more.stderr[-3000:]
    assert f"resumed from {root / strategy / 'checkpoints' / f'step-{STEPS:08d}'}" in more.stdout
    steps = [
        json.loads(line)["step"] for line in (root / strategy / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, STEPS + 3))
