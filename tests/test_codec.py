"""The sans-I/O wire codec: round trips, chunking, limits and bad bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from twinfer.errors import CodecError, ErrorCode
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes, encode_message
from twinfer.wire.frames import ALIGNMENT, HEADER, HEADER_SIZE, MAGIC, Frame, FrameDecoder
from twinfer.wire.messages import (
    Cancel,
    DType,
    Error,
    GetMetadata,
    GoAway,
    Hello,
    InferReply,
    InferRequest,
    ListModels,
    Metadata,
    ModelInfo,
    ModelList,
    Ping,
    Pong,
    TensorSpec,
)

names = st.text(min_size=0, max_size=40)
request_ids = st.integers(min_value=0, max_value=2**64 - 1)
wire_dtypes = st.sampled_from([d.numpy for d in DType])


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(wire_dtypes)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape))


tensor_maps = st.dictionaries(names, tensors(), max_size=4)
specs = st.builds(
    TensorSpec,
    names,
    st.sampled_from(list(DType)),
    st.none() | st.lists(st.integers(min_value=-1, max_value=2**31), max_size=5).map(tuple),
)
messages = st.one_of(
    st.builds(
        Hello, st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1), names
    ),
    st.just(Ping()),
    st.just(Pong()),
    st.just(Cancel()),
    st.just(ListModels()),
    st.builds(
        InferRequest,
        names,
        tensor_maps,
        st.lists(names, max_size=3).map(tuple),
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
    ),
    st.builds(InferReply, tensor_maps, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(GetMetadata, names),
    st.builds(
        ModelList,
        st.lists(
            st.builds(ModelInfo, names, st.lists(names, max_size=3).map(tuple), st.booleans()),
            max_size=4,
        ).map(tuple),
    ),
    st.builds(
        Metadata,
        names,
        st.lists(specs, max_size=3).map(tuple),
        st.lists(specs, max_size=3).map(tuple),
        st.lists(names, max_size=3).map(tuple),
    ),
    st.builds(Error, st.integers(0, 65535), st.text(max_size=200)),
    st.builds(GoAway, request_ids, st.text(max_size=200)),
)


def assert_tensors_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        expected = np.asarray(a[name])
        assert b[name].dtype == expected.dtype.newbyteorder("<")
        assert b[name].shape == expected.shape
        # Compare raw bytes: NaN payloads and -0.0 must survive too.
        assert b[name].tobytes() == np.ascontiguousarray(expected).tobytes()


def assert_same_message(sent: object, got: object) -> None:
    assert type(got) is type(sent)
    if isinstance(sent, InferRequest):
        assert isinstance(got, InferRequest)
        assert (got.model, got.outputs, got.timeout_ms, got.priority) == (
            sent.model,
            sent.outputs,
            sent.timeout_ms,
            sent.priority,
        )
        assert_tensors_equal(dict(sent.inputs), dict(got.inputs))
    elif isinstance(sent, InferReply):
        assert isinstance(got, InferReply)
        assert (got.queue_us, got.compute_us) == (sent.queue_us, sent.compute_us)
        assert_tensors_equal(dict(sent.outputs), dict(got.outputs))
    else:
        assert got == sent


def decode_all(data: bytes, chunk_sizes: list[int] | None = None) -> list[Frame]:
    decoder = FrameDecoder()
    frames: list[Frame] = []
    pos = 0
    for size in chunk_sizes or []:
        frames += decoder.feed(data[pos : pos + size])
        pos += size
    frames += decoder.feed(data[pos:])
    if decoder.error is not None:
        raise decoder.error
    return frames


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(request_ids, messages)
def test_every_message_round_trips(request_id: int, message: object) -> None:
    data = encode_bytes(request_id, message)  # type: ignore[arg-type]
    [frame] = decode_all(data)
    assert frame.request_id == request_id
    assert_same_message(message, decode_message(frame))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(request_ids, messages), min_size=1, max_size=5), st.data())
def test_frames_survive_any_chunking(pairs: list[tuple[int, object]], data: st.DataObject) -> None:
    stream = b"".join(encode_bytes(rid, m) for rid, m in pairs)  # type: ignore[arg-type]
    cuts = data.draw(st.lists(st.integers(0, 50), max_size=30))
    frames = decode_all(stream, cuts)
    assert [f.request_id for f in frames] == [rid for rid, _ in pairs]
    for (_, sent), frame in zip(pairs, frames):
        assert_same_message(sent, decode_message(frame))


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_errors(data: bytes) -> None:
    decoder = FrameDecoder(max_frame_size=1 << 20)
    try:
        for frame in decoder.feed(data):
            decode_message(frame)
    except CodecError:
        pass
    assert decoder.error is None or isinstance(decoder.error, CodecError)


@settings(max_examples=500)
@given(st.integers(min_value=0x00, max_value=0xFF), request_ids, st.binary(max_size=200))
def test_arbitrary_bodies_raise_only_codec_errors(mtype: int, request_id: int, body: bytes) -> None:
    frame = Frame(mtype, 0, request_id, bytearray(body))
    try:
        decode_message(frame)
    except CodecError as e:
        assert e.code in (
            ErrorCode.MALFORMED_FRAME,
            ErrorCode.UNSUPPORTED_MESSAGE,
            ErrorCode.INVALID_INPUT,  # well-formed JSON asking for something wrong
        )


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(request_ids, messages, st.data())
def test_truncated_bodies_raise_codec_errors(
    request_id: int, message: object, data: st.DataObject
) -> None:
    encoded = encode_bytes(request_id, message)  # type: ignore[arg-type]
    body = encoded[HEADER_SIZE:]
    if not body:
        return
    cut = data.draw(st.integers(0, len(body) - 1))
    header = HEADER.unpack(encoded[:HEADER_SIZE])
    frame = Frame(header[1], 0, request_id, bytearray(body[:cut]))
    with pytest.raises(CodecError) as e:
        decode_message(frame)
    assert e.value.code is ErrorCode.MALFORMED_FRAME


def test_decoded_tensors_are_zero_copy_writable_views_of_the_frame() -> None:
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    [frame] = decode_all(encode_bytes(1, InferRequest("m", {"x": x})))
    got = decode_message(frame)
    assert isinstance(got, InferRequest)
    array = got.inputs["x"]
    assert array.flags.writeable and array.flags.c_contiguous
    assert np.shares_memory(array, np.frombuffer(frame.body, np.uint8))
    assert array.ctypes.data % ALIGNMENT == np.frombuffer(frame.body, np.uint8).ctypes.data % 8


def test_tensor_data_is_aligned_within_the_body() -> None:
    inputs = {
        "a": np.ones(3, np.uint8),
        "bb": np.ones((2, 2), np.float64),
        "c": np.ones(1, np.int16),
    }
    [frame] = decode_all(encode_bytes(1, InferRequest("model", inputs)))
    got = decode_message(frame)
    assert isinstance(got, InferRequest)
    base = np.frombuffer(frame.body, np.uint8).ctypes.data
    for array in got.inputs.values():
        assert (array.ctypes.data - base) % ALIGNMENT == 0


def test_bytes_backed_arrays_are_sent_without_copy() -> None:
    payload = np.arange(6, dtype=np.float32).tobytes()
    array = np.ndarray((2, 3), np.float32, buffer=payload)
    chunks = encode_message(5, InferReply({"y": array}))
    assert any(chunk is payload for chunk in chunks)


def test_big_endian_and_non_contiguous_inputs_are_converted() -> None:
    x = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    [frame] = decode_all(encode_bytes(1, InferRequest("m", {"x": x})))
    got = decode_message(frame)
    assert isinstance(got, InferRequest)
    np.testing.assert_array_equal(got.inputs["x"], x)
    assert got.inputs["x"].dtype == np.dtype("<i4")


def test_unsupported_dtype_is_refused_when_encoding() -> None:
    with pytest.raises(CodecError) as e:
        encode_message(1, InferRequest("m", {"s": np.array(["text"])}))
    assert e.value.code is ErrorCode.INVALID_DTYPE
    assert "'s'" in e.value.message


def test_oversize_frame_is_refused_from_its_header_before_buffering() -> None:
    decoder = FrameDecoder(max_frame_size=1000)
    header = HEADER.pack(MAGIC, 0x10, 0, 10**9, 7)
    assert decoder.feed(header) == []
    assert decoder.error is not None and decoder.error.code is ErrorCode.FRAME_TOO_LARGE
    assert "1000000000" in decoder.error.message and "1000" in decoder.error.message
    assert decoder.buffered == 0


def test_a_partial_large_frame_holds_one_buffer_of_its_declared_size() -> None:
    x = np.zeros((1, 3, 224, 224), np.float32)
    data = encode_bytes(3, InferRequest("squeezenet", {"data_0": x}))
    decoder = FrameDecoder()
    assert decoder.feed(data[:65536]) == []
    assert decoder.buffered == len(data) - HEADER_SIZE
    frames = []
    for start in range(65536, len(data), 65536):
        frames += decoder.feed(data[start : start + 65536])
    assert len(frames) == 1 and decoder.buffered == 0


def test_bad_magic_is_a_malformed_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == []
    assert decoder.error is not None and decoder.error.code is ErrorCode.MALFORMED_FRAME
    assert "b'GE'" in decoder.error.message


def test_frames_before_a_break_are_delivered_and_later_input_is_ignored() -> None:
    decoder = FrameDecoder()
    data = encode_bytes(1, Ping()) + encode_bytes(2, Ping()) + b"\x00" * 20
    assert [f.request_id for f in decoder.feed(data)] == [1, 2]
    assert decoder.error is not None and decoder.error.code is ErrorCode.MALFORMED_FRAME
    assert decoder.feed(encode_bytes(3, Ping())) == []


def test_unknown_message_type_is_unsupported_not_malformed() -> None:
    with pytest.raises(CodecError) as e:
        decode_message(Frame(0x55, 0, 1, bytearray()))
    assert e.value.code is ErrorCode.UNSUPPORTED_MESSAGE


def test_bool_tensor_with_other_bytes_is_malformed() -> None:
    data = bytearray(encode_bytes(1, InferRequest("m", {"b": np.array([True, False])})))
    data[-8] = 7  # first element of the tensor
    [frame] = decode_all(bytes(data))
    with pytest.raises(CodecError, match="bool tensor 'b'"):
        decode_message(frame)


def test_tensor_longer_than_the_body_is_malformed() -> None:
    body = bytearray()
    body += struct.pack("<H", 1) + b"m" + struct.pack("<IBBBB", 0, 0, 1, 0, 0)
    body += (
        struct.pack("<H", 1) + b"x" + struct.pack("<BB", DType.F32, 1) + struct.pack("<Q", 10**6)
    )
    with pytest.raises(CodecError, match="tensor 'x' data"):
        decode_message(Frame(0x10, 0, 1, body))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(request_ids, messages), min_size=1, max_size=4), st.data())
def test_receiving_in_place_matches_feeding(
    pairs: list[tuple[int, object]], data: st.DataObject
) -> None:
    """A transport may fill read_buffer() itself (recv_into) for any part of a body."""
    stream = b"".join(encode_bytes(rid, m) for rid, m in pairs)  # type: ignore[arg-type]
    decoder = FrameDecoder()
    frames: list[Frame] = []
    pos = 0
    while pos < len(stream):
        target = decoder.read_buffer()
        step = data.draw(st.integers(1, 64))
        if target is not None and data.draw(st.booleans()):
            count = min(step, len(target), len(stream) - pos)
            target[:count] = stream[pos : pos + count]
            frames += decoder.buffer_filled(count)
        else:
            count = min(step, len(stream) - pos)
            frames += decoder.feed(stream[pos : pos + count])
        pos += count
    assert decoder.error is None
    assert [f.request_id for f in frames] == [rid for rid, _ in pairs]
    for (_, sent), frame in zip(pairs, frames):
        assert_same_message(sent, decode_message(frame))


def test_buffer_filled_without_a_buffer_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        FrameDecoder().buffer_filled(1)


def test_goaway_layout_is_the_last_request_id_then_the_reason() -> None:
    data = encode_bytes(0, GoAway(7, "bye"))
    assert data[2] == 0x04  # the type byte
    assert data[HEADER_SIZE:] == struct.pack("<QH", 7, 3) + b"bye"
