"""Shard files: many examples in one standard safetensors file, flat tensors plus token offsets.

Every tensor shares one flat token axis T (the example lengths summed):

    offsets        int64 [N+1]   example i covers tokens offsets[i]:offsets[i+1]
    token_ids      int32 [T]
    loss_mask      uint8 [T]
    hidden_states  dtype [T, L, H]
    logits         [T, V]        optional
    output_tokens  int32 [T]     optional
    vocab_ids      int32 [K]     distinct token ids at positions where loss_mask == 1
    vocab_counts   int64 [K]     how often each of them occurs there
    __metadata__   {"format": "specops-shard", "version": "1", "ids": "<JSON list of example ids>"}

Tensors are laid out by descending element size, so each one is naturally aligned and the reader
views it straight out of the file buffer. Writes stream each example's bytes to the file (no
concatenation copy) and hash exactly what lands on disk (`specops.stores.digests`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal, cast

import torch

from specops.example import ExampleDict
from specops.exitcodes import DataError
from specops.stores.base import StoreMeta
from specops.stores.digests import Algorithm, algorithm_of, digest_mismatch, new_hasher

SHARD_FORMAT = "specops-shard"
SHARD_VERSION = "1"
Compression = Literal["none", "zstd"]
OPTIONAL_FIELDS: tuple[str, ...] = ("logits", "output_tokens")
PER_TOKEN_FIELDS: tuple[str, ...] = ("token_ids", "loss_mask", "hidden_states", *OPTIONAL_FIELDS)
_READ_CHUNK = 16 << 20
_HASH_BEHIND: frozenset[Algorithm] = frozenset({"sha256"})
"""Digests slow enough to be worth a helper thread."""
_ZSTD_LEVEL = 3

_ST_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_DTYPES: dict[str, torch.dtype] = {v: k for k, v in _ST_NAMES.items()}


class ShardError(DataError):
    """A shard file is missing, malformed or disagrees with its manifest; the message names the file."""


class CorruptShardError(ShardError):
    """A shard's bytes differ from what its manifest recorded (truncated, extended or altered)."""


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`, the spelling StoreMeta uses."""
    return str(dtype).removeprefix("torch.")


def check_example(ex: ExampleDict, meta: StoreMeta) -> None:
    """Reject an example that does not match the store's producer; the error names id and field."""
    ex_id = ex.get("id")
    if not isinstance(ex_id, str) or not ex_id:
        raise ValueError(f"example id must be a non-empty string, got {ex_id!r}")
    tokens = ex["token_ids"]
    if tokens.dtype != torch.int32 or tokens.dim() != 1:
        raise ValueError(
            f"{ex_id}: token_ids must be int32 [S], got {dtype_name(tokens.dtype)} {list(tokens.shape)}"
        )
    seq = tokens.shape[0]
    expected: dict[str, tuple[str | None, list[int | None]]] = {
        "loss_mask": ("uint8", [seq]),
        "hidden_states": (meta.dtype, [seq, len(meta.layer_ids), meta.hidden_size]),
        "logits": (None, [seq, meta.vocab_size]),
        "output_tokens": ("int32", [seq]),
    }
    for field, (dtype, shape) in expected.items():
        if field not in ex:
            if field in OPTIONAL_FIELDS:
                continue
            raise ValueError(f"{ex_id}: missing {field}")
        t = cast(torch.Tensor, ex[field])  # type: ignore[literal-required]
        if (dtype is not None and dtype_name(t.dtype) != dtype) or list(t.shape) != shape:
            want = f"{dtype or 'float'} {shape}"
            raise ValueError(f"{ex_id}: {field} must be {want}, got {dtype_name(t.dtype)} {list(t.shape)}")


def present_fields(ex: ExampleDict) -> tuple[str, ...]:
    """The per-token tensor fields an example carries, in canonical order."""
    return tuple(f for f in PER_TOKEN_FIELDS if f in ex)


def loss_token_counts(examples: Sequence[ExampleDict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32, counts int64) of the tokens at loss-masked positions; builds the draft vocabulary later."""
    picked = [ex["token_ids"][ex["loss_mask"].bool()] for ex in examples]
    flat = torch.cat(picked) if picked else torch.empty(0, dtype=torch.int32)
    ids, counts = torch.unique(flat, return_counts=True)
    return ids.to(torch.int32), counts.to(torch.int64)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class WrittenShard:
    """What the manifest records about a shard just written."""

    digest: str
    """`<algorithm>:<hex>` of the bytes on disk (compressed if compressed)."""
    nbytes: int
    """Size on disk."""
    raw_nbytes: int
    """Size of the safetensors payload before compression."""
    num_tokens: int


class _Digester:
    """The digest of what a shard writer writes, as `<algorithm>:<hex>`.

    sha256 runs on a helper thread (hashlib drops the GIL), overlapping the writes, because
    without SHA extensions it is slower than the disk. xxh3 runs inline: at several GB/s it costs
    less than a thread hand-off per chunk, which on cores shared with other jobs cut the shard
    write speed by about a fifth. Callers must keep each buffer unchanged until `digest()` returns.
    """

    def __init__(self, algorithm: Algorithm) -> None:
        self._algorithm = algorithm
        self._hash = new_hasher(algorithm)
        self._pool = ThreadPoolExecutor(max_workers=1) if algorithm in _HASH_BEHIND else None

    def update(self, data: memoryview) -> None:
        if self._pool is None:
            self._hash.update(data)
        else:
            self._pool.submit(self._hash.update, data)

    def digest(self) -> str:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        return f"{self._algorithm}:{self._hash.hexdigest()}"


class _HashingWriter:
    """File-like sink that writes and hashes the same bytes; zstd's stream writer writes into it."""

    def __init__(self, f: BinaryIO, algorithm: Algorithm) -> None:
        self._f = f
        self.hash = _Digester(algorithm)
        self.nbytes = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        self.hash.update(view)
        self._f.write(view)
        self.nbytes += view.nbytes
        return view.nbytes


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The tensor's bytes without copying (CPU, contiguous)."""
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data


def encode_shard(
    examples: Sequence[ExampleDict], fields: Sequence[str]
) -> tuple[bytes, list[memoryview], int]:
    """(header bytes, data chunks in file order, total size) of a shard; examples are pre-checked."""
    lengths = [int(ex["token_ids"].shape[0]) for ex in examples]
    total = sum(lengths)
    offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)
    vocab_ids, vocab_counts = loss_token_counts(examples)
    parts: dict[str, tuple[torch.dtype, list[int], list[torch.Tensor]]] = {
        "offsets": (torch.int64, [len(examples) + 1], [offsets]),
        "vocab_ids": (torch.int32, [vocab_ids.numel()], [vocab_ids]),
        "vocab_counts": (torch.int64, [vocab_counts.numel()], [vocab_counts]),
    }
    for field in fields:
        tensors = [cast(torch.Tensor, ex[field]) for ex in examples]  # type: ignore[literal-required]
        parts[field] = (tensors[0].dtype, [total, *tensors[0].shape[1:]], tensors)
    header: dict[str, Any] = {
        "__metadata__": {
            "format": SHARD_FORMAT,
            "version": SHARD_VERSION,
            "ids": json.dumps([ex["id"] for ex in examples]),
        }
    }
    chunks: list[memoryview] = []
    pos = 0
    for name in sorted(parts, key=lambda n: (-parts[n][0].itemsize, n)):
        dtype, shape, tensors = parts[name]
        size = sum(t.numel() * t.element_size() for t in tensors)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": shape, "data_offsets": [pos, pos + size]}
        chunks.extend(_bytes_of(t) for t in tensors)
        pos += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    head = len(blob).to_bytes(8, "little") + blob
    return head, chunks, len(head) + pos


def write_shard(
    path: Path,
    examples: Sequence[ExampleDict],
    fields: Sequence[str],
    compression: Compression,
    digest: Algorithm,
) -> WrittenShard:
    """Write and fsync one shard at `path` (a temp name; the caller renames it into place)."""
    head, chunks, raw_nbytes = encode_shard(examples, fields)
    with open(path, "wb", buffering=1 << 20) as f:
        out = _HashingWriter(f, digest)
        if compression == "zstd":
            import zstandard

            # The frame's own checksum lets `zstd -d` (or any reader without the manifest) see damage.
            compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True)
            with compressor.stream_writer(cast(IO[bytes], out), size=raw_nbytes, closefd=False) as z:
                for chunk in (memoryview(head), *chunks):
                    z.write(chunk)
        else:
            for chunk in (memoryview(head), *chunks):
                out.write(chunk)
        recorded = out.hash.digest()
        f.flush()
        os.fsync(f.fileno())
    num_tokens = sum(int(ex["token_ids"].shape[0]) for ex in examples)
    return WrittenShard(recorded, out.nbytes, raw_nbytes, num_tokens)


# --------------------------------------------------------------------------- reading


def read_shard_bytes(
    path: Path, *, nbytes: int, compression: Compression, raw_nbytes: int, digest: str | None = None
) -> torch.Tensor:
    """The uncompressed shard as a uint8 tensor; a file shorter or longer than recorded is corrupt.

    With `digest` (the manifest's), the bytes are hashed as they arrive and a mismatch is a
    `CorruptShardError`: xxh3 hashes several times faster than a disk reads, so the check is cheap
    enough for every read (sha256 runs on a helper thread, overlapping the reads).
    """
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = buf.numpy().data
    hasher = _Digester(algorithm_of(digest)) if digest is not None else None
    try:
        with open(path, "rb", buffering=0) as f:
            pos = 0
            while pos < nbytes:
                n = f.readinto(view[pos : pos + _READ_CHUNK])
                if not n:
                    raise CorruptShardError(f"{path}: truncated: {pos} of {nbytes} bytes")
                if hasher is not None:
                    hasher.update(view[pos : pos + n])
                pos += n
            if f.read(1):
                raise CorruptShardError(f"{path}: longer than the {nbytes} bytes its manifest records")
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file is missing") from None
    finally:
        found = hasher.digest() if hasher is not None else None
    if found != digest:
        raise CorruptShardError(f"{path}: {digest_mismatch(found, digest)}")
    if compression == "zstd":
        return _decompress(buf, raw_nbytes, path)
    return buf


def _decompress(data: torch.Tensor, raw_nbytes: int, path: Path) -> torch.Tensor:
    import zstandard

    out = torch.empty(raw_nbytes, dtype=torch.uint8)
    view = out.numpy().data
    pos = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(data.numpy().data) as reader:
            while pos < raw_nbytes:
                n = reader.readinto(view[pos:])
                if not n:
                    break
                pos += n
    except zstandard.ZstdError as exc:
        raise CorruptShardError(f"{path}: zstd stream is damaged: {exc}") from None
    if pos != raw_nbytes:
        raise CorruptShardError(f"{path}: decompressed to {pos} bytes, manifest says {raw_nbytes}")
    return out


@dataclass(frozen=True)
class ShardContents:
    """A decoded shard: example ids and tensors viewed (not copied) out of the file buffer."""

    ids: list[str]
    tensors: dict[str, torch.Tensor]


def decode_shard(buf: torch.Tensor, path: Path) -> ShardContents:
    """Parse the safetensors header of an uncompressed shard buffer; errors name `path`."""
    try:
        if buf.numel() < 8:
            raise ValueError("shorter than a safetensors header")
        head_len = int.from_bytes(buf[:8].numpy().tobytes(), "little")
        if 8 + head_len > buf.numel():
            raise ValueError(f"header length {head_len} runs past the end of the file")
        header = json.loads(buf[8 : 8 + head_len].numpy().tobytes())
        meta = header.pop("__metadata__", None) or {}
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(f"not a SpecOps shard (format={meta.get('format')!r})")
        ids = json.loads(meta["ids"])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("metadata ids is not a list of strings")
        tensors = {name: _view_tensor(buf, 8 + head_len, spec) for name, spec in header.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path}: malformed shard: {exc}") from None
    return ShardContents(ids, tensors)


def _view_tensor(buf: torch.Tensor, data_start: int, spec: dict[str, Any]) -> torch.Tensor:
    dtype = _ST_DTYPES.get(spec["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported dtype {spec['dtype']!r}")
    shape = [int(d) for d in spec["shape"]]
    begin, end = (int(x) for x in spec["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0 or data_start + end > buf.numel():
        raise ValueError(f"tensor {spec} does not fit the file")
    raw = buf[data_start + begin : data_start + end]
    if (data_start + begin) % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def validate_shard(
    contents: ShardContents, path: Path, meta: StoreMeta, ids: Sequence[str], fields: Sequence[str]
) -> None:
    """Check a decoded shard against its manifest entry and the store's producer identity."""
    t = contents.tensors
    if contents.ids != list(ids):
        raise ShardError(f"{path}: example ids in the file differ from the manifest")
    missing = [f for f in ("offsets", "vocab_ids", "vocab_counts", *fields) if f not in t]
    if missing:
        raise ShardError(f"{path}: missing tensors {missing}")
    offsets = t["offsets"]
    if offsets.dtype != torch.int64 or list(offsets.shape) != [len(ids) + 1]:
        raise ShardError(
            f"{path}: offsets must be int64 [{len(ids) + 1}], got {dtype_name(offsets.dtype)} {list(offsets.shape)}"
        )
    total = int(t["token_ids"].shape[0]) if t["token_ids"].dim() == 1 else -1
    if int(offsets[0]) != 0 or int(offsets[-1]) != total or bool((offsets.diff() < 0).any()):
        raise ShardError(f"{path}: offsets are not a non-decreasing 0..{total} sequence")
    expected: dict[str, tuple[str | None, list[int]]] = {
        "token_ids": ("int32", [total]),
        "loss_mask": ("uint8", [total]),
        "hidden_states": (meta.dtype, [total, len(meta.layer_ids), meta.hidden_size]),
        "logits": (None, [total, meta.vocab_size]),
        "output_tokens": ("int32", [total]),
        "vocab_ids": ("int32", [int(t["vocab_ids"].numel())]),
        "vocab_counts": ("int64", [int(t["vocab_ids"].numel())]),
    }
    for field, (dtype, shape) in expected.items():
        if field not in t:
            continue
        got = t[field]
        if (dtype is not None and dtype_name(got.dtype) != dtype) or list(got.shape) != shape:
            raise ShardError(
                f"{path}: {field} must be {dtype or 'float'} {shape}, got {dtype_name(got.dtype)} {list(got.shape)}"
            )


def iter_examples(contents: ShardContents) -> Iterator[ExampleDict]:
    """Slice each example out of the flat tensors (views into the shard buffer)."""
    t = contents.tensors
    offsets = t["offsets"].tolist()
    fields = [f for f in PER_TOKEN_FIELDS if f in t]
    for i, ex_id in enumerate(contents.ids):
        begin, end = offsets[i], offsets[i + 1]
        yield cast(ExampleDict, {"id": ex_id, **{f: t[f][begin:end] for f in fields}})


def shard_token_counts(path: Path, compression: Compression, nbytes: int, raw_nbytes: int) -> dict[int, int]:
    """Loss-token counts stored in one shard; reads only those two tensors when uncompressed."""
    if compression == "zstd":
        buf = read_shard_bytes(path, nbytes=nbytes, compression=compression, raw_nbytes=raw_nbytes)
        t = decode_shard(buf, path).tensors
        ids, counts = t["vocab_ids"], t["vocab_counts"]
    else:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                ids, counts = f.get_tensor("vocab_ids"), f.get_tensor("vocab_counts")
        except (SafetensorError, OSError) as exc:
            raise ShardError(f"{path}: cannot read token counts: {exc}") from None
    return dict(zip(ids.tolist(), counts.tolist(), strict=True))
