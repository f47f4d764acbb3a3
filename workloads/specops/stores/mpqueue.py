"""MPQueueStore: generator processes feed a trainer process on the same machine through a bounded queue.

The queue is a directory (`sync.path` / `data.path`, best on tmpfs such as /dev/shm) that the
consumer owns: it listens on `<dir>/queue.sock` (a Unix SOCK_SEQPACKET socket, so each small
control packet arrives whole) and producers connect to it. A producer writes each example's
tensor bytes into a file of its own in the directory and sends a msgpack descriptor (codec header,
file name, offsets); the consumer maps the file copy-on-write, unlinks it and builds tensors
straight on the mapping. Nothing is pickled and the payload is copied once (into the file).

Backpressure: a producer needs a credit per example; the consumer grants credits only while
granted-but-unused credits plus queued-but-untaken examples stay under `queue_size`, so
`write()` blocks when the trainer falls behind. End of stream: each producer announces its input
slice `k` of `K` and sends `eos` when done; the stream ends once all `K` slices have. A peer that
dies is seen at once (its socket closes): the other side raises StreamError naming it instead of
waiting forever. A queue keeps no history, so a vanished producer's slice is reported, not replayed
(use the ZeroMQ broker for redelivery).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from specops.paths import resolve_allowed
from specops.stores.base import StoreMeta
from specops.stores.codec import Header, decode, encode
from specops.stores.streaming import MetricsServer, StreamError, StreamStats, serve_metrics

if TYPE_CHECKING:
    from specops.config import RunConfig, SyncConfig, TrainDataConfig
    from specops.example import ExampleDict

log = logging.getLogger(__name__)
SOCKET_NAME = "queue.sock"
PAYLOAD_SUFFIX = ".ex"
ALIGN = 64
"""Each tensor starts at a multiple of this offset in the payload file, so views are aligned."""
MAX_PACKET = 1 << 20
MAX_UNIX_PATH = 107


def _pack(obj: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(obj)
    return packed


def _unpack(raw: bytes, peer: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise StreamError(f"{peer}: sent a packet that is not msgpack: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise StreamError(f"{peer}: sent a packet without a type")
    return obj


def queue_socket(directory: Path, field: str) -> str:
    """The socket path of the queue in `directory` (Unix socket paths are limited to 107 bytes)."""
    path = str(directory / SOCKET_NAME)
    if len(path.encode()) > MAX_UNIX_PATH:
        raise ValueError(f"{field}: {directory} is too long for a Unix socket path; use a shorter directory")
    return path


def _seqpacket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# --------------------------------------------------------------------------- producer


class MPQueueStore:
    """DataSink: one producer of input slice `k` of `K` writing into the queue at `path`."""

    def __init__(
        self,
        path: str | Path,
        meta: StoreMeta,
        *,
        slice_index: int = 0,
        num_slices: int = 1,
        allowed_roots: Sequence[str | Path] = (),
        connect_timeout_s: float = 120.0,
        field: str = "sync.path",
    ) -> None:
        """Connect to the consumer (waiting up to `connect_timeout_s` for it to start listening)."""
        if not 0 <= slice_index < num_slices:
            raise ValueError(f"slice_index={slice_index} must be in [0, num_slices={num_slices})")
        self.dir = resolve_allowed(path, allowed_roots, field)
        self.meta = meta
        self.stats = StreamStats("queue-producer")
        self._sock = _seqpacket()
        self._address = queue_socket(self.dir, field)
        self._connect(connect_timeout_s, field)
        self._seq = 0
        self._credits = 0
        self._wanted = False
        self._closed = False
        self._send(
            {"t": "hello", "pid": os.getpid(), "meta": meta.to_json(), "slice": [slice_index, num_slices]}
        )
        reply = self._recv()
        if reply["t"] == "error":
            from specops.stores.manifest import StoreMetaMismatchError

            self._sock.close()
            self._closed = True
            error = StoreMetaMismatchError if reply.get("kind") == "meta" else StreamError
            raise error(str(reply.get("error")))
        if reply["t"] != "welcome":
            raise StreamError(f"queue consumer at {self._address}: expected welcome, got {reply['t']!r}")

    @classmethod
    def from_config(cls, sync: SyncConfig, run: RunConfig, meta: StoreMeta) -> MPQueueStore:
        """The producer of slice `run.shard_index` of `run.num_shards` (local workers are slices too)."""
        if not sync.path:
            raise ValueError("sync.path is required for kind mpqueue (the queue directory)")
        return cls(
            sync.path,
            meta,
            slice_index=run.shard_index,
            num_slices=run.num_shards,
            allowed_roots=run.allowed_roots,
        )

    def _connect(self, timeout_s: float, field: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._sock.connect(self._address)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise StreamError(
                        f"{field}: no queue consumer is listening at {self._address} "
                        f"(waited {timeout_s:.0f} s); start the trainer first"
                    ) from None
                time.sleep(0.05)

    def _send(self, obj: dict[str, Any]) -> None:
        try:
            self._sock.sendall(_pack(obj), socket.MSG_NOSIGNAL)
        except OSError as exc:
            raise StreamError(f"the queue consumer at {self._address} is gone ({exc.strerror})") from None

    def _recv(self) -> dict[str, Any]:
        try:
            raw = self._sock.recv(MAX_PACKET)
        except OSError as exc:
            raise StreamError(f"the queue consumer at {self._address} is gone ({exc.strerror})") from None
        if not raw:
            raise StreamError(f"the queue consumer at {self._address} closed the queue before end-of-stream")
        return _unpack(raw, f"queue consumer at {self._address}")

    @property
    def committed_examples(self) -> int:
        """Examples handed to the consumer: what this sink has stored."""
        return int(self.stats.counters.get("sent_examples", 0))

    def done_ids(self) -> set[str]:
        """A queue keeps no history: nothing is skipped on a rerun."""
        return set()

    def write(self, examples: Sequence[ExampleDict]) -> None:
        """Queue each example; blocks while the queue is full."""
        if self._closed:
            raise StreamError("write() on a closed MPQueueStore")
        for ex in examples:
            self._put(ex)

    def _take_credit(self) -> None:
        if self._credits > 0:
            return
        if not self._wanted:
            self._send({"t": "want"})
            self._wanted = True
        started = time.monotonic()
        reply = self._recv()
        self.stats.inc("blocked_seconds", time.monotonic() - started)
        if reply["t"] != "go":
            raise StreamError(f"queue consumer at {self._address}: expected go, got {reply['t']!r}")
        self._credits += 1
        self._wanted = False

    def _put(self, ex: ExampleDict) -> None:
        header, buffers = encode(ex, self.meta.layer_ids)
        self._take_credit()
        name = f"{os.getpid()}-{self._seq}{PAYLOAD_SUFFIX}"
        offsets = _write_payload(self.dir / name, buffers)
        self._seq += 1
        self._credits -= 1
        self._send({"t": "data", "file": name, "header": header, "offsets": offsets})
        self.stats.count("sent", offsets[-1])
        self._send({"t": "want"})  # ask for the next credit while the next example is generated
        self._wanted = True
        self.stats.maybe_log()

    def close(self) -> None:
        """Send end-of-stream for this slice; the consumer ends once every slice has."""
        if self._closed:
            return
        self._closed = True
        try:
            self._send({"t": "eos"})
        finally:
            self._sock.close()
            self.stats.maybe_log(force=True)


def _write_payload(path: Path, buffers: Sequence[Any]) -> list[int]:
    """Write buffers at ALIGN-ed offsets; returns each start plus the end (the file size)."""
    offsets: list[int] = []
    position = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for buf in buffers:
            pad = -position % ALIGN
            if pad:
                os.write(fd, b"\0" * pad)
                position += pad
            offsets.append(position)
            view = memoryview(buf).cast("B")
            while view:
                written = os.write(fd, view)
                view = view[written:]
                position += written
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return [*offsets, position]


# --------------------------------------------------------------------------- consumer


@dataclass
class _Producer:
    sock: socket.socket
    pid: int = 0
    slice: tuple[int, int] | None = None
    unused_credits: int = 0
    eos: bool = False

    def label(self) -> str:
        where = f" (slice {self.slice[0]}/{self.slice[1]})" if self.slice else ""
        return f"producer pid {self.pid}{where}"


class MPQueueSource:
    """StreamSource: the one consumer of the queue at `path`; yields examples until every slice ends."""

    def __init__(
        self,
        path: str | Path,
        *,
        queue_size: int = 16,
        allowed_roots: Sequence[str | Path] = (),
        timeout_s: float | None = None,
        metrics_port: int | None = None,
        field: str = "data.path",
    ) -> None:
        """Create the queue directory and listen. `timeout_s` bounds a wait with no data at all
        (None = wait for producers forever)."""
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.dir = resolve_allowed(path, allowed_roots, field)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._address = queue_socket(self.dir, field)
        self._claim_address(field)
        self._listener = _seqpacket()
        self._listener.bind(self._address)
        self._listener.listen(256)
        self._listener.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._producers: dict[socket.socket, _Producer] = {}
        self._ready: deque[tuple[dict[str, Any], _Producer]] = deque()
        self._wanting: deque[_Producer] = deque()
        """Producers waiting for a credit, in the order they asked (one entry each at most)."""
        self._queue_size = queue_size
        self._outstanding = 0
        self._num_slices: int | None = None
        self._finished_slices: set[int] = set()
        self._meta: StoreMeta | None = None
        self._timeout_s = timeout_s
        self._closed = False
        self.stats = StreamStats("queue-consumer")
        self._metrics: MetricsServer | None = serve_metrics(metrics_port, [self.stats])

    @classmethod
    def from_config(cls, data: TrainDataConfig, allowed_roots: Sequence[str | Path]) -> MPQueueSource:
        if not data.path:
            raise ValueError("data.path is required for kind mpqueue (the queue directory)")
        return cls(data.path, allowed_roots=allowed_roots, timeout_s=data.stall_timeout_s)

    def _claim_address(self, field: str) -> None:
        """Remove a socket left by a killed consumer; refuse if a live one still listens."""
        if not os.path.exists(self._address):
            return
        probe = _seqpacket()
        try:
            probe.connect(self._address)
        except OSError:
            os.unlink(self._address)  # stale: nobody listens
        else:
            raise StreamError(f"{field}: another consumer already reads the queue at {self.dir}")
        finally:
            probe.close()

    @property
    def meta(self) -> StoreMeta:
        """The producers' StoreMeta; waits for the first producer to connect."""
        while self._meta is None:
            self._pump(wait=True)
        return self._meta

    def __iter__(self) -> Iterator[ExampleDict]:
        while True:
            if self._ready:
                packet, producer = self._ready.popleft()
                yield self._take(packet, producer)
            elif self._finished():
                return
            else:
                self._pump(wait=True)

    def _finished(self) -> bool:
        return self._num_slices is not None and len(self._finished_slices) == self._num_slices

    def _take(self, packet: dict[str, Any], producer: _Producer) -> ExampleDict:
        path = self.dir / str(packet["file"])
        if path.parent != self.dir:
            raise StreamError(
                f"{producer.label()}: payload name {packet['file']!r} leaves the queue directory"
            )
        header = Header.from_bytes(packet["header"])
        offsets = packet.get("offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != len(header.tensors) + 1
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
        ):
            raise StreamError(f"{producer.label()}: {header.id}: bad payload offsets {offsets!r}")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped: Any = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
        path.unlink()
        if size != offsets[-1]:
            raise StreamError(
                f"{producer.label()}: payload {path.name} has {size} bytes, expected {offsets[-1]}"
            )
        view = memoryview(mapped)
        frames = [
            view[start : start + spec.nbytes] for start, spec in zip(offsets, header.tensors, strict=False)
        ]
        ex = decode(header, frames)
        self._check(ex)
        self._outstanding -= 1
        self.stats.count("received", size)
        self.stats.set("queue_depth", len(self._ready))
        self._grant()
        self.stats.maybe_log()
        return ex

    def _check(self, ex: ExampleDict) -> None:
        from specops.stores.shards import check_example

        assert self._meta is not None
        try:
            check_example(ex, self._meta)
        except ValueError as exc:
            raise StreamError(f"queue at {self.dir}: {exc}") from None

    def _pump(self, wait: bool) -> None:
        """Accept producers and read their packets; `wait` blocks until something arrives."""
        started = time.monotonic()
        events = self._selector.select(timeout=(self._timeout_s if wait else 0))
        if wait:
            self.stats.inc("idle_seconds", time.monotonic() - started)
        if wait and not events:
            raise StreamError(f"queue at {self.dir}: no data for {self._timeout_s} s ({self._status()})")
        for key, _ in events:
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock is self._listener:
                self._accept()
            else:
                self._read(self._producers[sock])
        self._grant()

    def _status(self) -> str:
        slices = f"{len(self._finished_slices)}/{self._num_slices or '?'} slices finished"
        return f"{len(self._producers)} producer(s) connected, {slices}"

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            sock, _ = self._listener.accept()
            sock.setblocking(True)
            self._producers[sock] = _Producer(sock)
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, producer: _Producer) -> None:
        try:
            raw = producer.sock.recv(MAX_PACKET)
        except ConnectionResetError:
            # A peer that closes with unread packets leaves ECONNRESET, reported once and before
            # the packets it sent last (its eos among them): read on.
            try:
                raw = producer.sock.recv(MAX_PACKET, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                raw = b""
        if not raw:
            self._drop(producer)
            return
        packet = _unpack(raw, producer.label())
        kind = packet["t"]
        if kind == "hello":
            self._hello(producer, packet)
        elif kind == "want":
            if producer.slice is None or producer in self._wanting:
                raise StreamError(f"{producer.label()}: asked for a credit out of turn")
            self._wanting.append(producer)
        elif kind == "data":
            if producer.unused_credits < 1:
                raise StreamError(f"{producer.label()}: sent an example without a credit")
            producer.unused_credits -= 1
            self._ready.append((packet, producer))
            self.stats.set("queue_depth", len(self._ready))
        elif kind == "eos":
            producer.eos = True
            with contextlib.suppress(ValueError):
                self._wanting.remove(producer)
            if producer.slice is not None:
                self._finished_slices.add(producer.slice[0])
        else:
            raise StreamError(f"{producer.label()}: unknown packet type {kind!r}")

    def _hello(self, producer: _Producer, packet: dict[str, Any]) -> None:
        producer.pid = int(packet.get("pid", 0))
        index, count = (int(v) for v in packet["slice"])
        meta = StoreMeta.from_json(packet["meta"])
        problem = self._refusal(meta, index, count)
        if problem is not None:
            kind, text = problem
            log.error("queue at %s: refusing producer pid %d: %s", self.dir, producer.pid, text)
            self._reply(producer, {"t": "error", "kind": kind, "error": text})
            self._drop(producer, quiet=True)
            return
        producer.slice = (index, count)
        self._meta = meta
        self._num_slices = count
        self._reply(producer, {"t": "welcome"})

    def _refusal(self, meta: StoreMeta, index: int, count: int) -> tuple[str, str] | None:
        if self._meta is not None:
            from specops.stores.manifest import StoreMetaMismatchError, check_meta

            try:
                check_meta(self._meta, meta, self.dir)
            except StoreMetaMismatchError as exc:
                return "meta", str(exc)
        if self._num_slices is not None and count != self._num_slices:
            return (
                "slice",
                f"this queue's producers split the input into {self._num_slices} slices, not {count}",
            )
        busy = [p for p in self._producers.values() if p.slice is not None and p.slice[0] == index]
        if index in self._finished_slices or busy:
            return "slice", f"slice {index}/{count} is already produced into {self.dir}"
        return None

    def _reply(self, producer: _Producer, obj: dict[str, Any]) -> bool:
        """Send to a producer; a closed peer is dropped when its socket reads EOF (packets it sent
        before closing, its eos included, are still read first)."""
        try:
            producer.sock.sendall(_pack(obj), socket.MSG_NOSIGNAL)
            return True
        except OSError:
            return False

    def _grant(self) -> None:
        """Hand credits to waiting producers in the order they asked, while the queue has room."""
        while self._wanting and self._outstanding < self._queue_size:
            producer = self._wanting.popleft()
            if self._reply(producer, {"t": "go"}):
                producer.unused_credits += 1
                self._outstanding += 1

    def _drop(self, producer: _Producer, quiet: bool = False) -> None:
        self._producers.pop(producer.sock, None)
        with contextlib.suppress(ValueError):
            self._wanting.remove(producer)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(producer.sock)
        producer.sock.close()
        self._outstanding -= producer.unused_credits
        producer.unused_credits = 0
        if not producer.eos and producer.slice is not None and not quiet:
            raise StreamError(
                f"queue at {self.dir}: {producer.label()} vanished before end-of-stream; "
                "examples of its slice are missing (rerun that slice)"
            )

    def close(self) -> None:
        """Stop listening and delete undelivered payload files (producers then see the queue gone)."""
        if self._closed:
            return
        self._closed = True
        for producer in list(self._producers.values()):
            producer.sock.close()
        self._producers.clear()
        self._selector.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._address)
        for leftover in self.dir.glob(f"*{PAYLOAD_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        if self._metrics is not None:
            self._metrics.close()
        self.stats.maybe_log(force=True)
