"""`specops generate-data --config path.yaml [--engine.* --sync.* --run.* ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from specops import exitcodes


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="DataGenConfig YAML file")
    parser.epilog = (
        "Any config field can be overridden as --section.field VALUE, e.g. --engine.batch_size 4 "
        "--sync.path /data/out --run.num_workers 2 --run.shard_index 3 --run.num_shards 8. "
        "Prints one JSON report line on stdout. Exit codes: 0 done, 1 examples or workers failed "
        "(rerunning resumes and retries only what is missing), 2 config error, 3 the output directory "
        "holds another run's data."
    )


def main(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from specops.generate import GenerateError, generate_data

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = generate_data(args.config, **overrides)
    except GenerateError as exc:
        print(json.dumps(exc.report.to_json()))
        print(f"specops generate-data: failed: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    except exitcodes.DataError as exc:  # e.g. sync.path holds another producer's examples
        return exitcodes.fail("generate-data", exc)
    print(json.dumps(report.to_json()))
    return exitcodes.OK
