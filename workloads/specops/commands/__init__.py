"""One module per CLI command: `register(parser)` and `main(args) -> int`."""

from __future__ import annotations

import argparse


def add_allowed_root(parser: argparse.ArgumentParser) -> None:
    """`--allowed-root DIR` (repeatable): the roots local paths given to the command must lie under."""
    parser.add_argument(
        "--allowed-root", action="append", default=[], help="allowed root for local paths (repeatable)"
    )
