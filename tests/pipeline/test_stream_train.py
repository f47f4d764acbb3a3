"""Online training end to end on CPU: `specops generate-data` (2 workers claiming ranges) -> `specops
broker` -> a trainer consuming the stream (stream-then-cache), against offline training on the same data.
The draft vocabulary is reduced: the online run chooses it from its first streamed window.

The first epoch streams (each example once), later epochs replay the cache; the offline run trains
on the cache directory with the same steps and seed. Both must learn, and end within noise of each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from specops.config import TrainConfig, load_config
from specops.models.base import SpeculatorModel
from specops.stores.disk import DiskStore
from specops.testing.net import free_port
from specops.testing.synthetic import make_conversations, write_jsonl
from specops.train.trainer import train

CLI = [sys.executable, "-m", "specops.cli"]
STEPS = 40
DRAFT_VOCAB = 256
"""Fewer than the tiny verifier's 578 tokens: the online run picks them from its stream window."""


def train_config(root: Path, verifier: Path, output: str, data: dict[str, Any]) -> TrainConfig:
    return load_config(
        TrainConfig,
        {
            "verifier": {"name_or_path": str(verifier)},
            "data": {"validation_fraction": 0.0, "prefetch": 0, **data},
            "draft": {"draft_vocab_size": DRAFT_VOCAB},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 1.0},
            "output_dir": str(root / output),
            "ttt_steps": 2,
            "tokens_per_step": 256,
            "max_seq_len": 128,
            "max_steps": STEPS,
            "log_every": 1,
            "eval_every": 1000,
            "checkpoint_every": 1000,
            "device": "cpu",
            "allowed_roots": [str(root), str(verifier)],
        },
    )


def losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "train" and "loss" in r]


@pytest.mark.slow  # about a minute on 2 CPU cores (spawned generator workers, two trainings)
def test_online_training_from_two_generators_matches_offline(
    tmp_path: Path, tiny_verifier_dir: Path, one_thread: None
) -> None:
    conversations = write_jsonl(tmp_path / "conv.jsonl", make_conversations(40, seed=11))
    url = f"tcp://127.0.0.1:{free_port()}"
    roots = [str(tmp_path), str(tiny_verifier_dir)]
    config = {
        "verifier": {"nameOrPath": str(tiny_verifier_dir)},
        "datasets": [{"path": str(conversations), "name": "syn"}],
        "states": {"hiddenStates": {"layers": [1, 2, 3, 4]}},
        "engine": {"device": "cpu", "batchSize": 8},
        "sync": {"kind": "zmq", "url": url, "claimRanges": 4},
        "run": {"numWorkers": 2, "allowedRoots": roots},
    }
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "procs.log", "ab")  # noqa: SIM115 (shared by the two processes)
    broker = subprocess.Popen(
        [*CLI, "broker", "--bind", url, "--state-dir", str(tmp_path / "state"), "--allowed-root", str(tmp_path),
         "--exit-after-eos"],
        stdout=log, stderr=log,
    )  # fmt: skip
    generators = subprocess.Popen(
        [*CLI, "generate-data", "--config", str(tmp_path / "gen.yaml")],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        online_cfg = train_config(
            tmp_path,
            tiny_verifier_dir,
            "online",
            # the direct data path, as README recommends (the fault tests cover the relay too)
            {
                "kind": "zmq",
                "url": url,
                "direct": True,
                "cache_path": str(tmp_path / "cache"),
                "stall_timeout_s": 180,
            },
        )
        online = train(online_cfg)  # the stream client comes from the config alone, as in a pod
        out, _ = generators.communicate(timeout=120)
        assert generators.returncode == 0, (tmp_path / "procs.log").read_text()[-3000:]
        report = json.loads(out.strip().splitlines()[-1])
        assert broker.wait(60) == 0
    finally:
        for proc in (generators, broker):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    assert "relaying its examples instead" not in (tmp_path / "procs.log").read_text()  # stayed direct
    cache = DiskStore.open(tmp_path / "cache", roots)
    assert len(cache) == report["written"] > 30  # the first epoch streamed every example, once
    offline = train(
        train_config(
            tmp_path, tiny_verifier_dir, "offline", {"kind": "disk", "path": str(tmp_path / "cache")}
        )
    )
    assert online.step == offline.step == STEPS
    # The window held the whole (short) stream, so it chose what the cache's token counts choose.
    drafts = [SpeculatorModel.from_pretrained(run.final) for run in (online, offline) if run.final]
    assert [d.config.draft_vocab_size for d in drafts] == [DRAFT_VOCAB] * 2  # type: ignore[attr-defined]
    assert torch.equal(drafts[0].t2d, drafts[1].t2d)  # type: ignore[attr-defined]
    on, off = losses(tmp_path / "online"), losses(tmp_path / "offline")
    tail_on, tail_off = sum(on[-10:]) / 10, sum(off[-10:]) / 10
    assert tail_on < 0.5 * on[0] and tail_off < 0.5 * off[0]  # both learn
    assert abs(tail_on - tail_off) <= 0.2 * tail_off, (tail_on, tail_off)  # orderings differ: ~10% noise
