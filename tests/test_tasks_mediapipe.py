"""A real pretrained detector end to end: MediaPipe's face detector on a real photo.

The model ships inside the ``mediapipe`` wheel, which is downloaded (not
installed) into ``~/.cache/twinfer/wheels`` with ``pip download``; offline
and without a cached wheel the test is skipped, saying so.  The photo is
scikit-image's ``astronaut`` (Eileen Collins, NASA).  The expected face
position was measured by hand on a gridded crop of the photo: cheeks at
x = 183 and 270, eyes at (203, 102) and (247, 102), mouth centre at
(225, 147), eyebrows at y = 93, chin at y = 180.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from twisted.internet import reactor

from mediapipe_model import ETC, face_model
from support import ServerTestCase
from twinfer.client import connect

skimage_data = pytest.importorskip(
    "skimage.data", reason="scikit-image (the test extra) ships the photo"
)


def _encoded(pixels: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind)
    return buffer.getvalue()


class MediaPipeFaceDetectorTests(ServerTestCase):
    async def setUp(self) -> None:
        model = face_model()
        # (Not self.mktemp(): that writes under the current directory.)
        directory = Path(tempfile.mkdtemp(prefix="twinfer-tasks-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        # The example config as shipped, next to the model and its labels.
        shutil.copy(ETC / "face-detection.toml", directory)
        shutil.copy(ETC / "face.labels", directory)
        shutil.copy(model, directory)
        port = await self.start_server(
            (directory / "face-detection.toml").read_text(), base_dir=directory
        )
        self.client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(self.client)

    def assert_collins_face(self, box: tuple[float, ...], scale: float = 1.0) -> None:
        x1, y1, x2, y2 = (v / scale for v in box)
        # The box holds both eyes and the mouth, and hugs the face measured by
        # hand (cheeks 183..270, eyebrows 93, chin 180) within 15 px.
        for x, y in ((203, 102), (247, 102), (225, 147)):
            assert x1 < x < x2 and y1 < y < y2, (box, (x, y))
        assert abs(x1 - 183) < 15 and abs(x2 - 270) < 15, box
        assert 65 < y1 < 93 and abs(y2 - 180) < 15, box

    async def test_finds_the_face_in_a_real_photo(self) -> None:
        photo = skimage_data.astronaut()  # 512x512 RGB
        [face] = await self.client.detect("face", _encoded(photo, "PNG"))
        assert face.label == "face" and face.label_id == 0
        assert face.confidence > 0.8
        self.assert_collins_face(face.box)

    async def test_any_size_and_aspect_ratio(self) -> None:
        # The photo cropped to a wide 512x300 and upscaled 1.5x, as a JPEG:
        # the box comes back in that image's own pixels.
        photo = skimage_data.astronaut()[:300]
        big = np.asarray(Image.fromarray(photo).resize((768, 450), Image.Resampling.BICUBIC))
        [face] = await self.client.detect("face", _encoded(big, "JPEG"))
        self.assert_collins_face(face.box, scale=1.5)

    async def test_no_face_in_a_photo_without_one(self) -> None:
        coffee = skimage_data.coffee()  # a cup of coffee
        assert await self.client.detect("face", _encoded(coffee, "PNG")) == []
