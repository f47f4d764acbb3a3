"""Fork server for the streaming fault tests: imports torch once, then forks producers and consumers.

Reads one JSON job per stdin line (`{"role": "producer"|"consumer", ...}`), forks a child that
runs it, and answers `{"pid": N}` on stdout. Children report through files only, so the test can
kill -9 any of them at any moment; they are reaped automatically.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import torch
from _stores_fixtures import META, make_example

from specops.generate import in_slice
from specops.stores.zmq import Claim, ZmqSource, ZmqStore


def example_id(i: int) -> str:
    return f"d/{i}/0"


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _write_range(sink: ZmqStore, claim: Claim, done: set[str], job: dict[str, Any]) -> None:
    for i in range(job["n"]):
        ex_id = example_id(i)
        if in_slice(ex_id, claim.index, claim.count) and ex_id not in done:
            sink.write([make_example(i)])
            time.sleep(job.get("pause_s", 0.0))


def producer(job: dict[str, Any]) -> None:
    """Dynamic: claim ranges until none is left. Static (`slice` given): produce that slice."""
    static = tuple(job["slice"]) if job.get("slice") else None
    sink = ZmqStore(job["url"], META, window=job.get("window", 4), slice_claim=static)
    if static is not None:
        assert sink._static is not None
        _append(job["out"], f"claim {sink._static.index}")
        _write_range(sink, sink._static, sink.done_ids(), job)
        sink.finalize()
    else:
        while (claim := sink.claim(job["ranges"])) is not None:
            _append(job["out"], f"claim {claim.index}")
            _write_range(sink, claim, sink.range_done_ids(claim), job)
            sink.complete(claim)
        sink.close()
    _append(job["out"], "finished")


def consumer(job: dict[str, Any]) -> None:
    """Log every id handed out (after checking its tensors), then EOS at the end of the stream."""
    source = ZmqSource(
        job["url"], credits=job.get("credits", 2), timeout_s=60, direct=job.get("direct", False)
    )
    for ex in source:
        want = make_example(int(ex["id"].split("/")[1]))
        same = all(torch.equal(ex[k], want[k]) for k in ("token_ids", "loss_mask", "hidden_states"))
        _append(job["out"], ex["id"] if same else f"BAD {ex['id']}")
        time.sleep(job.get("pause_s", 0.0))
    _append(job["out"], f"direct {source.stats.counters.get('direct_examples', 0):.0f}")
    _append(job["out"], "EOS")
    source.close()


ROLES = {"producer": producer, "consumer": consumer}


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    torch.set_num_threads(1)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ROLES[job["role"]](job)
            except BaseException:
                _append(job["out"], "ERROR " + traceback.format_exc().replace("\n", " | "))
                code = 1
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    main()
