"""Operator bench: latency from CR creation to all children existing (p50/p95), operator RSS.

`python bench/operator.py [--crs 200] [--rate 25]` prints one JSON line. The operator runs as a
subprocess (`python -m specops_operator run -A`), exactly as in its image, against a target API
server: the in-memory one (kmock + `specops_operator.emulator`), or with `--real` a real
kube-apiserver + kube-controller-manager (hack/control-plane, v1.20.2). The baseline, measured in
the same invocation against the same server, is a client creating the same three children of a
CR directly (the least any controller must do); `ratio_p50` = operator p50 / baseline p50.
RSS is measured idle (operator started, no CRs) and after all CRs were reconciled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from specops.testing.net import free_port
from specops_operator.api import SpeculatorDataGen, load_resources
from specops_operator.builders.common import Defaults
from specops_operator.builders.datagen import build_datagen
from specops_operator.kube import PLURALS, collection_path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "datagen-offline.yaml"
CHILDREN = (
    ("v1", "ConfigMap", "{}-gen"),
    ("v1", "PersistentVolumeClaim", "{}-data"),
    ("batch/v1", "Job", "{}-gen"),
)


@dataclass
class Target:
    """An API server the bench and the operator both talk to."""

    url: str
    kubeconfig: Path

    def request_options(self) -> dict[str, Any]:
        """Extra aiohttp request arguments (credentials, TLS); none for the in-memory server."""
        return {}

    async def post(self, session: aiohttp.ClientSession, obj: dict[str, Any]) -> None:
        path = collection_path(obj["apiVersion"], obj["kind"], obj["metadata"]["namespace"])
        async with session.post(self.url + path, json=obj, **self.request_options()) as response:
            if response.status >= 300:
                raise RuntimeError(f"POST {path}: {response.status} {await response.text()}")

    async def children(self, session: aiohttp.ClientSession, namespace: str) -> dict[str, set[str]]:
        """Names of the child kinds that exist now (one list call per kind)."""
        out = {}
        for api_version, kind, _ in CHILDREN:
            path = collection_path(api_version, kind, namespace)
            async with session.get(self.url + path, **self.request_options()) as response:
                data = await response.json(content_type=None)
            out[kind] = {item["metadata"]["name"] for item in data.get("items") or []}
        return out


@dataclass
class KmockTarget(Target):
    """The in-memory server: children are read from its store, so polling does not load the server."""

    emulator: Any = None

    async def children(self, session: aiohttp.ClientSession, namespace: str) -> dict[str, set[str]]:
        plurals = {kind: PLURALS[kind] for _, kind, _ in CHILDREN}
        out: dict[str, set[str]] = {kind: set() for kind in plurals}
        for (resource, ns, name), obj in list(self.emulator.objects.items()):
            for kind, plural in plurals.items():
                if resource.plural == plural and ns == namespace and not obj.deleted:
                    out[kind].add(name)
        return out


def _kubeconfig(url: str, directory: Path) -> Path:
    path = directory / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bench", "cluster": {"server": url}}],
        "users": [{"name": "bench", "user": {"token": "bench"}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}],
        "current-context": "bench",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.asynccontextmanager
async def kmock_target(directory: Path) -> AsyncIterator[KmockTarget]:
    """The in-memory API server, served from this process's event loop."""
    import kmock

    from specops_operator.emulator import StampingEmulator

    emulator = StampingEmulator()
    emulator.history = 16
    emulator.declare_resources()
    async with emulator, kmock.Server(emulator) as server:
        url = str(server.url).rstrip("/")
        yield KmockTarget(url, _kubeconfig(url, directory), emulator)


# --------------------------------------------------------------------------- real control plane
# (platform; `--real`): hack/control-plane's kube-apiserver + controller-manager (v1.20.2).


@dataclass
class RealTarget(Target):
    """A real API server: bearer token, self-signed TLS; children seen through watches."""

    token: str = ""
    seen: dict[str, set[str]] = field(default_factory=dict)

    def request_options(self) -> dict[str, Any]:
        return {"headers": {"Authorization": f"Bearer {self.token}"}, "ssl": False}

    async def watch(
        self, session: aiohttp.ClientSession, api_version: str, kind: str, namespace: str
    ) -> None:
        """Record the names of `kind` objects as the server announces them (no list polling)."""
        names = self.seen.setdefault(kind, set())
        path = collection_path(api_version, kind, namespace)
        params = {"watch": "1", "timeoutSeconds": "3600"}
        async with session.get(self.url + path, params=params, **self.request_options()) as response:
            async for line in response.content:
                event = json.loads(line)
                if event.get("type") == "ADDED":
                    names.add(event["object"]["metadata"]["name"])

    async def children(self, session: aiohttp.ClientSession, namespace: str) -> dict[str, set[str]]:
        return {kind: set(self.seen.get(kind, ())) for _, kind, _ in CHILDREN}


def _run_script(*args: str | Path) -> str:
    """Its stdout; its stderr (a cold build's progress, a failure's reason) passes through."""
    return subprocess.run([str(a) for a in args], check=True, stdout=subprocess.PIPE, text=True).stdout


@contextlib.asynccontextmanager
async def real_target(directory: Path) -> AsyncIterator[RealTarget]:
    """Build (once, cached) and start the control plane, apply our CRDs, watch the bench namespace."""
    hack = ROOT / "hack"
    _run_script(hack / "control-plane" / "build.sh")
    tools = Path(_run_script(hack / "tools.sh").strip().splitlines()[-1])
    state = directory / "control-plane"
    _run_script(hack / "control-plane" / "up.sh", "--owner", str(os.getpid()), str(state))
    try:
        env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)
        kubeconfig = Path(env["KUBECONFIG"])
        kubectl = [str(tools / "kubectl"), "--kubeconfig", str(kubeconfig)]
        # v1.20's CRD schema lacks x-kubernetes-validations: skip kubectl's client-side check.
        subprocess.run(
            [*kubectl, "apply", "--validate=false", "-f", str(ROOT / "crds")], check=True, capture_output=True
        )
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Established", "-f", str(ROOT / "crds")],
            check=True,
            capture_output=True,
        )
        subprocess.run([*kubectl, "create", "namespace", "bench"], check=True, capture_output=True)
        subprocess.run([*kubectl, "create", "namespace", "baseline"], check=True, capture_output=True)
        target = RealTarget(env["SERVER"], kubeconfig, token=env["ADMIN_TOKEN"])
        async with aiohttp.ClientSession() as session:
            watches = [
                asyncio.create_task(target.watch(session, api_version, kind, "bench"))
                for api_version, kind, _ in CHILDREN
            ]
            try:
                yield target
            finally:
                for task in watches:
                    task.cancel()
                await asyncio.gather(*watches, return_exceptions=True)
    finally:
        _run_script(hack / "control-plane" / "down.sh", str(state))


def _cr(name: str, namespace: str) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    return doc


def _percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


async def baseline(target: Target, session: aiohttp.ClientSession, count: int) -> list[float]:
    """Seconds a client needs to create one CR's three children itself."""
    latencies = []
    for i in range(count):
        cr = load_resources(yaml.safe_dump(_cr(f"base-{i:04d}", "baseline")))[0]
        assert isinstance(cr, SpeculatorDataGen)
        cr.metadata.uid = f"uid-{i}"
        children = build_datagen(cr, Defaults())
        start = time.perf_counter()
        for child in children:
            await target.post(session, child)
        latencies.append(time.perf_counter() - start)
    return latencies


def start_operator(target: Target, log: Path, interval: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    liveness = f"http://127.0.0.1:{port}/healthz"
    env = {**os.environ, "KUBECONFIG": str(target.kubeconfig)}
    command = [sys.executable, "-m", "specops_operator", "run", "-A", "--liveness", liveness]
    command += ["--refresh-interval", str(interval)]
    process = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return process, liveness


async def wait_alive(process: subprocess.Popen[bytes], liveness: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited with {process.returncode}")
        try:
            await asyncio.to_thread(urllib.request.urlopen, liveness, None, 1)
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise RuntimeError("the operator did not become live")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        open_target = real_target if args.real else kmock_target
        async with open_target(directory) as target, aiohttp.ClientSession() as session:
            base = await baseline(target, session, args.baseline)
            log = args.operator_log or directory / "operator.log"
            process, liveness = start_operator(target, log, args.refresh_interval)
            try:
                await wait_alive(process, liveness)
                await asyncio.sleep(1.0)
                rss_idle = psutil.Process(process.pid).memory_info().rss
                created: dict[str, float] = {}
                done: dict[str, float] = {}

                async def create_all() -> None:
                    for i in range(args.crs):
                        name = f"bench-{i:04d}"
                        created[name] = time.perf_counter()
                        await target.post(session, _cr(name, "bench"))
                        await asyncio.sleep(1.0 / args.rate)

                async def watch_children() -> None:
                    deadline = time.perf_counter() + args.timeout
                    while len(done) < args.crs and time.perf_counter() < deadline:
                        kinds = await target.children(session, "bench")
                        now = time.perf_counter()
                        for name in list(created):
                            if name not in done and all(p.format(name) in kinds[k] for _, k, p in CHILDREN):
                                done[name] = now
                        await asyncio.sleep(0.05)

                start = time.perf_counter()
                await asyncio.gather(create_all(), watch_children())
                elapsed = time.perf_counter() - start
                await asyncio.sleep(2.0)
                rss = psutil.Process(process.pid).memory_info().rss
            finally:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    latencies = [done[n] - created[n] for n in done]
    if len(latencies) < args.crs:
        raise RuntimeError(f"only {len(latencies)}/{args.crs} CRs got all children within {args.timeout}s")
    p50, p95 = _percentiles(latencies)
    b50, b95 = _percentiles(base)
    return {
        "bench": "operator",
        "target": "real-v1.20" if args.real else "kmock",
        "crs": args.crs,
        "children_per_cr": len(CHILDREN),
        "rate_per_s": args.rate,
        "latency_p50_s": round(p50, 4),
        "latency_p95_s": round(p95, 4),
        "baseline_p50_s": round(b50, 4),
        "baseline_p95_s": round(b95, 4),
        "ratio_p50": round(p50 / b50, 2),
        "crs_per_s": round(args.crs / elapsed, 1),
        "rss_idle_mb": round(rss_idle / 2**20, 1),
        "rss_mb": round(rss / 2**20, 1),
        "rss_ratio": round(rss / rss_idle, 2),
        "rss_per_cr_kb": round((rss - rss_idle) / args.crs / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crs", type=int, default=200, help="custom resources to create")
    parser.add_argument("--rate", type=float, default=10.0, help="CRs created per second")
    parser.add_argument(
        "--baseline", type=int, default=50, help="CRs whose children the client creates itself"
    )
    parser.add_argument(
        "--refresh-interval", type=float, default=30.0, help="operator status refresh seconds"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--operator-log", type=Path, help="keep the operator's log here")
    parser.add_argument(
        "--real", action="store_true", help="against a real control plane (built once by hack/control-plane)"
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
