"""The ``inference.GRPCInferenceService`` handlers, on the gRPC front end's asyncio loop.

Each handler decodes its message on the loop's thread (numpy views of the
raw bytes, no reactor time spent on protobuf), crosses to the reactor
through the :class:`~twinfer.frontends.grpc.adapter.ReactorBridge` for every
data-plane or dispatcher call, awaits the answer as an asyncio future and
encodes the reply back on the loop.  Errors leave as gRPC status codes
from :mod:`twinfer.outcomes` (the data plane's one table); a retryable
refusal (``OVERLOADED``, ``UNAVAILABLE``) carries the trailing metadata
``retry-after: 1`` (seconds, as HTTP's ``Retry-After`` header).

Triton's extensions (model configuration, statistics, the repository,
system shared memory) are thin translators: the adapter asks the server's
:class:`~twinfer.ops.repository.ModelRepository` or its server-wide
shared-memory regions, :mod:`twinfer.frontends.grpc.extensions` builds the
reply.  Load and unload without ``--allow-admin`` answer
``PERMISSION_DENIED``, the shared-memory RPCs without ``--allow-shm``
``UNIMPLEMENTED``, each with a message naming the flag.  CUDA shared memory,
tracing and log settings answer ``UNIMPLEMENTED`` (the generated base class).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Hashable
from typing import Any, NoReturn

import grpc

from twinfer.errors import TwinferError
from twinfer.frontends.grpc import codec, extensions
from twinfer.frontends.grpc import grpc_service_pb2 as pb
from twinfer.frontends.grpc import grpc_service_pb2_grpc as pb_grpc
from twinfer.frontends.grpc.adapter import GRPCAdapter, ReactorBridge
from twinfer.ops.repository import AdminDisabled, check_load_parameters
from twinfer.outcomes import PERMISSION_DENIED, outcome

__all__ = ["InferenceServicer", "status_of"]

#: The trailing metadata a retryable refusal carries: seconds to wait.
RETRY_AFTER = (("retry-after", "1"),)


def status_of(error: TwinferError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The gRPC status code for ``error`` and the trailing metadata to send with it."""
    result = PERMISSION_DENIED if isinstance(error, AdminDisabled) else outcome(error.code)
    return grpc.StatusCode[result.grpc_status], RETRY_AFTER if result.retryable else ()


async def _abort(context: grpc.aio.ServicerContext, error: TwinferError) -> NoReturn:
    code, trailers = status_of(error)
    await context.abort(code, error.message, trailing_metadata=trailers)
    raise AssertionError("context.abort returned")  # it raises; this tells mypy


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The service's handlers over one :class:`GRPCAdapter`, reached through ``bridge``."""

    def __init__(self, adapter: GRPCAdapter, bridge: ReactorBridge) -> None:
        self._adapter = adapter
        self._bridge = bridge
        #: Data-plane request keys, unique over the front end.
        self._keys = itertools.count(1)
        self._streams = itertools.count(1)

    # -- health and metadata ---------------------------------------------------------

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        ready = await self._bridge.call(self._adapter.server_ready)
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            ready = await self._bridge.call(
                self._adapter.model_ready, request.name, request.version
            )
        except TwinferError as e:
            await _abort(context, e)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return codec.server_metadata()

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            metadata = await self._bridge.call(
                self._adapter.metadata, request.name, request.version
            )
        except TwinferError as e:
            await _abort(context, e)
        return codec.model_metadata(metadata)

    # -- inference -----------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await self._infer(context.peer(), request, context.time_remaining())
        except TwinferError as e:
            await _abort(context, e)

    async def _infer(self, owner: Hashable, request: Any, remaining: float | None) -> Any:
        """One request on ``owner``'s session: its response, or TwinferError."""
        model = request.model_name
        try:
            decoded = codec.decode_infer_request(request)
        except TwinferError as e:
            self._bridge.send(self._adapter.refuse, owner, model, e)
            raise
        key = next(self._keys)
        adapter = self._adapter
        pending = self._bridge.call(
            adapter.infer, owner, key, model, request.model_version, decoded, remaining
        )
        try:
            result = await pending
        except asyncio.CancelledError:
            # The client cancelled, or its deadline passed: withdraw the job.
            self._bridge.send(adapter.cancel, owner, key)
            raise
        # Encoded here, on the loop's thread: the reactor never serialises protobuf.
        return codec.encode_infer_response(model, decoded, result.outputs)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Pipelined: every request is submitted as it arrives and answered as it
        completes; a failed request is answered with ``error_message`` and the
        stream goes on.  The stream is one data-plane session."""
        owner = ("stream", next(self._streams))
        replies: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[asyncio.Task[Any]] = set()
        self._bridge.send(self._adapter.acquire, owner)

        async def answer(request: Any) -> None:
            try:
                reply = pb.ModelStreamInferResponse(
                    infer_response=await self._infer(owner, request, None)
                )
            except Exception as e:  # TwinferError, or a bug: that request fails alone
                message = e.message if isinstance(e, TwinferError) else f"internal error: {e!r}"
                reply = pb.ModelStreamInferResponse(
                    error_message=message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, id=request.id
                    ),
                )
            replies.put_nowait(reply)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.ensure_future(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.wait(set(pending))
            finally:
                replies.put_nowait(None)  # every request answered (or reading failed): end

        reader = asyncio.ensure_future(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
            await reader  # re-raises what ended the reading, if anything did
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()  # each withdraws its own job
            self._bridge.send(self._adapter.release, owner)

    # -- Triton's extensions -------------------------------------------------------------

    async def _ask(self, context: grpc.aio.ServicerContext, function: Any, *args: Any) -> Any:
        """``function(*args)`` on the reactor thread; a TwinferError aborts the call."""
        try:
            return await self._bridge.call(function, *args)
        except TwinferError as e:
            await _abort(context, e)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        config = await self._ask(context, self._adapter.config, request.name, request.version)
        return extensions.config_response(config)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        stats = await self._ask(context, self._adapter.statistics, request.name, request.version)
        return extensions.statistics_response(stats)

    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # repository_name: twinfer has one repository, whatever its name.
        models = await self._ask(context, self._adapter.repository_index, request.ready)
        return extensions.index_response(models)

    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            check_load_parameters(request.parameters)
        except TwinferError as e:
            await _abort(context, e)
        await self._ask(context, self._adapter.load, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # parameters such as unload_dependents: nothing depends on a model.
        await self._ask(context, self._adapter.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        regions = await self._ask(context, self._adapter.region_status, request.name)
        return extensions.region_status_response(regions)

    async def SystemSharedMemoryRegister(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        await self._ask(
            context,
            self._adapter.register_region,
            request.name,
            request.key,
            request.offset,
            request.byte_size,
        )
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        await self._ask(context, self._adapter.unregister_region, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # CUDA shared memory, tracing and log settings: the generated base class
    # answers UNIMPLEMENTED ("Method not implemented!") for those.
