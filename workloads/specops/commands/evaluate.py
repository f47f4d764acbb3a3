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
from pathlib import Path

from specops import exitcodes
from specops.commands import add_allowed_root


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

    from specops.eval_inputs import load_inputs
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
