"""`specops push DIR --repo ORG/NAME`: a speculator with a generated model card onto the Hub."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from specops import exitcodes
from specops.commands import add_allowed_root


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", help="speculator directory (config.json + model.safetensors), e.g. <outputDir>/final"
    )
    parser.add_argument("--repo", required=True, help="Hub repository ORG/NAME (created when missing)")
    parser.add_argument("--revision", help="branch to commit to (default: main)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--message", help="commit message")
    parser.add_argument(
        "--eval-report",
        type=Path,
        help="`specops evaluate --output` JSON: its acceptance goes into the model card",
    )
    add_allowed_root(parser)
    parser.epilog = (
        "HF_TOKEN authenticates; HF_ENDPOINT selects another Hub. Prints one JSON line: url, commit, files."
    )


def main(args: argparse.Namespace) -> int:
    from specops.config import ConfigError
    from specops.paths import resolve_allowed
    from specops.publish import REPO_ID, push

    try:
        if not REPO_ID.match(args.repo):
            raise ConfigError(f"--repo: {args.repo!r} is not a Hub repository id (ORG/NAME)")
        directory = resolve_allowed(args.directory, args.allowed_root, "DIRECTORY")
        evaluation = None
        if args.eval_report is not None:
            report = resolve_allowed(str(args.eval_report), args.allowed_root, "--eval-report")
            try:
                evaluation = json.loads(report.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"--eval-report: {report}: {exc}") from None
        published = push(
            directory,
            args.repo,
            revision=args.revision,
            private=args.private,
            message=args.message,
            evaluation=evaluation,
        )
    except (ConfigError, FileNotFoundError, ConnectionError) as exc:
        return exitcodes.fail("push", exc)
    print(json.dumps(asdict(published)))
    return exitcodes.OK
