"""`specops crds [--out DIR] [--check]`: write (or check) the CRDs generated from the API models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from specops import exitcodes


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("crds"), help="directory to write the CRDs into")
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")


def main(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    if overrides:
        print(f"specops crds: error: unknown options {sorted(overrides)}")
        return exitcodes.CONFIG
    from specops_operator.crdgen import run

    return run(args.out, args.check)
