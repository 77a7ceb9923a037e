"""Image in, model input out: decoding with Pillow, the rest compiled into the model.

:func:`build_model` rewrites a model with OpenVINO's ``PrePostProcessor`` so
that it takes a ``u8 [1, H, W, 3]`` RGB image of *any* size and itself
converts the element type, reorders channels, resizes to the network input,
subtracts the mean, divides by the scale and changes the layout: all of it
compiled, and run by the device with the model.  What stays in Python is
:func:`decode_image` (Pillow, run in the device thread) and, for
``resize = "letterbox"``, one padding copy.
"""

from __future__ import annotations

import io
import warnings

import attrs
import numpy as np
import openvino as ov
from openvino.preprocess import ColorFormat, PrePostProcessor, ResizeAlgorithm
from PIL import Image, ImageOps

from twinfer.errors import ErrorCode, TwinferError
from twinfer.tasks.config import PreprocessConfig

#: The EXIF orientation tag, and its values that rotate by 90 or 270 degrees.
_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)

_ALGORITHMS = {
    "linear": ResizeAlgorithm.RESIZE_LINEAR,
    "nearest": ResizeAlgorithm.RESIZE_NEAREST,
    "cubic": ResizeAlgorithm.RESIZE_CUBIC,
    "bilinear_pillow": ResizeAlgorithm.RESIZE_BILINEAR_PILLOW,
    "bicubic_pillow": ResizeAlgorithm.RESIZE_BICUBIC_PILLOW,
}


@attrs.frozen
class ModelInput:
    """The model's image input, as found before preprocessing was added."""

    name: str
    index: int
    layout: str
    #: Network input (height, width).
    size: tuple[int, int]


def _port_names(port: ov.Output) -> set[str]:
    return set(port.get_names())


def find_image_input(model: ov.Model, config: PreprocessConfig) -> ModelInput:
    """The image input: named by ``config.input`` or the only 4-D input.

    Raises ``ValueError`` naming the problem (no such input, dynamic size,
    not 3 channels).
    """
    candidates = []
    for index, port in enumerate(model.inputs):
        rank = port.get_partial_shape().rank
        if config.input is not None:
            if config.input in _port_names(port):
                candidates = [(index, port)]
                break
        elif rank.is_static and rank.get_length() == 4:
            candidates.append((index, port))
    if config.input is not None and not candidates:
        names = [sorted(_port_names(p)) for p in model.inputs]
        raise ValueError(f"preprocess.input: the model has no input {config.input!r} ({names})")
    if len(candidates) != 1:
        raise ValueError(
            f"cannot tell which input takes the image ({len(candidates)} 4-D inputs): "
            f"set preprocess.input"
        )
    index, port = candidates[0]
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        raise ValueError(f"the image input must be 4-D, it is {shape}")
    dims = [d.get_length() if d.is_static else -1 for d in shape]
    layout = config.layout
    if layout is None:
        if dims[1] == 3:
            layout = "NCHW"
        elif dims[3] == 3:
            layout = "NHWC"
        else:
            raise ValueError(
                f"cannot guess the layout of input shape {shape}: set preprocess.layout"
            )
    channels, height, width = (
        (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
    )
    if channels != 3:
        raise ValueError(f"the image input must have 3 channels in {layout}, its shape is {shape}")
    if height < 1 or width < 1:
        raise ValueError(f"the image input needs a static height and width, its shape is {shape}")
    name = port.any_name if _port_names(port) else f"input_{index}"
    return ModelInput(name, index, layout, (height, width))


def build_model(model: ov.Model, config: PreprocessConfig) -> tuple[ov.Model, ModelInput]:
    """Compile the preprocessing into ``model`` (modified in place, and returned).

    Afterwards the image input takes ``u8 [1, ?, ?, 3]`` RGB (NHWC) of any
    size.  Raises ``ValueError`` when the model's input does not fit.
    """
    found = find_image_input(model, config)
    ppp = PrePostProcessor(model)
    info = ppp.input(found.index)
    info.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_color_format(
        ColorFormat.RGB
    ).set_spatial_dynamic_shape()
    info.model().set_layout(ov.Layout(found.layout))
    steps = info.preprocess()
    steps.convert_element_type(ov.Type.f32)
    if config.color != "RGB":
        steps.convert_color(ColorFormat.BGR)
    steps.resize(_ALGORITHMS[config.resize_algorithm])
    # Mean and scale are given in the model's channel order, after conversion.
    if any(m != 0.0 for m in config.mean):
        steps.mean(list(config.mean) if len(config.mean) > 1 else config.mean[0])
    if any(s != 1.0 for s in config.scale):
        steps.scale(list(config.scale) if len(config.scale) > 1 else config.scale[0])
    return ppp.build(), found


@attrs.frozen(eq=False)
class DecodedImage:
    """An image ready for the model, and how to map boxes back to the original."""

    #: ``u8 [1, H, W, 3]`` RGB, writable and C-contiguous (shared with OpenVINO).
    tensor: np.ndarray
    #: Size of the original image (after EXIF rotation): (width, height).
    original: tuple[int, int]
    #: What a normalized (0..1) box coordinate is multiplied by to get
    #: original-image pixels: (x factor, y factor).
    box_scale: tuple[float, float]


def decode_image(
    data: bytes | bytearray | memoryview,
    network_hw: tuple[int, int],
    resize: str,
    max_pixels: int,
) -> DecodedImage:
    """Decode encoded image bytes (JPEG, PNG, BMP, WebP...) for a network of ``network_hw``.

    The pixel count is checked before any pixel is decoded; JPEGs much larger
    than the network input are decoded at a reduced scale (``draft``), which is
    far cheaper and loses nothing the resize would keep.  Raises
    :class:`TwinferError` ``INVALID_INPUT`` for bytes that are not an image
    or an image that is too large.  Heavy: call it in a device thread.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        image: Image.Image = opened
        width, height = image.size
        if width * height > max_pixels:
            raise TwinferError(
                ErrorCode.INVALID_INPUT,
                f"image of {width}x{height} pixels is larger than the limit of {max_pixels} pixels",
            )
        if opened.format == "JPEG":
            opened.draft("RGB", (network_hw[1], network_hw[0]))
        # Scale of the (possibly reduced, by ``draft``) decode to the full image.
        back_x, back_y = width / image.size[0], height / image.size[1]
        original = (width, height)
        if image.getexif().get(_ORIENTATION, 1) in _SWAPS_AXES:
            back_x, back_y = back_y, back_x
            original = (height, width)
        image = ImageOps.exif_transpose(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image)
    except TwinferError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # fmt: skip
        raise TwinferError(ErrorCode.INVALID_INPUT, f"cannot decode the image: {e}") from None
    decoded_h, decoded_w = pixels.shape[:2]
    if resize == "letterbox":
        net_h, net_w = network_hw
        # Pad bottom/right so the padded image has the network's aspect ratio.
        padded_w = max(decoded_w, int(np.ceil(decoded_h * net_w / net_h)))
        padded_h = max(decoded_h, int(np.ceil(decoded_w * net_h / net_w)))
        # The padding counts against the limit: a 7x57095 strip padded to a
        # square would take 9.7 GB.
        if padded_w * padded_h > max_pixels:
            raise TwinferError(
                ErrorCode.INVALID_INPUT,
                f"image of {width}x{height} pixels, padded to the network's aspect ratio "
                f"({padded_w}x{padded_h}), is larger than the limit of {max_pixels} pixels",
            )
        tensor = np.zeros((1, padded_h, padded_w, 3), np.uint8)
        tensor[0, :decoded_h, :decoded_w] = pixels
        return DecodedImage(tensor, original, (padded_w * back_x, padded_h * back_y))
    tensor = pixels[None]
    if not tensor.flags.writeable:
        tensor = tensor.copy()  # OpenVINO shares inputs; Pillow's arrays are read-only
    return DecodedImage(tensor, original, (decoded_w * back_x, decoded_h * back_y))
