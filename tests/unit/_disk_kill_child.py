"""Writer processes for the kill -9 tests, forked from one pre-imported parent.

The parent ("zygote") imports torch once, then for each JSON command on stdin forks one writer
process per job, prints `{"pids": [...]}`, waits, and prints `{"status": [...]}` (negative = the
signal that killed it). A job may ask to SIGKILL itself at an exact point:
`{"target": "<file name prefix>", "when": "before"|"after", "nth": k}` around the k-th rename onto
such a file, or `{"target": "write", "nth": k}` at the k-th chunk written into a shard.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import Any

from _stores_fixtures import META, make_example

import specops.stores.shards as shards
from specops.stores.disk import DiskStore


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(spec: dict[str, Any]) -> None:
    calls = 0
    nth = int(spec["nth"])
    if spec["target"] == "write":
        real_write = shards._HashingWriter.write

        def write(self: shards._HashingWriter, data: bytes | memoryview) -> int:
            nonlocal calls
            calls += 1
            if calls == nth:
                _die()
            return real_write(self, data)

        shards._HashingWriter.write = write  # type: ignore[method-assign]
        return
    real_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal calls
        hit = os.path.basename(os.fspath(dst)).startswith(spec["target"])
        calls += hit
        if hit and calls == nth and spec["when"] == "before":
            _die()
        real_replace(src, dst, *args, **kwargs)
        if hit and calls == nth and spec["when"] == "after":
            _die()

    os.replace = replace


def _run_writer(job: dict[str, Any]) -> None:
    if job.get("kill"):
        _install_kill(job["kill"])
    writer, num_writers = job["writer"], job["num_writers"]
    store = DiskStore(
        job["dir"],
        meta=META,
        writer_index=writer,
        num_writers=num_writers,
        shard_size=job["shard_size"],
        compression=job["compression"],
        allowed_roots=[os.path.dirname(job["dir"])],
    )
    done = store.done_ids()
    todo = [make_example(i, seq=job.get("seq")) for i in range(job["num_ids"]) if i % num_writers == writer]
    todo = [ex for ex in todo if ex["id"] not in done]
    for start in range(0, len(todo), 3):
        store.write(todo[start : start + 3])
    store.finalize()


def main() -> None:
    for line in sys.stdin:
        jobs = json.loads(line)
        pids = []
        for job in jobs:
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _run_writer(job)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        print(json.dumps({"pids": pids}), flush=True)
        status = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    main()
