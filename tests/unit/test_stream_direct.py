"""The direct data path: the broker leases examples, producers send the bytes straight to consumers."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from _stores_fixtures import META, make_example
from test_stream_broker import EXAMPLE_BYTES, Running, _produce

from specops.config import TrainDataConfig
from specops.stores.streaming import StreamError
from specops.stores.wire import CurveKeys, Timing, broker_keys, client_keys, pack, secure_client, write_keys
from specops.stores.zmq import ZmqSource, ZmqStore, route_address
from specops.testing.net import free_port

IDS = Counter(f"d/{i}/0" for i in range(24))


@pytest.fixture()
def running() -> Iterator[Running]:
    r = Running(max_bytes=4 * EXAMPLE_BYTES)
    yield r
    r.stop()


def _attached(running: Running, count: int) -> bool:
    consumers = [s for s in running.broker.sessions.values() if s.role == "consumer"]
    return len(consumers) == count and all(s.credit or s.leases for s in consumers)


def _wait(ready: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _drain(sources: list[ZmqSource]) -> Counter[str]:
    """Read every source to the end of the stream concurrently."""
    got: Counter[str] = Counter()
    lock = threading.Lock()

    def read(source: ZmqSource) -> None:
        for ex in source:
            assert ex["hidden_states"].equal(
                make_example(int(ex["id"].split("/")[1]), seq=8)["hidden_states"]
            )
            with lock:
                got[ex["id"]] += 1

    threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return got


def test_bytes_skip_the_broker_and_every_example_arrives_once(running: Running) -> None:
    sources = [ZmqSource(running.url, credits=2, timeout_s=10, direct=True) for _ in range(2)]
    _wait(lambda: _attached(running, 2))
    writers = [_produce(running.url, range(i, 24, 2), (i, 2), window=3) for i in range(2)]
    assert _drain(sources) == IDS
    for w in writers:
        w.join(10)
    summary = running.broker.stats.summary()
    assert "in_examples" not in summary and summary["delivered_examples"] == 24  # no byte went through it
    assert sum(s.stats.counters["direct_examples"] for s in sources) == 24
    assert running.broker.held_bytes == 0 and not running.broker.entries
    for s in sources:
        s.close()


def test_relay_and_direct_consumers_share_one_stream(running: Running) -> None:
    direct = ZmqSource(running.url, credits=2, timeout_s=10, direct=True)
    relay = ZmqSource(running.url, credits=2, timeout_s=10)
    _wait(lambda: _attached(running, 2))
    writers = [_produce(running.url, range(i, 24, 2), (i, 2), window=3) for i in range(2)]
    assert _drain([direct, relay]) == IDS
    for w in writers:
        w.join(10)
    assert direct.stats.counters.get("direct_examples", 0) > 0
    assert relay.stats.counters.get("direct_examples", 0) == 0
    direct.close()
    relay.close()


def test_examples_sent_to_a_vanished_consumer_are_recalled_and_sent_to_another() -> None:
    """The consumer dies after attaching: producers get `go`s for its endpoint and send into the
    void; once the broker expires it, those examples are offered again and go to a live rank."""
    # The expiry must outlast a stalled machine between the crash and the three sends to the dead
    # endpoint (at 2 s a loaded CI machine sometimes expired the consumer first: nothing to recall).
    running = Running(max_bytes=4 * EXAMPLE_BYTES, timing=Timing(heartbeat_s=0.1, timeout_s=4.0))
    try:
        sink = ZmqStore(running.url, META, window=6, slice_claim=(0, 1))
        doomed = ZmqSource(running.url, credits=3, timeout_s=10, direct=True)
        _wait(lambda: _attached(running, 1))
        doomed._shutdown(bye=False)  # a crash: no bye, its endpoint is gone
        sink.write([make_example(i, seq=8) for i in range(6)])
        _wait(lambda: sink.stats.counters.get("sent_examples", 0) == 3)  # into the void
        survivor = ZmqSource(running.url, credits=2, timeout_s=10, direct=True)
        got: list[str] = []
        for ex in survivor:
            got.append(ex["id"])
            if len(got) == 6:
                break
        assert Counter(got) == Counter(f"d/{i}/0" for i in range(6))
        assert running.broker.stats.counters["redelivered_examples"] == 3
        assert sink.stats.counters["sent_examples"] == 9  # three went to the dead endpoint first
        assert doomed.direct_endpoint not in sink._peers  # `gone`: the producer dropped that connection
        sink.finalize()
        assert list(survivor) == []
        survivor.close()
    finally:
        running.stop()


def test_a_consumer_killed_between_data_and_ack_loses_nothing(running: Running) -> None:
    victim = ZmqSource(running.url, credits=3, timeout_s=10, direct=True)
    _wait(lambda: _attached(running, 1))
    writer = _produce(running.url, range(12), (0, 1), window=4)
    _wait(lambda: len(victim._inbox) == 3)  # the data arrived; nothing was asked for yet
    victim._shutdown(bye=False)
    rest = ZmqSource(running.url, credits=2, timeout_s=10, direct=True)
    assert _drain([rest]) == Counter(f"d/{i}/0" for i in range(12))
    writer.join(10)
    rest.close()


class BehindNat(ZmqSource):
    """A direct consumer whose advertised endpoint leads nowhere, as behind NAT."""

    def _bind_direct(self, host: str, port: int) -> str:
        super()._bind_direct(host, port)
        return f"tcp://127.0.0.1:{free_port()}"


def test_a_direct_consumer_producers_cannot_reach_falls_back_to_the_relay(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    source = BehindNat(running.url, credits=2, timeout_s=10, direct=True)
    _wait(lambda: _attached(running, 1))
    writer = _produce(running.url, range(8), (0, 1), window=4)
    assert _drain([source]) == Counter(f"d/{i}/0" for i in range(8))
    writer.join(10)
    assert source.stats.counters.get("direct_examples", 0) == 0
    assert "nothing sent to tcp://127.0.0.1" in caplog.text and "relaying its examples instead" in caplog.text
    source.close()


def test_a_direct_endpoint_takes_only_well_formed_examples(running: Running) -> None:
    source = ZmqSource(running.url, credits=2, timeout_s=10, direct=True)
    _wait(lambda: _attached(running, 1))
    stranger: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUSH)
    stranger.connect(str(source.direct_endpoint))
    for ctl, frames in (
        ({"t": "reset"}, []),  # only the broker may say that
        ({"t": "data", "id": 7, "range": 0}, [b"h"]),
        ({"t": "data", "id": "x", "range": 0}, []),
    ):
        stranger.send_multipart([pack(ctl), *frames])
    writer = _produce(running.url, range(4), (0, 1))
    assert _drain([source]) == Counter(f"d/{i}/0" for i in range(4))
    assert source.stats.counters["direct_examples"] == 4
    writer.join(10)
    stranger.close(linger=0)
    source.close()


def test_bad_direct_settings_fail_naming_the_field(running: Running) -> None:
    with pytest.raises(ValueError, match=r"tcp://host:port broker url or data\.direct_host"):
        route_address("ipc:///tmp/broker")
    assert route_address("tcp://127.0.0.1:5555") == "127.0.0.1"
    taken = ZmqSource(running.url, timeout_s=1, direct=True)
    port = int(str(taken.direct_endpoint).rsplit(":", 1)[1])
    with pytest.raises(
        StreamError, match=r"data.direct: cannot bind tcp://127.0.0.1:\d+ \(data.direct_host/direct_port\)"
    ):
        ZmqSource(running.url, direct=True, direct_port=port)
    taken.close()
    data = TrainDataConfig(kind="zmq", url=running.url, direct=True, direct_host="127.0.0.1")
    source = ZmqSource.from_config(data, [])
    assert str(source.direct_endpoint).startswith("tcp://127.0.0.1:")
    source.close()


def test_with_curve_the_direct_endpoint_serves_only_holders_of_the_producer_key(tmp_path: Path) -> None:
    write_keys(tmp_path / "keys")
    secured = Running(curve=broker_keys(tmp_path / "keys"), max_bytes=1 << 20)
    try:
        keys = client_keys(tmp_path / "keys", "consumer")
        source = ZmqSource(secured.url, keys=keys, timeout_s=10, direct=True)
        _wait(lambda: _attached(secured, 1))
        strangers: list[zmq.Socket[bytes]] = [zmq.Context.instance().socket(zmq.PUSH) for _ in range(2)]
        public, secret = zmq.curve_keypair()  # the second knows the endpoint's key, but not the producers'
        secure_client(strangers[1], CurveKeys(public=public, secret=secret, server_public=keys.public))
        for stranger in strangers:
            stranger.connect(str(source.direct_endpoint))
            stranger.send_multipart([pack({"t": "data", "id": "d/99/0", "range": 0}), b"header", b"tensor"])
        writer = _produce(secured.url, range(5), (0, 1), keys=client_keys(tmp_path / "keys", "producer"))
        assert _drain([source]) == Counter(f"d/{i}/0" for i in range(5))
        assert source.stats.counters["direct_examples"] == 5
        writer.join(10)
        for stranger in strangers:
            stranger.close(linger=0)
        source.close()
    finally:
        secured.stop()
