"""The tensors ``twinfer bench`` sends: from ``--input`` files or random, fitted to the model.

Every array is built once per run, before the load starts, and is
``bytes``-backed so that the codec sends it without a copy per request.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from twinfer.wire.messages import DType, Metadata


def _bytes_backed(array: np.ndarray) -> np.ndarray:
    """A read-only copy of ``array`` whose memory is a ``bytes`` object.

    The codec hands such an array's ``bytes`` to the transport as it is
    (see :func:`twinfer.wire.encode.tensor_payload`), so sending it costs no copy
    and no allocation per request.
    """
    array = np.ascontiguousarray(array)
    return np.ndarray(array.shape, array.dtype, buffer=array.tobytes())


def make_inputs(
    metadata: Metadata,
    files: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The request inputs: ``files`` where given, random data matching the model otherwise.

    Dynamic dimensions (``-1``) of a random input take their size from
    ``shapes`` or default to 1.  Raises ``ValueError`` naming the input when
    a file or shape does not fit the model.
    """
    files = dict(files or {})
    shapes = dict(shapes or {})
    names = [spec.name for spec in metadata.inputs]
    for name in [*files, *shapes]:
        if name not in names:
            raise ValueError(f"model {metadata.name!r} has no input {name!r} (inputs: {names})")
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in metadata.inputs:
        if spec.name in files:
            array = files[spec.name]
            if array.dtype.newbyteorder("<") != spec.dtype.numpy.newbyteorder("<"):
                raise ValueError(
                    f"input {spec.name!r}: the file holds {array.dtype}, the model takes "
                    f"{spec.dtype.short_name}"
                )
            inputs[spec.name] = _bytes_backed(array.astype(spec.dtype.numpy, copy=False))
            continue
        if spec.shape is None:  # dynamic rank: only the user can say
            if spec.name not in shapes:
                raise ValueError(
                    f"input {spec.name!r} has a dynamic rank: give --shape {spec.name}=D,D,..."
                )
            inputs[spec.name] = _bytes_backed(_random(rng, spec.dtype, shapes[spec.name]))
            continue
        shape = shapes.get(spec.name) or tuple(1 if d < 0 else d for d in spec.shape)
        if len(shape) != len(spec.shape) or any(
            d >= 0 and s != d for s, d in zip(shape, spec.shape, strict=True)
        ):
            raise ValueError(
                f"input {spec.name!r}: shape {list(shape)} does not fit the model's "
                f"{list(spec.shape)}"
            )
        inputs[spec.name] = _bytes_backed(_random(rng, spec.dtype, shape))
    return inputs


def _random(rng: np.random.Generator, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    kind = dtype.numpy.kind
    if kind == "f":
        return rng.random(shape).astype(dtype.numpy)
    if kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 10, shape).astype(dtype.numpy)  # small: valid as indices, ids, ...
