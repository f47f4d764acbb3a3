"""`specops convert eagle3|import-data|export-data`: bring outside formats into SpecOps and back."""

from __future__ import annotations

import argparse
import json
from typing import Any

from specops import exitcodes
from specops.commands import add_allowed_root


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    eagle = sub.add_parser("eagle3", help="SafeAILab EAGLE-3 research checkpoint -> speculators format")
    eagle.add_argument("--input", required=True, help="research checkpoint directory (config.json + weights)")
    eagle.add_argument("--output", required=True, help="speculator directory to write")
    eagle.add_argument("--verifier", required=True, help="local verifier directory the draft was trained for")
    eagle.add_argument("--verifier-name", help="verifier id recorded for vLLM; default: --verifier")
    eagle.add_argument("--speculative-tokens", type=int, default=3, help="k written to the greedy proposal")
    eagle.add_argument("--algorithm", choices=["eagle3", "hass"], default="eagle3")
    eagle.add_argument(
        "--aux-layers",
        help="comma-separated verifier layer ids; default: the checkpoint's, else [2, N//2, N-3]",
    )
    imp = sub.add_parser("import-data", help="upstream speculators hs_{i} layout -> DiskStore")
    imp.add_argument("--input", required=True)
    imp.add_argument("--output", required=True)
    exp = sub.add_parser("export-data", help="DiskStore -> upstream speculators hs_{i} layout")
    exp.add_argument("--input", required=True)
    exp.add_argument("--output", required=True)
    for command in (eagle, imp, exp):
        add_allowed_root(command)


def main(args: argparse.Namespace) -> int:
    from specops.models.config import SpeculatorFormatError

    try:
        result = _run(args)
    except (SpeculatorFormatError, ValueError, KeyError) as exc:
        return exitcodes.fail(f"convert {args.what}", exc, default=exitcodes.CONFIG)
    print(json.dumps(result))
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from specops.paths import resolve_allowed

    roots = args.allowed_root
    source = resolve_allowed(args.input, roots, "--input")
    if args.what == "eagle3":
        from specops.models.convert import convert_research_checkpoint

        if args.speculative_tokens < 1:
            raise ValueError("--speculative-tokens must be >= 1")
        layers = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
        output = resolve_allowed(args.output, roots, "--output")
        model = convert_research_checkpoint(
            source,
            output,
            verifier=resolve_allowed(args.verifier, roots, "--verifier"),
            verifier_name_or_path=args.verifier_name,
            speculative_tokens=args.speculative_tokens,
            algorithm=args.algorithm,
            aux_layer_ids=layers,
        )
        return {"output": str(output), "draft_vocab_size": model.config.draft_vocab_size}
    if args.what == "import-data":
        from specops.stores.speculators_layout import import_speculators

        return {"examples": import_speculators(source, args.output, allowed_roots=roots)}
    from specops.stores.disk import DiskStore
    from specops.stores.speculators_layout import export_speculators

    store = DiskStore.open(source, roots, field="--input")
    return {"examples": export_speculators(store, args.output, allowed_roots=roots)}
