"""What the broker and its clients share: control frames, timing, CURVE keys and socket setup.

Every ZeroMQ message is multipart: frame 0 is a msgpack control map with a type `t` (and the
sender's session id `sid` for client messages); data messages append the codec header and the raw
tensor frames. The protocol itself is described in docs/streaming.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from specops.stores.streaming import StreamError

if TYPE_CHECKING:
    import zmq

BROKER_KEY = "broker"
CLIENT_KEY = "client"


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


def range_pair(value: Any) -> tuple[int, int]:
    """`[index, count]` as sent on the wire, checked."""
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ProtocolError(f"a range must be [index, count] with 0 <= index < count, got {value!r}")
    return int(value[0]), int(value[1])


# --------------------------------------------------------------------------- CURVE


@dataclass(frozen=True)
class CurveKeys:
    """Z85 keys of one side: its own pair, plus the broker's public key for clients."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    directory: Path | None = None
    """Where authorized client public keys (`*.key`) live; broker side only."""


def write_keys(directory: Path) -> list[Path]:
    """Create `broker.key[_secret]` and `client.key[_secret]` in `directory` (secrets mode 0600)."""
    import zmq.auth

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (BROKER_KEY, CLIENT_KEY):
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
    """The broker's key pair; every `*.key` public key in the directory may connect."""
    public, secret = _load(directory, BROKER_KEY, secret=True)
    assert secret is not None
    return CurveKeys(public=public, secret=secret, directory=directory)


def client_keys(directory: Path) -> CurveKeys:
    """A client's key pair and the broker's public key."""
    public, secret = _load(directory, CLIENT_KEY, secret=True)
    server, _ = _load(directory, BROKER_KEY, secret=False)
    assert secret is not None
    return CurveKeys(public=public, secret=secret, server_public=server)


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
