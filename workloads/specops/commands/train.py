"""`specops train [--config FILE] [--section.field VALUE ...] [--print-config]`, alone or under torchrun."""

from __future__ import annotations

import argparse
import json
import logging
import os

from specops import exitcodes
from specops.config import TrainConfig
from specops.config_cli import add_config_arguments, print_config


def register(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig, "TrainConfig")
    parser.epilog = (
        "Every field is a flag, in camelCase or snake_case: --epochs 2 --optim.lr 3e-4 "
        "--draft.algorithm hass. Run under `torchrun --nproc-per-node N` for "
        "data parallelism. Rerunning with the same outputDir resumes from its newest checkpoint. "
        "Rank 0 prints one JSON result line on stdout. Exit codes: 0 done, 2 config error, 3 unusable "
        "data or checkpoint state, 143 stopped by SIGTERM after a checkpoint, 1 anything else."
    )


def main(args: argparse.Namespace) -> int:
    cfg: TrainConfig = args.resolved_config
    if args.print_config:
        print(print_config(cfg), end="")
        return exitcodes.OK
    from specops.train.monitor import rank0_stderr_to_stdout
    from specops.train.trainer import train

    merged = rank0_stderr_to_stdout()  # the reader of stdout stamps each line with its own time
    stamp = "" if merged else "%(asctime)s "
    logging.basicConfig(level=logging.INFO, format=stamp + "%(levelname)s %(name)s: %(message)s")
    try:
        result = train(cfg)
    except (ValueError, KeyError) as exc:  # the trainer's checks of config against data
        return exitcodes.fail("train", exc, default=exitcodes.CONFIG)
    if os.environ.get("RANK", "0") == "0":
        report = {
            "step": result.step,
            "interrupted": result.interrupted,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "final": str(result.final) if result.final else None,
            "best": str(result.best) if result.best else None,
            "best_val_loss": result.best_val_loss,
        }
        print(json.dumps(report), flush=True)
    # A preempted run is not a finished one: Kubernetes retries it and the rerun resumes.
    return exitcodes.TERMINATED if result.interrupted else exitcodes.OK
