"""The clients' shared-memory pool: ``infer(..., shared_memory=True)`` without bookkeeping.

Sans-I/O, shared by the Twisted client (:mod:`twinfer.client`) and the
blocking one (:mod:`twinfer.blocking`).  A :class:`RegionPool` owns POSIX
shared-memory objects it creates under ``/dev/shm`` (never through
``multiprocessing.shared_memory``, whose resource tracker would unlink them
behind our back), each registered once as a region of the connection and
reused by request after request:

1. :meth:`RegionPool.prepare` picks a free object big enough for the
   request's inputs and its outputs of static shape (or makes a new one:
   then :attr:`Prepared.register` must be sent first), copies the inputs in
   and builds the ``INFER_REQUEST`` that references them;
2. :meth:`Prepared.finish` reads the outputs written into the object (a
   copy: the object is reused at once) and frees it; :meth:`Prepared.abandon`
   frees it after an error;
3. :meth:`RegionPool.close` unlinks every object (the server unregisters a
   connection's regions itself when it closes).

Shared memory only helps, and only works, when the server is on this host:
:func:`is_local` tells from the peer's address (loopback or a UNIX socket).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import uuid
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from twinfer.errors import ErrorCode, TwinferError
from twinfer.sharedmem import SHM_DIR
from twinfer.wire.encode import wire_array
from twinfer.wire.messages import (
    InferReply,
    InferRequest,
    Metadata,
    RegionRef,
    RegionTensor,
    RegisterRegion,
)

__all__ = ["Prepared", "RegionPool", "SharedMemoryState", "is_local"]

#: Smallest shared-memory object the pool makes.
MIN_OBJECT = 64 * 1024
#: Tensors start at multiples of this within an object.
ALIGN = 64


def is_local(address: Any) -> bool:
    """Whether a peer address (a Twisted ``IAddress`` or a socket peername)
    is on this host: a UNIX socket, or a loopback IPv4/IPv6 address."""
    host = getattr(address, "host", None)
    if host is None:
        if isinstance(address, tuple) and address:
            host = address[0]
        else:
            return isinstance(address, str) or type(address).__name__ == "UNIXAddress"
    return isinstance(host, str) and (host.startswith("127.") or host in ("::1", "localhost"))


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class _Object:
    """One shm object made by the pool, mapped, and registered as a region of the same name."""

    def __init__(self, shm_dir: str, name: str, size: int) -> None:
        self.name = name
        self.path = os.path.join(shm_dir, name)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self.memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        self.bytes = np.frombuffer(self.memory, np.uint8)
        self.registered = False

    @property
    def key(self) -> str:
        return "/" + self.name

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@attrs.define(eq=False)
class Prepared:
    """One request placed in a shm object of the pool."""

    pool: RegionPool
    obj: _Object
    #: The ``REGISTER_REGION`` to send (and wait for) first, for a new object.
    register: RegisterRegion | None
    #: The ``INFER_REQUEST`` to send.
    request: InferRequest
    done: bool = False

    def finish(self, reply: InferReply) -> dict[str, np.ndarray]:
        """The outputs: those written into the object are copied out; frees it."""
        outputs = {}
        for name, value in reply.outputs.items():
            if type(value) is RegionTensor:
                ref = value.ref
                if ref.region != self.obj.name or ref.offset + ref.byte_size > self.obj.size:
                    raise ValueError(f"output {name!r} names a region this request did not give")
                data = self.obj.bytes[ref.offset : ref.offset + ref.byte_size]
                outputs[name] = data.view(value.dtype.numpy).reshape(value.shape).copy()
            else:
                outputs[name] = value
        self.abandon()
        return outputs

    def abandon(self) -> None:
        """Give the object back to the pool (idempotent)."""
        if not self.done:
            self.done = True
            self.pool._free.append(self.obj)


class RegionPool:
    """The shm objects of one client connection; see the module docstring."""

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self._prefix = f"twinfer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._numbers = itertools.count()
        self._objects: list[_Object] = []
        self._free: list[_Object] = []

    @property
    def objects(self) -> int:
        """How many shm objects the pool holds."""
        return len(self._objects)

    def prepare(
        self,
        metadata: Metadata,
        inputs: Mapping[str, Any],
        outputs: tuple[str, ...] = (),
        timeout_ms: int = 0,
        priority: int = 0,
    ) -> Prepared:
        """Place a request in a free object (made if none fits); see the module docstring."""
        arrays = {name: wire_array(value, name) for name, value in inputs.items()}
        layout: list[tuple[str, int]] = []
        size = 0
        for name, (_, array) in arrays.items():
            layout.append((name, size))
            size += _aligned(array.nbytes)
        into: dict[str, int] = {}
        for spec in metadata.outputs:
            if outputs and spec.name not in outputs:
                continue
            if spec.shape is None or any(d < 0 for d in spec.shape):
                continue  # its size is known only afterwards: it comes in the reply
            into[spec.name] = int(np.prod(spec.shape)) * spec.dtype.numpy.itemsize
            layout.append((spec.name, size))
            size += _aligned(into[spec.name])
        obj = self._take(max(size, 1))
        register = None
        if not obj.registered:
            obj.registered = True
            register = RegisterRegion(obj.name, obj.key, 0, obj.size)
        offsets = dict(layout)
        region_inputs: dict[str, RegionTensor] = {}
        for name, (dtype, array) in arrays.items():
            start = offsets[name]
            obj.bytes[start : start + array.nbytes] = array.reshape(-1).view(np.uint8)
            ref = RegionRef(obj.name, start, array.nbytes)
            region_inputs[name] = RegionTensor(dtype, array.shape, ref)
        wanted = outputs or tuple(spec.name for spec in metadata.outputs)
        regions = {name: RegionRef(obj.name, offsets[name], n) for name, n in into.items()}
        request = InferRequest(
            metadata.name, region_inputs, wanted, timeout_ms, priority, output_regions=regions
        )
        return Prepared(self, obj, register, request)

    def _take(self, size: int) -> _Object:
        fits = [o for o in self._free if o.size >= size]
        if fits:
            best = min(fits, key=lambda o: o.size)
            self._free.remove(best)
            return best
        target = max(MIN_OBJECT, 1 << (size - 1).bit_length())
        obj = _Object(self.shm_dir, f"{self._prefix}-{next(self._numbers)}", target)
        self._objects.append(obj)
        return obj

    def discard(self, prepared: Prepared) -> None:
        """The server refused to register ``prepared``'s new object: drop it."""
        prepared.done = True
        obj = prepared.obj
        if obj in self._objects:
            self._objects.remove(obj)
        obj.unlink()

    def close(self) -> list[str]:
        """Unlink every object; returns the names of the regions registered."""
        names = [o.name for o in self._objects if o.registered]
        for obj in self._objects:
            obj.unlink()
        self._objects.clear()
        self._free.clear()
        return names


class SharedMemoryState:
    """One client's ``shared_memory=True`` state: the pool of its current
    connection (``owner``), the models' metadata, and why shm is off."""

    def __init__(self) -> None:
        self.pool: RegionPool | None = None
        self._owner: object = None
        #: Metadata of the models used (to know their outputs' sizes).
        self.metadata: dict[str, Metadata] = {}
        #: Why shared memory is not used (set once, logged once); None: it is.
        self.off: str | None = None

    def pool_for(self, owner: object, version: int, peer: Any) -> RegionPool | None:
        """The pool for the connection ``owner`` (a new one for a new
        connection, whose regions are new too); None when shm is off, or
        turns off now: the server speaks ``version`` < 2 or ``peer`` is
        not on this host (:attr:`off` says why)."""
        if self.off is not None:
            return None
        if self.pool is not None and self._owner is owner:
            return self.pool
        self.close()
        if version < 2:
            self.off = f"the server speaks protocol version {version} only"
        elif not is_local(peer):
            self.off = f"the server {peer} is not on this host"
        else:
            self.pool, self._owner = RegionPool(), owner
        return self.pool

    def refused(self, prepared: Prepared, error: TwinferError) -> None:
        """The server refused to register ``prepared``'s new object: drop it;
        anything but ``REGION_LIMIT`` (which concerns this request only)
        turns shm off."""
        if self.pool is not None:
            self.pool.discard(prepared)
        if error.code != ErrorCode.REGION_LIMIT:
            self.off = str(error)
            self.close()

    def close(self) -> None:
        """Unlink the pool's objects (the server unregisters a connection's
        regions itself when it closes)."""
        if self.pool is not None:
            self.pool.close()
        self.pool, self._owner = None, None
