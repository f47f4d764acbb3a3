"""Training throughput and peak memory on CPU: packed batches vs the naive padded baseline.

One invocation builds a tiny random Llama verifier and a DiskStore of examples whose lengths
follow a chat-like skew (many short, a few long), then trains one epoch over the same data twice,
each in a fresh child process so peak RSS is its own: `batching: packed` (documents share rows up
to `tokens_per_step`) and `batching: padded` (the same number of rows per batch, one example per
row, padded to the longest). Tokens/s counts real (non-padding) tokens over the training loop's
wall time. Prints one JSON line with both figures and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT_ENV = "SPECOPS_BENCH_TRAIN_ROOT"
VOCAB, HIDDEN, LAYERS = 2048, 128, 4
LAYER_IDS = (1, 2, 3, LAYERS)


def build_inputs(root: Path, examples: int, max_len: int, seed: int) -> int:
    """Verifier + DiskStore under `root`; returns the real tokens one epoch trains on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specops.stores.base import StoreMeta
    from specops.stores.disk import DiskStore

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4 * max_len,
    )
    LlamaForCausalLM(config).save_pretrained(root / "verifier")
    meta = StoreMeta(
        verifier=str(root / "verifier"),
        layer_ids=LAYER_IDS,
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        vocab_size=VOCAB,
        dtype="float32",
    )
    g = torch.Generator().manual_seed(seed)
    lengths = torch.distributions.LogNormal(4.6, 0.8).sample((examples,)).clamp(16, max_len).long()
    total = 0
    with DiskStore(root / "data", meta=meta, shard_size=16, allowed_roots=[root]) as store:
        for i, n in enumerate(lengths.tolist()):
            store.write(
                [
                    {
                        "id": f"bench/{i}/0",
                        "token_ids": torch.randint(0, VOCAB, (n,), generator=g, dtype=torch.int32),
                        "loss_mask": torch.ones(n, dtype=torch.uint8),
                        "hidden_states": torch.randn(n, len(LAYER_IDS), HIDDEN, generator=g),
                    }
                ]
            )
            total += n
    return total


def child(root: Path, batching: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one epoch with `batching`; this process's loop time, steps and peak RSS."""
    from specops.config import TrainConfig, load_config
    from specops.train.distributed import DistEnv
    from specops.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config(
        TrainConfig,
        {
            "verifier": {"name_or_path": str(root / "verifier")},
            "data": {"path": str(root / "data"), "validation_fraction": 0.0, "prefetch": 2},
            "draft": {"draft_vocab_size": VOCAB // 2},
            "output_dir": str(root / f"out-{batching}"),
            "ttt_steps": 3,
            "tokens_per_step": args.tokens_per_step,
            "max_seq_len": args.max_len,
            "batching": batching,
            "log_every": 1000,
            "eval_every": 100000,
            "checkpoint_every": 100000,
            "device": "cpu",
            "allowed_roots": [str(root)],
        },
    )
    trainer = Trainer(cfg, DistEnv())
    start = time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "steps": result.step,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["packed", "padded"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(os.environ[ROOT_ENV]), args.child, args)))
        return
    with tempfile.TemporaryDirectory(prefix="specops-bench-train-") as tmp:
        root = Path(tmp)
        tokens = build_inputs(root, args.examples, args.max_len, args.seed)
        runs = {}
        for batching in ("packed", "padded"):
            cmd = [sys.executable, __file__, "--child", batching, *sys.argv[1:]]
            done = subprocess.run(
                cmd, env={**os.environ, ROOT_ENV: tmp}, capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                sys.exit(f"bench/train.py: {batching} run failed:\n{done.stderr[-3000:]}")
            runs[batching] = json.loads(done.stdout.strip().splitlines()[-1])
    packed, padded = runs["packed"], runs["padded"]
    out = {
        "bench": "train",
        "device": "cpu",
        "threads": args.threads,
        "examples": args.examples,
        "real_tokens": tokens,
        "tokens_per_step": args.tokens_per_step,
        "max_seq_len": args.max_len,
        "packed_tokens_per_s": round(tokens / packed["seconds"], 1),
        "padded_tokens_per_s": round(tokens / padded["seconds"], 1),
        "packed_steps": packed["steps"],
        "padded_steps": padded["steps"],
        "packed_peak_rss_mb": round(packed["peak_rss_mb"], 1),
        "padded_peak_rss_mb": round(padded["peak_rss_mb"], 1),
        "speedup": round(padded["seconds"] / packed["seconds"], 3),
        "rss_ratio": round(packed["peak_rss_mb"] / padded["peak_rss_mb"], 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
