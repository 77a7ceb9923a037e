"""The worked hex examples in docs/protocol.md are real codec output.

Each annotated dump is parsed line by line (``OFFSET  HEX BYTES  comment``):
the offsets must follow one another and the bytes must equal what
``twinfer.wire`` encodes today, so the spec cannot drift from the code.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twinfer.engines.builtin import tiny_reference
from twinfer.wire.decode import decode_message
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import FrameDecoder
from twinfer.wire.messages import ImageRequest, InferReply, InferRequest

PROTOCOL_MD = Path(__file__).parent.parent / "docs" / "protocol.md"
_LINE = re.compile(r"^([0-9a-f]{4})  ((?:[0-9a-f]{2} )*[0-9a-f]{2})(?:\s{2,}\S.*)?$")
X = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
#: The 1x1 white PNG of the IMAGE_REQUEST example, as Pillow wrote it.
ONE_PIXEL_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c49444154789c63f8ffff3f0005fe02fe0def46b80000000049454e44ae426082"
)


def hex_dump(label: str) -> bytes:
    """The bytes of the annotated dump following ``<!-- hex: label -->``."""
    text = PROTOCOL_MD.read_text("utf-8")
    match = re.search(rf"<!-- hex: {label} -->\n```\n(.*?)```", text, re.S)
    assert match, f"no dump labelled {label!r} in {PROTOCOL_MD}"
    data = bytearray()
    for line in match.group(1).splitlines():
        parsed = _LINE.match(line)
        assert parsed, f"unparsable dump line: {line!r}"
        offset, hexbytes = parsed.groups()
        assert int(offset, 16) == len(data), f"offset {offset} should be {len(data):04x}"
        data += bytes.fromhex(hexbytes)
    return bytes(data)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("infer-request", InferRequest("tiny", {"x": X})),
        ("infer-reply", InferReply(tiny_reference(X), 120, 45)),
        ("image-request", ImageRequest("face", ONE_PIXEL_PNG, "detect")),
    ],
)
def test_dump_is_codec_output(label: str, message: object) -> None:
    assert hex_dump(label) == encode_bytes(7, message)  # type: ignore[arg-type]


def test_request_dump_decodes_to_the_tiny_request() -> None:
    (frame,) = FrameDecoder().feed(hex_dump("infer-request"))
    request = decode_message(frame)
    assert isinstance(request, InferRequest)
    assert frame.request_id == 7 and request.model == "tiny" and request.outputs == ()
    np.testing.assert_array_equal(request.inputs["x"], X)


def test_image_dump_decodes_to_the_image_request() -> None:
    (frame,) = FrameDecoder().feed(hex_dump("image-request"))
    request = decode_message(frame)
    assert isinstance(request, ImageRequest)
    assert (frame.request_id, request.model, request.task) == (7, "face", "detect")
    assert bytes(request.image) == ONE_PIXEL_PNG
    # It really is the 1x1 image the text says it is.
    with Image.open(io.BytesIO(bytes(request.image))) as image:
        assert (image.format, image.size) == ("PNG", (1, 1))
        assert image.getpixel((0, 0)) == (255, 255, 255)


ARCHITECTURE_MD = Path(__file__).parent.parent / "docs" / "architecture.md"
OPERATIONS_MD = Path(__file__).parent.parent / "docs" / "operations.md"


def test_the_outcome_table_in_architecture_md_is_the_code_table() -> None:
    """Every row of the documented outcome table says what twinfer.outcomes says."""
    from twinfer.errors import ErrorCode
    from twinfer.outcomes import OK, outcome

    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in ARCHITECTURE_MD.read_text("utf-8").splitlines()
        if line.startswith("| `")
    ]
    documented: set[str] = set()
    for names, _binary, http, grpc, retryable in (r for r in rows if len(r) == 5):
        for name in re.findall(r"`(\w+)`", names):
            result = OK if name == "OK" else outcome(ErrorCode[name])
            assert str(result.http_status) == http, name
            assert f"`{result.grpc_status}`" == grpc, name
            assert result.retryable == (retryable == "yes"), name
            documented.add(name)
    assert documented == {"OK"} | {code.name for code in ErrorCode}


def test_every_twistd_option_has_a_row_in_operations_md() -> None:
    """Each option of ``twistd twinfer --help`` is a table cell of its own in
    docs/operations.md (``--name`` or ``--name ARG``), not just a mention."""
    from twinfer.tap import Options

    cells = {
        cell.strip()
        for line in OPERATIONS_MD.read_text("utf-8").splitlines()
        if line.startswith("|")
        for cell in line.strip("|").split("|")
    }
    options = {name.rstrip("=") for name in Options().longOpt} - {"help", "version"}
    missing = [
        name
        for name in sorted(options)
        if not any(re.fullmatch(rf"`--{name}( [A-Z_.]+)?`", cell) for cell in cells)
    ]
    assert not missing, f"options without a row in docs/operations.md: {missing}"
