"""Broker and clients in one process (threads, TCP loopback): flow control, dedup, claims, journal, CURVE, metrics."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _stores_fixtures import META, assert_same_example, make_example

from specops.dataset import GeneratedDataset
from specops.example import ExampleDict
from specops.stores.base import DataSink, StoreMeta, StreamSource
from specops.stores.broker import JOURNAL_FILE, Broker, BrokerConfig, Entry, Journal, Session
from specops.stores.manifest import StoreMetaMismatchError
from specops.stores.streaming import StreamError
from specops.stores.wire import Timing, broker_keys, client_keys, write_keys
from specops.stores.zmq import Claim, ZmqSource, ZmqStore

FAST = Timing(heartbeat_s=0.1, timeout_s=1.0)
EXAMPLE_BYTES = 400  # make_example(i, seq=8): 8*2*8*4 + 8*4 + 8 bytes of tensors plus a header


class Running:
    """A broker serving in a background thread."""

    def __init__(self, **config: object) -> None:
        options = {"bind": "tcp://127.0.0.1:0", "timing": FAST, **config}
        self.broker = Broker(BrokerConfig(**options))  # type: ignore[arg-type]
        self.url = self.broker.endpoint
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(10)


@pytest.fixture()
def running() -> Iterator[Running]:
    r = Running(max_bytes=4 * EXAMPLE_BYTES)
    yield r
    r.stop()


def _examples(ids: range) -> list[ExampleDict]:
    return [make_example(i, seq=8) for i in ids]


def _produce(url: str, ids: range, slice_claim: tuple[int, int], **kwargs: object) -> threading.Thread:
    def run() -> None:
        sink = ZmqStore(url, META, slice_claim=slice_claim, **kwargs)  # type: ignore[arg-type]
        done = sink.done_ids()
        sink.write([ex for ex in _examples(ids) if ex["id"] not in done])
        sink.finalize()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_memory_stays_within_budget_and_producers_block_until_consumers_take(running: Running) -> None:
    broker = running.broker
    sink = ZmqStore(running.url, META, window=3, slice_claim=(0, 1))
    blocked = threading.Event()

    def write_all() -> None:
        sink.write(_examples(range(0, 3)))
        blocked.set()
        sink.write(_examples(range(3, 12)))  # blocks: 3 unacked is the window

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    assert blocked.wait(10)
    for _ in range(20):
        assert broker.held_bytes + broker.reserved_bytes <= broker.config.max_bytes
        time.sleep(0.02)
    assert writer.is_alive() and len(sink._unacked) == 3
    source = ZmqSource(running.url, credits=2, timeout_s=10)
    got = []
    for ex in source:
        got.append(ex["id"])
        assert broker.held_bytes + broker.reserved_bytes <= broker.config.max_bytes
        if len(got) == 12:
            break
    writer.join(10)
    sink.finalize()
    assert got == [f"d/{i}/0" for i in range(12)]  # one producer, one consumer: order kept
    assert list(source) == []  # the stream ended: its one range is complete
    source.close()
    summary = broker.stats.summary()
    assert summary["delivered_examples"] == 12 and broker.held_bytes == 0


def test_an_example_larger_than_the_budget_is_refused_by_name(running: Running) -> None:
    sink = ZmqStore(running.url, META, slice_claim=(0, 1))
    with pytest.raises(StreamError, match=r"example d/0/0 is \d+ bytes, more than the broker may hold"):
        sink.write([make_example(0, seq=64)])
        sink.flush(timeout_s=10)
    sink._shutdown(bye=False)


def test_producers_of_a_different_verifier_or_split_are_refused(running: Running) -> None:
    first = ZmqStore(running.url, META, slice_claim=(0, 2))
    other = StoreMeta(**{**META.to_json(), "hidden_size": 16})
    with pytest.raises(StoreMetaMismatchError, match="hidden_size: stream 8, this generator 16"):
        ZmqStore(running.url, other, slice_claim=(1, 2))
    with pytest.raises(StreamError, match="splits the input into 2 ranges, this generator into 3"):
        ZmqStore(running.url, META, slice_claim=(1, 3))
    first.close()


def test_regenerated_and_concurrent_duplicates_reach_consumers_once(running: Running) -> None:
    writers = [_produce(running.url, range(10), (0, 1)) for _ in range(2)]  # the same slice twice
    source = ZmqSource(running.url, credits=3, timeout_s=10)
    got = Counter(ex["id"] for ex in source)
    for w in writers:
        w.join(10)
    source.close()
    assert got == Counter(f"d/{i}/0" for i in range(10))
    assert running.broker.stats.counters["duplicate_examples"] >= 1
    again = ZmqStore(running.url, META, slice_claim=(0, 1))  # a rerun of a finished slice
    assert again.done_ids() == {f"d/{i}/0" for i in range(10)}
    assert again._static is not None and again._static.complete
    again.close()


def test_dynamic_claims_hand_out_each_range_once_then_report_done(running: Running) -> None:
    a = ZmqStore(running.url, META)
    b = ZmqStore(running.url, META)
    first, second = a.claim(count=2), b.claim(count=2)
    assert first is not None and second is not None
    assert {first.index, second.index} == {0, 1} and first.count == 2
    reclaimed: list[Claim | None] = []
    waiting = threading.Thread(target=lambda: reclaimed.append(a.claim(count=2)), daemon=True)
    waiting.start()  # every range is taken: it waits
    time.sleep(0.3)
    assert waiting.is_alive()
    b.close()  # b leaves holding range `second` unfinished: it is free again
    waiting.join(5)
    assert reclaimed and reclaimed[0] is not None and reclaimed[0].index == second.index
    source = ZmqSource(running.url, timeout_s=5)
    a.complete(first)
    a.complete(reclaimed[0])
    a.flush(timeout_s=5)
    assert a.claim(count=2) is None
    assert list(source) == []
    a.close()
    source.close()


def test_the_journal_survives_a_torn_tail_and_a_new_broker_resumes_from_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.set_stream(meta=META, ranges=2)
    journal.deliver([("d/1/0", 0), ("d/2/0", 1)], "c1")
    journal.mark_complete(0)
    journal.close()
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b"\x93\xa1d")  # a record cut short by a crash
    again = Journal(tmp_path)
    assert again.meta == META and again.ranges == 2
    assert again.delivered == {"d/1/0": 0, "d/2/0": 1} and again.complete == {0}
    assert again.ids_in(1) == ["d/2/0"] and again.resumed and again.owner["d/2/0"] == "c1"
    again.deliver([("d/3/0", 1)], "c2")
    again.close()
    assert Journal(tmp_path).ids_in(1) == ["d/2/0", "d/3/0"]


def test_a_restarted_broker_holds_dispatch_for_a_grace_period(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.set_stream(meta=META, ranges=1)
    journal.close()
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", state_dir=tmp_path, timing=FAST))
    try:
        assert broker.grace_until > time.monotonic() + 0.5 * FAST.timeout_s
    finally:
        broker.close()


def test_the_first_consumer_to_take_an_example_gets_it_and_a_late_one_is_told_lost() -> None:
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", timing=FAST))
    try:
        now = time.monotonic()
        a = Session("a", "consumer", b"ra", now, credit=0, leases={"x"})
        b = Session("b", "consumer", b"rb", now, credit=1)
        broker.sessions.update(a=a, b=b)
        broker.entries["x"] = Entry("x", 0, [], 10, lease="a")
        broker.leased["x"] = (0, {"b", "a"})  # pushed to b, which was expired while alive, then to a
        broker.held_bytes = 10
        assert broker._take(b, [["x", 0]]) == (["x"], [])  # b took it while it was pushed to a
        assert a.credit == 1 and not a.leases and broker.held_bytes == 0
        assert broker._take(a, [["x", 0]]) == ([], ["x"])  # a must drop its copy
        assert broker._take(b, [["x", 0]]) == (["x"], [])  # a repeated ask by the owner is fine
        assert broker.journal.delivered == {"x": 0}
    finally:
        broker.close()


def test_curve_clients_with_keys_stream_and_others_are_not_served(tmp_path: Path) -> None:
    write_keys(tmp_path / "keys")
    secured = Running(curve=broker_keys(tmp_path / "keys"), max_bytes=1 << 20)
    try:
        producer, consumer = (
            client_keys(tmp_path / "keys", "producer"),
            client_keys(tmp_path / "keys", "consumer"),
        )
        writer = _produce(secured.url, range(5), (0, 1), keys=producer)
        source = ZmqSource(secured.url, keys=consumer, timeout_s=10)
        assert sorted(ex["id"] for ex in source) == [f"d/{i}/0" for i in range(5)]
        writer.join(10)
        source.close()
        stranger = ZmqSource(secured.url, timeout_s=1.0)
        with pytest.raises(StreamError, match=r"no example for 1\.0 s"):
            next(iter(stranger))
        stranger._shutdown(bye=False)
        with pytest.raises(StreamError, match="CURVE key may not act as a producer"):
            ZmqStore(secured.url, META, keys=consumer, slice_claim=(0, 1))  # a consumer cannot offer
        wrong = ZmqSource(secured.url, keys=producer, timeout_s=5)  # nor a producer take
        with pytest.raises(StreamError, match="CURVE key may not act as a consumer"):
            next(iter(wrong))
        wrong._shutdown(bye=False)
    finally:
        secured.stop()
    with pytest.raises(FileNotFoundError, match=r"curve_key_dir: .*consumer\.key_secret is missing"):
        client_keys(tmp_path, "consumer")


def test_a_key_directory_from_before_keys_per_role_still_serves_both_roles(tmp_path: Path) -> None:
    import zmq.auth

    for name in ("broker", "client"):
        zmq.auth.create_certificates(str(tmp_path), name)
    secured = Running(curve=broker_keys(tmp_path), max_bytes=1 << 20)
    try:
        writer = _produce(secured.url, range(3), (0, 1), keys=client_keys(tmp_path, "producer"))
        source = ZmqSource(secured.url, keys=client_keys(tmp_path, "consumer"), timeout_s=10, direct=True)
        assert sorted(ex["id"] for ex in source) == [f"d/{i}/0" for i in range(3)]
        writer.join(10)
        source.close()
    finally:
        secured.stop()


def test_metrics_are_served_for_prometheus(tmp_path: Path) -> None:
    served = Running(max_bytes=1 << 20, metrics_port=0)
    try:
        writer = _produce(served.url, range(4), (0, 1))
        source = ZmqSource(served.url, timeout_s=10)
        examples = list(GeneratedDataset(source))  # the dataset takes the stream unchanged
        writer.join(10)
        assert isinstance(source, StreamSource) and isinstance(ZmqStore, type)
        for ex in examples:
            assert_same_example(ex, make_example(int(ex["id"].split("/")[1]), seq=8))
        served.broker._update_gauges()
        assert served.broker._metrics is not None
        port = served.broker._metrics.port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in (
            "in_examples_total",
            "out_bytes_total",
            "held_bytes",
            "queue_depth",
            "consumer_idle_fraction",
        ):
            assert f"specops_stream_{name}" in text, name
        assert 'specops_stream_delivered_examples_total{role="broker"} 4.0' in text
        source.close()
    finally:
        served.stop()


def test_backpressure_stalls_are_counted(running: Running) -> None:
    """Two producers offer more than the broker may hold: their offers wait (one stall, some
    seconds of it) until a consumer takes examples and room frees."""
    broker = running.broker
    writers = [_produce(running.url, range(k * 6, k * 6 + 6), (k, 2), window=3) for k in range(2)]
    deadline = time.monotonic() + 10
    while not broker.offers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert broker.offers, "6 offers for a budget of 4 examples: some wait"
    assert broker.stats.counters.get("stalls") == 1
    source = ZmqSource(running.url, timeout_s=10)
    assert len(list(source)) == 12
    for writer in writers:
        writer.join(10)
    source.close()
    broker._update_gauges()
    assert broker.stats.counters["stalls"] >= 1 and broker.stats.counters["stalled_seconds"] > 0
    assert broker._stalled_since is None


def test_sink_contract_and_config(tmp_path: Path, running: Running) -> None:
    from specops.config import RunConfig, SyncConfig

    sink = ZmqStore.from_config(
        SyncConfig(kind="zmq", url=running.url, queue_size=2), RunConfig(shard_index=1, num_shards=3), META
    )
    assert isinstance(sink, DataSink) and sink.window == 2
    assert sink._static is not None and (sink._static.index, sink._static.count) == (1, 3)
    sink.close()
    claiming = ZmqStore.from_config(
        SyncConfig(kind="zmq", url=running.url, claim_ranges=3), RunConfig(shard_index=1, num_shards=3), META
    )
    assert claiming._static is None and claiming.done_ids() == set()
    claiming.close()
    assert sink.give_up_s == claiming.give_up_s == 1800.0  # the default
    patient = ZmqStore.from_config(
        SyncConfig(kind="zmq", url=running.url, claim_ranges=3, broker_timeout_s=None), RunConfig(), META
    )
    assert patient.give_up_s is None
    patient.close()
    with pytest.raises(ValueError, match=r"sync\.claim_ranges needs sync\.kind 'zmq'"):
        SyncConfig(kind="disk", path="x", claim_ranges=3)


def _unused_url() -> str:
    """A loopback address nobody listens on (a port just bound and released)."""
    import zmq

    probe = zmq.Context.instance().socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    return f"tcp://127.0.0.1:{port}"


def test_a_generator_with_no_broker_gives_up_after_the_broker_timeout() -> None:
    """It used to reconnect forever, so a Job whose broker was gone for good never ended."""
    url = _unused_url()
    began = time.monotonic()
    with pytest.raises(StreamError, match=rf"no word from the broker at {url} for .* giving up"):
        ZmqStore(url, META, slice_claim=(0, 1), give_up_s=0.5)
    assert time.monotonic() - began < 5


def test_a_generator_whose_broker_vanishes_mid_stream_gives_up_but_one_with_a_busy_broker_waits() -> None:
    running = Running()
    sink = ZmqStore(running.url, META, window=2, slice_claim=(0, 1), give_up_s=1.5)
    sink.write(_examples(range(0, 2)))  # no trainer takes them: the window is full
    assert not sink.flush(timeout_s=2.5)  # a live broker with nobody taking is backpressure, not a fault
    running.stop()
    began = time.monotonic()
    with pytest.raises(StreamError, match=r"giving up"):
        sink.flush()
    assert time.monotonic() - began < 5
    sink.close()  # after the error: no flush, no hang


def test_a_client_whose_hello_went_unanswered_says_hello_again() -> None:
    """A broker that never saw our hello answers heartbeats with resets; after `timeout_s` of that
    the client must say hello again (it used to ignore the resets as stale, forever)."""
    import zmq

    from specops.stores.wire import pack, unpack

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = ZmqStore(f"tcp://127.0.0.1:{port}", META)
    hellos, resets = 0, 0
    deadline = time.monotonic() + 30
    try:
        while hellos < 2 and time.monotonic() < deadline:
            if not router.poll(500):
                continue
            rid, raw, *_ = router.recv_multipart()
            kind = unpack(raw)["t"]
            if kind == "hello":
                hellos += 1  # swallowed: as if it never arrived
            elif kind == "hb":
                router.send_multipart([rid, pack({"t": "reset"})])
                resets += 1
    finally:
        client.close()
        router.close(linger=0)
    assert hellos == 2 and resets >= 2, (hellos, resets)


def test_a_broker_exiting_after_the_stream_waits_a_timeout_for_late_generators() -> None:
    """`exit_after_eos` used to exit the moment the last client left, so a generator still loading
    when another finished every range connected to nothing and waited forever (a CI hang)."""
    running = Running(exit_after_eos=True)
    early = ZmqStore(running.url, META)
    claim = early.claim(count=1)
    assert claim is not None
    early.complete(claim)
    early.close()  # the stream is complete and the broker has no client
    time.sleep(FAST.timeout_s / 2)
    assert running.thread.is_alive()

    answers: list[Claim | None] = []
    late = ZmqStore(running.url, META)
    asking = threading.Thread(target=lambda: answers.append(late.claim(count=1)), daemon=True)
    asking.start()
    asking.join(5)
    assert answers == [None]  # told the stream is done
    late.close()
    running.thread.join(5 * FAST.timeout_s)
    assert not running.thread.is_alive()  # and then, with nobody left for a timeout, it exits


def test_a_generator_that_finds_every_range_done_loads_no_model(
    tmp_path: Path, tiny_verifier_dir: Path, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    from specops import generate
    from specops.config import DataGenConfig
    from specops.testing.synthetic import make_conversations, write_jsonl
    from specops.verifier import load_tokenizer

    data = write_jsonl(tmp_path / "syn.jsonl", make_conversations(4, seed=3))
    config = DataGenConfig.model_validate(
        {
            "verifier": {"name_or_path": str(tiny_verifier_dir)},
            "datasets": [{"path": str(data), "name": "syn"}],
            "sync": {"kind": "zmq", "url": running.url, "claim_ranges": 2},
            "run": {"allowed_roots": [str(tmp_path), str(tiny_verifier_dir)]},
        }
    )
    meta = generate.store_meta(config, load_tokenizer(config.verifier, config.run.allowed_roots))
    early = ZmqStore(running.url, meta)
    while (claim := early.claim(count=2)) is not None:
        early.complete(claim)
        early.flush(timeout_s=5)
    early.close()

    def no_engine(*args: object) -> None:
        raise AssertionError("the engine loaded with nothing left to generate")

    monkeypatch.setattr(generate, "load_engine", no_engine)
    report = generate.run_slice(config)
    assert report.ok and report.written == 0


def test_generate_data_with_its_broker_gone_fails_in_one_line(
    tmp_path: Path, tiny_verifier_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from specops.cli import main
    from specops.testing.synthetic import make_conversations, write_jsonl

    url = _unused_url()
    data = write_jsonl(tmp_path / "syn.jsonl", make_conversations(2, seed=3))
    config = tmp_path / "datagen.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "verifier": {"nameOrPath": str(tiny_verifier_dir)},
                "datasets": [{"path": str(data), "name": "syn"}],
                "sync": {"kind": "zmq", "url": url, "brokerTimeoutS": 0.5},
                "run": {"allowedRoots": [str(tmp_path), str(tiny_verifier_dir)]},
            }
        )
    )
    assert main(["generate-data", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"specops generate-data: error: producer: no word from the broker at {url}" in err
    assert "Traceback" not in err


def test_a_restarted_broker_confirms_a_delivered_id_only_to_the_consumer_that_took_it(tmp_path: Path) -> None:
    """The journal records who took each id; records from before it did (no owner) are
    confirmed to whoever asks, as they always were."""
    import msgpack

    journal = Journal(tmp_path)
    journal.deliver([("x", 0)], "a")
    journal.close()
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(msgpack.packb(["d", "old", 0]))
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:0", state_dir=tmp_path, timing=FAST))
    try:
        now = time.monotonic()
        a, b = Session("a", "consumer", b"ra", now), Session("b", "consumer", b"rb", now)
        assert broker._take(a, [("x", 0)]) == (["x"], [])
        assert broker._take(b, [("x", 0), ("old", 0), ("never", 0)]) == (["old"], ["x", "never"])
    finally:
        broker.close()
