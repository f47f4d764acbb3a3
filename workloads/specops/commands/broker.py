"""`specops broker --bind tcp://0.0.0.0:5555 [--max-bytes N] [--state-dir DIR] ...`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from specops.config import ConfigError


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bind", default="tcp://0.0.0.0:5555", help="ZeroMQ endpoint for generators and trainers"
    )
    parser.add_argument(
        "--max-bytes", type=int, default=2 << 30, help="example bytes held at once (sync.maxBrokerBytes)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="journal of delivered ids and finished ranges; a restart on it loses and repeats nothing",
    )
    parser.add_argument("--ranges", type=int, help="split the input into this many claimable ranges")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    parser.add_argument(
        "--curve-key-dir", type=Path, help="require CURVE: broker.key_secret + authorized *.key"
    )
    parser.add_argument("--heartbeat-s", type=float, default=1.0, help="client heartbeat interval")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="a client silent this long is gone")
    parser.add_argument(
        "--exit-after-eos",
        action="store_true",
        help="exit once the stream ended and no client has come for --timeout-s",
    )
    parser.add_argument(
        "--allowed-root",
        action="append",
        default=[],
        help="roots the directories must lie under (repeatable)",
    )
    parser.add_argument(
        "--write-keys", type=Path, metavar="DIR", help="create broker and client CURVE keys in DIR and exit"
    )
    parser.epilog = (
        "One broker serves one stream. Mount --state-dir on a volume that outlives the process (an "
        "emptyDir survives container restarts) so a restarted broker continues the stream."
    )


def main(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from specops.paths import resolve_allowed
    from specops.stores.broker import BrokerConfig, serve
    from specops.stores.wire import Timing, broker_keys, write_keys

    if overrides:
        raise ConfigError(f"specops broker takes no config overrides, got {sorted(overrides)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roots = args.allowed_root
    if args.write_keys is not None:
        for path in write_keys(resolve_allowed(args.write_keys, roots, "--write-keys")):
            print(path)
        return 0
    if args.max_bytes < 1 << 20:
        raise ConfigError(f"--max-bytes: {args.max_bytes} is below the 1 MiB minimum")
    try:
        timing = Timing(args.heartbeat_s, args.timeout_s)
    except ValueError as exc:
        raise ConfigError(f"--heartbeat-s/--timeout-s: {exc}") from None
    config = BrokerConfig(
        bind=args.bind,
        max_bytes=args.max_bytes,
        state_dir=resolve_allowed(args.state_dir, roots, "--state-dir") if args.state_dir else None,
        ranges=args.ranges,
        timing=timing,
        curve=broker_keys(resolve_allowed(args.curve_key_dir, roots, "--curve-key-dir"))
        if args.curve_key_dir
        else None,
        metrics_port=args.metrics_port,
        exit_after_eos=args.exit_after_eos,
    )
    return serve(config)
