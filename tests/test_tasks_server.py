"""Image tasks end to end: the binary protocol's IMAGE_REQUEST on a real server
over loopback, the Twisted client, the CLI subcommands and ``predict_image``."""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from PIL import Image
from twisted.internet import reactor

from support import ServerTestCase
from tasks_support import blank_png, constant_outputs_model
from twinfer.client import connect
from twinfer.errors import ErrorCode, TwinferError
from twinfer.tasks import cli as tasks_cli
from twinfer.tasks import predict_image, task_info

# One detection: "car" (id 2) at [0.1, 0.2, 0.5, 0.6] of the image, 0.95.
SSD_ROWS = np.array([[0, 2, 0.95, 0.1, 0.2, 0.5, 0.6], [-1, 0, 0, 0, 0, 0, 0]], np.float32)[
    None, None
]

CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "det"
path = "det.xml"
task = "detect"
labels = "coco.txt"
[models.detect]
decoder = "ssd"

[[models]]
name = "colours"
path = "colours.xml"
task = "classify"
labels = "colours.txt"
[models.preprocess]
scale = 255.0
[models.classify]
top_k = 3

[[models]]
name = "tiny"
path = "builtin:tiny"
"""


def _write_models(directory: Path) -> None:
    model = constant_outputs_model([1, 3, 32, 32], {"detection_out": SSD_ROWS})
    ov.save_model(model, str(directory / "det.xml"), compress_to_fp16=False)
    # A real (tiny) classifier: the mean of each channel.
    image = ops.parameter([1, 3, 16, 16], ov.Type.f32, name="image")
    mean = ops.reduce_mean(image, ops.constant(np.array([2, 3])), keep_dims=False)
    mean.output(0).get_tensor().set_names({"scores"})
    ov.save_model(ov.Model([mean.output(0)], [image], "colours"), str(directory / "colours.xml"))
    (directory / "coco.txt").write_text("background\nperson\ncar\n")
    (directory / "colours.txt").write_text("red\ngreen\nblue\n")


class ImageTaskServerTests(ServerTestCase):
    async def setUp(self) -> None:
        # (Not self.mktemp(): that writes under the current directory.)
        directory = Path(tempfile.mkdtemp(prefix="twinfer-tasks-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        _write_models(directory)
        self.directory = directory
        port = await self.start_server(CONFIG, base_dir=directory)
        self.client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(self.client)

    async def test_detect(self) -> None:
        predictions = await self.client.detect("det", blank_png(300, 200))
        assert len(predictions) == 1
        [car] = predictions
        assert (car.label_id, car.label) == (2, "car")
        assert abs(car.confidence - 0.95) < 1e-6
        assert car.box == (30.0, 40.0, 150.0, 120.0)
        assert car.as_dict()["detection_box"] == [30.0, 40.0, 150.0, 120.0]

    async def test_classify(self) -> None:
        predictions = await self.client.classify("colours", blank_png(20, 10, (0, 51, 255)))
        assert [p.label for p in predictions] == ["blue", "green", "red"]
        assert [round(p.confidence, 4) for p in predictions] == [1.0, 0.2, 0.0]
        assert predictions[0].box == (0.0, 0.0, 20.0, 10.0)

    async def test_errors_keep_the_connection(self) -> None:
        cases = [
            (self.client.detect("det", b"\x89PNG\r\n\x1a\n garbage"), ErrorCode.INVALID_INPUT),
            (self.client.detect("det", b""), ErrorCode.INVALID_INPUT),
            (self.client.classify("det", blank_png(8, 8)), ErrorCode.WRONG_TASK),
            (self.client.detect("tiny", blank_png(8, 8)), ErrorCode.WRONG_TASK),
            (self.client.detect("nope", blank_png(8, 8)), ErrorCode.UNKNOWN_MODEL),
            (self.client.predict("det", blank_png(8, 8), "segment"), ErrorCode.INVALID_INPUT),
        ]
        for d, code in cases:
            try:
                await d
            except TwinferError as e:
                assert e.code is code, (e, code)
            else:
                raise AssertionError(f"expected {code.name}")
        # Still served, and the plain tensor interface of the same server too.
        assert len(await self.client.detect("det", blank_png(8, 8))) == 1
        outputs = await self.client.infer("tiny", {"x": np.ones((1, 4), np.float32)})
        assert outputs["y"].shape == (1, 3)

    async def test_predict_image_and_task_info(self) -> None:
        # The API the HTTP front end calls.
        predictions = await predict_image(self.dispatcher, "det", blank_png(100, 100))
        assert predictions == [
            {"label_id": 2, "label": "car", "confidences": predictions[0]["confidences"],
             "detection_box": [10.0, 20.0, 50.0, 60.0]},
        ]  # fmt: skip
        info = task_info(self.dispatcher, "colours")
        assert info is not None
        assert info["task"] == "classify" and info["labels"] == ["red", "green", "blue"]
        assert task_info(self.dispatcher, "tiny") is None
        try:
            task_info(self.dispatcher, "nope")
        except TwinferError as e:
            assert e.code is ErrorCode.UNKNOWN_MODEL
        else:
            raise AssertionError("expected UNKNOWN_MODEL")

    async def test_work_runs_in_the_device_thread(self) -> None:
        seen: list[str] = []

        def work(engine: object) -> str:
            seen.append(threading.current_thread().name)
            return "done"

        assert await self.dispatcher.submit_call("det", work) == "done"
        assert seen == ["PoolThread-twinfer-cpu#0-0"]  # the worker's own thread

        def bad_input(engine: object) -> None:
            raise TwinferError(ErrorCode.INVALID_INPUT, "bad image")

        def crash(engine: object) -> None:
            raise RuntimeError("device on fire")

        for work_fn, code in ((bad_input, ErrorCode.INVALID_INPUT),
                              (crash, ErrorCode.INFERENCE_FAILED)):  # fmt: skip
            try:
                await self.dispatcher.submit_call("det", work_fn)
            except TwinferError as e:
                assert e.code is code
            else:
                raise AssertionError(f"expected {code.name}")
        # The crash is logged (a device failure); bad input is not.
        assert len(self.flushLoggedErrors(RuntimeError)) == 1

    async def test_cli_detect_with_draw(self) -> None:
        parser = argparse.ArgumentParser(prog="twinfer")
        tasks_cli.add_arguments(parser.add_subparsers())
        image = self.directory / "photo.png"
        image.write_bytes(blank_png(300, 200, (255, 255, 255)))
        drawn = self.directory / "out.png"
        args = parser.parse_args(
            ["detect", "det", str(image), "--server", f"tcp:127.0.0.1:{self.port}",
             "--draw", str(drawn)]
        )  # fmt: skip
        out = io.StringIO()
        assert args.func is tasks_cli.run
        assert await tasks_cli.image_command(reactor, args, out) == 0
        assert out.getvalue() == "car                   0.9500  [30.0, 40.0, 150.0, 120.0]\n"
        picture = np.asarray(Image.open(drawn).convert("RGB"))
        assert picture.shape == (200, 300, 3)
        # The box's outline (class 2's colour) at its left edge, white inside.
        assert tuple(picture[100, 30]) == tasks_cli._COLOURS[2]
        assert tuple(picture[100, 90]) == (255, 255, 255)

    async def test_cli_reports_errors(self) -> None:
        parser = argparse.ArgumentParser(prog="twinfer")
        tasks_cli.add_arguments(parser.add_subparsers())
        image = self.directory / "photo.png"
        image.write_bytes(blank_png(10, 10))
        server = f"tcp:127.0.0.1:{self.port}"
        out = io.StringIO()
        args = parser.parse_args(["classify", "det", str(image), "--server", server])
        assert await tasks_cli.image_command(reactor, args, out) == 1  # WRONG_TASK
        args = parser.parse_args(["classify", "colours", str(image), "--server", server, "--json"])
        assert await tasks_cli.image_command(reactor, args, out) == 0
        assert '"label": "blue"' in out.getvalue()
        args = parser.parse_args(["detect", "det", str(self.directory / "none.png")])
        assert await tasks_cli.image_command(reactor, args, out) == 2


def test_codec_image_messages_round_trip_and_reject_bad_bodies() -> None:
    import pytest

    from twinfer.errors import CodecError
    from twinfer.wire.decode import decode_message
    from twinfer.wire.encode import encode_bytes
    from twinfer.wire.frames import HEADER, MAGIC, FrameDecoder
    from twinfer.wire.messages import ImageRequest, Prediction, Predictions

    def decode(data: bytes) -> object:
        [frame] = FrameDecoder().feed(data)
        return decode_message(frame)

    request = decode(encode_bytes(9, ImageRequest("face", b"\xff\xd8 jpeg bytes", "detect")))
    assert isinstance(request, ImageRequest)
    assert (request.model, bytes(request.image), request.task) == (
        "face", b"\xff\xd8 jpeg bytes", "detect",
    )  # fmt: skip
    reply = Predictions("detect", (Prediction(3, "dog", 0.5, (1.0, 2.0, 3.5, 4.0)),))
    assert decode(encode_bytes(9, reply)) == reply
    header = HEADER
    for mtype, body in (
        (0x30, b"\x05\x00fa"),  # model name cut short
        (0x31, b'{"task": "detect", "predictions": [{"label_id": "3"}]}'),
        (
            0x31,
            b'{"task": "detect", "predictions": [{"label_id": 1, "label": "a", '
            b'"confidences": 1, "detection_box": [1, 2, 3]}]}',
        ),  # fmt: skip
        (0x31, b"[]"),
    ):
        frame = header.pack(MAGIC, mtype, 0, len(body), 1) + body
        with pytest.raises(CodecError) as caught:
            decode(frame)
        assert caught.value.code is ErrorCode.MALFORMED_FRAME
