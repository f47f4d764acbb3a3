"""`specops train --config train.yaml [--section.field VALUE ...]`, alone or under torchrun."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from specops import exitcodes


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig YAML file")
    parser.epilog = (
        "Any config field can be overridden as --section.field VALUE, e.g. --optim.lr 3e-4 "
        "--draft.algorithm hass. Run under `torchrun --nproc-per-node N` for "
        "data parallelism. Rerunning with the same output_dir resumes from its newest checkpoint. "
        "Rank 0 prints one JSON result line on stdout. Exit codes: 0 done, 2 config error, 3 unusable "
        "data or checkpoint state, 143 stopped by SIGTERM after a checkpoint, 1 anything else."
    )


def main(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from specops.config import TrainConfig, load_config
    from specops.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(TrainConfig, args.config, overrides)
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
