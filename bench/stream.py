"""Throughput of a broker stream (generators, `specops broker`, consumer, acks on) vs raw ZeroMQ PUSH/PULL.

Every path carries the same frames (codec header + raw bf16 tensor buffers, `copy=False`) over TCP
loopback from the same number of generator processes into one consumer in this process. The
broker stream runs twice: `relay` (the bytes go through the broker) and `direct` (the broker only
leases, the generators send to the consumer's own endpoint). Payloads: large (S=2048, L=4,
H=4096 bf16, 64 MiB per example) and small (S=256, L=4, H=1024, 2 MiB). Also measured: the
broker's peak RSS against its byte budget, and the consumer's idle fraction when the generators
are faster than it (a consumer that "trains" for a fixed time per example).

Prints one JSON line; `ratio` is direct / raw examples per second for the large payload,
`ratio_relay` the same for the relay.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from specops.example import ExampleDict
from specops.stores.base import StoreMeta
from specops.stores.codec import decode, encode
from specops.stores.zmq import ZmqSource, ZmqStore
from specops.testing.net import free_port

FORK = multiprocessing.get_context("fork")  # children skip the torch import; no zmq context exists yet
LAYERS = (2, 16, 29, 32)
PATHS = ("relay", "direct")
"""The broker stream's data paths: through the broker, or generators straight to the consumer."""


def payload(seq: int, hidden: int) -> ExampleDict:
    """One example's tensors (random bits, so nothing compresses by accident)."""
    bits = torch.randint(-(2**15), 2**15 - 1, (seq * len(LAYERS) * hidden,), dtype=torch.int16)
    return {
        "id": "",
        "token_ids": torch.arange(seq, dtype=torch.int32),
        "loss_mask": torch.ones(seq, dtype=torch.uint8),
        "hidden_states": bits.view(torch.bfloat16).reshape(seq, len(LAYERS), hidden),
    }


def numbered(base: ExampleDict, i: int) -> ExampleDict:
    """The same tensors under example id `bench/<i>/0` (nothing is copied)."""
    return {**base, "id": f"bench/{i}/0"}


def tensor_bytes(ex: ExampleDict) -> int:
    return sum(ex[k].numel() * ex[k].element_size() for k in ("token_ids", "loss_mask", "hidden_states"))


def meta_for(hidden: int) -> StoreMeta:
    return StoreMeta(
        verifier="bench",
        layer_ids=LAYERS,
        num_layers=32,
        hidden_size=hidden,
        vocab_size=32000,
        dtype="bfloat16",
    )


def my_ids(count: int, index: int, generators: int) -> list[int]:
    return list(range(index, count, generators))


# --------------------------------------------------------------------------- raw PUSH/PULL


def raw_producer(url: str, ids: list[int], seq: int, hidden: int, hwm: int, start: Any) -> None:
    torch.set_num_threads(1)
    base = payload(seq, hidden)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, hwm)
    push.connect(url)
    start.wait()
    for i in ids:
        header, buffers = encode(numbered(base, i), LAYERS)
        push.send_multipart([header, *buffers], copy=False)
    push.send(b"")  # this producer is done
    push.close(linger=-1)
    ctx.term()


def run_raw(count: int, generators: int, seq: int, hidden: int, hwm: int) -> dict[str, float]:
    url = f"tcp://127.0.0.1:{free_port()}"
    start = FORK.Barrier(generators + 1)
    procs = [
        FORK.Process(target=raw_producer, args=(url, my_ids(count, g, generators), seq, hidden, hwm, start))
        for g in range(generators)
    ]
    for p in procs:
        p.start()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, hwm)
    pull.bind(url)
    start.wait()
    arrivals: list[float] = [time.perf_counter()]
    nbytes = 0
    finished = 0
    while finished < generators:
        frames = pull.recv_multipart(copy=False)
        if len(frames) == 1:
            finished += 1
            continue
        ex = decode(frames[0].buffer, [f.buffer for f in frames[1:]])
        nbytes += sum(len(f) for f in frames[1:])
        arrivals.append(time.perf_counter())
        del ex
    pull.close()
    ctx.term()
    for p in procs:
        p.join()
    return rates(arrivals, nbytes)


def rates(times: list[float], nbytes: int) -> dict[str, float]:
    """`times` = [start, arrival 1, ..., arrival n]: everything from the start signal to the last
    example, pipeline fill included, the same way for both paths."""
    n = len(times) - 1
    span = max(times[-1] - times[0], 1e-9)
    return {"examples": n, "examples_per_s": round(n / span, 2), "gb": nbytes / 1e9, "seconds": span}


def combined(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Several runs of one path as one: all examples over all their time, and the highest RSS."""
    n, seconds = sum(r["examples"] for r in runs), sum(r["seconds"] for r in runs)
    out: dict[str, Any] = {
        "examples": n,
        "examples_per_s": round(n / seconds, 2),
        "gb_per_s": round(sum(r["gb"] for r in runs) / seconds, 3),
        "per_round": [r["examples_per_s"] for r in runs],
    }
    if "broker_peak_rss_mib" in runs[0]:
        out["broker_peak_rss_mib"] = max(r["broker_peak_rss_mib"] for r in runs)
    return out


# --------------------------------------------------------------------------- through the broker


def broker_producer(
    url: str, index: int, generators: int, ids: list[int], seq: int, hidden: int, window: int, start: Any
) -> None:
    torch.set_num_threads(1)
    base = payload(seq, hidden)
    sink = ZmqStore(url, meta_for(hidden), window=window, slice_claim=(index, generators))
    start.wait()
    for i in ids:
        sink.write([numbered(base, i)])
    sink.finalize()


def start_broker(url: str, max_bytes: int, log_path: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "specops.cli", "broker", "--bind", url, "--max-bytes", str(max_bytes),
        "--exit-after-eos", "--timeout-s", "30",
    ]  # fmt: skip
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=log)


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the highest resident set size the process has had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_broker(
    count: int,
    generators: int,
    seq: int,
    hidden: int,
    *,
    window: int,
    credits: int,
    max_bytes: int,
    work_s: float,
    log_path: Path,
    direct: bool,
) -> dict[str, float]:
    url = f"tcp://127.0.0.1:{free_port()}"
    start = FORK.Barrier(generators + 1)
    procs = [
        FORK.Process(
            target=broker_producer,
            args=(url, g, generators, my_ids(count, g, generators), seq, hidden, window, start),
        )
        for g in range(generators)
    ]
    for p in procs:
        p.start()
    broker = start_broker(url, max_bytes, log_path)
    source = ZmqSource(url, credits=credits, timeout_s=300, direct=direct)
    assert source.meta is not None  # connected, and a producer too
    start.wait()
    arrivals: list[float] = [time.perf_counter()]
    nbytes = 0
    idle_at_first = 0.0
    started_first = 0.0
    for ex in source:
        arrivals.append(time.perf_counter())
        nbytes += tensor_bytes(ex)
        if len(arrivals) == 2:
            idle_at_first = source.stats.counters.get("idle_seconds", 0.0)
            started_first = time.monotonic()
        if work_s:
            time.sleep(work_s)  # a trainer step
    steady = time.monotonic() - started_first
    idle = (source.stats.counters.get("idle_seconds", 0.0) - idle_at_first) / max(steady, 1e-9)
    rss = peak_rss_mib(broker.pid)
    source.close()
    broker.wait(60)
    for p in procs:
        p.join()
    return {
        **rates(arrivals, nbytes),
        "consumer_idle_fraction": round(idle, 3),
        "broker_peak_rss_mib": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="raw, relay, direct in turn, this many times")
    parser.add_argument("--large-examples", type=int, default=16, help="per path and round")
    parser.add_argument("--small-examples", type=int, default=100, help="per path and round")
    parser.add_argument("--large-budget-mib", type=int, default=512)
    parser.add_argument("--small-budget-mib", type=int, default=64)
    parser.add_argument("--log", type=Path, default=Path("/tmp/specops-bench-stream-broker.log"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = args.generators
    cases = {
        "large": (args.large_examples, 2048, 4096, 2, 2, args.large_budget_mib),
        "small": (args.small_examples, 256, 1024, 8, 8, args.small_budget_mib),
    }
    result: dict[str, Any] = {
        "bench": "stream",
        "cpus": os.cpu_count(),
        "load1": round(os.getloadavg()[0], 1),
    }
    for name, (count, seq, hidden, window, credits, budget) in cases.items():
        runs: dict[str, list[dict[str, float]]] = {"raw": [], **{path: [] for path in PATHS}}
        for _ in range(args.rounds):  # interleaved, so a change in background load hits every path
            runs["raw"].append(run_raw(count, g, seq, hidden, hwm=window))
            for path in PATHS:
                run = run_broker(
                    count, g, seq, hidden, window=window, credits=credits, max_bytes=budget << 20,
                    work_s=0.0, log_path=args.log, direct=path == "direct",
                )  # fmt: skip
                runs[path].append(run)
        raw = combined(runs["raw"])
        result[name] = {"mib_per_example": round(seq * len(LAYERS) * hidden * 2 / 2**20, 1), "raw": raw}
        for path in PATHS:
            brokered = combined(runs[path])
            result[name][path] = {
                **brokered,
                "rss_within_budget": brokered["broker_peak_rss_mib"] <= budget + 100,
                "ratio": round(brokered["examples_per_s"] / raw["examples_per_s"], 3),
            }
        result[name]["budget_mib"] = budget
    # A consumer slower than the generators (each example "trains" for twice its transfer time).
    small_count, small_seq, small_hidden = cases["small"][:3]
    slow: dict[str, Any] = {}
    for path in PATHS:
        work_s = 2 / max(result["small"][path]["examples_per_s"], 1e-9)
        run = run_broker(
            min(small_count, 60), g, small_seq, small_hidden, window=8, credits=8,
            max_bytes=args.small_budget_mib << 20, work_s=work_s, log_path=args.log, direct=path == "direct",
        )  # fmt: skip
        slow[path] = {
            "work_s": round(work_s, 4),
            **combined([run]),
            "consumer_idle_fraction": run["consumer_idle_fraction"],
        }
    result["slow_consumer"] = slow
    result["path"] = "direct"
    result["ratio"] = result["large"]["direct"]["ratio"]
    result["ratio_relay"] = result["large"]["relay"]["ratio"]
    result["meets_ratio_0_7"] = result["ratio"] >= 0.7
    result["load1_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
