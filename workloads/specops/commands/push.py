"""`specops push DIR --repo ORG/NAME | --to s3://BUCKET/PREFIX`: a speculator with a generated
model card onto the Hub or into an object store."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from specops import exitcodes
from specops.commands import add_allowed_root

if TYPE_CHECKING:
    from specops.config import ExportConfig


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", help="speculator directory (config.json + model.safetensors), e.g. <outputDir>/final"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo", help="Hub repository ORG/NAME (created when missing)")
    target.add_argument(
        "--to", metavar="URI", help="object-store prefix s3://BUCKET/PREFIX (the bucket must exist)"
    )
    parser.add_argument("--revision", help="--repo: existing branch to commit to (default: main)")
    parser.add_argument("--private", action="store_true", help="--repo: create the repository private")
    parser.add_argument("--message", help="--repo: commit message")
    parser.add_argument("--endpoint-url", help="--to: S3-compatible endpoint (MinIO, on-premises)")
    parser.add_argument(
        "--eval-report",
        type=Path,
        help="`specops evaluate --output` JSON: its acceptance goes into the model card",
    )
    add_allowed_root(parser)
    parser.epilog = (
        "HF_TOKEN authenticates to the Hub, HF_ENDPOINT selects another Hub; AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or the machine's role) authenticate to the object store. "
        "Prints one JSON line: url, commit (null for an object store), files."
    )


def main(args: argparse.Namespace) -> int:
    from specops.config import ConfigError
    from specops.paths import resolve_allowed
    from specops.publish import publish, push

    try:
        target = export_target(args)
        directory = resolve_allowed(args.directory, args.allowed_root, "DIRECTORY")
        evaluation = None
        if args.eval_report is not None:
            report = resolve_allowed(str(args.eval_report), args.allowed_root, "--eval-report")
            try:
                evaluation = json.loads(report.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"--eval-report: {report}: {exc}") from None
        if target.hub is not None:
            hub = target.hub
            published = push(
                directory,
                hub.repo,
                revision=hub.revision,
                private=hub.private,
                message=args.message,
                evaluation=evaluation,
            )
        else:
            published = publish(directory, target, evaluation)
    except (ConfigError, FileNotFoundError, ConnectionError) as exc:
        return exitcodes.fail("push", exc)
    print(json.dumps(asdict(published)))
    return exitcodes.OK


FLAGS = {
    "hub.repo": ("--repo", "a Hub repository id (ORG/NAME)"),
    "hub.revision": ("--revision", "a branch name"),
    "uri": ("--to", "an object-store prefix (s3://BUCKET/PREFIX)"),
    "endpoint_url": ("--endpoint-url", "an http(s) URL"),
}


def export_target(args: argparse.Namespace) -> ExportConfig:
    """The flags as the `export` section they stand for (one model validates both); errors name the flag."""
    from pydantic import ValidationError

    from specops.config import ConfigError, ExportConfig

    if args.to is not None and (args.revision or args.private or args.message):
        raise ConfigError("--revision, --private and --message apply to --repo only")
    if args.repo is not None and args.endpoint_url:
        raise ConfigError("--endpoint-url applies to --to only")
    hub = {"repo": args.repo, "private": args.private, "revision": args.revision} if args.repo else None
    try:
        return ExportConfig.model_validate({"hub": hub, "uri": args.to, "endpoint_url": args.endpoint_url})
    except ValidationError as exc:
        error = exc.errors()[0]
        flag, expected = FLAGS[".".join(str(p) for p in error["loc"])]
        raise ConfigError(f"{flag}: {error.get('input')!r} is not {expected}") from None
