"""`python -m specops_operator crds --out crds` | `python -m specops_operator run [-A | -n NS ...]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from specops_operator import crdgen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specops-operator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    crds = sub.add_parser("crds", help="write the CustomResourceDefinitions generated from the API models")
    crdgen.add_arguments(crds)
    run = sub.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable)",
    )
    run.add_argument(
        "--liveness",
        default=os.environ.get("SPECOPS_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="liveness endpoint URL (empty: none)",
    )
    run.add_argument(
        "--workload-image",
        default=os.environ.get("SPECOPS_WORKLOAD_IMAGE"),
        help="image of workload pods whose CR names none (env SPECOPS_WORKLOAD_IMAGE)",
    )
    run.add_argument(
        "--refresh-interval",
        type=float,
        default=float(os.environ.get("SPECOPS_REFRESH_SECONDS", "30")),
        help="seconds between status refreshes of each resource",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("SPECOPS_METRICS_PORT", "0")),
        help="port of the Prometheus /metrics endpoint (default 0: none; the chart sets 8081)",
    )
    run.add_argument(
        "--allowed-images",
        default=os.environ.get("SPECOPS_ALLOWED_IMAGES"),
        help="JSON list of image prefixes CRs may name in pod.image, e.g. '[\"ghcr.io/acme/\"]' "
        "(env SPECOPS_ALLOWED_IMAGES; default: any image)",
    )
    run.add_argument(
        "--allowed-service-accounts",
        default=os.environ.get("SPECOPS_ALLOWED_SERVICE_ACCOUNTS"),
        help="JSON list of ServiceAccounts CRs may name in pod.serviceAccountName "
        "(env SPECOPS_ALLOWED_SERVICE_ACCOUNTS; default: any)",
    )
    run.add_argument(
        "--stream-metrics-from",
        default=os.environ.get("SPECOPS_STREAM_METRICS_FROM"),
        help="JSON list of NetworkPolicy peers that may scrape stream brokers' metrics port "
        "(env SPECOPS_STREAM_METRICS_FROM; default: none)",
    )
    run.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from specops.config import ConfigError
    from specops_operator.builders.common import DEFAULT_IMAGE, Defaults
    from specops_operator.handlers import Context, configure, register
    from specops_operator.trust import AllowList, parse_peers

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        allow = AllowList.parse(args.allowed_images, args.allowed_service_accounts)
        metrics_from = parse_peers(args.stream_metrics_from, "--stream-metrics-from")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    defaults = Defaults(image=args.workload_image or DEFAULT_IMAGE, metrics_from=metrics_from)
    ctx = Context(defaults=defaults, allow=allow, interval=args.refresh_interval)
    if args.metrics_port:
        ctx.metrics.serve(args.metrics_port)
    registry = kopf.OperatorRegistry()
    settings = kopf.OperatorSettings()
    configure(settings)
    register(registry, ctx)

    @kopf.on.login(registry=registry)
    def login(**kwargs: object) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # type: ignore[arg-type]

    asyncio.run(
        kopf.operator(
            registry=registry,
            settings=settings,
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "crds":
        return crdgen.run(args.out, args.check)
    return run_operator(args)


if __name__ == "__main__":
    sys.exit(main())
