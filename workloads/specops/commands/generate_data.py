"""`specops generate-data --config path.yaml [--engine.* --sync.* --run.* ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, type=Path, help="DataGenConfig YAML file")
    parser.epilog = (
        "Any config field can be overridden as --section.field VALUE, e.g. --engine.batch_size 4 "
        "--sync.path /data/out --run.num_workers 2 --run.shard_index 3 --run.num_shards 8. "
        "Prints one JSON report line on stdout; exits 1 when examples or workers failed "
        "(rerunning resumes and retries only what is missing)."
    )


def main(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from specops.generate import GenerateError, generate_data
    from specops.stores.manifest import StoreMetaMismatchError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        report = generate_data(args.config, **overrides)
    except GenerateError as exc:
        print(json.dumps(exc.report.to_json()))
        print(f"specops generate-data: failed: {exc}", file=sys.stderr)
        return 1
    except StoreMetaMismatchError as exc:
        print(f"specops generate-data: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json()))
    return 0
