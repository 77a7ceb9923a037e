"""Inference requests whose tensors are in shared-memory regions, for every front end.

A front end decodes its request into arrays and region references
(:class:`~twinfer.wire.messages.RegionTensor` inputs, output names mapped to
:class:`~twinfer.wire.messages.RegionRef`) and calls :func:`infer` with the
owner's :class:`~twinfer.sharedmem.RegionTable`.  Everything else is the data
plane's usual path (admission, validation, counting).

* Every reference is bounds-checked and leased before the request is
  queued; a bad one fails the request (``UNKNOWN_REGION``,
  ``INVALID_REGION``), is counted as a refusal, and nothing is queued.
* Region inputs are zero-copy views of the mapping; a request with only
  those takes the ordinary path (and may be batched).  Its leases end when
  its Deferred fires; the views keep the mapping alive for a device thread
  that is still on a cancelled job.
* Requested region outputs are written by the device thread (see
  ``OpenVINOEngine.run``'s ``into``): such a request runs alone (never
  batched) as custom work whose leases end in the device thread when it is
  done, or when it fires without ever having started.

The result's outputs for region outputs are views of the region; the front
end answers with their shapes and dtypes, not their bytes
(:func:`region_outputs`).  Front ends that take requests with and without
region references alike (HTTP, gRPC: Triton's parameters on any tensor) call
:func:`infer_maybe_shared`, which does both steps and refuses references on a
server without ``--allow-shm``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable, Mapping
from typing import Any

import attrs
import numpy as np
from twisted.internet.defer import Deferred, fail

from twinfer.dataplane import DataPlane, Session
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling import InferResult
from twinfer.sharedmem import Lease, RegionTable, regions_of, release_all, write_into
from twinfer.wire.messages import DType, RegionRef, RegionTensor

__all__ = ["infer", "infer_maybe_shared", "region_outputs"]


def infer(
    plane: DataPlane,
    session: Session,
    key: Hashable,
    model: str,
    table: RegionTable,
    inputs: Mapping[str, Any],
    outputs: tuple[str, ...] = (),
    output_regions: Mapping[str, RegionRef] | None = None,
    *,
    timeout_ms: int = 0,
    priority: int = 0,
) -> Deferred[InferResult]:
    """:meth:`DataPlane.infer` with inputs from and outputs into ``table``'s regions.

    Fires with an :class:`InferResult` whose region outputs are views of
    their regions, or fails with :class:`TwinferError`.
    """
    output_regions = output_regions or {}
    leases: list[Lease] = []
    try:
        arrays: dict[str, np.ndarray] = {}
        for name, value in inputs.items():
            if type(value) is RegionTensor:
                lease = table.input_array(value.ref, value.dtype, value.shape, f"input {name!r}")
                leases.append(lease)
                arrays[name] = lease.array
            else:
                arrays[name] = value
        into: dict[str, np.ndarray] = {}
        for name, ref in output_regions.items():
            if outputs and name not in outputs:
                raise TwinferError(
                    ErrorCode.INVALID_REGION, f"output {name!r} has a region but is not requested"
                )
            lease = table.lease(ref, f"output {name!r}")
            leases.append(lease)
            into[name] = lease.bytes
        _check_static_outputs(plane, model, into, output_regions)
    except TwinferError as e:
        release_all(leases)(None)
        plane.refuse(session, model, e)
        return fail(e)
    if not into:
        d = plane.infer(
            session, key, model, arrays, outputs, timeout_ms=timeout_ms, priority=priority
        )
        return d.addBoth(release_all(leases))
    work = _WriteOutputs(model, arrays, outputs, into, leases)
    d = plane.infer(
        session, key, model, arrays, outputs, timeout_ms=timeout_ms, priority=priority, work=work
    )
    return d.addBoth(work.fired)


def infer_maybe_shared(
    plane: DataPlane,
    session: Session,
    key: Hashable,
    model: str,
    table: RegionTable | None,
    inputs: Mapping[str, Any],
    outputs: tuple[str, ...] = (),
    output_regions: Mapping[str, RegionRef] | None = None,
    *,
    timeout_ms: int = 0,
    priority: int = 0,
) -> Deferred[InferResult]:
    """Run a request that may reference regions of ``table`` (None: the
    server has no shared memory).

    Without references it is :meth:`DataPlane.infer` as it is.  With them,
    :func:`infer`, and the result's region outputs become :class:`RegionTensor`
    (:func:`region_outputs`) for the front end to describe; without a table
    the request is refused (``UNSUPPORTED_MESSAGE`` naming ``--allow-shm``,
    counted).  Fires with the :class:`InferResult` or fails with
    :class:`TwinferError`.
    """
    if not output_regions and not any(type(v) is RegionTensor for v in inputs.values()):
        return plane.infer(
            session, key, model, inputs, outputs, timeout_ms=timeout_ms, priority=priority
        )
    try:
        regions = regions_of(table)
    except TwinferError as e:
        plane.refuse(session, model, e)
        return fail(e)
    refs = dict(output_regions or {})
    d = infer(
        plane,
        session,
        key,
        model,
        regions,
        inputs,
        outputs,
        refs,
        timeout_ms=timeout_ms,
        priority=priority,
    )
    return d.addCallback(
        lambda result: attrs.evolve(result, outputs=region_outputs(result.outputs, refs))
    )


def _check_static_outputs(
    plane: DataPlane, model: str, into: Mapping[str, np.ndarray], refs: Mapping[str, RegionRef]
) -> None:
    """Refuse, before queueing, an output of static shape that cannot fit its
    region reference (a dynamic one is checked when it is known)."""
    entry = plane.dispatcher.model(model)
    if entry is None or not into:
        return  # the data plane reports the unknown model
    for port in entry.signature.outputs:
        if port.name not in into or port.bounds is None:
            continue
        if any(lo != hi for lo, hi in port.bounds):
            continue
        need = math.prod(lo for lo, _ in port.bounds) * port.dtype.numpy.itemsize
        ref = refs[port.name]
        if need > ref.byte_size:
            raise TwinferError(
                ErrorCode.INVALID_REGION,
                f"output {port.name!r} takes {need} bytes; its reference to region "
                f"{ref.region!r} gives {ref.byte_size}",
            )


class _WriteOutputs:
    """The device-thread work of a request with region outputs; ends its
    leases when it is done, or (:meth:`fired`) if it never starts."""

    def __init__(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: tuple[str, ...],
        into: dict[str, np.ndarray],
        leases: list[Lease],
    ) -> None:
        self.model = model
        self.inputs = inputs
        self.outputs = outputs
        self.into = into
        self._leases = leases
        self._lock = threading.Lock()
        self._state = "queued"  # -> "running" -> "done", or "queued" -> "done"
        self._enqueued = time.monotonic()

    def __call__(self, engine: Any) -> InferResult:
        with self._lock:
            if self._state != "queued":
                raise TwinferError(ErrorCode.CANCELLED, "the request was withdrawn")
            self._state = "running"
        try:
            started = time.monotonic()
            result = self._run(engine)
            compute_us = int((time.monotonic() - started) * 1e6)
            first = next(iter(self.inputs.values()), None)
            rows = first.shape[0] if first is not None and first.ndim else 1
            queue_us = int((started - self._enqueued) * 1e6)
            return InferResult(result, queue_us, compute_us, rows, self.model)
        finally:
            with self._lock:
                self._state = "done"
                release_all(self._leases)(None)

    def _run(self, engine: Any) -> dict[str, np.ndarray]:
        from twinfer.engines.openvino import OpenVINOEngine

        if isinstance(engine, OpenVINOEngine):
            return engine.run(self.inputs, self.outputs, into=self.into)
        result = engine.run(self.inputs, self.outputs)  # another engine: copy here
        for name, dest in self.into.items():
            result[name] = write_into(dest, result[name], name)
        return dict(result)

    def fired(self, result: object) -> object:
        with self._lock:
            if self._state == "queued":  # cancelled, expired or refused: never ran
                self._state = "done"
                release_all(self._leases)(None)
        return result


def region_outputs(
    outputs: Mapping[str, np.ndarray], output_regions: Mapping[str, RegionRef]
) -> dict[str, Any]:
    """The reply's outputs: region outputs as :class:`RegionTensor` (their
    shape, dtype and the bytes written), the others as they are."""
    reply: dict[str, Any] = {}
    for name, array in outputs.items():
        ref = output_regions.get(name)
        if ref is None:
            reply[name] = array
        else:
            written = RegionRef(ref.region, ref.offset, array.nbytes)
            reply[name] = RegionTensor(DType.from_numpy(array.dtype), array.shape, written)
    return reply
