"""`specops run FILE`: execute a SpeculatorTraining YAML with local processes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specops import exitcodes


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="YAML with a SpeculatorTraining (and its SpeculatorDataGen)")
    parser.add_argument(
        "--local",
        action="store_true",
        help="accepted for older scripts: running here, as local processes, is what `run` does",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: runs/<metadata.name>)"
    )
    parser.add_argument(
        "--nproc", type=int, default=None, help="training ranks (default: spec.procsPerNode or 1)"
    )
    parser.epilog = (
        "Stages: generate -> train -> evaluate -> report. Ctrl-C stops cleanly; rerunning resumes. "
        f"Exit {exitcodes.NOT_BETTER} when the trained draft is not better than an untrained one "
        "(or not lossless); the other codes follow `specops.exitcodes`."
    )


def main(args: argparse.Namespace) -> int:
    from specops.local_run import plan_local, run_local, summary

    plan = plan_local(args.file, args.out, args.nproc)
    report = run_local(plan)
    print(summary(report))
    if plan.evaluate and not (report["better_than_baseline"] and report["lossless"]):
        print(
            "specops run: the trained speculator is not better than the untrained baseline", file=sys.stderr
        )
        return exitcodes.NOT_BETTER
    return exitcodes.OK
