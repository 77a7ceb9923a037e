"""The OpenVINO backend: read, compile, validate, run.

This module knows OpenVINO and nothing about sockets or queues.  It reads a
model once (:func:`read_model`), describes its ports (:class:`Signature`,
used to validate requests on the reactor thread before they are queued),
compiles it once per device (:func:`compile_model`) and gives each device
replica its own :class:`OpenVINOEngine` (one infer request) to run in that
replica's single thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import attrs
import numpy as np
import openvino as ov

from twinfer.engines import builtin
from twinfer.errors import ErrorCode, TwinferError
from twinfer.sharedmem import write_into
from twinfer.wire.messages import DType, Metadata, TensorSpec


class Engine(Protocol):
    """Runs one model on one device replica; called only from that replica's thread."""

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        """Infer; return the outputs named in ``outputs`` (all if empty)."""
        ...


@attrs.frozen
class Port:
    """One model input or output, as the validator needs it."""

    name: str
    index: int
    dtype: DType
    #: ``(min, max)`` per dimension, ``max == -1`` for unbounded; ``None``
    #: when even the rank is dynamic.
    bounds: tuple[tuple[int, int], ...] | None

    @property
    def spec(self) -> TensorSpec:
        """The port as published in metadata (``-1`` for each dynamic dimension)."""
        if self.bounds is None:
            return TensorSpec(self.name, self.dtype, None)
        dims = tuple(lo if lo == hi else -1 for lo, hi in self.bounds)
        return TensorSpec(self.name, self.dtype, dims)

    @property
    def smallest_shape(self) -> tuple[int, ...] | None:
        """The smallest non-empty shape the port accepts (``None``: dynamic rank)."""
        if self.bounds is None:
            return None
        return tuple(max(lo, 1) for lo, _ in self.bounds)

    def describe_shape(self) -> str:
        """The accepted shape, human-readable (``[?,3,224,224]``)."""
        if self.bounds is None:
            return "any shape"
        parts = []
        for lo, hi in self.bounds:
            if lo == hi:
                parts.append(str(lo))
            elif lo == 0 and hi == -1:
                parts.append("?")
            else:
                parts.append(f"{lo}..{'' if hi == -1 else hi}")
        return "[" + ",".join(parts) + "]"

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of ``shape`` fits this port."""
        bounds = self.bounds
        if bounds is None:
            return True
        if len(shape) != len(bounds):
            return False
        return all(lo <= d and (hi == -1 or d <= hi) for d, (lo, hi) in zip(shape, bounds))


#: OpenVINO element types the wire can carry.  Matched by name, not through
#: ``Type.to_dtype()``, which maps bf16 to float16 and u4 to uint8.
_DTYPE_BY_OV_NAME = {
    "f32": DType.F32, "f16": DType.F16, "f64": DType.F64,
    "i8": DType.I8, "u8": DType.U8, "i16": DType.I16, "u16": DType.U16,
    "i32": DType.I32, "u32": DType.U32, "i64": DType.I64, "u64": DType.U64,
    "boolean": DType.BOOL,
}  # fmt: skip


def _port(name_of: str, index: int, element: ov.Type, shape: ov.PartialShape, what: str) -> Port:
    try:
        dtype = _DTYPE_BY_OV_NAME[element.get_type_name()]
    except KeyError:
        raise ValueError(
            f"{what} {name_of!r} has element type {element.get_type_name()}, which "
            f"twinfer cannot carry"
        ) from None
    if shape.rank.is_dynamic:
        return Port(name_of, index, dtype, None)
    bounds = []
    for dim in shape:
        if dim.is_static:
            bounds.append((dim.get_length(), dim.get_length()))
        else:
            bounds.append((max(dim.get_min_length(), 0), dim.get_max_length()))
    return Port(name_of, index, dtype, tuple(bounds))


def _port_name(port: ov.Output, index: int, what: str) -> str:
    try:
        return str(port.any_name)
    except RuntimeError:
        return f"{what}_{index}"  # unnamed port: give it a stable name


@attrs.frozen
class Signature:
    """A model's inputs and outputs; validates requests before they are queued."""

    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]

    @classmethod
    def of(cls, model: ov.Model | ov.CompiledModel) -> Signature:
        """Read the ports of an OpenVINO model."""

        def ports(outputs: list[ov.Output], what: str) -> tuple[Port, ...]:
            return tuple(
                _port(_port_name(p, i, what), i, p.get_element_type(), p.get_partial_shape(), what)
                for i, p in enumerate(outputs)
            )

        return cls(ports(model.inputs, "input"), ports(model.outputs, "output"))

    def metadata(self, name: str, devices: tuple[str, ...]) -> Metadata:
        """The model's metadata message."""
        return Metadata(
            name, tuple(p.spec for p in self.inputs), tuple(p.spec for p in self.outputs), devices
        )

    def validate(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...]
    ) -> None:
        """Raise :class:`TwinferError` naming what is wrong with a request, if anything."""
        expected = self.inputs
        if len(inputs) != len(expected) or any(p.name not in inputs for p in expected):
            names = [p.name for p in expected]
            missing = [n for n in names if n not in inputs]
            unexpected = [n for n in inputs if n not in names]
            detail = []
            if missing:
                detail.append(f"missing {missing}")
            if unexpected:
                detail.append(f"unexpected {unexpected}")
            raise TwinferError(
                ErrorCode.INVALID_INPUT,
                f"model {model!r} takes inputs {names}: {', '.join(detail)}",
            )
        for port in expected:
            array = inputs[port.name]
            if array.dtype != port.dtype.numpy:
                got = (
                    DType.from_numpy(array.dtype).short_name
                    if array.dtype.newbyteorder("<") in _WIRE_DTYPES
                    else str(array.dtype)
                )
                raise TwinferError(
                    ErrorCode.INVALID_DTYPE,
                    f"model {model!r} input {port.name!r} takes {port.dtype.short_name}, got {got}",
                )
            if not port.accepts_shape(array.shape):
                raise TwinferError(
                    ErrorCode.INVALID_SHAPE,
                    f"model {model!r} input {port.name!r} takes shape {port.describe_shape()}, "
                    f"got [{','.join(map(str, array.shape))}]",
                )
        if outputs:
            names = [p.name for p in self.outputs]
            for name in outputs:
                if name not in names:
                    raise TwinferError(
                        ErrorCode.UNKNOWN_OUTPUT,
                        f"model {model!r} has no output {name!r} (outputs: {names})",
                    )


_WIRE_DTYPES = {d.numpy for d in DType}


def _bind_outputs(
    request: ov.InferRequest, ports: tuple[Port, ...], into: Mapping[str, np.ndarray]
) -> dict[str, tuple[int, ov.Tensor, np.ndarray]]:
    """Point the outputs of static shape named in ``into`` at those bytes;
    returns each one's port index and own tensor (to restore after) and the
    output's view of the bytes."""
    bound = {}
    for port in ports:
        dest = into.get(port.name)
        if dest is None or port.bounds is None or any(lo != hi for lo, hi in port.bounds):
            continue
        shape = tuple(lo for lo, _ in port.bounds)
        nbytes = int(np.prod(shape)) * port.dtype.numpy.itemsize
        if nbytes > dest.nbytes:
            continue  # write_into refuses it after the inference, precisely
        view = dest[:nbytes].view(port.dtype.numpy).reshape(shape)
        if not view.flags.aligned:
            continue
        bound[port.name] = (port.index, request.get_output_tensor(port.index), view)
        request.set_output_tensor(port.index, ov.Tensor(view, shared_memory=True))
    return bound


def read_model(core: ov.Core, path: str) -> ov.Model:
    """Read a model file (IR, ONNX, TFLite, Paddle) or a ``builtin:`` model."""
    if path.startswith(builtin.PREFIX):
        return builtin.read_builtin(core, path)
    return core.read_model(path)


def compile_model(
    core: ov.Core, model: ov.Model, target: str, properties: Mapping[str, str]
) -> ov.CompiledModel:
    """Compile ``model`` for the OpenVINO device ``target`` with ``properties``."""
    return core.compile_model(model, target, dict(properties))


def optimal_requests(compiled: ov.CompiledModel) -> int:
    """OpenVINO's OPTIMAL_NUMBER_OF_INFER_REQUESTS for a compiled model (at least 1)."""
    try:
        return max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
    except RuntimeError:
        return 1


class OpenVINOEngine:
    """One infer request on a compiled model: one device replica's handle on it.

    Not thread-safe by design: the dispatcher calls :meth:`run` only from the
    replica's single thread.
    """

    def __init__(self, compiled: ov.CompiledModel, signature: Signature) -> None:
        self._request = compiled.create_infer_request()
        self._signature = signature

    def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: tuple[str, ...],
        into: Mapping[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Infer and return the outputs, each backed by its own ``bytes`` object.

        ``into`` maps outputs to shared-memory bytes (uint8) to write them
        into instead (:mod:`twinfer.sharedmem`), returned as views there: an
        output of static shape is OpenVINO's own output tensor for this
        inference (no copy at all), any other is copied there once.

        Inputs are shared with OpenVINO, not copied (they are writable views
        of the request's frame).  Each output is copied exactly once, from
        the infer request's memory (reused by the next inference) into a
        ``bytes`` object: the wire codec hands that object to the transport
        as it is, so the reactor thread never copies tensor data.
        """
        request = self._request
        bound = _bind_outputs(request, self._signature.outputs, into) if into else {}
        try:
            request.infer(
                {port.index: inputs[port.name] for port in self._signature.inputs},
                share_inputs=True,
                share_outputs=True,
            )
            result = {}
            for port in self._signature.outputs:
                if outputs and port.name not in outputs:
                    continue
                data = request.get_output_tensor(port.index).data
                if into and port.name in into:
                    done = bound.get(port.name)  # written in place: its view of the region
                    result[port.name] = (
                        done[2]
                        if done is not None
                        else write_into(into[port.name], data, port.name)
                    )
                else:
                    result[port.name] = np.ndarray(data.shape, data.dtype, buffer=data.tobytes())
        finally:
            for index, own, _ in bound.values():  # the next request writes its own tensors
                request.set_output_tensor(index, own)
        return result

    def probe(self) -> None:
        """Health check: run the model once on zeros of its smallest shape.

        Raises if the device fails; a model with an input of dynamic rank is
        not probed.
        """
        inputs = {}
        for port in self._signature.inputs:
            shape = port.smallest_shape
            if shape is None:
                return
            inputs[port.name] = np.zeros(shape, port.dtype.numpy)
        self.run(inputs, ())
