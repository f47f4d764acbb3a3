"""The stream codec: exact round trips (bf16 included), zero-copy buffers, clear errors on bad input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from _stores_fixtures import META, assert_same_example, make_example

from specops.stores.codec import CodecError, Header, decode, encode

BF16 = META.__class__(**{**META.to_json(), "layer_ids": (1, 2), "dtype": "bfloat16"})


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("meta", [META, BF16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_exact(compress: bool, meta: object) -> None:
    ex = make_example(5, meta, extras=True)  # type: ignore[arg-type]
    header, buffers = encode(ex, [1, 2], compress=compress)
    got = decode(header, [bytes(memoryview(b)) for b in buffers])
    assert_same_example(got, ex)
    assert Header.from_bytes(header).layer_ids == (1, 2)


def test_bf16_bits_survive_including_nan_and_subnormals() -> None:
    ex = make_example(1, BF16, seq=4)
    bits = (
        torch.tensor([0x7FC1, 0x0001, 0x8000, 0xFF80], dtype=torch.int32).to(torch.uint16).view(torch.int16)
    )  # NaN payload, subnormal, -0, -inf
    ex["hidden_states"] = bits.view(torch.bfloat16).repeat(4 * 2 * 8 // 4).reshape(4, 2, 8)
    header, buffers = encode(ex, [1, 2])
    got = decode(header, buffers)
    assert torch.equal(got["hidden_states"].view(torch.int16), ex["hidden_states"].view(torch.int16))


def test_encode_aliases_tensor_memory_and_decode_views_the_frames() -> None:
    ex = make_example(2, seq=64)
    _, buffers = encode(ex, [1, 2])
    hidden = buffers[2]
    assert isinstance(hidden, np.ndarray)
    assert hidden.ctypes.data == ex["hidden_states"].data_ptr()  # no copy on the way out
    frames = [bytearray(memoryview(b)) for b in buffers]
    got = decode(encode(ex, [1, 2])[0], frames)
    got["hidden_states"][0, 0, 0] = 123.0  # writable, and it is the frame's memory
    assert np.frombuffer(frames[2], dtype=np.float32)[0] == 123.0


def test_compression_shrinks_redundant_tensors_and_skips_incompressible_ones() -> None:
    ex = make_example(3, seq=128)
    ex["hidden_states"] = torch.zeros_like(ex["hidden_states"])
    header, buffers = encode(ex, [1, 2], compress=True)
    specs = {t.name: t for t in Header.from_bytes(header).tensors}
    assert specs["hidden_states"].compressed
    assert len(buffers[2]) < ex["hidden_states"].numel() * 4 // 10  # type: ignore[arg-type]
    noisy = make_example(4, seq=128)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (128, 2, 8), dtype=torch.int32)
    noisy["hidden_states"] = random_bits.view(torch.float32)
    header, _ = encode(noisy, [1, 2], compress=True)
    assert not {t.name: t for t in Header.from_bytes(header).tensors}["hidden_states"].compressed


def _raw_header(**changes: object) -> bytes:
    header, _ = encode(make_example(0, seq=3), [1, 2])
    data = msgpack.unpackb(header)
    data.update(changes)
    return bytes(msgpack.packb(data))


def _frames() -> list[bytes]:
    return [bytes(memoryview(b)) for b in encode(make_example(0, seq=3), [1, 2])[1]]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"\xc1not msgpack", "not valid msgpack"),
        (msgpack.packb([1, 2]), "must be a map"),
        (_raw_header(id=""), "id must be a string"),
        (_raw_header(v=99), "version 99"),
        (_raw_header(tensors=[["token_ids", "object", [3], False]]), "dtype 'object' is not allowed"),
        (_raw_header(tensors=[["weights", "float32", [3], False]]), "unknown tensor field 'weights'"),
        (_raw_header(tensors=[["token_ids", "int32", [-3], False]]), "shape must be"),
        (_raw_header(tensors=[["token_ids", "int32", [3], False]]), r"missing tensor field\(s\)"),
        (_raw_header(layer_ids=["a"]), "layer_ids must be"),
    ],
)
def test_bad_headers_are_named(header: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode(header, _frames())


def test_buffer_length_must_match_shape_times_itemsize() -> None:
    frames = _frames()
    frames[2] = frames[2][:-4]
    header, _ = encode(make_example(0, seq=3), [1, 2])
    with pytest.raises(
        CodecError, match=r"d/0/0: hidden_states: float32 \[3, 2, 8\] needs 192 bytes, buffer has 188"
    ):
        decode(header, frames)
    with pytest.raises(CodecError, match="lists 3 tensors, message has 2"):
        decode(header, frames[:2])


def test_a_zstd_frame_that_lies_about_its_size_is_refused_before_allocation() -> None:
    import zstandard

    header = _raw_header(
        tensors=[
            ["token_ids", "int32", [3], False],
            ["loss_mask", "uint8", [3], False],
            ["hidden_states", "float32", [3, 2, 8], True],
        ]
    )
    frames = _frames()
    frames[2] = zstandard.ZstdCompressor().compress(b"\0" * (1 << 30))  # a "bomb": 1 GiB declared
    with pytest.raises(CodecError, match="declares 1073741824 bytes, the header 192"):
        decode(header, frames)
    frames[2] = b"not zstd at all"
    with pytest.raises(CodecError, match="does not decompress"):
        decode(header, frames)


def test_unstreamable_dtype_is_refused_on_encode() -> None:
    ex = make_example(0, seq=3)
    ex["hidden_states"] = ex["hidden_states"].to(torch.complex64)
    with pytest.raises(CodecError, match="complex64 cannot be streamed"):
        encode(ex, [1, 2])
