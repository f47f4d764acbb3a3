"""ExampleDict <-> (msgpack header, raw tensor buffers): the wire and queue format, never pickle.

The header names the example id, the captured layer ids and, per tensor, its field, dtype, shape
and whether its buffer is zstd-compressed. Buffers are the tensors' bytes as they are in memory
(bf16 travels as its two bytes per element), so encoding copies nothing and sending them with
`copy=False` hands the tensor memory straight to the socket. Decoding checks everything a peer
could get wrong before a tensor is built: field and dtype allowlists, shapes, buffer lengths,
decompressed sizes. The header half (`Header`) needs no torch, so the broker can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

import msgpack
from typing_extensions import Buffer

from specops.example import TENSOR_FIELDS

if TYPE_CHECKING:
    import torch

    from specops.example import ExampleDict

FORMAT_VERSION = 1
ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
"""The dtypes a stream may carry (name -> bytes per element)."""
REQUIRED_FIELDS: tuple[str, ...] = ("token_ids", "loss_mask", "hidden_states")
MAX_DIMS = 4
MAX_ID_CHARS = 1024
ZSTD_LEVEL = 1
"""Fast level: the point is fewer bytes on a slow link, not the best ratio."""


class CodecError(ValueError):
    """A message is not a valid encoded example; the text names the example id and field."""


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor travels: field name, dtype, shape, and whether its buffer is zstd."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    compressed: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor itself (after decompression)."""
        return prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Header:
    """Frame 0 of an encoded example; `tensors[i]` describes buffer i."""

    id: str
    layer_ids: tuple[int, ...]
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors after decompression."""
        return sum(t.nbytes for t in self.tensors)

    def to_bytes(self) -> bytes:
        packed: bytes = msgpack.packb(
            {
                "v": FORMAT_VERSION,
                "id": self.id,
                "layer_ids": list(self.layer_ids),
                "tensors": [[t.name, t.dtype, list(t.shape), t.compressed] for t in self.tensors],
            }
        )
        return packed

    @classmethod
    def from_bytes(cls, raw: Buffer) -> Header:
        """Parse and validate a header; raises CodecError naming what is wrong."""
        try:
            data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise CodecError(f"example header is not valid msgpack: {exc}") from None
        if not isinstance(data, dict):
            raise CodecError(f"example header must be a map, got {type(data).__name__}")
        ex_id = data.get("id")
        if not isinstance(ex_id, str) or not 0 < len(ex_id) <= MAX_ID_CHARS:
            raise CodecError(f"example header: id must be a string of 1..{MAX_ID_CHARS} chars, got {ex_id!r}")
        if data.get("v") != FORMAT_VERSION:
            raise CodecError(f"{ex_id}: header version {data.get('v')!r}, this reader knows {FORMAT_VERSION}")
        layer_ids = data.get("layer_ids")
        if not isinstance(layer_ids, list) or not all(is_int(k) and k >= 0 for k in layer_ids):
            raise CodecError(f"{ex_id}: layer_ids must be a list of non-negative ints, got {layer_ids!r}")
        tensors = data.get("tensors")
        if not isinstance(tensors, list):
            raise CodecError(f"{ex_id}: tensors must be a list")
        specs = tuple(_tensor_spec(ex_id, item) for item in tensors)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise CodecError(f"{ex_id}: a tensor field appears twice: {names}")
        missing = [f for f in REQUIRED_FIELDS if f not in names]
        if missing:
            raise CodecError(f"{ex_id}: missing tensor field(s) {missing}")
        return cls(id=ex_id, layer_ids=tuple(layer_ids), tensors=specs)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_spec(ex_id: str, item: Any) -> TensorSpec:
    if not isinstance(item, list) or len(item) != 4:
        raise CodecError(f"{ex_id}: each tensor entry must be [name, dtype, shape, compressed], got {item!r}")
    name, dtype, shape, compressed = item
    if name not in TENSOR_FIELDS:
        raise CodecError(f"{ex_id}: unknown tensor field {name!r} (allowed: {', '.join(TENSOR_FIELDS)})")
    if dtype not in ITEMSIZE:
        raise CodecError(f"{ex_id}: {name}: dtype {dtype!r} is not allowed (allowed: {', '.join(ITEMSIZE)})")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(is_int(d) and d >= 0 for d in shape)
    ):
        raise CodecError(f"{ex_id}: {name}: shape must be 1..{MAX_DIMS} non-negative ints, got {shape!r}")
    if not isinstance(compressed, bool):
        raise CodecError(f"{ex_id}: {name}: compressed flag must be a bool, got {compressed!r}")
    return TensorSpec(name, dtype, tuple(shape), compressed)


# --------------------------------------------------------------------------- torch side


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> Buffer:
    """The tensor's memory as a flat byte buffer (no copy when it is already contiguous)."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    view: Buffer = flat.view(torch.uint8).numpy()  # type: ignore[assignment]  # numpy arrays are buffers
    return view


def encode(
    ex: ExampleDict, layer_ids: Sequence[int], *, compress: bool = False
) -> tuple[bytes, list[Buffer]]:
    """(header bytes, one buffer per tensor). Buffers alias the tensors unless compressed: keep
    the tensors unchanged until the buffers are sent."""
    specs: list[TensorSpec] = []
    buffers: list[Buffer] = []
    compressor = _zstd().ZstdCompressor(level=ZSTD_LEVEL) if compress else None
    for name in TENSOR_FIELDS:
        if name not in ex:
            continue
        tensor: torch.Tensor = ex[name]  # type: ignore[literal-required]
        dtype = dtype_name(tensor.dtype)
        if dtype not in ITEMSIZE:
            raise CodecError(f"{ex['id']}: {name}: dtype {dtype} cannot be streamed")
        buf = tensor_bytes(tensor)
        packed = False
        if compressor is not None and memoryview(buf).nbytes:
            small = compressor.compress(buf)
            if len(small) < memoryview(buf).nbytes:
                buf, packed = small, True
        specs.append(TensorSpec(name, dtype, tuple(tensor.shape), packed))
        buffers.append(buf)
    header = Header(id=ex["id"], layer_ids=tuple(int(k) for k in layer_ids), tensors=tuple(specs))
    return header.to_bytes(), buffers


def decode(header: Header | Buffer, frames: Sequence[Buffer]) -> ExampleDict:
    """Build the ExampleDict; tensors view `frames` (no copy) unless they were compressed."""
    import torch

    head = header if isinstance(header, Header) else Header.from_bytes(header)
    if len(frames) != len(head.tensors):
        raise CodecError(
            f"{head.id}: header lists {len(head.tensors)} tensors, message has {len(frames)} buffers"
        )
    out: dict[str, Any] = {"id": head.id}
    for spec, frame in zip(head.tensors, frames, strict=True):
        data = memoryview(frame).cast("B")
        if spec.compressed:
            data = memoryview(_decompress(head.id, spec, data))
        elif data.readonly:
            data = memoryview(bytearray(data))  # torch tensors must own writable memory
        if data.nbytes != spec.nbytes:
            raise CodecError(
                f"{head.id}: {spec.name}: {spec.dtype} {list(spec.shape)} needs {spec.nbytes} bytes, "
                f"buffer has {data.nbytes}"
            )
        dtype = getattr(torch, spec.dtype)
        if spec.nbytes == 0:
            out[spec.name] = torch.empty(spec.shape, dtype=dtype)
        else:
            out[spec.name] = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(spec.shape)
    ex: ExampleDict = out  # type: ignore[assignment]
    return ex


def _decompress(ex_id: str, spec: TensorSpec, data: memoryview) -> bytearray:
    zstd = _zstd()
    try:
        declared = zstd.frame_content_size(data)
        if declared != spec.nbytes:  # checked first: the declared size is what gets allocated
            raise CodecError(
                f"{ex_id}: {spec.name}: zstd frame declares {declared} bytes, the header {spec.nbytes}"
            )
        raw = zstd.ZstdDecompressor().decompress(data, max_output_size=spec.nbytes)
    except zstd.ZstdError as exc:
        raise CodecError(f"{ex_id}: {spec.name}: zstd buffer does not decompress: {exc}") from None
    return bytearray(raw)  # writable, so torch can view it


def _zstd() -> Any:
    import zstandard

    return zstandard
