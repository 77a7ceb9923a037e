"""Preprocessing compiled with PrePostProcessor equals a numpy/Pillow reference;
image decoding maps boxes back to the original pixels."""

from __future__ import annotations

import io

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from PIL import Image

from tasks_support import png
from twinfer.engines.openvino import OpenVINOEngine, Signature
from twinfer.errors import ErrorCode, TwinferError
from twinfer.tasks.config import PreprocessConfig
from twinfer.tasks.preprocess import build_model, decode_image


def _echo_model(shape: list[int]) -> ov.Model:
    """``out = image * 1``: shows exactly what the model received."""
    image = ops.parameter(shape, ov.Type.f32, name="image")
    out = ops.multiply(image, ops.constant(np.float32(1)))
    out.output(0).get_tensor().set_names({"out"})
    return ov.Model([out.output(0)], [image], "echo")


def _run(model: ov.Model, config: PreprocessConfig, pixels: np.ndarray) -> np.ndarray:
    prepared, found = build_model(model, config)
    compiled = ov.Core().compile_model(prepared, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    engine = OpenVINOEngine(compiled, Signature.of(prepared))
    return engine.run({found.name: np.ascontiguousarray(pixels[None])}, ())["out"]


RNG = np.random.default_rng(7)
PIXELS = RNG.integers(0, 256, (24, 36, 3), dtype=np.uint8)  # H 24, W 36


def test_nchw_bgr_mean_scale_resize_matches_pillow():
    config = PreprocessConfig(
        color="BGR", mean=(10.0, 20.0, 30.0), scale=(2.0, 4.0, 8.0),
        resize_algorithm="bilinear_pillow",
    )  # fmt: skip
    got = _run(_echo_model([1, 3, 8, 12]), config, PIXELS)
    # Reference: Pillow's own bilinear resize (in float, so no rounding),
    # then BGR, (x - mean) / scale per channel, NCHW.
    channels = [
        np.asarray(Image.fromarray(PIXELS[..., c].astype(np.float32), "F").resize(
            (12, 8), Image.Resampling.BILINEAR))
        for c in range(3)
    ]  # fmt: skip
    rgb = np.stack(channels, axis=-1)
    bgr = rgb[..., ::-1]
    expected = ((bgr - [10.0, 20.0, 30.0]) / [2.0, 4.0, 8.0]).transpose(2, 0, 1)[None]
    assert got.shape == (1, 3, 8, 12)
    np.testing.assert_allclose(got, expected, atol=1e-3)


def test_nhwc_rgb_nearest_exact():
    config = PreprocessConfig(layout="NHWC", mean=(127.5,), scale=(127.5,),
                              resize_algorithm="nearest")  # fmt: skip
    # A 2x upscale by nearest neighbour repeats each pixel: unambiguous.
    small = PIXELS[:4, :6]
    got = _run(_echo_model([1, 8, 12, 3]), config, small)
    expected = (np.repeat(np.repeat(small, 2, axis=0), 2, axis=1) - 127.5) / 127.5
    np.testing.assert_allclose(got[0], expected, atol=1e-6)


def test_any_image_size_is_accepted():
    config = PreprocessConfig(resize_algorithm="linear")
    prepared, found = build_model(_echo_model([1, 3, 8, 12]), config)
    assert found.size == (8, 12) and found.layout == "NCHW"
    shape = prepared.inputs[0].get_partial_shape()
    assert shape[1].is_dynamic and shape[2].is_dynamic  # [1, ?, ?, 3] u8
    assert prepared.inputs[0].get_element_type() == ov.Type.u8
    uniform = np.full((50, 7, 3), 200, np.uint8)
    np.testing.assert_allclose(_run(_echo_model([1, 3, 8, 12]), config, uniform), 200.0, atol=1e-4)


def test_input_that_is_not_an_image():
    with pytest.raises(ValueError, match="3 channels"):
        build_model(_echo_model([1, 4, 8, 8]), PreprocessConfig(layout="NCHW"))
    with pytest.raises(ValueError, match="no input 'pixels'"):
        build_model(_echo_model([1, 3, 8, 8]), PreprocessConfig(input="pixels"))


# --------------------------------------------------------------------------
# decode_image


def test_stretch_and_letterbox_geometry():
    data = png(PIXELS)  # 36 wide, 24 high
    stretched = decode_image(data, (10, 10), "stretch", 10**6)
    assert stretched.tensor.shape == (1, 24, 36, 3)
    np.testing.assert_array_equal(stretched.tensor[0], PIXELS)
    assert stretched.original == (36, 24) and stretched.box_scale == (36, 24)
    # Letterboxed for a square network: padded below to 36x36.
    boxed = decode_image(data, (10, 10), "letterbox", 10**6)
    assert boxed.tensor.shape == (1, 36, 36, 3)
    np.testing.assert_array_equal(boxed.tensor[0, :24], PIXELS)
    assert not boxed.tensor[0, 24:].any()
    assert boxed.box_scale == (36, 36)
    # For a network twice as wide as high, a tall image is padded on the right.
    tall = decode_image(png(PIXELS[:, :10]), (10, 20), "letterbox", 10**6)
    assert tall.tensor.shape == (1, 24, 48, 3) and tall.box_scale == (48, 24)


def test_jpeg_draft_and_exif_rotation_map_back_to_original_pixels():
    # An 800x400 JPEG tagged "rotate 90" (orientation 6): upright it is 400x800.
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (800, 400), (10, 200, 30)).save(buffer, "JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), (100, 100), "stretch", 10**6)
    # Decoded at 1/4 scale (draft), then rotated: 100x200, tall.
    assert decoded.tensor.shape == (1, 200, 100, 3)
    assert decoded.original == (400, 800)
    assert decoded.box_scale == (400, 800)  # normalized -> upright original pixels


def test_bad_images_are_invalid_input():
    for data, message in (
        (b"not an image at all", "cannot decode the image"),
        (png(PIXELS)[:100], "cannot decode the image"),  # truncated PNG
    ):
        with pytest.raises(TwinferError) as caught:
            decode_image(data, (10, 10), "stretch", 10**6)
        assert caught.value.code is ErrorCode.INVALID_INPUT
        assert message in caught.value.message
    with pytest.raises(TwinferError, match="36x24 pixels is larger than the limit of 500"):
        decode_image(png(PIXELS), (10, 10), "stretch", 500)


def test_grey_and_alpha_images_become_rgb():
    grey = io.BytesIO()
    Image.new("L", (5, 4), 77).save(grey, "PNG")
    decoded = decode_image(grey.getvalue(), (4, 4), "stretch", 10**6)
    assert decoded.tensor.shape == (1, 4, 5, 3) and (decoded.tensor == 77).all()
    rgba = io.BytesIO()
    Image.new("RGBA", (3, 3), (1, 2, 3, 4)).save(rgba, "PNG")
    assert decode_image(rgba.getvalue(), (4, 4), "stretch", 10**6).tensor[0, 0, 0].tolist() == [
        1, 2, 3,
    ]  # fmt: skip
