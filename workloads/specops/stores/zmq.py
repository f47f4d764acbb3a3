"""ZeroMQ broker clients: ZmqStore (a generator's DataSink) and ZmqSource (a trainer rank's StreamSource).

Each client's DEALER sockets are driven by a background I/O thread, so heartbeats, acks and
reconnects go on while the generator runs a forward pass or the trainer a step. The application
thread talks to the I/O thread through a lock-guarded state and a wake-up pipe.

ZmqStore keeps every example it wrote until the broker acks it (that is, until a consumer took
it), at most `window` at a time, so `write()` blocks when the stream is full and a broker restart
loses nothing: on reconnect every unacked example is offered again. ZmqSource hands an example out
only after the broker recorded it as taken by this source, and asks again after a reconnect for
what the broker never answered. See broker.py for the broker's side and docs/streaming.md for the
protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from specops.paths import resolve_allowed
from specops.stores.base import StoreMeta
from specops.stores.codec import CodecError, decode, encode
from specops.stores.streaming import StreamError, StreamStats
from specops.stores.wire import (
    CurveKeys,
    ProtocolError,
    Timing,
    client_keys,
    pack,
    secure_client,
    secure_server,
    unpack,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from specops.config import RunConfig, SyncConfig, TrainDataConfig
    from specops.example import ExampleDict

log = logging.getLogger(__name__)


def load_client_keys(
    directory: str | None, allowed_roots: Sequence[str | Path], field: str, role: str
) -> CurveKeys | None:
    """`role`'s CURVE keys from `directory` (under an allowed root), or None for a plain connection."""
    if not directory:
        return None
    return client_keys(resolve_allowed(directory, allowed_roots, field), role)


def route_address(url: str) -> str:
    """This host's address on the route to the broker at `url` (where peers can reach it too,
    unless there is NAT in between): no packet is sent, the kernel only picks a source address."""
    host, sep, port = url.removeprefix("tcp://").rpartition(":")
    if not url.startswith("tcp://") or not sep:
        raise ValueError(f"data.direct needs a tcp://host:port broker url or data.direct_host, got {url!r}")
    family, kind, _, _, address = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, kind) as probe:
        probe.connect(address)
        return str(probe.getsockname()[0])


def _is_data(ctl: dict[str, Any], frames: list[zmq.Frame]) -> bool:
    """Whether a message a peer sent is a well-formed example (control map, header, tensors)."""
    return (
        ctl["t"] == "data"
        and isinstance(ctl.get("id"), str)
        and isinstance(ctl.get("range"), int)
        and len(frames) > 1
    )


class _OneKey:
    """ZAP check for a direct consumer's endpoint: admit peers whose public key is the producers'
    (with a shared client key pair: that key)."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public


class _Link:
    """One DEALER connection to the broker, run by an I/O thread; subclasses handle their messages."""

    role = "client"
    data_channel = False
    """Open a second connection that only carries examples to this client, so control replies
    never queue behind a large example on the wire."""

    def __init__(self, url: str, keys: CurveKeys | None, give_up_s: float | None = None) -> None:
        self.url = url
        self.sid = uuid.uuid4().hex
        self.timing = Timing()
        self.give_up_s = give_up_s
        """Fail with StreamError after this long without a word from the broker (None: reconnect
        forever). Reconnects within it are routine: a restarted broker takes the session back."""
        self.stats = StreamStats(self.role)
        self._keys = keys
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[Any] | None = None
        self._data: zmq.Socket[Any] | None = None
        self._peers: dict[str, zmq.Socket[Any]] = {}
        """Sockets to or from peers other than the broker, for the direct data path: a producer's
        connections to direct consumers (by endpoint), a direct consumer's own bound endpoint."""
        self._auth: Any = None
        """A direct consumer's CURVE authenticator (admits only holders of the client key pair)."""
        self._poller = zmq.Poller()
        self._cond = threading.Condition()
        self._calls: deque[Callable[[], None]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._welcomed = False
        self._hello_at = 0.0
        self._broker: str | None = None
        self._last_heard = self._last_contact = time.monotonic()
        """`_last_heard` restarts at every reconnect (the liveness timer); `_last_contact` only
        when the broker speaks (the give-up timer)."""
        self._last_sent = 0.0
        self._thread = threading.Thread(target=self._loop, name=f"specops-{self.role}-io", daemon=True)

    # ------------------------------------------------------------------ application side

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the I/O thread soon."""
        with self._cond:
            self._calls.append(fn)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _wait(self, ready: Callable[[], bool], timeout_s: float | None = None) -> bool:
        """Wait (holding the condition) until `ready()`; raises the I/O thread's error."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not ready():
            self._raise_if_failed()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._cond.wait(timeout=min(0.5, remaining) if remaining is not None else 0.5)
        self._raise_if_failed()
        return True

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive() and not self._stopping.is_set():
            raise StreamError(f"{self.role} I/O thread for {self.url} is not running")

    def _shutdown(self, bye: bool) -> None:
        """Say bye (so the broker acts at once instead of after a timeout) and stop the I/O thread."""
        if bye and self._error is None and self._thread.is_alive():
            done = threading.Event()

            def send_bye() -> None:
                self._send({"t": "bye"})
                done.set()

            self._call(send_bye)
            done.wait(timeout=5)
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        if not self._thread.is_alive():  # a stuck thread keeps its socket and pipe
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._stop_auth()
            self._ctx.term()
        self.stats.maybe_log(force=True)

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # ------------------------------------------------------------------ I/O thread

    def _loop(self) -> None:
        try:
            self._poller.register(self._wake_r, zmq.POLLIN)
            self._connect()
            while not self._stopping.is_set():
                timeout_ms = int(self.timing.heartbeat_s * 500)
                events = dict(self._poller.poll(timeout_ms))
                if self._wake_r in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                self._run_calls()
                for sock in (self._sock, self._data, *self._peers.values()):
                    if sock is not None and sock in events:
                        self._drain(sock)
                self._keepalive()
        except BaseException as exc:  # surfaced to the application thread
            with self._cond:
                self._error = (
                    exc if isinstance(exc, StreamError | ValueError) else StreamError(f"{self.url}: {exc!r}")
                )
                self._cond.notify_all()
        finally:
            for sock in (self._data, *self._peers.values()):
                if sock is not None:
                    sock.close(linger=0)
            if self._sock is not None:
                self._sock.close(linger=500)  # lets a final bye out

    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn = self._calls.popleft()
            fn()

    def _drain(self, sock: zmq.Socket[Any]) -> None:
        while sock in (self._sock, self._data, *self._peers.values()):  # a message may have reconnected us
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                ctl = unpack(frames[0].buffer)
            except ProtocolError as exc:
                log.warning("%s: ignoring a bad frame: %s", self.role, exc)
                continue
            if sock is self._sock or sock is self._data:
                self._last_heard = self._last_contact = time.monotonic()
                self._on_message(ctl, frames[1:])
            elif _is_data(ctl, frames):  # producers sending directly may send nothing else
                self.stats.inc("direct_examples")
                self._on_role_message("data", ctl, frames[1:])
            else:
                log.warning("%s: ignoring a %r message on the direct endpoint", self.role, ctl["t"])

    def _keepalive(self) -> None:
        now = time.monotonic()
        if self.give_up_s is not None and now - self._last_contact > self.give_up_s:
            raise StreamError(
                f"{self.role}: no word from the broker at {self.url} for {now - self._last_contact:.1f} s "
                f"(sync.broker_timeout_s is {self.give_up_s:g} s); giving up"
            )
        if now - self._last_heard > self.timing.timeout_s:
            log.warning(
                "%s: no word from the broker at %s for %.1f s; reconnecting",
                self.role,
                self.url,
                now - self._last_heard,
            )
            self._connect()
        elif now - self._last_sent >= self.timing.heartbeat_s:
            self._send({"t": "hb", "stats": self._report()})
            self.stats.maybe_log()

    def _connect(self) -> None:
        """Fresh sockets and a hello: whatever the old sockets still queued is dropped, and the
        broker (restarted or not) learns this session's state from the hello."""
        for old in (self._sock, self._data):
            if old is not None:
                self._poller.unregister(old)
                old.close(linger=0)
        self._sock = self._open()
        self._data = self._open() if self.data_channel else None
        self._welcomed = False
        self._last_heard = self._hello_at = time.monotonic()
        self._on_connect()
        self._send(self._hello())

    def _open(self) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.DEALER)
        for option, value in (
            (zmq.LINGER, 0),
            (zmq.SNDHWM, 0),
            (zmq.RCVHWM, 0),
            (zmq.RECONNECT_IVL, 100),
            (zmq.RECONNECT_IVL_MAX, 1000),
        ):
            sock.setsockopt(option, value)
        secure_client(sock, self._keys)
        sock.connect(self.url)
        self._poller.register(sock, zmq.POLLIN)
        return sock

    def _send(self, ctl: dict[str, Any], payload: Sequence[Buffer] = ()) -> None:
        """Queue a message, never blocking: with no connection to queue on (a refused handshake)
        it is dropped, and the reconnect after `timeout_s` replays the session state anyway."""
        assert self._sock is not None
        try:
            self._sock.send_multipart([pack({**ctl, "sid": self.sid}), *payload], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.debug("%s: no connection to %s; dropped a %s message", self.role, self.url, ctl["t"])
            return
        self._last_sent = time.monotonic()

    def _on_message(self, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        kind = ctl["t"]
        if kind == "welcome":
            self.timing = Timing(float(ctl["heartbeat_s"]), float(ctl["timeout_s"]))
            restarted = self._broker is not None and self._broker != ctl["broker"]
            if restarted:
                log.warning("%s: the broker at %s restarted; resuming", self.role, self.url)
            self._broker = str(ctl["broker"])
            self._welcomed = True
            self._on_welcome(ctl)
        elif kind == "reset":
            # Resets queued behind our hello are stale, unless the hello itself went unanswered for
            # a whole timeout (dropped before a connection existed): then heartbeats draw resets
            # forever and nothing else would ever say hello again.
            if self._welcomed or time.monotonic() - self._hello_at > self.timing.timeout_s:
                log.info("%s: the broker does not know this session; saying hello again", self.role)
                self._connect()
        elif kind == "error":
            raise self._error_type(ctl)(str(ctl.get("error")))
        elif kind != "hb":
            self._on_role_message(kind, ctl, payload)

    def _error_type(self, ctl: dict[str, Any]) -> type[Exception]:
        if ctl.get("kind") == "meta":
            from specops.stores.manifest import StoreMetaMismatchError

            return StoreMetaMismatchError
        return StreamError

    # ------------------------------------------------------------------ subclass hooks

    def _hello(self) -> dict[str, Any]:
        raise NotImplementedError

    def _on_connect(self) -> None:
        """Forget what the old connection had in flight (I/O thread)."""

    def _on_welcome(self, ctl: dict[str, Any]) -> None:
        raise NotImplementedError

    def _on_role_message(self, kind: str, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        raise NotImplementedError

    def _report(self) -> dict[str, float]:
        return {}


# --------------------------------------------------------------------------- producer


@dataclass
class _Out:
    """An example written and not yet acked by the broker."""

    id: str
    range: int
    header: bytes
    buffers: list[Buffer]
    nbytes: int
    state: str = "new"
    """new -> offered -> sent; back to offered after a reconnect."""


@dataclass(frozen=True)
class Claim:
    """A range of the input this generator produces: examples whose id hashes into slice
    `index` of `count` (`specops.generate.in_slice`)."""

    index: int
    count: int
    complete: bool = False
    """Already complete in the stream (a static claim of a finished slice)."""


class ZmqStore(_Link):
    """DataSink: a generator streaming examples to the broker at `url`.

    Static use (what `open_sink` builds from a config): the sink claims this process's run slice
    and `finalize()` reports it complete. Dynamic use: call `claim()` for ranges until it
    returns None, write each range's examples, then `complete(claim)`.
    """

    role = "producer"

    def __init__(
        self,
        url: str,
        meta: StoreMeta,
        *,
        window: int = 16,
        compress: bool = False,
        keys: CurveKeys | None = None,
        slice_claim: tuple[int, int] | None = None,
        give_up_s: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        super().__init__(url, keys, give_up_s)
        self.meta = meta
        self.window = window
        self.compress = compress
        self._seq = 0
        self._unacked: dict[int, _Out] = {}
        self._unacked_bytes = 0
        self._range = -1
        self._claims: set[tuple[int, int]] = set()
        self._completing: set[tuple[int, int]] = set()
        """Ranges written in full, reported complete once their examples are all acked."""
        self._completed_unconfirmed: set[tuple[int, int]] = set()
        self._completed: set[tuple[int, int]] = set()
        self._replies: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, dict[str, Any]] = {}
        """Requests (claims, id lists) waiting for their reply, by request number."""
        self._req = 0
        self._closed = False
        self._static: Claim | None = None
        self._thread.start()
        if slice_claim is not None:
            try:
                self._static = self._claimed(self._request({"t": "claim", "want": list(slice_claim)}))
            except BaseException:
                self._shutdown(bye=False)
                raise
            self._range = self._static.index

    @classmethod
    def from_config(cls, sync: SyncConfig, run: RunConfig, meta: StoreMeta) -> ZmqStore:
        """The generator of run slice `run.shard_index` of `run.num_shards`, or, with
        `sync.claim_ranges`, a generator that claims ranges (`generate.generate_claimed`)."""
        if not sync.url:
            raise ValueError("sync.url is required for kind zmq")
        return cls(
            sync.url,
            meta,
            window=sync.queue_size,
            compress=sync.compression == "zstd",
            keys=load_client_keys(sync.curve_key_dir, run.allowed_roots, "sync.curve_key_dir", "producer"),
            slice_claim=None if sync.claim_ranges else (run.shard_index, run.num_shards),
            give_up_s=sync.broker_timeout_s,
        )

    # ------------------------------------------------------------------ application side

    def claim(self, count: int = 16) -> Claim | None:
        """The next unfinished range of the input (split into `count`); None once all are
        complete. Waits while every unfinished range is being produced by someone else."""
        while True:
            reply = self._request({"t": "claim", "want": None, "count": count})
            if reply.get("done"):
                return None
            if "range" in reply or "error" in reply:
                claim = self._claimed(reply)
                self._range = claim.index
                return claim
            time.sleep(self.timing.heartbeat_s)

    def _claimed(self, reply: dict[str, Any]) -> Claim:
        if "error" in reply:
            raise StreamError(f"{self.url}: {reply['error']}")
        index, total = (int(v) for v in reply["range"])
        with self._cond:
            self._claims.add((index, total))
        return Claim(index, total, bool(reply.get("complete")))

    def _request(self, ctl: dict[str, Any]) -> dict[str, Any]:
        """Send a request and wait for its reply; a reconnect re-sends it."""
        with self._cond:
            self._req += 1
            message = {**ctl, "req": self._req}
            self._pending[self._req] = message
        self._call(lambda: self._send(message) if self._welcomed else None)
        with self._cond:
            self._wait(lambda: message["req"] in self._replies)
            del self._pending[message["req"]]
            return self._replies.pop(message["req"])

    @property
    def committed_examples(self) -> int:
        """Examples the broker acked (it holds or delivered them): what this sink has stored."""
        return int(self.stats.counters.get("acked_examples", 0))

    def done_ids(self) -> set[str]:
        """Ids of this sink's slice the stream already delivered (a rerun skips them)."""
        return set() if self._static is None else self.range_done_ids(self._static)

    def range_done_ids(self, claim: Claim) -> set[str]:
        """Ids of `claim`'s range the stream already delivered."""
        reply = self._request({"t": "ids", "range": [claim.index, claim.count]})
        return {str(i) for i in reply.get("ids", [])}

    def write(self, examples: Sequence[ExampleDict]) -> None:
        """Hand examples to the I/O thread; blocks while `window` examples are unacked."""
        if self._closed:
            raise StreamError("write() on a closed ZmqStore")
        for ex in examples:
            header, buffers = encode(ex, self.meta.layer_ids, compress=self.compress)
            nbytes = len(header) + sum(memoryview(b).nbytes for b in buffers)
            with self._cond:
                started = time.monotonic()
                self._wait(lambda: len(self._unacked) < self.window)
                self.stats.inc("blocked_seconds", time.monotonic() - started)
                seq = self._seq
                self._seq += 1
                self._unacked[seq] = _Out(ex["id"], self._range, header, buffers, nbytes)
                self._unacked_bytes += nbytes
            self._call(self._offer_new)
            self.stats.count("written", nbytes)

    def complete(self, claim: Claim) -> None:
        """Report `claim`'s range complete once everything written for it is acked (non-blocking)."""
        with self._cond:
            self._completing.add((claim.index, claim.count))
            self._range = -1
        self._call(self._send_completions)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until the broker acked every example and confirmed every completed range (which
        takes consumers taking them); logs every 30 s while it waits."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                left = 30.0 if deadline is None else min(30.0, deadline - time.monotonic())
                if self._wait(self._flushed, max(left, 0.0)):
                    return True
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                log.info("producer: %d example(s) not yet taken by a trainer; waiting", len(self._unacked))

    def _flushed(self) -> bool:
        return not self._unacked and not self._completing and not self._completed_unconfirmed

    def finalize(self) -> bool:
        """Static use: report this slice complete, wait for the broker to confirm, and close."""
        if self._static is not None:
            self.complete(self._static)
        self.close()
        return True

    def close(self) -> None:
        """Wait until every written example is acked (nothing is lost), then leave."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._error is None:
                self.flush()
        finally:
            self._shutdown(bye=True)

    # ------------------------------------------------------------------ I/O thread

    def _hello(self) -> dict[str, Any]:
        with self._cond:
            return {
                "t": "hello",
                "role": "producer",
                "meta": self.meta.to_json(),
                "claims": [list(c) for c in self._claims - self._completed],
                "completed": [list(c) for c in self._completed_unconfirmed],
            }

    def _on_connect(self) -> None:
        with self._cond:
            for out in self._unacked.values():
                out.state = "new"
        for endpoint in list(self._peers):  # the broker hands out fresh `go`s after the hello
            self._peers.pop(endpoint).close(linger=0)

    def _on_welcome(self, ctl: dict[str, Any]) -> None:
        self._offer_new()
        with self._cond:
            pending = list(self._pending.values())
        for message in pending:
            self._send(message)
        self._send_completions()

    def _offer_new(self) -> None:
        if not self._welcomed:
            return
        with self._cond:
            fresh = [(seq, out) for seq, out in self._unacked.items() if out.state == "new"]
            for _, out in fresh:
                out.state = "offered"
        if fresh:
            self._send({"t": "offer", "offers": [[seq, o.id, o.nbytes, o.range] for seq, o in fresh]})

    def _send_completions(self) -> None:
        if not self._welcomed:
            return
        with self._cond:
            busy = {out.range for out in self._unacked.values()}
            ready = [c for c in self._completing if c[0] not in busy]
            for pair in ready:
                self._completing.discard(pair)
                self._completed_unconfirmed.add(pair)
        for pair in ready:
            self._send({"t": "complete", "range": list(pair)})

    def _on_role_message(self, kind: str, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        if kind == "go":  # to the broker, or with `to` straight to a direct consumer
            to = ctl.get("to")
            for seq in ctl["seqs"]:
                with self._cond:
                    out = self._unacked.get(seq)
                    if out is None:
                        continue
                    out.state = "sent"  # a recalled direct example may be sent again
                message = {"t": "data", "seq": seq, "id": out.id, "range": out.range}
                if to:
                    self._send_direct(str(to), message, [out.header, *out.buffers])
                else:
                    self._send(message, [out.header, *out.buffers])
                self.stats.count("sent", out.nbytes)
        elif kind == "gone":  # a direct consumer left; what is still queued for it was recalled
            peer = self._peers.pop(str(ctl["to"]), None)
            if peer is not None:
                peer.close(linger=0)
        elif kind == "ack":
            with self._cond:
                for seq in ctl["seqs"]:
                    out = self._unacked.pop(seq, None)
                    if out is not None:
                        self._unacked_bytes -= out.nbytes
                        self.stats.count("acked", out.nbytes)
                self._cond.notify_all()
            self._send_completions()
        elif kind in ("claim", "ids"):
            with self._cond:
                if ctl.get("req") in self._pending:  # a reply to a re-sent request may come twice
                    self._replies[int(ctl["req"])] = ctl
                    self._cond.notify_all()
        elif kind == "completed":
            pair = (int(ctl["range"][0]), int(ctl["range"][1]))
            with self._cond:
                self._completed_unconfirmed.discard(pair)
                self._completed.add(pair)
                self._cond.notify_all()

    def _send_direct(self, endpoint: str, ctl: dict[str, Any], payload: Sequence[Buffer]) -> None:
        """Queue an example for a direct consumer, never blocking: if the consumer cannot be reached,
        the broker recalls the example (after its timeout) and says `gone`."""
        peer = self._peers.get(endpoint)
        if peer is None:
            peer = self._peers[endpoint] = self._ctx.socket(zmq.PUSH)
            for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.IPV6, 1), (zmq.RECONNECT_IVL, 100)):
                peer.setsockopt(option, value)
            if self._keys is not None:  # a direct consumer serves CURVE with its own key pair
                secure_client(peer, replace(self._keys, server_public=self._keys.peer_public))
            peer.connect(endpoint)
        # no session id: it is this producer's credential with the broker, and consumers need none
        peer.send_multipart([pack(ctl), *payload], zmq.NOBLOCK, copy=False)

    def _report(self) -> dict[str, float]:
        with self._cond:
            return {"unacked": len(self._unacked), "unacked_bytes": self._unacked_bytes}


# --------------------------------------------------------------------------- consumer


DEFAULT_CREDITS = 4
"""Examples a consumer rank lets the broker send ahead of what it has taken (`ZmqSource`)."""


class ZmqSource(_Link):
    """StreamSource: one trainer rank's share of the stream; yields examples until the stream ends.

    The broker pushes up to `credits` examples ahead. Before handing one out, the source asks the
    broker to record it as delivered here and waits for the answer (one round trip): an example
    is handed out only once the broker journaled it, so a consumer killed at any point has
    every example either handed out (and never sent again) or sent to another rank.

    With `direct`, the source binds its own endpoint (on `direct_host`, default the address this
    host uses to reach the broker, and `direct_port`, default any free one) and the producers
    send the examples the broker leases it there, so the bytes skip the broker.
    """

    role = "consumer"
    data_channel = True

    def __init__(
        self,
        url: str,
        *,
        credits: int = DEFAULT_CREDITS,
        keys: CurveKeys | None = None,
        timeout_s: float | None = None,
        direct: bool = False,
        direct_host: str | None = None,
        direct_port: int = 0,
    ) -> None:
        """`timeout_s` bounds a wait with nothing arriving (None = wait for producers forever)."""
        if credits < 1:
            raise ValueError("credits must be >= 1")
        super().__init__(url, keys)
        self.credits = credits
        self.data_channel = not direct
        self.direct_endpoint: str | None = None
        """Where producers send this source's examples (direct only)."""
        if direct:
            self.direct_endpoint = self._bind_direct(direct_host or route_address(url), direct_port)
        self.wait_timeout_s = timeout_s
        self._inbox: deque[tuple[dict[str, Any], list[zmq.Frame]]] = deque()
        self._asked: dict[str, int] = {}
        """Examples this source asked to take, no verdict yet (id -> range)."""
        self._to_ask: list[list[Any]] = []
        self._verdicts: dict[str, bool] = {}
        self._eos = False
        self._meta: StoreMeta | None = None
        self._closed = False
        self._thread.start()

    @classmethod
    def from_config(cls, data: TrainDataConfig, allowed_roots: Sequence[str | Path]) -> ZmqSource:
        if not data.url:
            raise ValueError("data.url is required for kind zmq")
        keys = load_client_keys(data.curve_key_dir, allowed_roots, "data.curve_key_dir", "consumer")
        return cls(
            data.url,
            keys=keys,
            timeout_s=data.stall_timeout_s,
            direct=data.direct,
            direct_host=data.direct_host,
            direct_port=data.direct_port,
        )

    def _bind_direct(self, host: str, port: int) -> str:
        """Bind the socket producers send this source's examples to; returns its endpoint."""
        sock = self._ctx.socket(zmq.PULL)
        for option, value in ((zmq.LINGER, 0), (zmq.RCVHWM, 0), (zmq.IPV6, int(":" in host))):
            sock.setsockopt(option, value)
        if self._keys is not None:  # producers hold the same client key pair as this source
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve_callback(
                "*", credentials_provider=_OneKey(self._keys.peer_public or b"")
            )
            secure_server(sock, self._keys)
        address = f"tcp://[{host}]:{port or '*'}" if ":" in host else f"tcp://{host}:{port or '*'}"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close()
            self._stop_auth()
            self._ctx.term()
            raise StreamError(
                f"data.direct: cannot bind {address} (data.direct_host/direct_port): {exc}"
            ) from None
        self._peers[address] = sock
        self._poller.register(sock, zmq.POLLIN)
        return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))

    @property
    def meta(self) -> StoreMeta:
        """The producers' StoreMeta; waits until the broker knows it (a producer connected)."""
        with self._cond:
            self._wait(lambda: self._meta is not None)
            assert self._meta is not None
            return self._meta

    def __iter__(self) -> Iterator[ExampleDict]:
        while True:
            with self._cond:
                started = time.monotonic()
                arrived = self._wait(lambda: bool(self._inbox) or self._eos, self.wait_timeout_s)
                self.stats.inc("idle_seconds", time.monotonic() - started)
                if not arrived:
                    raise StreamError(f"{self.url}: no example for {self.wait_timeout_s} s")
                if not self._inbox:
                    return
                ctl, frames = self._inbox.popleft()
                ex_id, rng = str(ctl["id"]), int(ctl["range"])
                self._asked[ex_id] = rng
                self._to_ask.append([ex_id, rng])
            self._call(self._send_asks)
            with self._cond:
                asked = time.monotonic()
                self._wait(lambda: ex_id in self._verdicts)  # noqa: B023 (called right here)
                mine = self._verdicts.pop(ex_id)
                self.stats.inc("ack_wait_seconds", time.monotonic() - asked)
            if not mine:
                log.warning("%s: %s went to another consumer meanwhile; dropping this copy", self.url, ex_id)
                self.stats.inc("lost_examples")
                continue
            try:
                ex = decode(frames[0].buffer, [f.buffer for f in frames[1:]])
                if ex["id"] != ex_id:
                    raise CodecError(f"the message for {ex_id} carries example {ex['id']}")
            except CodecError as exc:  # a broken or hostile producer must not stop training
                log.error("%s: dropping %s, which is not a valid example: %s", self.url, ex_id, exc)
                self.stats.inc("bad_examples")
                continue
            self.stats.count("received", sum(len(f) for f in frames))
            yield ex

    def close(self) -> None:
        """Leave: the broker re-queues whatever it pushed here that was not handed out."""
        if self._closed:
            return
        self._closed = True
        self._shutdown(bye=True)

    # ------------------------------------------------------------------ I/O thread

    def _hello(self) -> dict[str, Any]:
        with self._cond:
            self._to_ask.clear()  # the hello carries them
            taken = [[ex_id, rng] for ex_id, rng in self._asked.items()]
        return {"t": "hello", "role": "consumer", "taken": taken}

    def _on_connect(self) -> None:
        with self._cond:
            self._inbox.clear()  # the broker re-queues them when this session says hello again

    def _on_welcome(self, ctl: dict[str, Any]) -> None:
        if self.direct_endpoint is not None:
            self._send({"t": "attach", "credit": self.credits, "direct": self.direct_endpoint})
        else:
            assert self._data is not None
            with contextlib.suppress(zmq.Again):  # lost: the broker never pushes here; the timeout reconnects
                self._data.send_multipart(
                    [pack({"t": "attach", "sid": self.sid, "credit": self.credits})], zmq.NOBLOCK
                )
        self._verdict(ctl)  # after the attach, so whoever waits for `meta` finds this source attached

    def _verdict(self, ctl: dict[str, Any]) -> None:
        with self._cond:
            if ctl.get("meta"):
                self._meta = StoreMeta.from_json(ctl["meta"])
            for key, mine in (("ok", True), ("lost", False)):
                for ex_id in ctl.get(key, []):
                    if self._asked.pop(str(ex_id), None) is not None:
                        self._verdicts[str(ex_id)] = mine
            self._cond.notify_all()

    def _send_asks(self) -> None:
        with self._cond:
            taken, self._to_ask = self._to_ask, []
        if taken and self._welcomed:
            self._send({"t": "ack", "taken": taken})

    def _on_role_message(self, kind: str, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        if kind in ("acked", "meta"):
            self._verdict(ctl)
            return
        with self._cond:
            if kind == "data":
                self._inbox.append((ctl, payload))
            elif kind == "eos":
                self._eos = True
            self._cond.notify_all()

    def _report(self) -> dict[str, float]:
        return {
            "idle_fraction": self.stats.idle_fraction(),
            "inbox": len(self._inbox),
            "direct_examples": self.stats.counters.get("direct_examples", 0.0),
        }
