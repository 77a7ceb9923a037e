"""Shared-memory regions: tensors that same-host clients pass by reference.

Triton's *system shared-memory* extension is the model: a client creates a
POSIX shared-memory object, registers a *region* of it by name (``key``,
``offset``, ``byte_size``), and then names ``(region, offset, byte_size)`` in
its requests instead of sending the bytes.  Inputs become zero-copy numpy
views of the mapping (writable, so OpenVINO shares them); outputs are written
by the device thread straight into the region.

Front-end neutral: the binary protocol, HTTP and gRPC all use this module.

* :class:`SharedMemory` maps each shm object once, however many regions (of
  however many owners) use it, and unmaps it when the last one is gone.
* :class:`RegionTable` is one owner's regions: a binary connection's (closed
  with it) or the server-wide table of HTTP (Triton's semantics), each with
  its own limits on regions and bytes.
* :class:`Lease` is one request's use of a region.  Unregistering a region
  that requests still use succeeds at once (the name is free again), but the
  mapping stays until the last lease ends: a device thread never reads or
  writes unmapped memory.  The numpy views themselves also keep the mapping
  alive (``mmap`` refuses to close while they exist), so even a view that
  outlives its lease (OpenVINO keeps its last input tensor) stays valid.

Keys name shm objects only: one optional leading ``/`` and no other, at most
255 bytes, opened under ``/dev/shm`` with ``O_NOFOLLOW`` and required to be
regular files; never a path of the client's choosing.

A known limit, as for Triton: a same-host client that *shrinks* (ftruncate)
an shm object it registered makes the server's next access to the lost pages
fault; run untrusted local clients without ``--allow-shm``.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import stat
import threading
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np

from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.messages import DType, RegionInfo, RegionRef

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_REGIONS",
    "DISABLED",
    "Lease",
    "Region",
    "RegionTable",
    "SharedMemory",
    "region_ref",
    "regions_of",
    "shm_file_name",
]

#: Where POSIX shared-memory objects live on Linux.
SHM_DIR = "/dev/shm"
#: Longest key (a file name under /dev/shm: NAME_MAX).
MAX_KEY_LENGTH = 255
#: Longest region name.
MAX_NAME_LENGTH = 255
#: Default limits of one binary connection (``server.shm_max_regions``,
#: ``server.shm_max_bytes``).
DEFAULT_MAX_REGIONS = 16
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: The error of every shared-memory request to a server without ``--allow-shm``
#: (whatever its front end).
DISABLED = "shared memory is disabled on this server (start it with --allow-shm)"


def _invalid(message: str) -> TwinferError:
    return TwinferError(ErrorCode.INVALID_REGION, message)


def shm_file_name(key: object) -> str:
    """The file name under ``/dev/shm`` of the shm object ``key`` (``"/x"`` or
    ``"x"``); raises ``INVALID_REGION`` for anything that is not such a name."""
    if not isinstance(key, str):
        raise _invalid(f"shared-memory key must be a string, got {key!r}")
    name = key[1:] if key.startswith("/") else key
    if (
        not name
        or "/" in name
        or "\0" in name
        or name in (".", "..")
        or len(name.encode("utf-8", "surrogatepass")) > MAX_KEY_LENGTH
    ):
        raise _invalid(
            f"shared-memory key {key!r} is not the name of a POSIX shared-memory object "
            f"(one optional leading '/', no other '/', 1..{MAX_KEY_LENGTH} bytes)"
        )
    return name


class _Mapping:
    """One shm object mapped once; ``refs`` counts the regions and leases on it."""

    def __init__(self, key: str, memory: mmap.mmap) -> None:
        self.key = key
        self.memory = memory
        self.size = len(memory)
        self.array = np.frombuffer(memory, np.uint8)
        self.refs = 0


@attrs.define(eq=False)
class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` of shm object ``key``."""

    name: str
    key: str
    offset: int
    byte_size: int
    mapping: _Mapping
    #: Leases of requests in flight.
    leases: int = 0
    #: Unregistered: no new lease; the mapping goes with the last lease.
    retired: bool = False

    @property
    def info(self) -> RegionInfo:
        """The region as status messages show it."""
        return RegionInfo(self.name, self.key, self.offset, self.byte_size)


class SharedMemory:
    """The server's shm mappings: each object mapped once, refcounted.

    Thread-safe (a lease may end in a device thread).  ``shm_dir`` is
    ``/dev/shm``; tests may point it elsewhere.
    """

    def __init__(self, shm_dir: str = SHM_DIR) -> None:
        self.shm_dir = shm_dir
        self.lock = threading.Lock()
        self._mappings: dict[str, _Mapping] = {}

    @property
    def mapped(self) -> dict[str, int]:
        """Mapped shm objects: key -> size in bytes."""
        with self.lock:
            return {key: m.size for key, m in self._mappings.items()}

    def table(self, max_regions: int, max_bytes: int, owner: str = "") -> RegionTable:
        """A new owner's table of regions, with its limits."""
        return RegionTable(self, max_regions, max_bytes, owner)

    def _acquire(self, key: str) -> _Mapping:
        """(Lock held.) The mapping of ``key``, mapped now if it is not yet."""
        name = shm_file_name(key)
        mapping = self._mappings.get(name)
        if mapping is None:
            mapping = self._mappings[name] = _Mapping(name, self._map(key, name))
        mapping.refs += 1
        return mapping

    def _map(self, key: str, name: str) -> mmap.mmap:
        path = os.path.join(self.shm_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _invalid(f"no shared-memory object {key!r} exists on this host") from None
        except OSError as e:
            raise _invalid(f"cannot open shared-memory object {key!r}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise _invalid(f"shared-memory key {key!r} does not name a shm object")
            if info.st_size == 0:
                raise _invalid(f"shared-memory object {key!r} is empty")
            return mmap.mmap(fd, info.st_size)
        except OSError as e:
            raise _invalid(f"cannot map shared-memory object {key!r}: {e}") from None
        finally:
            os.close(fd)  # the mapping keeps the object alive

    def _release(self, mapping: _Mapping) -> None:
        """(Lock held.) One reference less; unmapped with the last one."""
        mapping.refs -= 1
        if mapping.refs > 0:
            return
        del self._mappings[mapping.key]
        mapping.array = np.empty(0, np.uint8)
        # A view of it may still be alive (OpenVINO keeps its last input
        # tensor): the memory is then unmapped when that view goes.
        with contextlib.suppress(BufferError):
            mapping.memory.close()


class RegionTable:
    """One owner's registered regions, with its limits; see the module docstring.

    ``max_regions`` and ``max_bytes`` bound the regions registered and the
    sum of their byte sizes (``REGION_LIMIT`` beyond).
    """

    def __init__(self, shm: SharedMemory, max_regions: int, max_bytes: int, owner: str) -> None:
        self.shm = shm
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.owner = owner
        self._regions: dict[str, Region] = {}
        #: Refusals by error code name, for the owner's metrics.
        self.errors: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def registered_bytes(self) -> int:
        """The byte sizes of the registered regions, summed."""
        return sum(r.byte_size for r in self._regions.values())

    def _error(self, code: ErrorCode, message: str) -> TwinferError:
        self.errors[code.name] = self.errors.get(code.name, 0) + 1
        return TwinferError(code, message)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Register ``byte_size`` bytes at ``offset`` of shm object ``key`` as ``name``.

        Raises ``INVALID_REGION`` (bad name or key, no such object, the
        range beyond the object, a name already registered) or
        ``REGION_LIMIT``.
        """
        try:
            if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
                raise _invalid(f"region name must be 1..{MAX_NAME_LENGTH} characters")
            shm_file_name(key)
            if not all(type(v) is int and v >= 0 for v in (offset, byte_size)) or not byte_size:
                raise _invalid(
                    f"region {name!r}: offset must be >= 0 and byte_size > 0, "
                    f"got {offset!r} and {byte_size!r}"
                )
            if name in self._regions:
                raise _invalid(f"region {name!r} is already registered; unregister it first")
            if len(self._regions) >= self.max_regions:
                raise TwinferError(
                    ErrorCode.REGION_LIMIT,
                    f"{self.owner} already has {self.max_regions} regions registered (the limit)",
                )
            if self.registered_bytes + byte_size > self.max_bytes:
                raise TwinferError(
                    ErrorCode.REGION_LIMIT,
                    f"region {name!r} of {byte_size} bytes would bring {self.owner}'s regions "
                    f"to {self.registered_bytes + byte_size} bytes (the limit is "
                    f"{self.max_bytes})",
                )
            with self.shm.lock:
                mapping = self.shm._acquire(key)
                if offset + byte_size > mapping.size:
                    self.shm._release(mapping)
                    raise _invalid(
                        f"region {name!r}: offset {offset} + byte_size {byte_size} is beyond "
                        f"the {mapping.size} bytes of shared-memory object {key!r}"
                    )
        except TwinferError as e:
            raise self._error(ErrorCode(e.code), e.message) from None
        region = self._regions[name] = Region(name, key, offset, byte_size, mapping)
        return region

    def unregister(self, name: str) -> RegionInfo:
        """Forget region ``name`` (``UNKNOWN_REGION`` if it is not registered).

        Requests using it finish with their leases; it is unmapped after them.
        """
        region = self._regions.pop(name, None)
        if region is None:
            raise self._error(
                ErrorCode.UNKNOWN_REGION,
                f"no shared-memory region {name!r} is registered ({self._known()})",
            )
        with self.shm.lock:
            region.retired = True
            if region.leases == 0:
                self.shm._release(region.mapping)
        return region.info

    def unregister_all(self) -> list[RegionInfo]:
        """Forget every region (the owner is gone: a connection closed)."""
        return [self.unregister(name) for name in list(self._regions)]

    close = unregister_all

    def status(self, name: str = "") -> list[RegionInfo]:
        """Every region, or only ``name`` (``UNKNOWN_REGION`` if not registered)."""
        if not name:
            return [r.info for r in self._regions.values()]
        region = self._regions.get(name)
        if region is None:
            raise self._error(
                ErrorCode.UNKNOWN_REGION,
                f"no shared-memory region {name!r} is registered ({self._known()})",
            )
        return [region.info]

    def _known(self) -> str:
        names = sorted(self._regions)
        return f"registered: {names}" if names else "none is"

    def lease(self, ref: RegionRef, what: str) -> Lease:
        """A lease on ``ref``'s bytes, bounds-checked against its region.

        ``what`` names the tensor in errors (``"input 'x'"``).  Raises
        ``UNKNOWN_REGION`` or ``INVALID_REGION``.
        """
        region = self._regions.get(ref.region)
        if region is None:
            raise self._error(
                ErrorCode.UNKNOWN_REGION,
                f"{what}: no shared-memory region {ref.region!r} is registered ({self._known()})",
            )
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > region.byte_size:
            raise self._error(
                ErrorCode.INVALID_REGION,
                f"{what}: offset {ref.offset} + byte_size {ref.byte_size} is beyond region "
                f"{ref.region!r} of {region.byte_size} bytes",
            )
        with self.shm.lock:
            region.leases += 1
        start = region.offset + ref.offset
        return Lease(self.shm, region, region.mapping.array[start : start + ref.byte_size])

    def input_array(self, ref: RegionRef, dtype: DType, shape: tuple[int, ...], what: str) -> Lease:
        """A lease whose :attr:`Lease.array` is the input tensor: a writable
        zero-copy view of ``dtype`` and ``shape`` (a copy only if ``offset``
        is not a multiple of the item size)."""
        expected = math.prod(shape) * dtype.numpy.itemsize
        if ref.byte_size != expected:
            raise self._error(
                ErrorCode.INVALID_REGION,
                f"{what}: shape [{','.join(map(str, shape))}] of {dtype.short_name} takes "
                f"{expected} bytes, the region reference gives {ref.byte_size}",
            )
        lease = self.lease(ref, what)
        array = lease.bytes.view(dtype.numpy).reshape(shape)
        if not array.flags.aligned:
            array = array.copy()
        if dtype is DType.BOOL and array.size and array.view(np.uint8).max() > 1:
            lease.release()
            raise self._error(
                ErrorCode.INVALID_REGION, f"{what}: bool tensor holds bytes other than 0 and 1"
            )
        lease.array = array
        return lease


class Lease:
    """One request's use of a region's bytes; :meth:`release` exactly once
    (more calls do nothing), from any thread."""

    def __init__(self, shm: SharedMemory, region: Region, data: np.ndarray) -> None:
        self._shm = shm
        self._region = region
        #: The referenced bytes (uint8, writable view of the mapping).
        self.bytes = data
        #: The tensor, for an input lease (:meth:`RegionTable.input_array`).
        self.array: np.ndarray = data
        self.released = False

    @property
    def region(self) -> str:
        """The region's name."""
        return self._region.name

    def release(self) -> None:
        """End the lease; the last lease of an unregistered region unmaps it."""
        with self._shm.lock:
            if self.released:
                return
            self.released = True
            region = self._region
            region.leases -= 1
            if region.retired and region.leases == 0:
                self._shm._release(region.mapping)


def release_all(leases: list[Lease]) -> Callable[[object], object]:
    """A Deferred callback that releases ``leases`` and passes the result on."""

    def release(result: object) -> object:
        for lease in leases:
            lease.release()
        return result

    return release


def write_into(dest: np.ndarray, data: np.ndarray, name: str) -> np.ndarray:
    """Copy output ``data`` into the region bytes ``dest`` (in the device
    thread); returns the tensor there.  ``INVALID_REGION`` if it does not fit."""
    need = data.nbytes
    if need > dest.nbytes:
        raise TwinferError(
            ErrorCode.INVALID_REGION,
            f"output {name!r} of shape [{','.join(map(str, data.shape))}] takes {need} bytes; "
            f"its region reference gives {dest.nbytes}",
        )
    view = dest[:need].view(data.dtype).reshape(data.shape)
    np.copyto(view, data)
    return view


def regions_of(table: RegionTable | None) -> RegionTable:
    """``table``, or ``UNSUPPORTED_MESSAGE`` naming ``--allow-shm`` for None
    (a server without shared memory)."""
    if table is None:
        raise TwinferError(ErrorCode.UNSUPPORTED_MESSAGE, DISABLED)
    return table


def region_ref(parameters: Mapping[str, Any], where: str) -> RegionRef | None:
    """Triton's ``shared_memory_region``, ``_offset`` (default 0) and
    ``_byte_size`` parameters of one tensor, if it has them.

    ``parameters`` holds plain values (KServe's JSON over HTTP, gRPC's
    ``InferParameter`` values unwrapped), so every front end reads Triton's
    shared-memory parameters with this one function; ``INVALID_REGION`` for
    a value of the wrong kind.
    """
    region = parameters.get("shared_memory_region")
    if region is None:
        return None
    if not isinstance(region, str):
        raise _invalid(
            f"{where}.parameters.shared_memory_region: expected a string, got {region!r}"
        )
    values = []
    for key, default in (("shared_memory_offset", 0), ("shared_memory_byte_size", None)):
        value = parameters.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _invalid(f"{where}.parameters.{key}: expected bytes >= 0, got {value!r}")
        values.append(value)
    return RegionRef(region, values[0], values[1])
