"""The fuzz targets (tests/fuzz/): the committed corpus replayed in-process,
each target fuzzed briefly with atheris, and the bugs the fuzzers found."""

from __future__ import annotations

import importlib
import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fuzz import TARGETS
from twinfer.config import loads_config
from twinfer.errors import CodecError, ConfigError, ErrorCode, TwinferError
from twinfer.frontends.http.kserve import decode_infer_request
from twinfer.tasks.preprocess import decode_image
from twinfer.wire.decode import decode_message
from twinfer.wire.frames import Frame
from twinfer.wire.messages import DType

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "fuzz" / "corpus"


def corpus(target: str) -> list[Path]:
    return sorted((CORPUS / target).iterdir())


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_has_a_seed_corpus(target: str) -> None:
    assert len([p for p in corpus(target) if p.name.startswith("seed-")]) >= 4


@pytest.mark.parametrize("target", TARGETS)
def test_the_committed_corpus_replays_cleanly(target: str) -> None:
    """Every committed input, seeds and regressions, passes its target's checks."""
    test_one_input = importlib.import_module(f"fuzz.{target}").TestOneInput
    for path in corpus(target):
        test_one_input(path.read_bytes())


def test_targets_raise_when_their_rule_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    """A target lets through exceptions other than the module's own error."""
    frames = importlib.import_module("fuzz.frames")

    def broken(frame: Frame) -> None:
        raise ValueError("not a CodecError")

    monkeypatch.setattr(frames, "decode_message", broken)
    with pytest.raises(ValueError, match="not a CodecError"):
        frames.TestOneInput((CORPUS / "frames" / "seed-stream").read_bytes())


def test_every_target_fuzzes_briefly_with_atheris(tmp_path: Path) -> None:
    """CI's short run: 2,000 executions of each instrumented target, no crash."""
    pytest.importorskip("atheris")
    command = [sys.executable, "-m", "tests.fuzz.run", "--runs", "2000"]
    result = subprocess.run(
        [*command, "--workdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "executions" in line]
    assert [line.split()[0] for line in lines] == list(TARGETS)
    for line in lines:
        fields = line.split()
        assert fields[fields.index("executions") + 1] == "2000", line
        assert int(fields[fields.index("cov") + 1]) > 0, line
        assert fields[fields.index("crashes") + 1] == "0", line


# -- regressions: bugs the fuzzers found ------------------------------------------


def test_empty_tensor_with_a_dimension_beyond_numpy_range_is_malformed() -> None:
    """(frames) A zero dim makes the tensor empty, so it passed the size
    check, but numpy refused the other dim 2**64 - 1 with a ValueError."""
    body = bytearray()
    body += struct.pack("<H", 1) + b"m" + struct.pack("<IBBBB", 0, 0, 1, 0, 0)
    body += struct.pack("<H", 1) + b"x" + struct.pack("<BB", DType.F32, 2)
    body += struct.pack("<QQ", 0, 2**64 - 1)
    with pytest.raises(CodecError, match="tensor 'x' of shape") as e:
        decode_message(Frame(0x10, 0, 1, body))
    assert e.value.code is ErrorCode.MALFORMED_FRAME


def test_a_model_path_too_long_for_the_filesystem_is_a_config_error(tmp_path: Path) -> None:
    """(config) ``Path.exists`` raised OSError (ENAMETOOLONG) out of the loader."""
    devices = '[[devices]]\nname = "cpu"\ntarget = "CPU"\n'
    text = f'{devices}[[models]]\nname = "m"\npath = "{"x" * 5000}.xml"\n'
    with pytest.raises(ConfigError, match=r"path: cannot read .*File name too long"):
        loads_config(text, tmp_path, "long.toml")


@pytest.mark.parametrize("value", ["¹", "٣", "1²"])
def test_a_header_length_of_non_ascii_digits_is_invalid_input(value: str) -> None:
    """(kserve) ``str.isdigit`` accepts '¹', which ``int`` refuses: a ValueError escaped."""
    with pytest.raises(TwinferError, match="Inference-Header-Content-Length") as e:
        decode_infer_request(b'{"inputs": []}', value)
    assert e.value.code is ErrorCode.INVALID_INPUT


def test_letterbox_padding_counts_against_the_pixel_limit() -> None:
    """(image) A 7x57095 strip is under the limit, but letterboxing it for a
    square network padded it to 57095x57095: a 9.7 GB allocation."""
    buffer = io.BytesIO()
    Image.new("L", (7, 57095)).save(buffer, "GIF")
    with pytest.raises(TwinferError, match=r"padded .*\(57095x57095\)") as e:
        decode_image(buffer.getvalue(), (224, 224), "letterbox", 4_000_000)
    assert e.value.code is ErrorCode.INVALID_INPUT
    stretched = decode_image(buffer.getvalue(), (224, 224), "stretch", 4_000_000)
    assert stretched.tensor.shape == (1, 57095, 7, 3)
