"""What the broker and its clients share: control frames, timing, CURVE keys and socket setup.

Every ZeroMQ message is multipart: frame 0 is a msgpack control map with a type `t` (and the
sender's session id `sid` for client messages); data messages append the codec header and the raw
tensor frames. The protocol itself is described in docs/streaming.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from specops.stores.codec import MAX_ID_CHARS, is_int
from specops.stores.streaming import StreamError

if TYPE_CHECKING:
    import zmq

BROKER_KEY = "broker"
ROLES = frozenset({"producer", "consumer"})
"""Each role has its own key pair (`producer.key`, `consumer.key`), so a consumer cannot offer
and a producer cannot take examples."""
CLIENT_KEY = "client"
"""The key pair all clients shared before there was one per role: it may still take either."""
MAX_ITEMS = 65536
"""Most entries in one list of a control message (offers, asks, claims): a producer
offers its whole window (sync.queueSize, at most 65,536) at once after a reconnect."""
MAX_RANGES = 1_000_000
"""Most input ranges a stream may be split into (the bound of sync.claimRanges)."""
MAX_STATS = 64
"""Most figures a client reports in one heartbeat."""
MAX_CREDIT = 65536
"""Most examples a consumer may ask the broker to push ahead."""
MAX_SEQ = (1 << 63) - 1


class ProtocolError(StreamError):
    """A peer sent a frame this side cannot read."""


@dataclass(frozen=True)
class Timing:
    """Liveness: clients send a heartbeat every `heartbeat_s` when otherwise silent; a peer not
    heard from for `timeout_s` is gone. The broker announces its timing to clients in `welcome`."""

    heartbeat_s: float = 1.0
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_s < self.timeout_s:
            raise ValueError(
                f"heartbeat ({self.heartbeat_s} s) must be positive and shorter than the timeout ({self.timeout_s} s)"
            )


def pack(obj: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(obj)
    return packed


def unpack(raw: Any) -> dict[str, Any]:
    """Parse a control frame; raises ProtocolError on anything but a map with a string `t`."""
    try:
        obj = msgpack.unpackb(memoryview(raw), raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"control frame is not msgpack: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise ProtocolError("control frame is not a map with a string type 't'")
    return obj


def range_pair(value: Any, name: str = "range") -> tuple[int, int]:
    """`[index, count]` as sent on the wire, checked."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(is_int(v) for v in value)
        or not 0 <= value[0] < value[1] <= MAX_RANGES
    ):
        raise ProtocolError(
            f"{name} must be [index, count] with 0 <= index < count <= {MAX_RANGES}, got {value!r:.80}"
        )
    return int(value[0]), int(value[1])


# --------------------------------------------------------------------------- requests to the broker

Check = Callable[[Any, str], Any]
"""Validates one field of a control message (value, name) and returns it normalized."""


def integer(lo: int, hi: int) -> Check:
    """An int (never a bool or float: `inf` and `5e6` are refused) in [lo, hi]."""

    def check(value: Any, name: str) -> int:
        if not is_int(value) or not lo <= value <= hi:
            raise ProtocolError(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.80}")
        return value

    return check


def text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ProtocolError(f"{name} must be a string of 1..{MAX_ID_CHARS} characters, got {value!r:.80}")
    return value


def optional(check: Check) -> Check:
    return lambda value, name: None if value is None else check(value, name)


def items(check: Check, width: int = 0) -> Check:
    """A list of at most MAX_ITEMS entries, each checked; with `width`, each entry is a list of
    that many values, checked as one tuple."""

    def check_all(value: Any, name: str) -> list[Any]:
        if not isinstance(value, list | tuple) or len(value) > MAX_ITEMS:
            raise ProtocolError(f"{name} must be a list of at most {MAX_ITEMS} entries, got {value!r:.80}")
        for i, item in enumerate(value):
            if width and (not isinstance(item, list | tuple) or len(item) != width):
                raise ProtocolError(f"{name}[{i}] must be a list of {width} values, got {item!r:.80}")
        return [check(item, f"{name}[{i}]") for i, item in enumerate(value)]

    return check_all


def entry(*checks: Check) -> Check:
    """A fixed-width list entry whose values are checked one by one."""
    return lambda value, name: tuple(
        c(v, f"{name}[{i}]") for i, (c, v) in enumerate(zip(checks, value, strict=True))
    )


def _meta_value(kind: str, value: Any) -> bool:
    if kind == "int":
        return is_int(value) and 0 <= value <= MAX_SEQ
    if kind == "str":
        return isinstance(value, str) and len(value) <= MAX_ID_CHARS
    return isinstance(value, list) and len(value) <= MAX_ITEMS and all(is_int(v) for v in value)


def store_meta(value: Any, name: str) -> dict[str, Any]:
    """A StoreMeta's JSON form, every field of the type the dataclass declares (the first
    producer's meta is persisted as the stream's, so nothing unchecked may get there)."""
    from specops.stores.base import StoreMeta

    kinds = {f.name: str(f.type) for f in fields(StoreMeta)}
    required = {f.name for f in fields(StoreMeta) if f.default is MISSING}
    if not isinstance(value, dict) or not required <= set(value) <= set(kinds):
        raise ProtocolError(
            f"{name} must be a map of the StoreMeta fields {sorted(kinds)}, got {value!r:.80}"
        )
    for key, val in value.items():
        if not _meta_value(kinds[key], val):
            raise ProtocolError(f"{name}.{key} has the wrong type or size: {val!r:.80}")
    return value


def stats(value: Any, name: str) -> dict[str, float]:
    """A client's heartbeat figures: a few finite numbers by name."""
    if not isinstance(value, dict) or len(value) > MAX_STATS:
        raise ProtocolError(f"{name} must be a map of at most {MAX_STATS} numbers")
    out: dict[str, float] = {}
    for key, val in value.items():
        if (
            not isinstance(val, int | float)
            or isinstance(val, bool)
            or not math.isfinite(val)
            or abs(val) > 1e18
        ):
            raise ProtocolError(f"{name}.{key!s:.40} must be a finite number, got {val!r:.80}")
        out[text(key, f"{name} key")] = float(val)
    return out


def _role(value: Any, name: str) -> str:
    if value not in ROLES:
        raise ProtocolError(f"{name} must be 'producer' or 'consumer', got {value!r:.80}")
    return str(value)


SEQ = integer(0, MAX_SEQ)
RANGE_INDEX = integer(-1, MAX_RANGES - 1)
"""The range an example belongs to (-1: written before its producer claimed one)."""
ASK = entry(text, RANGE_INDEX)
"""A consumer's ask to take an example: [id, range]."""
REQUESTS: dict[str, dict[str, tuple[Check, bool]]] = {
    "hello": {
        "role": (_role, True),
        "meta": (store_meta, False),
        "claims": (items(range_pair, 2), False),
        "completed": (items(range_pair, 2), False),
        "taken": (items(ASK, 2), False),
    },
    "attach": {"credit": (integer(0, MAX_CREDIT), True), "direct": (optional(text), False)},
    "offer": {"offers": (items(entry(SEQ, text, integer(0, MAX_SEQ), RANGE_INDEX), 4), True)},
    "data": {"seq": (SEQ, True), "id": (text, True)},
    "claim": {
        "req": (optional(SEQ), False),
        "want": (optional(range_pair), False),
        "count": (optional(integer(1, MAX_RANGES)), False),
    },
    "complete": {"range": (range_pair, True)},
    "ids": {"req": (optional(SEQ), False), "range": (range_pair, True)},
    "ack": {"taken": (items(ASK, 2), True)},
    "hb": {"stats": (stats, False)},
    "bye": {},
}
"""What a client may send the broker, field by field: (check, required). Fields not listed are
dropped, so a handler sees only checked values."""


def parse_request(raw: Any) -> dict[str, Any]:
    """A client's control frame with every field checked (type, finiteness, bounds), or
    ProtocolError naming the field: the broker decides nothing on an unchecked number."""
    ctl = unpack(raw)
    kind = ctl["t"]
    spec = REQUESTS.get(kind)
    if spec is None:
        raise ProtocolError(f"unknown message type {kind!r:.40}")
    out: dict[str, Any] = {"t": kind, "sid": text(ctl.get("sid"), "sid")}
    for key, (check, required) in spec.items():
        if key in ctl:
            out[key] = check(ctl[key], f"{kind}.{key}")
        elif required:
            raise ProtocolError(f"{kind} needs {key!r}")
    if kind == "claim" and out.get("want") is None and out.get("count") is None:
        raise ProtocolError("claim needs 'want' or 'count'")
    return out


# --------------------------------------------------------------------------- CURVE


@dataclass(frozen=True)
class CurveKeys:
    """Z85 keys of one side: its own pair, plus the broker's public key for clients."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    peer_public: bytes | None = None
    """Clients: the other role's public key, for the direct path (a producer connects to a direct
    consumer's endpoint with it as the server key; the consumer admits only that key)."""
    directory: Path | None = None
    """Where authorized client public keys (`*.key`) live; broker side only."""
    roles: dict[str, frozenset[str]] = field(default_factory=dict)
    """Broker side: Z85 public key -> the roles its holder may take (keys not listed: either)."""


def write_keys(directory: Path) -> list[Path]:
    """Create the broker's and each role's key pair in `directory` (secrets mode 0600)."""
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (BROKER_KEY, *sorted(ROLES)):
        public, secret = zmq.auth.create_certificates(str(directory), name)
        os.chmod(secret, 0o600)
        written += [Path(public), Path(secret)]
    return written


def _load(directory: Path, name: str, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    path = directory / f"{name}.key{'_secret' if secret else ''}"
    if not path.is_file():
        raise FileNotFoundError(
            f"curve_key_dir: {path} is missing (create keys with `specops broker --write-keys DIR`)"
        )
    try:
        return zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"curve_key_dir: {path} is not a ZeroMQ certificate: {exc}") from None


def broker_keys(directory: Path) -> CurveKeys:
    """The broker's key pair; every `*.key` public key in the directory may connect, and the
    holder of `producer.key` or `consumer.key` only in that role."""
    public, secret = _load(directory, BROKER_KEY, secret=True)
    assert secret is not None
    roles = {
        _load(directory, role, secret=False)[0].decode("ascii"): frozenset({role})
        for role in ROLES
        if (directory / f"{role}.key").is_file()
    }
    return CurveKeys(public=public, secret=secret, directory=directory, roles=roles)


def client_keys(directory: Path, role: str) -> CurveKeys:
    """The key pair of `role` (`<role>.key_secret`; or the shared `client.key_secret` of a
    directory made before keys per role), the broker's public key, and the other role's."""
    shared = (
        not (directory / f"{role}.key_secret").is_file()
        and (directory / f"{CLIENT_KEY}.key_secret").is_file()
    )
    public, secret = _load(directory, CLIENT_KEY if shared else role, secret=True)
    server, _ = _load(directory, BROKER_KEY, secret=False)
    assert secret is not None
    (other,) = ROLES - {role}
    peer = public if shared else _load(directory, other, secret=False)[0]
    return CurveKeys(public=public, secret=secret, server_public=server, peer_public=peer)


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    if keys is None:
        return
    import zmq

    assert keys.server_public is not None
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)


def secure_server(sock: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    if keys is None:
        return
    import zmq

    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
