"""Write the seed corpus: ``python -m tests.fuzz.seeds`` (rewrites ``corpus/<target>/seed-*``).

Small valid and near-valid inputs: real frames from the encoder, real KServe
bodies, the shipped ``etc/*.toml``, tiny images made with Pillow.  Each
target's docstring says how it reads its input: a seed starts with the few
bytes that target takes for its parameters.
Regression inputs (``corpus/<target>/regression-*``) are kept as they are.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from twinfer.wire.encode import encode_message
from twinfer.wire.messages import (
    AdminRequest,
    Cancel,
    DType,
    Error,
    GetHealth,
    GetMetadata,
    GetRegionStatus,
    GoAway,
    Health,
    Hello,
    ImageRequest,
    InferReply,
    InferRequest,
    ListModels,
    Ping,
    Pong,
    RegionInfo,
    RegionRef,
    RegionStatus,
    RegionTensor,
    RegisterRegion,
    UnregisterRegion,
)

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
ROOT = HERE.parent.parent
TENSOR = np.arange(6, dtype=np.float32).reshape(2, 3)


def frame(request_id: int, message: object) -> bytes:
    return b"".join(bytes(c) for c in encode_message(request_id, message))  # type: ignore[arg-type]


def client_frames() -> list[bytes]:
    return [
        frame(0, Hello(1, 1, 0, "seed")),
        frame(1, Ping()),
        frame(2, InferRequest("m", {"x": TENSOR}, ("y",), 100, 1)),
        frame(2, Cancel()),
        frame(3, ListModels()),
        frame(4, GetMetadata("m")),
        frame(5, ImageRequest("m", b"\x89PNG", "classify")),
        frame(6, GetHealth()),
        frame(7, AdminRequest("reload", "m")),
    ]


def server_frames() -> list[bytes]:
    return [
        frame(0, Hello(1, 1, 4096, "seed-server")),
        frame(1, Pong()),
        frame(2, InferReply({"y": TENSOR}, 5, 7)),
        frame(3, Health(True, False, "warming up")),
        frame(4, Error(3, "no such model")),
        frame(0, GoAway(4, "shutting down")),
    ]


def region_frames() -> list[bytes]:
    """Protocol version 2: shared-memory regions, and tensors that reference them."""
    ref = RegionRef("in", 8, 24)
    return [
        frame(0, Hello(1, 2, 0, "seed")),
        frame(1, RegisterRegion("in", "/seed", 0, 64)),
        frame(
            2,
            InferRequest(
                "m",
                {"x": RegionTensor(DType.F32, (2, 3), ref)},
                ("y",),
                output_regions={"y": RegionRef("in", 32, 24)},
            ),
        ),
        frame(3, GetRegionStatus("")),
        frame(4, UnregisterRegion("in")),
        frame(5, InferReply({"y": RegionTensor(DType.F32, (2, 3), ref)}, 5, 7)),
        frame(6, RegionStatus((RegionInfo("in", "/seed", 0, 64),))),
    ]


def chunked(stream: bytes, bits: int = 0) -> bytes:
    """``stream`` in chunks of 64 bytes, each after a control byte (size - 1 | ``bits``)."""
    out = bytearray()
    for i in range(0, len(stream), 64):
        chunk = stream[i : i + 64]
        out += bytes([(len(chunk) - 1) | bits]) + chunk
    return bytes(out)


def picture(mode: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    """A tiny image file of one colour."""
    colour = (10, 200, 30, 255)[: len(mode)] if mode in ("RGB", "RGBA") else 128
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


def seeds() -> dict[str, dict[str, bytes]]:
    requests = client_frames()
    replies = server_frames()
    stream = b"".join(requests)
    # frames: max_frame_size (2 bytes), then chunks (see chunked()).
    frames = {f"frame-{i}": b"\xff\x0f" + chunked(f) for i, f in enumerate(requests + replies)}
    frames["stream"] = b"\xff\x0f" + chunked(stream)
    frames["stream-in-place"] = b"\xff\x0f" + chunked(stream, 0x80)
    frames["bad-magic"] = b"\xff\x0f" + chunked(b"XX" + stream[2:40])
    frames["too-large"] = b"\x10\x00" + chunked(requests[2])
    shm = region_frames()
    frames.update({f"shm-{i}": b"\xff\x0f" + chunked(f) for i, f in enumerate(shm)})
    # connection: the role (odd: server), then chunks (see chunked()).
    connection = {
        "server": b"\x01" + chunked(stream, 0x40),
        "server-no-hello": b"\x01" + chunked(requests[1]),
        "server-twice-hello": b"\x01" + chunked(requests[0] + requests[0]),
        "server-duplicate": b"\x01" + chunked(requests[0] + requests[2] + requests[2]),
        "client": b"\x00" + chunked(b"".join(replies), 0x80),
        "client-refused": b"\x00" + chunked(frame(0, Error(7, "go away"))),
        "server-v2-shm": b"\x01" + chunked(b"".join(shm[:5]), 0x40),
        # Region messages on a connection that negotiated version 1: refused.
        "server-v1-shm": b"\x01" + chunked(requests[0] + b"".join(shm[1:5]), 0x40),
    }
    body = {
        "inputs": [
            {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": TENSOR.ravel().tolist()}
        ],
        "outputs": [{"name": "y"}],
        "id": "seed",
        "parameters": {"timeout": 1000, "priority": 1},
    }
    binary = {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 24},
            },
            {"name": "s", "shape": [2], "datatype": "BYTES", "data": ["ab", "c"]},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }
    header = json.dumps(binary).encode()
    kserve = {
        "json": b"\x00" + json.dumps(body).encode(),
        # choice 2, then the header value's length and the value itself.
        "binary": b"\x02\x03" + str(len(header)).encode() + header + TENSOR.tobytes(),
        "bool": b"\x00"
        + json.dumps(
            {"inputs": [{"name": "b", "shape": [2], "datatype": "BOOL", "data": [True, False]}]}
        ).encode(),
        "empty": b"\x00{}",
        "shm": b"\x00"
        + json.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "shape": [2, 3],
                        "datatype": "FP32",
                        "parameters": {
                            "shared_memory_region": "in",
                            "shared_memory_offset": 8,
                            "shared_memory_byte_size": 24,
                        },
                    }
                ],
                "outputs": [
                    {
                        "name": "y",
                        "parameters": {
                            "shared_memory_region": "out",
                            "shared_memory_byte_size": 24,
                        },
                    }
                ],
            }
        ).encode(),
    }
    config = {
        path.stem: b"\x00" + path.read_bytes() for path in sorted((ROOT / "etc").glob("*.toml"))
    }
    config["default"] = b"\x00" + (ROOT / "src" / "twinfer" / "default.toml").read_bytes()
    config["broken"] = b'\x00[models.m]\npath = "x.xml"\n[[['
    # image: network height and width (2 bytes each), letterbox?, the file.
    image = {
        "png-rgb": b"\xdf\x00\xdf\x00\x01" + picture("RGB", (8, 6)),
        "png-grey": b"\xdf\x00\xdf\x00\x00" + picture("L", (5, 9)),
        "png-rgba": b"\xdf\x00\xdf\x00\x01" + picture("RGBA", (4, 4)),
        "png-16bit": b"\xdf\x00\xdf\x00\x00" + picture("I;16", (4, 3)),
        "jpeg": b"\xdf\x00\xdf\x00\x01" + picture("RGB", (16, 16), "JPEG"),
        "gif": b"\xdf\x00\xdf\x00\x00" + picture("P", (7, 7), "GIF"),
        "bmp": b"\xdf\x00\xdf\x00\x01" + picture("RGB", (3, 5), "BMP"),
        "webp": b"\xdf\x00\xdf\x00\x00" + picture("RGB", (6, 6), "WEBP"),
        "tiff": b"\xdf\x00\xdf\x00\x01" + picture("RGB", (6, 2), "TIFF"),
    }
    return {
        "frames": frames,
        "connection": connection,
        "kserve": kserve,
        "config": config,
        "image": image,
    }


def main() -> None:
    for target, inputs in seeds().items():
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
        for name, data in inputs.items():
            (directory / f"seed-{name}").write_bytes(data)
        print(f"{target}: {len(inputs)} seeds in {directory}")


if __name__ == "__main__":
    main()
