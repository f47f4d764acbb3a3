"""MPQueueStore: exact delivery across processes, backpressure, end-of-stream per slice, dead peers seen."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from _stores_fixtures import META, assert_same_example, make_example

from specops.dataset import GeneratedDataset
from specops.stores.base import DataSink, StoreMeta, StreamSource
from specops.stores.manifest import StoreMetaMismatchError
from specops.stores.mpqueue import MPQueueSource, MPQueueStore
from specops.stores.streaming import StreamError

FORK = multiprocessing.get_context("fork")


def _produce(path: str, ids: list[int], index: int, count: int, pause_s: float = 0.0) -> None:
    torch.set_num_threads(1)
    sink = MPQueueStore(path, META, slice_index=index, num_slices=count, allowed_roots=[path])
    for i in ids:
        sink.write([make_example(i)])
        time.sleep(pause_s)
    sink.close()


@pytest.fixture()
def qdir(tmp_path: Path) -> Path:
    return tmp_path / "q"


def _source(qdir: Path, **kwargs: Any) -> MPQueueSource:
    return MPQueueSource(qdir, allowed_roots=[qdir.parent], **{"timeout_s": 20, **kwargs})


def _beside(source: MPQueueSource, producer_side: Callable[[], Any], timeout_s: float = 20) -> Any:
    """Run `producer_side` in a thread while this thread serves the queue (handshakes, credits)
    without taking examples; returns its result or raises its exception."""
    with ThreadPoolExecutor(1) as pool:
        future: Future[Any] = pool.submit(producer_side)
        deadline = time.monotonic() + timeout_s
        while not future.done():
            assert time.monotonic() < deadline, "the producer side did not finish"
            source._pump(wait=False)
            time.sleep(0.005)
        return future.result()


def test_every_example_of_every_producer_process_arrives_once_and_intact(qdir: Path) -> None:
    source = _source(qdir, queue_size=3)
    assert isinstance(source, StreamSource)
    procs = [FORK.Process(target=_produce, args=(str(qdir), list(range(k, 20, 2)), k, 2)) for k in range(2)]
    for p in procs:
        p.start()
    try:
        got = list(GeneratedDataset(source))  # the dataset takes the stream unchanged
    finally:
        source.close()
        for p in procs:
            p.join(10)
    assert Counter(ex["id"] for ex in got) == Counter(f"d/{i}/0" for i in range(20))
    for ex in got:
        assert_same_example(ex, make_example(int(ex["id"].split("/")[1])))
    assert source.meta == META
    assert all(p.exitcode == 0 for p in procs)
    assert not list(qdir.glob("*.ex"))


def test_producers_block_when_the_queue_is_full(qdir: Path) -> None:
    source = _source(qdir, queue_size=2)
    done = threading.Event()

    def produce() -> None:
        _produce(str(qdir), list(range(8)), 0, 1)
        done.set()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    assert source.meta == META  # accepts the producer and grants its first credits
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        source._pump(wait=False)  # read packets without taking examples
        assert len(list(qdir.glob("*.ex"))) <= 2
        time.sleep(0.02)
    assert not done.is_set()  # still blocked: 8 examples, room for 2
    got = [ex["id"] for ex in source]
    thread.join(10)
    source.close()
    assert got == [f"d/{i}/0" for i in range(8)]  # one producer: its order is kept
    assert source.stats.counters["received_examples"] == 8


def test_a_killed_producer_is_reported_not_waited_for(qdir: Path) -> None:
    source = _source(qdir)
    proc = FORK.Process(target=_produce, args=(str(qdir), list(range(1000)), 0, 1, 0.01))
    proc.start()
    seen = 0
    with pytest.raises(
        StreamError, match=rf"producer pid {proc.pid} \(slice 0/1\) vanished before end-of-stream"
    ):
        for _ in source:
            seen += 1
            if seen == 3:
                os.kill(proc.pid or 0, signal.SIGKILL)
    proc.join(10)
    source.close()
    assert not list(qdir.glob("*.ex"))


def test_a_vanished_consumer_fails_the_producer_instead_of_hanging(qdir: Path) -> None:
    source = _source(qdir, queue_size=1)
    sink = _beside(source, lambda: MPQueueStore(qdir, META, allowed_roots=[qdir.parent]))
    _beside(source, lambda: sink.write([make_example(0)]))
    source.close()
    with pytest.raises(StreamError, match=r"closed the queue before end-of-stream|is gone"):
        sink.write([make_example(1), make_example(2)])


def test_wrong_producers_are_refused_with_the_reason(qdir: Path) -> None:
    source = _source(qdir)

    def attempt(meta: StoreMeta, index: int, count: int) -> Callable[[], Any]:
        return lambda: MPQueueStore(
            qdir, meta, slice_index=index, num_slices=count, allowed_roots=[qdir.parent]
        )

    first = _beside(source, attempt(META, 0, 2))
    other = StoreMeta(**{**META.to_json(), "layer_ids": (0, 1), "hidden_size": 8})
    with pytest.raises(StoreMetaMismatchError, match=r"layer_ids: stored \(1, 2\), this run \(0, 1\)"):
        _beside(source, attempt(other, 1, 2))
    with pytest.raises(StreamError, match="split the input into 2 slices, not 3"):
        _beside(source, attempt(META, 1, 3))
    with pytest.raises(StreamError, match="slice 0/2 is already produced"):
        _beside(source, attempt(META, 0, 2))
    first.close()
    source.close()


def test_no_consumer_is_a_clear_error(qdir: Path) -> None:
    qdir.mkdir()
    with pytest.raises(
        StreamError, match=r"sync\.path: no queue consumer is listening .* start the trainer first"
    ):
        MPQueueStore(qdir, META, allowed_roots=[qdir.parent], connect_timeout_s=0.2)


def test_a_stale_socket_is_reclaimed_but_a_live_consumer_is_not_shared(qdir: Path) -> None:
    source = _source(qdir)
    with pytest.raises(StreamError, match="another consumer already reads the queue"):
        _source(qdir)
    source._listener.close()  # what kill -9 leaves: the socket file, nobody listening
    again = _source(qdir)
    again.close()
    source.close()


def test_the_stream_ends_only_when_every_slice_has_ended(qdir: Path) -> None:
    source = _source(qdir, timeout_s=0.5)
    thread = threading.Thread(target=_produce, args=(str(qdir), [0], 0, 2), daemon=True)
    thread.start()
    items = iter(source)
    assert next(items)["id"] == "d/0/0"
    thread.join(10)
    with pytest.raises(
        StreamError, match=r"no data for 0\.5 s \(0 producer\(s\) connected, 1/2 slices finished\)"
    ):
        next(items)
    source.close()


def test_sink_and_config_contracts(qdir: Path) -> None:
    from specops.config import ConfigError, DataGenConfig, load_config

    source = _source(qdir)
    sink = _beside(source, lambda: MPQueueStore(qdir, META, allowed_roots=[qdir.parent]))
    assert isinstance(sink, DataSink)
    assert sink.done_ids() == set()
    sink.close()
    source.close()
    with pytest.raises(ConfigError, match=r"sync\.path is required when sync\.kind is 'mpqueue'"):
        load_config(
            DataGenConfig,
            {"verifier": {"name_or_path": "x"}, "datasets": [{"path": "x"}], "sync": {"kind": "mpqueue"}},
        )
