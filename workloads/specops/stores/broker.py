"""The ZeroMQ broker between N generators (producers) and M trainer ranks (consumers).

One ROUTER socket serves both sides. Guarantees (see docs/streaming.md for the protocol):

- Bounded memory: a producer offers each example (id, size) and sends it only after a `go`; the
  broker grants `go`s while the bytes it holds plus the bytes it promised stay under
  `max_bytes`. Consumers grant credits; the broker pushes at most that many unacked examples to each.
- Two data paths, chosen by each consumer: relay (the producer sends to the broker, which holds
  the bytes and pushes them on) or direct (the consumer advertises an endpoint, and the `go`
  sends the producer there: the broker keeps the bookkeeping but never the bytes, so each byte
  crosses the network once). A direct example's lease is the consumer's credit, as for relay.
- No loss: an example stays with the broker until a consumer acks it, and with its producer until
  the broker acks it back (after the consumer did). A vanished consumer's unacked examples are
  delivered again; a restarted broker gets every unacked example again from its producers.
- No duplicates: delivered ids are journaled (in `state_dir`, when given, before any ack goes
  out); an offer of a delivered id is acked without its data, an offer of an id already held
  waits for that copy. Consumers re-send acks the broker had not confirmed when they reconnect,
  and a broker restarted on a journal holds dispatch for one timeout so they can.
- Work assignment: the input is split into hash ranges; producers claim ranges and report each
  complete once all its examples are delivered. A producer that vanishes releases its unfinished
  ranges to the next claimer. The stream ends (`eos` to consumers) when every range is complete.

The broker never imports torch: it moves frames it does not look into.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack
import zmq

from specops.stores.atomic import disk_full_as_error, write_json_atomic
from specops.stores.base import StoreMeta
from specops.stores.streaming import MetricsServer, StreamStats, serve_metrics
from specops.stores.wire import (
    MAX_SEQ,
    ROLES,
    CurveKeys,
    ProtocolError,
    Timing,
    pack,
    parse_request,
    secure_server,
)

log = logging.getLogger(__name__)
STREAM_FILE = "stream.json"
JOURNAL_FILE = "journal.msgpack"
MAX_BATCH = 256
"""Messages handled per poll before housekeeping runs."""
FRAME_SLACK = 1 << 20
"""Bytes a frame may exceed `max_bytes` by (control maps and example headers are small): a peer
sending a larger frame is disconnected by ZeroMQ before the broker buffers it."""
RCVHWM = 1024
"""Messages queued per connection before ZeroMQ stops reading from it (TCP backpressure)."""


def meta_differences(stored: StoreMeta, offered: StoreMeta) -> str:
    have, want = asdict(stored), asdict(offered)
    return "; ".join(
        f"{k}: stream {have[k]!r}, this generator {want[k]!r}" for k in have if have[k] != want[k]
    )


# --------------------------------------------------------------------------- journal


class Journal:
    """What must survive a broker restart: the stream's StoreMeta and range count, the complete
    ranges and every delivered id (with its range and the consumer session it went to). Kept in
    memory; with a directory, also appended to `journal.msgpack` before the broker acks anything
    (kill -9 safe: one write() per record batch; an fsync every `fsync_every_s` covers power loss;
    a full disk cuts a half-written batch off again and stops the broker with `DiskFull`)."""

    def __init__(self, directory: Path | None, fsync_every_s: float = 1.0) -> None:
        self.directory = directory
        self.meta: StoreMeta | None = None
        self.ranges: int | None = None
        self.complete: set[int] = set()
        self.delivered: dict[str, int] = {}
        self.owner: dict[str, str] = {}
        """Delivered id -> the consumer session that took it (absent in journals written before
        owners were recorded: such an id may be confirmed to any consumer that asks)."""
        self._fd: int | None = None
        self._size = 0
        """Bytes of whole records in the journal file."""
        self._fsync_every_s = fsync_every_s
        self._last_fsync = time.monotonic()
        self._dirty = False
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self._load(directory)
            self._fd = os.open(directory / JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._size = os.fstat(self._fd).st_size

    @property
    def resumed(self) -> bool:
        """Whether this journal continues an earlier broker's stream."""
        return self.meta is not None or bool(self.delivered)

    def _load(self, directory: Path) -> None:
        stream = directory / STREAM_FILE
        if stream.is_file():
            data = json.loads(stream.read_text())
            self.meta = StoreMeta.from_json(data["meta"]) if data.get("meta") else None
            self.ranges = data.get("ranges")
        path = directory / JOURNAL_FILE
        if not path.is_file():
            return
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(path.read_bytes())
        good = 0
        sids: dict[str, str] = {}  # one string per consumer session, not one per id
        try:
            for record in unpacker:
                if record[0] == "d":
                    self.delivered[record[1]] = int(record[2])
                    if len(record) > 3:
                        self.owner[record[1]] = sids.setdefault(record[3], record[3])
                elif record[0] == "c":
                    self.complete.add(int(record[1]))
                good = unpacker.tell()
        except (ValueError, IndexError, TypeError, msgpack.UnpackException) as exc:
            log.warning("%s: journal damaged after byte %d (%s); keeping what precedes", path, good, exc)
        if good < path.stat().st_size:
            os.truncate(path, good)  # a torn tail record from a crash mid-write
        log.info(
            "journal %s: %d delivered ids, %d/%s ranges complete",
            directory,
            len(self.delivered),
            len(self.complete),
            self.ranges,
        )

    def set_stream(self, meta: StoreMeta | None = None, ranges: int | None = None) -> None:
        self.meta = meta or self.meta
        self.ranges = ranges or self.ranges
        if self.directory is not None:
            write_json_atomic(
                self.directory / STREAM_FILE,
                {"meta": self.meta.to_json() if self.meta else None, "ranges": self.ranges},
            )

    def deliver(self, items: list[tuple[str, int]], owner: str) -> None:
        """Record `items` (id, range) as taken by consumer session `owner`."""
        fresh = [(ex_id, rng) for ex_id, rng in items if ex_id not in self.delivered]
        if not fresh:
            return
        self._append(b"".join(msgpack.packb(["d", ex_id, rng, owner]) for ex_id, rng in fresh))
        self.delivered.update(fresh)
        self.owner.update((ex_id, owner) for ex_id, _ in fresh)

    def mark_complete(self, index: int) -> None:
        if index not in self.complete:
            self._append(msgpack.packb(["c", index]))
            self.complete.add(index)

    def ids_in(self, index: int) -> list[str]:
        return [ex_id for ex_id, rng in self.delivered.items() if rng == index]

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            return
        assert self.directory is not None
        view = memoryview(data)
        try:
            with disk_full_as_error(self.directory / JOURNAL_FILE, "the broker journal"):
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError:
            os.ftruncate(self._fd, self._size)  # no torn record: the journal ends at the last whole one
            raise
        self._size += len(data)
        self._dirty = True

    def sync(self, force: bool = False) -> None:
        """fsync the journal at most every `fsync_every_s` (always when `force`)."""
        if self._fd is None or not self._dirty:
            return
        if force or time.monotonic() - self._last_fsync >= self._fsync_every_s:
            assert self.directory is not None
            with disk_full_as_error(self.directory / JOURNAL_FILE, "the broker journal"):
                os.fsync(self._fd)
            self._dirty = False
            self._last_fsync = time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            self.sync(force=True)
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------- state


@dataclass
class Entry:
    """One example the broker holds until a consumer acks it."""

    id: str
    range: int
    frames: list[zmq.Frame] | None
    """None: a direct example, whose bytes go from its producer to the leasing consumer."""
    nbytes: int
    waiters: list[tuple[str, int]] = field(default_factory=list)
    """(producer sid, seq) to ack once delivered: the sender and anyone who offered it again."""
    lease: str | None = None
    """The consumer sid it was pushed to, unacked."""


@dataclass
class Offer:
    sid: str
    seq: int
    id: str
    nbytes: int
    range: int


@dataclass
class Session:
    sid: str
    role: str
    rid: bytes
    last_seen: float
    data_rid: bytes | None = None
    """Consumers: the connection examples go out on (control replies use `rid`)."""
    attached: bool = False
    """Consumers: said how many examples they take (`attach`)."""
    direct: str | None = None
    """Direct consumers: the endpoint producers send its examples to."""
    direct_since: float | None = None
    """Direct consumers: when producers were first sent to its endpoint."""
    direct_ok: bool = False
    """Direct consumers: an example is known to have arrived at its endpoint (it is reachable)."""
    claims: set[int] = field(default_factory=set)
    credit: int = 0
    leases: set[str] = field(default_factory=set)
    reported: dict[str, float] = field(default_factory=dict)
    """The client's own stats from its last heartbeat (idle fraction, unacked bytes...)."""


@dataclass(frozen=True)
class BrokerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    max_bytes: int = 2 << 30
    """Bytes of example frames held plus promised to producers, at most."""
    state_dir: Path | None = None
    """Journal directory; without one a broker restart starts a new stream."""
    ranges: int | None = None
    """Input ranges for claims; default: what the first claiming producer asks for."""
    timing: Timing = field(default_factory=Timing)
    curve: CurveKeys | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    exit_after_eos: bool = False
    """Exit once the stream has ended and no client has been connected for `timing.timeout_s`
    (local runs and tests): a generator that starts late still hears that the stream is done
    instead of waiting for a broker that has gone."""


class Broker:
    """The broker loop; `run()` serves until `stop()` (or SIGTERM via `serve`)."""

    def __init__(self, config: BrokerConfig) -> None:
        if config.max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.config = config
        self.instance = uuid.uuid4().hex
        self.journal = Journal(config.state_dir)
        self.timing = config.timing
        self.entries: dict[str, Entry] = {}
        self.queue: deque[str] = deque()
        """Ids waiting for a consumer; redeliveries go to the front."""
        self.offers: deque[Offer] = deque()
        self.reserved: dict[tuple[str, int], Offer] = {}
        self.sessions: dict[str, Session] = {}
        self.leased: dict[str, tuple[int, set[str]]] = {}
        """Example id -> (range, every consumer session it was pushed or sent to in this broker's
        lifetime), until it is delivered: only those may take it."""
        self.claimed_by: dict[int, set[str]] = {}
        """Range -> every producer session that claimed it in this broker's lifetime: only those
        may report it complete."""
        self.completing: set[int] = set()
        """Ranges one holder completed while others still held them: complete once none does."""
        self.held_bytes = 0
        self.reserved_bytes = 0
        self.eos_sent = False
        self.last_client_at = time.monotonic()
        """When the last client left (`exit_after_eos` waits `timeout_s` past it)."""
        self.grace_until = time.monotonic() + (self.timing.timeout_s if self.journal.resumed else 0.0)
        self.stats = StreamStats("broker")
        self._stalled_since: float | None = None
        for name in ("stalls", "stalled_seconds"):  # served from the start, at 0
            self.stats.inc(name, 0.0)
        """Since when producers' offers wait for room in `max_bytes` (backpressure), if they do."""
        self._stopping = False
        self._rr: deque[str] = deque()
        """Consumer sids in round-robin order for dispatch."""
        self._ctx = zmq.Context(io_threads=2)
        self._auth: Any = None
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, RCVHWM)
        self.socket.setsockopt(zmq.MAXMSGSIZE, min(config.max_bytes + FRAME_SLACK, MAX_SEQ))
        self.socket.setsockopt(zmq.LINGER, 0)
        if config.curve is not None:
            self._start_auth(config.curve)
        secure_server(self.socket, config.curve)
        self.socket.bind(config.bind)
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._metrics: MetricsServer | None = serve_metrics(
            config.metrics_port, [self.stats], config.metrics_host
        )
        log.info(
            "broker %s on %s: max %d MiB held, state %s, %s",
            self.instance[:8],
            self.endpoint,
            config.max_bytes >> 20,
            config.state_dir or "in memory only (a restart starts a new stream)",
            "plaintext (no CURVE)"
            if config.curve is None
            else f"CURVE required (client keys in {config.curve.directory})",
        )

    def _start_auth(self, keys: CurveKeys) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(keys.directory))

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        tick = self.timing.heartbeat_s / 2
        next_tick = time.monotonic()
        try:
            while not self._stopping:
                wait_ms = max(0.0, next_tick - time.monotonic()) * 1000
                if poller.poll(math.ceil(wait_ms)):
                    for _ in range(MAX_BATCH):
                        try:
                            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                    self._dispatch()
                if time.monotonic() >= next_tick:
                    self._housekeeping()
                    next_tick = time.monotonic() + tick
                    if self._finished():
                        log.info("stream complete and no client for %.1f s: exiting", self.timing.timeout_s)
                        return
        finally:
            self.close()

    def stop(self) -> None:
        self._stopping = True

    def _finished(self) -> bool:
        """`exit_after_eos`: the stream ended and no client came for a whole timeout."""
        idle = time.monotonic() - self.last_client_at
        return (
            self.config.exit_after_eos
            and self.eos_sent
            and not self.sessions
            and idle >= self.timing.timeout_s
        )

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        self.journal.close()
        if self._metrics is not None:
            self._metrics.close()
        self.stats.maybe_log(force=True)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            self._check_reachable(session, now)
            if now - session.last_seen > self.timing.timeout_s:
                log.warning(
                    "%s %s: silent for %.1f s, expiring",
                    session.role,
                    session.sid[:8],
                    now - session.last_seen,
                )
                self._end_session(session)
        self._dispatch()
        self._check_eos()
        self.journal.sync()
        self._update_gauges()
        self.stats.maybe_log()

    def _note_stall(self, stalled: bool) -> None:
        """Backpressure for Prometheus: `stalls` counts the times offers began to wait for room,
        `stalled_seconds` how long they waited (brought up to date by every call)."""
        now = time.monotonic()
        if self._stalled_since is not None:
            self.stats.inc("stalled_seconds", now - self._stalled_since)
        elif stalled:
            self.stats.inc("stalls")
        self._stalled_since = now if stalled else None

    def _update_gauges(self) -> None:
        consumers = [s for s in self.sessions.values() if s.role == "consumer"]
        producers = [s for s in self.sessions.values() if s.role == "producer"]
        idle = [s.reported.get("idle_fraction", 0.0) for s in consumers]
        self.stats.set("queue_depth", len(self.queue))
        self.stats.set("leased", sum(len(s.leases) for s in consumers))
        self.stats.set("held_bytes", self.held_bytes)
        self.stats.set("reserved_bytes", self.reserved_bytes)
        self.stats.set("waiting_offers", len(self.offers))
        self._note_stall(self._stalled_since is not None)
        self.stats.set("producers", len(producers))
        self.stats.set("consumers", len(consumers))
        self.stats.set("producer_unacked_bytes", sum(s.reported.get("unacked_bytes", 0.0) for s in producers))
        self.stats.set("consumer_idle_fraction", sum(idle) / len(idle) if idle else 0.0)
        self.stats.set("ranges_complete", len(self.journal.complete))
        self.stats.set("ranges_total", self.journal.ranges or 0)

    # ------------------------------------------------------------------ messages

    def _send(self, rid: bytes, ctl: dict[str, Any], payload: list[zmq.Frame] | None = None) -> bool:
        """Send to one client; False (and the session ended) when it is no longer connected."""
        try:
            self.socket.send_multipart([rid, pack(ctl), *(payload or [])], zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            sid = next((s.sid for s in self.sessions.values() if rid in (s.rid, s.data_rid)), None)
            if sid is not None:
                log.warning("client %s is unreachable; ending its session", sid[:8])
                self._end_session(self.sessions[sid])
            return False

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """One message, inside its own error boundary: whatever a peer sends, the broker goes on
        serving the others. Fields are checked before anything changes (`parse_request`); a
        message that still fails resets its sender, which starts over with a hello."""
        if len(frames) < 2:
            return
        rid = frames[0].bytes
        try:
            self._route(rid, parse_request(frames[1].buffer), frames[2:], self._roles(frames[1]))
        except OSError:
            raise  # the broker's own disk or sockets, not the peer's doing
        except Exception as exc:
            self._reject(rid, exc)

    def _roles(self, frame: zmq.Frame) -> frozenset[str]:
        """The roles the sender may take: what its CURVE key allows (any without CURVE)."""
        if self.config.curve is None:
            return ROLES
        user = frame.get("User-Id")
        return self.config.curve.roles.get(str(user), ROLES)

    def _reject(self, rid: bytes, exc: Exception) -> None:
        log.warning(
            "client %s sent a bad message (%s); resetting it",
            rid.hex()[:8],
            exc,
            exc_info=not isinstance(exc, ProtocolError),  # anything else is a broker bug to see
        )
        self.stats.inc("rejected_messages")
        session = next((s for s in self.sessions.values() if rid in (s.rid, s.data_rid)), None)
        if session is not None:
            self._end_session(session)
        self._send(rid, {"t": "reset"})

    def _route(
        self, rid: bytes, ctl: dict[str, Any], payload: list[zmq.Frame], roles: frozenset[str]
    ) -> None:
        kind, sid = ctl["t"], ctl["sid"]
        role = "consumer" if kind == "attach" else ctl.get("role")
        if role is not None and role not in roles:  # every other message comes on a hello's connection
            text = f"this client's CURVE key may not act as a {role}; use the {role}'s key pair"
            self._send(rid, {"t": "error", "kind": "role", "error": text})
            return
        if kind == "hello":
            self._hello(rid, sid, ctl)
            return
        session = self.sessions.get(sid)
        if kind == "attach":  # a relay consumer's data connection, or a direct consumer's endpoint
            if session is not None and session.role == "consumer":
                self._attach(session, rid, ctl)
            return
        if session is None or session.rid != rid:
            if session is None and kind != "bye":
                self._send(rid, {"t": "reset"})  # e.g. this broker restarted: say hello again
            return
        session.last_seen = time.monotonic()
        needed, handler = {
            "hb": (session.role, self._heartbeat),
            "bye": (session.role, self._bye),
            "offer": ("producer", self._offer),
            "data": ("producer", self._data),
            "claim": ("producer", self._claim),
            "complete": ("producer", self._complete),
            "ids": ("producer", self._ids),
            "ack": ("consumer", self._ack),
        }[kind]
        if needed != session.role:
            raise ProtocolError(f"a {session.role} may not send {kind!r}")
        handler(session, ctl, payload)

    def _attach(self, session: Session, rid: bytes, ctl: dict[str, Any]) -> None:
        direct = ctl.get("direct")
        if direct is not None and not direct.startswith("tcp://"):
            raise ProtocolError(f"attach.direct must be a tcp:// endpoint, got {direct!r:.80}")
        session.direct = direct
        session.data_rid = None if direct else rid
        session.credit = max(0, ctl["credit"] - len(session.leases))  # a repeated attach adds nothing
        session.attached = True

    def _hello(self, rid: bytes, sid: str, ctl: dict[str, Any]) -> None:
        role = ctl["role"]
        if role == "producer" and ctl.get("meta") is None:
            raise ProtocolError("a producer's hello needs its meta")
        old = self.sessions.get(sid)
        if old is not None:
            self._end_session(old)
        if role == "producer":
            meta = StoreMeta.from_json(ctl["meta"])
            if self.journal.meta is None:
                self.journal.set_stream(meta=meta)
                for consumer in self._consumers():
                    self._send(consumer.rid, {"t": "meta", "meta": meta.to_json()})
            elif meta != self.journal.meta:
                text = (
                    f"the broker's stream comes from a different producer ({meta_differences(self.journal.meta, meta)}); "
                    "use the original verifier and layers, or a new broker state directory"
                )
                self._send(rid, {"t": "error", "kind": "meta", "error": text})
                return
        session = Session(sid=sid, role=role, rid=rid, last_seen=time.monotonic())
        self.sessions[sid] = session
        welcome = {
            "t": "welcome",
            "broker": self.instance,
            "heartbeat_s": self.timing.heartbeat_s,
            "timeout_s": self.timing.timeout_s,
            "meta": self.journal.meta.to_json() if self.journal.meta else None,
        }
        if role == "producer":
            for index, count in ctl.get("claims", []):
                if self.journal.ranges in (None, count):
                    self._hold(session, index)
            refused = [
                r for pair in ctl.get("completed", []) if (r := self._complete_range(session, pair, True))
            ]
            self._send(rid, welcome)
            for text in refused:
                self._send(rid, {"t": "error", "kind": "complete", "error": text})
        else:
            ok, lost = self._take(session, ctl.get("taken", []))
            self._rr.append(sid)
            self._send(rid, {**welcome, "ok": ok, "lost": lost})
            if self.eos_sent:
                self._send(rid, {"t": "eos"})
        log.info("%s %s connected (%d sessions)", role, sid[:8], len(self.sessions))

    def _consumers(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.role == "consumer"]

    def _heartbeat(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        stats = ctl.get("stats")
        if isinstance(stats, dict):
            session.reported = {str(k): float(v) for k, v in stats.items() if isinstance(v, int | float)}
        self._send(session.rid, {"t": "hb"})

    def _bye(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        log.info("%s %s left", session.role, session.sid[:8])
        self._end_session(session)

    def _end_session(self, session: Session) -> None:
        """Forget a client: a producer's claims and pending offers go, a consumer's unacked
        examples go back to the front of the queue."""
        if self.sessions.get(session.sid) is not session:
            return
        del self.sessions[session.sid]
        self.last_client_at = time.monotonic()
        if session.role == "producer":
            for index in session.claims & self.completing:
                if not any(index in s.claims for s in self.sessions.values()):
                    self._finish_range(index)
            session.claims.clear()
            self.offers = deque(o for o in self.offers if o.sid != session.sid)
            for key in [k for k in self.reserved if k[0] == session.sid]:
                self.reserved_bytes -= self.reserved.pop(key).nbytes
            for direct in [e for e in self.entries.values() if e.frames is None]:
                if any(sid == session.sid for sid, _ in direct.waiters):  # its bytes may never come
                    direct.waiters = [w for w in direct.waiters if w[0] != session.sid]
                    self._recall(direct)
            self._grant()
            return
        with contextlib.suppress(ValueError):
            self._rr.remove(session.sid)
        self._end_direct(session)
        for ex_id in sorted(session.leases, reverse=True):
            entry = self.entries.get(ex_id)
            if entry is not None and entry.lease == session.sid:
                entry.lease = None
                self.queue.appendleft(ex_id)
                self.stats.inc("redelivered_examples")
        session.leases.clear()

    def _end_direct(self, session: Session) -> None:
        """Stop sending to a consumer's endpoint: its direct examples are recalled, and producers
        drop whatever they still queue for it."""
        if session.direct is None:
            return
        for ex_id in sorted(session.leases, reverse=True):
            entry = self.entries.get(ex_id)
            if entry is not None and entry.lease == session.sid and entry.frames is None:
                self._recall(entry)
                self.stats.inc("redelivered_examples")
        for producer in [s for s in self.sessions.values() if s.role == "producer"]:
            self._send(producer.rid, {"t": "gone", "to": session.direct})
        session.direct = None
        self._grant()  # the broker may now have to relay

    def _check_reachable(self, session: Session, now: float) -> None:
        """A direct consumer that got nothing for a timeout after producers were sent to it
        cannot be reached from them (NAT, a firewall, a wrong data.direct_host): relay to it."""
        if session.direct is None or session.direct_since is None or session.direct_ok:
            return
        if session.reported.get("direct_examples", 0.0) > 0:
            session.direct_ok = True
        elif now - session.direct_since > self.timing.timeout_s:
            log.warning(
                "consumer %s: nothing sent to %s arrived in %.1f s; relaying its examples instead",
                session.sid[:8],
                session.direct,
                now - session.direct_since,
            )
            self._end_direct(session)

    def _recall(self, entry: Entry) -> None:
        """Take back a direct example whose consumer or producer went away: the consumer's credit
        returns, and the producers that still hold the example offer it again, first in line."""
        del self.entries[entry.id]
        owner = self.sessions.get(entry.lease or "")
        if owner is not None and entry.id in owner.leases:
            owner.leases.discard(entry.id)
            owner.credit += 1
        for sid, seq in reversed(entry.waiters):
            if sid in self.sessions:
                self.offers.appendleft(Offer(sid, seq, entry.id, entry.nbytes, entry.range))

    # ------------------------------------------------------------------ producers

    def _offer(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        for seq, ex_id, nbytes, rng in ctl["offers"]:
            offer = Offer(session.sid, seq, ex_id, nbytes, rng)
            if offer.nbytes > self.config.max_bytes:
                text = (
                    f"example {offer.id} is {offer.nbytes} bytes, more than the broker may hold "
                    f"({self.config.max_bytes}); raise sync.max_broker_bytes / --max-bytes"
                )
                self._send(session.rid, {"t": "error", "kind": "size", "error": text})
                return
            if not self._settled(offer):
                self.offers.append(offer)
        self._grant()

    def _settled(self, offer: Offer) -> bool:
        """Whether an offer needs no data: its id was delivered (acked now) or a copy is held or
        on its way (the offer waits for that copy)."""
        if offer.id in self.journal.delivered:
            producer = self.sessions.get(offer.sid)
            if producer is not None:
                self._send(producer.rid, {"t": "ack", "seqs": [offer.seq]})
        elif offer.id in self.entries:
            self.entries[offer.id].waiters.append((offer.sid, offer.seq))
        else:
            return False
        self.stats.inc("duplicate_examples")
        return True

    def _head_offer(self) -> Offer | None:
        """The first waiting offer that still needs its data (an offer re-queued by a recall may
        have been settled by another copy meanwhile)."""
        while self.offers and self._settled(self.offers[0]):
            self.offers.popleft()
        return self.offers[0] if self.offers else None

    def _relay_wanted(self) -> bool:
        """Take example bytes in only for relay consumers (or while no consumer is there yet)."""
        consumers = self._consumers()
        return not consumers or any(c.direct is None for c in consumers)

    def _grant(self) -> None:
        """Relay `go` for waiting offers, in arrival order, while held + promised bytes fit the budget."""
        if not self._relay_wanted():
            return
        grants: dict[str, list[int]] = {}
        stalled = False
        while (offer := self._head_offer()) is not None:
            used = self.held_bytes + self.reserved_bytes
            if used and used + offer.nbytes > self.config.max_bytes:
                stalled = True
                break
            self.offers.popleft()
            if (offer.sid, offer.seq) in self.reserved:
                continue  # offered twice: one go, and its bytes reserved once
            self.reserved[(offer.sid, offer.seq)] = offer
            self.reserved_bytes += offer.nbytes
            grants.setdefault(offer.sid, []).append(offer.seq)
        self._note_stall(stalled)
        for sid, seqs in grants.items():
            session = self.sessions.get(sid)
            if session is not None:
                self._send(session.rid, {"t": "go", "seqs": seqs})

    def _data(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        seq, ex_id = ctl["seq"], ctl["id"]
        nbytes = sum(len(f) for f in payload)
        offer = self.reserved.get((session.sid, seq))
        if offer is None or offer.id != ex_id or offer.nbytes != nbytes:
            raise ProtocolError(
                f"{ex_id:.80} (seq {seq}, {nbytes} bytes) came without a go for it: "
                f"{'none' if offer is None else f'{offer.id:.80}, {offer.nbytes} bytes'} was granted"
            )
        del self.reserved[(session.sid, seq)]
        self.reserved_bytes -= offer.nbytes
        self.stats.count("in", nbytes)
        if ex_id in self.journal.delivered:
            self._send(session.rid, {"t": "ack", "seqs": [seq]})
            self.stats.inc("duplicate_examples")
        elif ex_id in self.entries:
            self.entries[ex_id].waiters.append((session.sid, seq))
            self.stats.inc("duplicate_examples")
        else:
            self.entries[ex_id] = Entry(ex_id, offer.range, payload, nbytes, waiters=[(session.sid, seq)])
            self.held_bytes += nbytes
            self.queue.append(ex_id)
        self._grant()

    def _claim(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        req = ctl.get("req")
        want = ctl.get("want")
        count = want[1] if want is not None else ctl["count"]
        reply: dict[str, Any] = {"t": "claim", "req": req}
        if self.journal.ranges is None:
            self.journal.set_stream(ranges=self.config.ranges or count)
        ranges = self.journal.ranges
        assert ranges is not None
        if count != ranges:
            reply["error"] = (
                f"this stream splits the input into {ranges} ranges, this generator into {count}; "
                "every generator must use the same run.num_shards x run.num_workers (or claim ranges)"
            )
        elif want is not None:
            self._hold(session, want[0])
            reply.update(range=[want[0], ranges], complete=want[0] in self.journal.complete)
        elif len(self.journal.complete) == ranges:
            reply["done"] = True
        else:
            taken = {i for s in self.sessions.values() for i in s.claims} | self.journal.complete
            free = next((i for i in range(ranges) if i not in taken), None)
            if free is not None and time.monotonic() >= self.grace_until:
                self._hold(session, free)
                reply["range"] = [free, ranges]
            else:
                reply["wait"] = True
        self._send(session.rid, reply)

    def _hold(self, session: Session, index: int) -> None:
        session.claims.add(index)
        self.claimed_by.setdefault(index, set()).add(session.sid)

    def _complete(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        refused = self._complete_range(session, ctl["range"], False)
        if refused:
            self._send(session.rid, {"t": "error", "kind": "complete", "error": refused})
        else:
            self._send(session.rid, {"t": "completed", "range": list(ctl["range"])})

    def _complete_range(self, session: Session, pair: tuple[int, int], in_hello: bool) -> str | None:
        """A producer reports a range complete; returns why it is refused, if it is. Only a
        session that claimed the range may (or, in its hello to a broker restarted on a journal,
        one that finds the range unclaimed: its claim was the old broker's). The range is complete
        once no other session still holds a claim on it (two generators of one slice: the second
        to finish completes it, or the last to leave), so a stray completion cannot end the stream
        under a producer that is still writing."""
        index, count = pair
        if self.journal.ranges not in (None, count):
            return f"range {list(pair)} does not match the stream's {self.journal.ranges} ranges"
        others = {s.sid for s in self.sessions.values() if index in s.claims} - {session.sid}
        restarted = in_hello and not others and time.monotonic() < self.grace_until
        if session.sid not in self.claimed_by.get(index, ()) and not restarted:
            return (
                f"range {list(pair)}: this generator never claimed it, so it cannot complete it "
                "(did the broker restart without --state-dir?)"
            )
        session.claims.discard(index)
        if self.journal.ranges is None:
            self.journal.set_stream(ranges=count)
        if others:
            self.completing.add(index)
        else:
            self._finish_range(index)
        return None

    def _finish_range(self, index: int) -> None:
        self.completing.discard(index)
        self.journal.mark_complete(index)
        self._check_eos()

    def _ids(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        index = ctl["range"][0]
        self._send(session.rid, {"t": "ids", "req": ctl.get("req"), "ids": self.journal.ids_in(index)})

    # ------------------------------------------------------------------ consumers

    def _ack(self, session: Session, ctl: dict[str, Any], payload: list[zmq.Frame]) -> None:
        ok, lost = self._take(session, ctl["taken"])
        self._send(session.rid, {"t": "acked", "ok": ok, "lost": lost})

    def _take(self, session: Session, taken: list[tuple[str, int]]) -> tuple[list[str], list[str]]:
        """A consumer asks to hand these (id, range) examples to its trainer. Each goes to the
        first consumer that asks among those it was pushed or sent to: those are journaled as
        delivered (to that consumer) before their producers (and the consumer) hear of it; any
        other ask is answered `lost`. An id this broker never leased to the asker (forged, or
        leased by a broker that restarted before journaling it) is `lost` too: its producer
        still holds it and offers it again, so refusing loses nothing."""
        ok: list[str] = []
        lost: list[str] = []
        done: list[tuple[str, int]] = []
        for ex_id in dict.fromkeys(ex_id for ex_id, _ in taken):
            if ex_id in self.journal.delivered:
                mine = self.journal.owner.get(ex_id, session.sid) == session.sid
                (ok if mine else lost).append(ex_id)
                continue
            leased = self.leased.get(ex_id)
            if leased is None or session.sid not in leased[1]:
                self.stats.inc("refused_asks")
                lost.append(ex_id)
                continue
            entry = self.entries.get(ex_id)
            if entry is not None:
                session.direct_ok |= entry.frames is None and entry.lease == session.sid
                if entry.lease not in (None, session.sid):
                    log.warning(
                        "%s: taken by %s while pushed to %s", ex_id, session.sid[:8], str(entry.lease)[:8]
                    )
            done.append((ex_id, leased[0]))
            ok.append(ex_id)
        self.journal.deliver(done, session.sid)  # durable before anyone hears of it
        producer_acks: dict[str, list[int]] = {}
        for ex_id, _ in done:
            del self.leased[ex_id]
            self.stats.inc("delivered_examples")
            entry = self.entries.pop(ex_id, None)
            if entry is None:
                continue
            if entry.frames is not None:
                self.held_bytes -= entry.nbytes
            if entry.lease is None:
                with contextlib.suppress(ValueError):
                    self.queue.remove(ex_id)
            else:
                owner = self.sessions.get(entry.lease)
                if owner is not None and ex_id in owner.leases:
                    owner.leases.discard(ex_id)
                    owner.credit += 1  # credit comes back with the lease, whoever took it
            for sid, seq in entry.waiters:
                producer_acks.setdefault(sid, []).append(seq)
        for sid, seqs in producer_acks.items():
            producer = self.sessions.get(sid)
            if producer is not None:
                self._send(producer.rid, {"t": "ack", "seqs": seqs})
        self._grant()
        return ok, lost

    def _dispatch(self) -> None:
        """Give consumers with credit one example at a time, round-robin."""
        if time.monotonic() < self.grace_until:
            return
        gos: dict[tuple[str, str], list[int]] = {}
        idle_rounds = 0
        while self._rr and idle_rounds < len(self._rr):
            session = self.sessions.get(self._rr[0])
            self._rr.rotate(-1)
            if session is None or session.credit <= 0 or not self._lease_one(session, gos):
                idle_rounds += 1
                continue
            idle_rounds = 0
        for (sid, to), seqs in gos.items():
            producer = self.sessions.get(sid)
            if producer is not None:
                self._send(producer.rid, {"t": "go", "seqs": seqs, "to": to})

    def _lease_one(self, session: Session, gos: dict[tuple[str, str], list[int]]) -> bool:
        """Lease `session` one example: a held one (pushed on its data connection, or on its
        control connection if it is direct), else, for a direct consumer, a waiting offer (whose
        producer gets a `go` naming the consumer's endpoint, collected in `gos`)."""
        if self.queue and session.attached:
            entry = self.entries[self.queue.popleft()]
            frames = entry.frames
        elif session.direct and (offer := self._head_offer()) is not None:
            self.offers.popleft()
            entry = Entry(offer.id, offer.range, None, offer.nbytes, waiters=[(offer.sid, offer.seq)])
            self.entries[offer.id] = entry
            gos.setdefault((offer.sid, session.direct), []).append(offer.seq)
            session.direct_since = session.direct_since or time.monotonic()
            frames = None
        else:
            return False
        entry.lease = session.sid
        self.leased.setdefault(entry.id, (entry.range, set()))[1].add(session.sid)
        session.leases.add(entry.id)
        session.credit -= 1
        self.stats.count("out", entry.nbytes)
        if frames is not None:
            self._send(
                session.data_rid or session.rid, {"t": "data", "id": entry.id, "range": entry.range}, frames
            )
        return True

    def _check_eos(self) -> None:
        ranges = self.journal.ranges
        if self.eos_sent or ranges is None or len(self.journal.complete) < ranges or self.entries:
            return
        self.eos_sent = True
        self.journal.sync(force=True)
        log.info("stream complete: %d examples delivered over %d ranges", len(self.journal.delivered), ranges)
        for consumer in self._consumers():
            self._send(consumer.rid, {"t": "eos"})


def serve(broker: Broker) -> int:
    """Run a broker in the foreground until SIGTERM/SIGINT (or the end of the stream with exit_after_eos)."""

    def _stop(signum: int, frame: FrameType | None) -> None:
        broker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    broker.run()
    return 0
