"""Hand-off of captured hidden states from vLLM's worker to the VllmPipeline that asked for them.

Our KV connector (`engines.vllm_connector`) runs inside vLLM's worker process (tensor-parallel rank
0) and hands each finished request's `[S, L, H]` hidden states and its token ids over one of two
channels, chosen per request:

- `memory`: a ZeroMQ PUSH socket to the pipeline's PULL socket on a local `ipc://` address. Frames
  are the stream codec's (`stores.codec`: msgpack header, then raw tensor buffers sent without a
  copy). Nothing touches a disk, and it works whether the worker is our own process or a child.
- `file`: one safetensors file per request in a directory of the pipeline's, written under a temp
  name and renamed, so a reader never sees half a file.

Nothing is pickled on either channel. This module does not import vLLM: the pipeline and the tests
use it without it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    import zmq

    from specops.example import ExampleDict

log = logging.getLogger(__name__)

Handoff = Literal["memory", "file"]

KEY_PARAM = "specops_key"
"""Request `kv_transfer_params` entry naming the request for the hand-off (set by the pipeline)."""
HANDOFF_PARAM = "specops_handoff"
"""Request `kv_transfer_params` entry choosing the channel: `memory` or `file`."""
ADDRESS_PARAM = "address"
"""Connector extra-config entry: the pipeline's PULL address (memory hand-off)."""
DIRECTORY_PARAM = "directory"
"""Connector extra-config entry: the directory of hand-off files (file hand-off)."""

IPC_PATH_MAX = 107
"""Unix socket paths longer than this cannot be bound (sun_path)."""

_KEY = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class HandoffError(RuntimeError):
    """Hidden states of some requests did not arrive, or arrived malformed."""


@dataclass(frozen=True)
class Delivery:
    """One request's captured states as the worker saw them."""

    key: str
    token_ids: list[int]
    hidden_states: torch.Tensor
    """[S, L, H], slots in vLLM's (ascending, de-duplicated) layer order."""
    layer_ids: tuple[int, ...]
    """The layer of each slot, as the worker was configured."""


def check_key(key: str) -> str:
    """Keys become file names and header fields: keep them plain."""
    if not _KEY.match(key):
        raise ValueError(f"hand-off key {key!r} must match {_KEY.pattern}")
    return key


# --------------------------------------------------------------------------- memory (ZeroMQ)


def encode(delivery: Delivery) -> list[Any]:
    """Frames for one delivery in the stream codec's format (header, then raw buffers, no copy).

    The codec carries ExampleDicts; the worker knows no loss mask, so an all-zero one rides along.
    """
    import torch

    from specops.stores.codec import encode as encode_example

    states = delivery.hidden_states.detach().contiguous()
    example: ExampleDict = {
        "id": check_key(delivery.key),
        "token_ids": torch.tensor(delivery.token_ids, dtype=torch.int32),
        "loss_mask": torch.zeros(len(delivery.token_ids), dtype=torch.uint8),
        "hidden_states": states,
    }
    header, buffers = encode_example(example, delivery.layer_ids)
    return [header, *buffers]


def decode(frames: list[Any]) -> Delivery:
    """Inverse of `encode`; malformed messages raise HandoffError naming what is wrong."""
    from specops.stores.codec import CodecError, Header
    from specops.stores.codec import decode as decode_example

    if not frames:
        raise HandoffError("hand-off message has no frames")
    buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames]
    try:
        header = Header.from_bytes(buffers[0])
        example = decode_example(header, buffers[1:])
    except CodecError as exc:
        raise HandoffError(f"hand-off message: {exc}") from None
    return Delivery(
        key=example["id"],
        token_ids=example["token_ids"].tolist(),
        hidden_states=example["hidden_states"],
        layer_ids=header.layer_ids,
    )


class MemorySender:
    """Worker side: PUSH deliveries to the pipeline. Created lazily in the process that sends."""

    def __init__(self, address: str) -> None:
        import zmq

        self.address = address
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, 0)  # never drop or block: the pipeline bounds the batch
        self._socket.setsockopt(zmq.LINGER, 10_000)
        self._socket.connect(address)

    def send(self, delivery: Delivery) -> None:
        self._socket.send_multipart(encode(delivery), copy=False)

    def close(self) -> None:
        self._socket.close()
        self._context.term()


class MemoryReceiver:
    """Pipeline side: a PULL socket on a private `ipc://` address inside `directory`."""

    def __init__(self, directory: Path) -> None:
        import zmq

        self.path = directory / "handoff.sock"
        if len(str(self.path).encode()) > IPC_PATH_MAX:
            raise ValueError(f"hand-off socket path {self.path} is longer than {IPC_PATH_MAX} bytes")
        self.address = f"ipc://{self.path}"
        self._context = zmq.Context()
        self._socket: zmq.Socket[Any] = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.bind(self.address)

    def collect(self, keys: Collection[str], timeout_s: float) -> dict[str, Delivery]:
        """Wait until every key arrived. Deliveries for other keys (left over from a batch that
        failed earlier) are dropped, so one failure does not poison the batches after it."""
        import zmq

        wanted = set(keys)
        got: dict[str, Delivery] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(wanted):
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._socket.poll(left_ms, zmq.POLLIN):
                raise HandoffError(_missing(wanted, got, timeout_s, "memory"))
            delivery = decode(self._socket.recv_multipart(copy=False))
            if delivery.key in wanted:
                got[delivery.key] = delivery
            else:
                log.warning("hand-off: dropped hidden states of stale request %s", delivery.key)
        return got

    def close(self) -> None:
        self._socket.close(linger=0)
        self._context.term()
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- file


def file_path(directory: str | Path, key: str) -> Path:
    return Path(directory) / f"{check_key(key)}.safetensors"


def write_file(directory: str | Path, delivery: Delivery) -> Path:
    """Worker side: one safetensors file, written under a temp name and renamed."""
    import torch
    from safetensors.torch import save_file

    from specops.stores.atomic import temp_path

    final = file_path(directory, delivery.key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final, ".handoff-")
    tensors = {
        "hidden_states": delivery.hidden_states.detach().contiguous(),
        "token_ids": torch.tensor(delivery.token_ids, dtype=torch.int64),
    }
    try:
        save_file(tensors, str(tmp), metadata={"layer_ids": json.dumps(list(delivery.layer_ids))})
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


class FileReceiver:
    """Pipeline side: wait for each key's file, load it and delete it."""

    POLL_S = 0.005

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def collect(self, keys: Collection[str], timeout_s: float) -> dict[str, Delivery]:
        wanted = set(keys)
        got: dict[str, Delivery] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(wanted):
            for key in wanted - got.keys():
                path = file_path(self.directory, key)
                if not path.is_file():
                    continue
                got[key] = _read_file(path, key)
                path.unlink()
            if len(got) < len(wanted):
                if time.monotonic() > deadline:
                    raise HandoffError(_missing(wanted, got, timeout_s, "file"))
                time.sleep(self.POLL_S)
        return got


def _read_file(path: Path, key: str) -> Delivery:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing = sorted({"hidden_states", "token_ids"} - names)
        if missing:
            raise HandoffError(f"hand-off file {path} lacks tensor(s) {missing}")
        layer_ids = json.loads((f.metadata() or {}).get("layer_ids", "null"))
        if not isinstance(layer_ids, list):
            raise HandoffError(f"hand-off file {path} lacks its layer_ids metadata")
        return Delivery(
            key, f.get_tensor("token_ids").tolist(), f.get_tensor("hidden_states"), tuple(layer_ids)
        )


def _missing(wanted: set[str], got: dict[str, Delivery], timeout_s: float, handoff: str) -> str:
    missing = sorted(wanted - got.keys())
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    return (
        f"{handoff} hand-off: no hidden states for {len(missing)} request(s) after {timeout_s:.0f} s ({shown}); "
        "did vLLM's worker load specops.engines.vllm_connector?"
    )
