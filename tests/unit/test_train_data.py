"""Trainer data inputs: the upstream speculators layout, stable id-hash holds, prefetch thread, config errors."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _train_support import build_verifier, gloo_world, make_examples, train_config, write_store

from specops.config import TrainDataConfig
from specops.stores.disk import DiskStore
from specops.stores.mpqueue import MPQueueStore
from specops.stores.speculators_layout import export_speculators
from specops.stores.streaming import StreamError
from specops.stores.zmq import ZmqSource
from specops.testing.net import free_port
from specops.train.data import Prefetcher, count_tokens, open_source
from specops.train.trainer import train


def test_trains_from_the_upstream_speculators_layout(tmp_path: Path) -> None:
    verifier = build_verifier(tmp_path / "verifier")
    examples = make_examples(verifier, 12)
    write_store(tmp_path / "data", tmp_path / "verifier", examples)
    export_speculators(
        DiskStore.open(tmp_path / "data", [tmp_path]), tmp_path / "upstream", allowed_roots=[tmp_path]
    )
    cfg = train_config(
        tmp_path, tmp_path / "verifier", tmp_path / "upstream", max_steps=3, data__kind="speculators"
    )
    result = train(cfg)
    assert result.step == 3 and result.final is not None
    # The upstream files carry no token-count cache: the trainer counted them itself, identically.
    assert count_tokens(examples) == DiskStore.open(tmp_path / "data", [tmp_path]).token_counts()


def test_prefetcher_keeps_order_and_reraises() -> None:
    assert list(Prefetcher(iter(range(50)), depth=3)) == list(range(50))

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("shard vanished")

    fetched = Prefetcher(broken(), depth=2)
    assert next(fetched) == 1
    with pytest.raises(OSError, match="shard vanished"):
        next(fetched)


def test_prefetcher_close_returns_when_the_source_blocks() -> None:
    release = threading.Event()

    def stuck() -> Iterator[int]:
        yield 0
        release.wait(30)  # a stream waiting for its producer
        yield 1

    fetched = Prefetcher(stuck(), depth=1)
    assert next(fetched) == 0
    started = time.monotonic()
    fetched.close(timeout_s=0.3)
    assert time.monotonic() - started < 5
    release.set()


def test_bad_data_configs_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.path is required"):
        open_source(TrainDataConfig(kind="mpqueue"), [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        open_source(TrainDataConfig(kind="speculators", path=str(tmp_path / "missing")), [str(tmp_path)])


def test_a_broker_stream_opens_from_config_alone_and_a_stall_fails_naming_the_url() -> None:
    """What a training pod does: `data.kind: zmq` + `data.url`; no producer ever comes here."""
    url = f"tcp://127.0.0.1:{free_port()}"
    source = open_source(TrainDataConfig(kind="zmq", url=url, stall_timeout_s=0.5), [])
    assert isinstance(source, ZmqSource)
    try:
        started = time.monotonic()
        with pytest.raises(StreamError, match=re.escape(url)):
            next(iter(source))
        assert time.monotonic() - started < 10
    finally:
        source.close()


def test_trains_from_a_local_queue(tmp_path: Path) -> None:
    verifier = build_verifier(tmp_path / "verifier")
    examples = make_examples(verifier, 16)
    write_store(tmp_path / "data", tmp_path / "verifier", examples)  # its token counts pick the vocabulary
    meta = DiskStore.open(tmp_path / "data", [tmp_path]).meta

    def produce() -> None:
        sink = MPQueueStore(tmp_path / "q", meta, allowed_roots=[tmp_path])
        sink.write(examples)
        sink.close()

    producer = threading.Thread(target=produce)
    producer.start()
    cfg = train_config(
        tmp_path,
        tmp_path / "verifier",
        tmp_path / "q",
        max_steps=50,
        data__kind="mpqueue",
        data__vocab_from=str(tmp_path / "data"),
    )
    result = train(cfg)
    producer.join(timeout=60)
    assert 0 < result.step < 50 and not result.interrupted  # trained until the producers finished


WORLD_COUNTS = """import json, sys
from specops.train.data import world_token_counts
from specops.train.distributed import init_distributed, shutdown
env = init_distributed("cpu", timeout_s=60)
mine = {0: {3: 2, 7: 1}, 1: {7: 4, 9: 5}}[env.rank]
print(json.dumps(sorted(world_token_counts(mine, 12, env).items())))
shutdown(env)
"""


def test_every_rank_of_a_gloo_world_gets_the_summed_window_counts(tmp_path: Path) -> None:
    """Each rank's stream window differs; the draft vocabulary must not (one mapping for DDP)."""
    import json

    assert [json.loads(line) for line in gloo_world(WORLD_COUNTS, timeout=120)] == [
        [[3, 2], [7, 5], [9, 5]]
    ] * 2
