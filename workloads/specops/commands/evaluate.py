"""`specops evaluate --speculator DIR [--verifier ID_OR_DIR] --train-config FILE | --data PATH`.

Acceptance length on held-out prompts: with `--train-config` (what the operator's evaluation Job
passes) the prompts are the conversations that training's split kept out of training
(`specops.data.split`), read from its `data.path`; `--data` takes a store or prompt file as given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specops import exitcodes
from specops.commands import add_allowed_root
from specops.data.split import HeldOutSplit

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from specops.config import VerifierConfig
    from specops.models.eagle3 import Eagle3DraftModel


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speculator", required=True, help="speculator directory (config.json + model.safetensors) or Hub id"
    )
    parser.add_argument(
        "--verifier", help="verifier Hub id or directory; default: the one recorded in the speculator"
    )
    parser.add_argument("--gguf-file", help="GGUF file name inside the --verifier directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--train-config",
        type=Path,
        help="the TrainConfig YAML the speculator was trained with: evaluate on the conversations its "
        "split held out of training (data.path, data.validationFraction, seed)",
    )
    source.add_argument(
        "--data",
        help="prompts as given: a DiskStore directory, or JSON/JSONL rows with prompt_ids, messages or prompt",
    )
    parser.add_argument("--max-prompts", type=int, default=32, help="evaluate at most this many prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument(
        "--k", type=int, help="draft tokens per step; default: the speculator's speculative_tokens"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts decoded together (results do not depend on it)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--no-lossless-check", action="store_true", help="skip the plain greedy decoding check"
    )
    parser.add_argument(
        "--max-mismatch-rate",
        type=float,
        help="share of prompts whose output may differ from plain greedy decoding; default 0 in "
        "float32, 0.5 in bfloat16/float16 (rounding differs between batched and stepwise forwards)",
    )
    parser.add_argument("--output", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--engine",
        choices=["transformers", "vllm"],
        default="transformers",
        help="vllm: also serve the speculator with vLLM and report vLLM's own acceptance counters",
    )
    add_allowed_root(parser)
    parser.epilog = (
        "Prints one JSON report line (acceptance_length, per_position, lossless, ...). "
        "Exit codes: 0 lossless, 4 the speculative output differs from the verifier's greedy output "
        "for more than --max-mismatch-rate of the prompts, 2 bad arguments or speculator, 3 no usable "
        "prompts, 1 anything else."
    )


def main(args: argparse.Namespace) -> int:
    for name in ("max_prompts", "max_new_tokens", "k", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"specops evaluate: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return exitcodes.CONFIG
    rate = args.max_mismatch_rate
    if rate is not None and not 0.0 <= rate <= 1.0:
        print("specops evaluate: error: --max-mismatch-rate must be in [0, 1]", file=sys.stderr)
        return exitcodes.CONFIG
    if args.engine == "vllm":
        from specops.evaluate_vllm import main as evaluate_with_vllm

        return evaluate_with_vllm(args)

    from specops.evaluate import evaluate, write_report
    from specops.models.config import SpeculatorFormatError

    # Progress lines on stderr (stdout carries the JSON report).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        inputs = load_inputs(args)
        report = evaluate(
            inputs.model,
            inputs.draft,
            inputs.prompts,
            max_new_tokens=args.max_new_tokens,
            k=args.k,
            check_lossless=not args.no_lossless_check,
            batch_size=args.batch_size,
            max_mismatch_rate=args.max_mismatch_rate,
        )
    except (SpeculatorFormatError, ValueError, KeyError, FileNotFoundError) as exc:
        return exitcodes.fail("evaluate", exc, default=exitcodes.CONFIG)
    report.source = inputs.source
    print(json.dumps(report.to_dict()))
    if args.output:
        write_report(report, args.output)
    if not report.passed:
        print(f"specops evaluate: error: {report.mismatch_message()}", file=sys.stderr)
        return exitcodes.NOT_BETTER
    return exitcodes.OK


@dataclass
class EvalInputs:
    """What evaluation starts from with either engine, resolved and checked from the arguments."""

    speculator_dir: Path
    device: torch.device
    dtype: torch.dtype
    draft: Eagle3DraftModel
    verifier: VerifierConfig
    prompts: list[list[int]]
    source: dict[str, Any]
    """Where the prompts came from (`specops.evaluate.PromptSet.source`)."""
    model: PreTrainedModel


def load_inputs(args: argparse.Namespace) -> EvalInputs:
    """Speculator, verifier (the one the speculator records unless --verifier) and prompts.

    Raises ValueError/KeyError/SpeculatorFormatError with a message naming the argument at fault.
    """
    from specops.config import VerifierConfig
    from specops.evaluate import load_prompts
    from specops.models.eagle3 import Eagle3DraftModel
    from specops.paths import resolve_allowed
    from specops.verifier import (
        hub_snapshot,
        is_local,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )

    roots = args.allowed_root
    speculator_dir = (
        resolve_allowed(args.speculator, roots, "--speculator")
        if is_local(args.speculator)
        else Path(hub_snapshot(args.speculator, None, field="--speculator"))
    )
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    draft = Eagle3DraftModel.from_pretrained(speculator_dir, device=device)
    verifier_name = args.verifier or draft.config.spec.verifier.name_or_path
    if not verifier_name:
        raise ValueError("--verifier: the speculator records no verifier; pass one")
    verifier = VerifierConfig(name_or_path=verifier_name, gguf_file=args.gguf_file)
    data, split, field = args.data, None, "--data"
    if args.train_config is not None:
        data, split = held_out_of(args.train_config)
        field = "--train-config data.path"
    found = load_prompts(
        data,
        get_tokenizer=lambda: load_tokenizer(verifier, roots),
        allowed_roots=roots,
        limit=args.max_prompts,
        field=field,
        split=split,
    )
    if not found.prompts:
        held = " held-out" if split is not None else ""
        raise exitcodes.DataError(f"{field}: {data} holds no{held} prompts")
    model = load_model(verifier, dtype=dtype, device=device, allowed_roots=roots)
    return EvalInputs(speculator_dir, device, dtype, draft, verifier, found.prompts, found.source, model)


def held_out_of(train_config: Path) -> tuple[str, HeldOutSplit]:
    """The data a training read and the split that kept its held-out conversations out of it."""
    from specops.config import ConfigError, TrainConfig, load_config

    cfg = load_config(TrainConfig, train_config)
    if cfg.data.kind != "disk" or not cfg.data.path:
        raise ConfigError(
            f"--train-config: {train_config}: data.kind is {cfg.data.kind!r}; held-out prompts need a DiskStore"
        )
    if cfg.data.validation_fraction <= 0:
        raise ConfigError(
            f"--train-config: {train_config}: data.validationFraction is 0, so the training held out no "
            "conversation to evaluate on"
        )
    return cfg.data.path, HeldOutSplit(cfg.data.validation_fraction, cfg.seed)
