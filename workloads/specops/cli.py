"""`specops` command line: a thin dispatcher over `specops.commands.<name>` modules.

Each command module defines `register(parser)` (argparse only, no heavy imports) and
`main(args, overrides) -> int`; heavy libraries are imported inside `main`, so `specops --help`
stays fast. Unknown `--section.field value` arguments become dotted config overrides.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from specops import exitcodes
from specops.config import ConfigError, parse_override_value

COMMANDS: dict[str, str] = {
    "generate-data": "Run the verifier over datasets and store hidden states (disk, queue or broker).",
    "broker": "Run the ZeroMQ broker between generators and trainers.",
    "train": "Train an EAGLE-3 or HASS speculator.",
    "evaluate": "Measure acceptance length of a speculator against its verifier.",
    "convert": "Import research checkpoints or upstream data into SpecOps formats.",
    "push": "Upload a trained speculator with a generated model card to the Hugging Face Hub.",
    "fetch-verifier": "Download a Hub verifier once into a shared model cache (spec.modelCache).",
    "run": "Execute a SpeculatorTraining YAML locally (the same file kubectl takes).",
    "crds": "Write the CustomResourceDefinitions generated from the API models.",
}


def split_overrides(rest: Sequence[str]) -> dict[str, Any]:
    """`--engine.batch_size 4 --sync.path=x` -> {"engine.batch_size": 4, "sync.path": "x"}."""
    overrides: dict[str, Any] = {}
    items = list(rest)
    while items:
        flag = items.pop(0)
        if not flag.startswith("--") or "." not in flag:
            raise ConfigError(f"unexpected argument {flag!r}; overrides look like --section.field VALUE")
        key, eq, value = flag[2:].partition("=")
        if not eq:
            if not items:
                raise ConfigError(f"override {flag} needs a value")
            value = items.pop(0)
        overrides[key] = parse_override_value(value)
    return overrides


def _module(name: str) -> Any:
    return importlib.import_module(f"specops.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        _module(name).register(command_parser)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = split_overrides(rest)
        return int(_module(args.command).main(args, overrides))
    except KeyboardInterrupt:
        print(f"specops {args.command}: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except Exception as exc:
        if exitcodes.classify(exc) is None:
            raise  # a bug: the traceback, exit 1 (retried)
        return exitcodes.fail(args.command, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes follow `specops.exitcodes`; nonzero ones are also recorded for the pod wrapper."""
    try:
        code = _run(argv)
    except SystemExit as exc:  # argparse: 2 on a usage error, 0 for --help
        code = (
            exc.code if isinstance(exc.code, int) else exitcodes.OK if exc.code is None else exitcodes.FAILED
        )
    exitcodes.record(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
