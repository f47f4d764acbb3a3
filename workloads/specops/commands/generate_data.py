"""`specops generate-data [--config FILE] [--section.field VALUE ...] [--print-config]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from specops import exitcodes
from specops.config import DataGenConfig
from specops.config_cli import add_config_arguments, print_config


def register(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, DataGenConfig, "DataGenConfig")
    parser.epilog = (
        "Every field is a flag, in camelCase or snake_case: --engine.batchSize 4 --sync.path /data/out "
        "--run.numWorkers 2 --datasets.0.maxSamples 1000 (entries of a list by index). "
        "Prints one JSON report line on stdout. Exit codes: 0 done, 1 examples or workers failed "
        "(rerunning resumes and retries only what is missing), 2 config error, 3 the output directory "
        "holds another run's data."
    )


def main(args: argparse.Namespace) -> int:
    from specops.generate import GenerateError, generate_data

    cfg: DataGenConfig = args.resolved_config
    if args.print_config:
        print(print_config(cfg), end="")
        return exitcodes.OK
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = generate_data(cfg)
    except GenerateError as exc:
        print(json.dumps(exc.report.to_json()))
        print(f"specops generate-data: failed: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    except exitcodes.DataError as exc:  # e.g. sync.path holds another producer's examples
        return exitcodes.fail("generate-data", exc)
    print(json.dumps(report.to_json()))
    return exitcodes.OK
