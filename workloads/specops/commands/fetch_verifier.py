"""`specops fetch-verifier --verifier ID [--revision REV] --cache-dir DIR`: fill a shared model cache.

The operator's download step for `spec.modelCache`: one pod runs this into the claim, and every
generator, trainer and evaluator then reads the claim read-only (`$SPECOPS_MODEL_CACHE`), so a run
pulls its verifier once instead of once per pod. It uses the very resolution code the pods use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from specops import exitcodes


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verifier", required=True, help="Hub model id, e.g. meta-llama/Llama-3.1-8B-Instruct"
    )
    parser.add_argument("--revision", help="branch, tag or commit; default: main")
    parser.add_argument(
        "--cache-dir", required=True, type=Path, help="Hugging Face Hub cache directory to fill (created)"
    )
    parser.epilog = (
        "Prints one JSON report line (verifier, revision commit, path, files, bytes). Files already in "
        "the cache are not downloaded again. Exit codes: 0 cached, 2 not a Hub id, access refused, no "
        "such model or revision, 1 the Hub cannot be reached (retry)."
    )


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from specops.config import ConfigError, VerifierConfig, format_validation_error
    from specops.verifier import fetch_snapshot

    try:
        verifier = VerifierConfig(name_or_path=args.verifier, revision=args.revision)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "--verifier/--revision")) from None
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    fetched = fetch_snapshot(verifier, str(args.cache_dir))
    print(json.dumps(dataclasses.asdict(fetched)), flush=True)
    return exitcodes.OK
