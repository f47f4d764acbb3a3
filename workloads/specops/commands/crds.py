"""`specops crds [--out DIR] [--check]`: write (or check) the CRDs generated from the API models."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("crds"), help="directory to write the CRDs into")
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")


def main(args: argparse.Namespace) -> int:
    from specops_operator.crdgen import run

    return run(args.out, args.check)
