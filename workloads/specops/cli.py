"""`specops`: train speculative-decoding drafts (EAGLE-3, HASS) for a verifier LLM.

Each command lives in `specops.commands.<name>` with `register(parser)` (argparse only, no heavy
imports, so `--help` is fast) and `main(args) -> int`. Commands that read a config take every
field as a flag (`specops.config_cli`); the rest of the argument list is theirs to refuse.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

import specops
from specops import config_cli, exitcodes
from specops.config import ConfigError

DESCRIPTION = (
    "SpecOps trains speculative-decoding drafts (EAGLE-3, HASS) for a verifier LLM: it captures the "
    "verifier's hidden states, trains the draft and checks its acceptance, on this machine or on "
    "Kubernetes, from the same YAML. The trained draft loads in `vllm serve --speculative-config`."
)
EPILOG = (
    "Start with `specops run examples/local/smollm2-sharegpt.yaml`, or `specops plan FILE` to see what a "
    "run will store and cost. `specops COMMAND --help` lists each command's options; for generate-data "
    "and train that is every config field (`--section.field VALUE`)."
)

COMMANDS: dict[str, str] = {
    "run": "Run a SpeculatorTraining YAML here (the same file kubectl takes): generate, train, evaluate.",
    "plan": "Say what a DataGen, Training or config YAML will store and cost, before any GPU starts.",
    "generate-data": "Run the verifier over datasets and store hidden states (disk, queue or broker).",
    "train": "Train an EAGLE-3 or HASS speculator on generated data.",
    "evaluate": "Measure a speculator's acceptance length against its verifier.",
    "push": "Upload a trained speculator with a generated model card to the Hugging Face Hub.",
    "fetch-verifier": "Download a Hub verifier once into a shared model cache (spec.modelCache).",
    "broker": "Run the ZeroMQ broker that streams examples from generators to trainers.",
    "convert": "Import research checkpoints or upstream speculators data, or export data back.",
    "crds": "Write the CustomResourceDefinitions for the Kubernetes operator.",
}


def _module(name: str) -> Any:
    return importlib.import_module(f"specops.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (`only`) just one command's parser under `specops`."""
    parser = argparse.ArgumentParser(
        prog="specops", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"specops {specops.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if only is None or name == only:
            command_parser = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
            _module(name).register(command_parser)
    return parser


def run_command(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> int:
    """Parse `argv` (`COMMAND ARGS...`) and run the command; errors print one line and exit 2."""
    argv = list(argv)
    parser = parser or build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if config_cli.takes_config(args):
            args.resolved_config = config_cli.resolve(args, argv, rest)
        elif rest:
            raise ConfigError(f"unrecognized arguments: {' '.join(rest)} (see specops {args.command} --help)")
        return int(_module(args.command).main(args))
    except KeyboardInterrupt:
        print(f"specops {args.command}: interrupted", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except Exception as exc:
        if exitcodes.classify(exc) is None:
            raise  # a bug: the traceback, exit 1 (retried)
        return exitcodes.fail(args.command, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes follow `specops.exitcodes`; nonzero ones are also recorded for the pod wrapper."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = run_command(argv)
    except SystemExit as exc:  # argparse: 2 on a usage error, 0 for --help / --version
        code = (
            exc.code if isinstance(exc.code, int) else exitcodes.OK if exc.code is None else exitcodes.FAILED
        )
    exitcodes.record(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
