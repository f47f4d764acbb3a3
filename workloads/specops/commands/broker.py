"""`specops broker --bind tcp://0.0.0.0:5555 [--max-bytes N] [--state-dir DIR] ...`."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from specops.config import ConfigError

DEFAULT_BIND = "tcp://127.0.0.1:5555"
"""Loopback unless asked: a broker without CURVE serves anyone who reaches its port."""
_BIND = re.compile(r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.*-]+):(\d{1,5})", re.ASCII)


def bind_host(bind: str) -> str:
    """The host part of `--bind` (`*` is every interface), after checking the endpoint's form and
    port, so a typo is a one-line error rather than a ZeroMQ traceback or some other port."""
    match = _BIND.fullmatch(bind)
    if match is None or int(match[2]) > 65535:
        raise ConfigError(
            f"--bind: {bind!r} is not tcp://HOST:PORT with a port in 0..65535 (e.g. {DEFAULT_BIND})"
        )
    host = match[1].strip("[]")
    return "0.0.0.0" if host == "*" else host


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        help="ZeroMQ endpoint for generators and trainers (tcp://0.0.0.0:PORT for every interface)",
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
        "--metrics-host", help="address the metrics server listens on (default: the host of --bind)"
    )
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


def main(args: argparse.Namespace) -> int:
    import zmq

    from specops.paths import resolve_allowed
    from specops.stores.broker import Broker, BrokerConfig, serve
    from specops.stores.wire import MAX_RANGES, Timing, broker_keys, write_keys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roots = args.allowed_root
    if args.write_keys is not None:
        for path in write_keys(resolve_allowed(args.write_keys, roots, "--write-keys")):
            print(path)
        return 0
    if args.max_bytes < 1 << 20:
        raise ConfigError(f"--max-bytes: {args.max_bytes} is below the 1 MiB minimum")
    host = bind_host(args.bind)
    if args.ranges is not None and not 1 <= args.ranges <= MAX_RANGES:
        raise ConfigError(f"--ranges: {args.ranges} is not in 1..{MAX_RANGES}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port: {args.metrics_port} is not in 0..65535")
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
        metrics_host=args.metrics_host or host,
        exit_after_eos=args.exit_after_eos,
    )
    try:
        broker = Broker(config)
    except (zmq.ZMQError, OSError) as exc:
        raise ConfigError(f"--bind/--metrics-port: cannot listen on {config.bind}: {exc}") from None
    return serve(broker)
