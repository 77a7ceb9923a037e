"""twinfer's gRPC front end: the KServe v2 / Triton ``inference.GRPCInferenceService``.

``twistd twinfer --grpc-port ENDPOINT`` runs a
:class:`~twinfer.frontends.grpc.service.GRPCService`: a
``grpc.aio`` server on an asyncio loop of its own, in one dedicated thread
(``twinfer-grpc``).  gRPC's Python server cannot run on Twisted's reactor,
and its threaded server parks a thread per call; on the asyncio loop a call
is a coroutine, and the hop to the reactor (where the data plane lives) is a
``callFromThread`` each way (:mod:`twinfer.frontends.grpc.adapter`), so
nothing blocks per request.  See docs/architecture.md, "gRPC".

Modules: :mod:`~twinfer.frontends.grpc.service` (the service, its thread
and ``--grpc-port`` endpoints), :mod:`~twinfer.frontends.grpc.servicer` (the handlers, loop
thread), :mod:`~twinfer.frontends.grpc.adapter` (the data-plane calls,
reactor thread), :mod:`~twinfer.frontends.grpc.codec` (messages <-> tensors,
sans-I/O); ``grpc_service.proto`` and its generated, committed modules
(:mod:`~twinfer.frontends.grpc.generate` regenerates them).  This package
module imports none of them, so that the generator runs even when the
generated modules do not import.
"""
