"""Shared fixtures of the trainer tests: a tiny random Llama verifier and DiskStores of its states."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specops.config import TrainConfig, load_config
from specops.example import ExampleDict
from specops.stores.base import StoreMeta
from specops.stores.disk import DiskStore
from specops.testing.net import free_port

VOCAB = 64
HIDDEN = 32
LAYERS = 4
LAYER_IDS = (1, 2, 3, LAYERS)


def build_verifier(path: Path, seed: int = 0) -> LlamaForCausalLM:
    """A random 4-layer Llama saved as safetensors under `path`."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked next-token distributions, like a trained model's
    model.save_pretrained(path)
    return model


def capture(verifier: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """hidden_states [S, 4, H]: inputs of layers 1..3 and the final output before the norm."""
    seen: list[torch.Tensor] = []
    hook = verifier.model.norm.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = verifier(ids[None].long(), output_hidden_states=True)
    finally:
        hook.remove()
    return torch.stack([*(out.hidden_states[k][0] for k in LAYER_IDS[:-1]), seen[0][0]], dim=1)


def make_examples(
    verifier: LlamaForCausalLM, count: int, *, seed: int = 1, lengths: Sequence[int] = ()
) -> list[ExampleDict]:
    """Token sequences from a sparse random Markov chain (learnable structure), verifier states attached."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    out: list[ExampleDict] = []
    for i in range(count):
        n = lengths[i % len(lengths)] if lengths else int(torch.randint(12, 40, (1,), generator=g))
        ids = [int(torch.randint(0, VOCAB, (1,), generator=g))]
        for _ in range(n - 1):
            ids.append(int(successors[ids[-1], int(torch.randint(0, 3, (1,), generator=g))]))
        token_ids = torch.tensor(ids, dtype=torch.int32)
        mask = torch.ones(n, dtype=torch.uint8)
        mask[: n // 4] = 0  # a "prompt" that is not trained on
        out.append(
            {
                "id": f"syn/{i}/0",
                "token_ids": token_ids,
                "loss_mask": mask,
                "hidden_states": capture(verifier, token_ids),
            }
        )
    return out


def write_store(path: Path, verifier_dir: Path, examples: Sequence[ExampleDict], shard_size: int = 4) -> Path:
    meta = StoreMeta(
        verifier=str(verifier_dir),
        layer_ids=LAYER_IDS,
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
        dtype="float32",
    )
    with DiskStore(path, meta=meta, shard_size=shard_size, allowed_roots=[path.parent]) as store:
        store.write(list(examples))
    return path


def small_world(root: Path, count: int) -> dict[str, Any]:
    """A verifier and a DiskStore of `count` examples of its states under `root`."""
    verifier = build_verifier(root / "verifier")
    write_store(root / "data", root / "verifier", make_examples(verifier, count))
    return {"root": root, "verifier": root / "verifier", "data": root / "data"}


def train_config(
    root: Path, verifier_dir: Path, data_dir: Path, output: str = "out", **overrides: Any
) -> TrainConfig:
    """A seconds-long CPU config; dotted `overrides` (e.g. `draft.algorithm="hass"`) on top."""
    base: dict[str, Any] = {
        "verifier": {"name_or_path": str(verifier_dir)},
        "data": {"path": str(data_dir), "validation_fraction": 0.0, "prefetch": 0},
        "draft": {"draft_vocab_size": 48},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "output_dir": str(root / output),
        "ttt_steps": 2,
        "tokens_per_step": 128,
        "max_seq_len": 64,
        "log_every": 1,
        "eval_every": 1000,
        "checkpoint_every": 1000,
        "device": "cpu",
        "allowed_roots": [str(root)],
    }
    return load_config(TrainConfig, base, {k.replace("__", "."): v for k, v in overrides.items()})


TRAIN_MAIN = """import sys
from specops.cli import build_parser, run_command
sys.exit(run_command(["train", *sys.argv[1:]], build_parser(only="train")))
"""


def train_cli(root: Path) -> list[str]:
    """argv (after the interpreter) that runs `specops train` through its command module, so a test
    depends on this command only, not on every module the dispatcher lists."""
    script = root / "specops_train.py"
    script.write_text(TRAIN_MAIN)
    return [str(script)]


def gloo_world(script: str, *args: str, ranks: int = 2, timeout: float = 240) -> list[str]:
    """Run `python -c script args` as every rank of a local CPU world; each rank's last stdout line."""
    base = {
        **os.environ,
        "WORLD_SIZE": str(ranks),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    base.update(PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(ranks)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [out.splitlines()[-1] for out, _ in outs]
