"""The binary protocol's shared-memory messages (protocol version 2).

Handlers that :class:`~twinfer.frontends.binary.TwinferProtocol` calls for
``REGISTER_REGION``, ``UNREGISTER_REGION``, ``GET_REGION_STATUS`` and for an
``INFER_REQUEST`` with region references.  Regions registered on a connection
belong to its data-plane session: they are unregistered (and unmapped once no
request uses them) when the connection closes.  Without ``--allow-shm``
(``factory.shared_memory`` is None) every one of these messages is answered
``UNSUPPORTED_MESSAGE`` naming the flag.  Every refusal is counted: inference
by the data plane, the others as protocol errors by code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from twisted.logger import Logger

from twinfer import sharedmem_requests
from twinfer.errors import ErrorCode, TwinferError
from twinfer.scheduling import InferResult
from twinfer.sharedmem import DISABLED, RegionTable
from twinfer.wire.messages import (
    GetRegionStatus,
    InferRequest,
    RegionStatus,
    RegionTensor,
    RegisterRegion,
    UnregisterRegion,
)

if TYPE_CHECKING:
    from twinfer.frontends.binary import TwinferProtocol

log = Logger()


def _table(protocol: TwinferProtocol) -> RegionTable:
    """The connection's regions (created at its first shared-memory message);
    raises ``UNSUPPORTED_MESSAGE`` without ``--allow-shm``."""
    shm = protocol.factory.shared_memory
    if shm is None:
        raise TwinferError(ErrorCode.UNSUPPORTED_MESSAGE, DISABLED)
    if protocol.regions is None:
        config = protocol.factory.config
        peer = protocol.transport.getPeer()
        protocol.regions = shm.table(
            config.shm_max_regions, config.shm_max_bytes, f"connection {peer}"
        )
    return protocol.regions


def _refused(protocol: TwinferProtocol, request_id: int, error: TwinferError) -> None:
    protocol.factory.dataplane.protocol_error("binary", error.code)
    protocol._send_error(request_id, error.code, error.message)


def on_register(protocol: TwinferProtocol, request_id: int, message: RegisterRegion) -> None:
    """``REGISTER_REGION``: answered with the region's status."""
    try:
        region = _table(protocol).register(
            message.name, message.key, message.offset, message.byte_size
        )
    except TwinferError as e:
        _refused(protocol, request_id, e)
        return
    log.debug(
        "{peer} registered shm region {region}",
        peer=protocol.transport.getPeer(),
        region=region.info,
    )
    protocol._send(request_id, RegionStatus((region.info,)))


def on_unregister(protocol: TwinferProtocol, request_id: int, message: UnregisterRegion) -> None:
    """``UNREGISTER_REGION``: answered with the regions removed."""
    try:
        table = _table(protocol)
        removed = [table.unregister(message.name)] if message.name else table.unregister_all()
    except TwinferError as e:
        _refused(protocol, request_id, e)
        return
    protocol._send(request_id, RegionStatus(tuple(removed)))


def on_status(protocol: TwinferProtocol, request_id: int, message: GetRegionStatus) -> None:
    """``GET_REGION_STATUS``: the connection's regions, or the one named."""
    try:
        regions = _table(protocol).status(message.name)
    except TwinferError as e:
        _refused(protocol, request_id, e)
        return
    protocol._send(request_id, RegionStatus(tuple(regions)))


def on_infer(protocol: TwinferProtocol, request_id: int, message: InferRequest) -> None:
    """An ``INFER_REQUEST`` with region references: like any other, but its
    region outputs are answered as :class:`RegionTensor` descriptors."""
    assert protocol.session is not None
    factory = protocol.factory
    try:
        table = _table(protocol)
    except TwinferError as e:
        factory.dataplane.refuse(protocol.session, message.model, e)
        protocol._send_error(request_id, e.code, e.message)
        return
    d = sharedmem_requests.infer(
        factory.dataplane,
        protocol.session,
        request_id,
        message.model,
        table,
        message.inputs,
        message.outputs,
        message.output_regions,
        timeout_ms=message.timeout_ms,
        priority=message.priority,
    )
    inline = sum(v.nbytes for v in message.inputs.values() if type(v) is not RegionTensor)
    regions = message.output_regions

    def in_regions(result: InferResult) -> InferResult:
        outputs = sharedmem_requests.region_outputs(result.outputs, regions)
        return attrs.evolve(result, outputs=outputs)

    d.addCallback(in_regions)
    protocol._reply_to_infer(request_id, message.model, d, inline)


def close(protocol: TwinferProtocol) -> None:
    """The connection is gone: unregister its regions."""
    if protocol.regions is not None:
        protocol.regions.close()
