"""twinfer's HTTP front end: the KServe v2 REST API and the seed's REST API.

Both APIs share one :class:`~twinfer.dataplane.DataPlane` with the binary
protocol (same admission, queues, limits and counting; no second inference
path).
:class:`HTTPFrontEnd` builds the ``twisted.web`` site and owns the small
thread pool that encodes and decodes large JSON tensors off the reactor
thread; ``twistd twinfer --http-port ENDPOINT`` listens with it.

Modules: :mod:`twinfer.frontends.http.site` (limits, routing, error mapping),
:mod:`twinfer.frontends.http.v2` (KServe v2), :mod:`twinfer.frontends.http.extensions`
(Triton's repository, statistics and configuration extensions),
:mod:`twinfer.frontends.http.rest` (the seed API);
the tensor mapping itself is the sans-I/O :mod:`twinfer.frontends.http.kserve`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application import service
from twisted.python.threadpool import ThreadPool

from twinfer.config import Config
from twinfer.dataplane import DataPlane
from twinfer.frontends.http.channel import TwinferSite
from twinfer.frontends.http.extensions import TritonExtensionsAPI
from twinfer.frontends.http.rest import SeedAPI
from twinfer.frontends.http.shm import SharedMemoryAPI
from twinfer.frontends.http.site import STATUS_BY_CODE, Router, status_for
from twinfer.frontends.http.v2 import KServeAPI
from twinfer.ops.repository import ModelRepository
from twinfer.sharedmem import RegionTable

if TYPE_CHECKING:
    from twinfer.ops.control import Controller

__all__ = ["HTTPFrontEnd", "STATUS_BY_CODE", "status_for"]

#: Threads for JSON tensor work; 2 keeps it from crowding the device threads.
CODEC_THREADS = 2


class HTTPFrontEnd(service.Service):
    """The HTTP site over a data plane; as a service, it runs the codec thread pool.

    Start it (``startService``, or as a child of the ``twistd`` service tree)
    before serving :attr:`site`, and stop it after the port is closed.
    ``repository`` answers Triton's repository, statistics and configuration
    extensions (the server's one :class:`ModelRepository`, shared with the
    gRPC front end); without one, a repository of its own is built from
    ``controller`` (:class:`~twinfer.ops.control.Controller`) and
    ``allow_admin`` (``--allow-admin``), which serve load and unload (without
    a controller they answer 403).
    """

    def __init__(
        self,
        dataplane: DataPlane,
        config: Config,
        reactor: Any,
        *,
        controller: Controller | None = None,
        allow_admin: bool = False,
        shared_regions: RegionTable | None = None,
        repository: ModelRepository | None = None,
    ) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=CODEC_THREADS, name="twinfer-http-codec")
        router = Router()
        #: Triton's repository, statistics and configuration extensions.
        self.repository = repository or ModelRepository.for_server(
            dataplane, config, controller=controller, allow_admin=allow_admin
        )
        # First: ``/v2/models/stats`` is not the metadata of a model "stats".
        TritonExtensionsAPI(self.repository).install(router)
        #: The server-wide shared-memory regions (None: no ``--allow-shm``).
        self.shared_regions = shared_regions
        KServeAPI(dataplane, reactor, self.pool, shared_regions).install(router)
        SharedMemoryAPI(shared_regions, dataplane).install(router)
        # The image API needs the data plane's image tasks (none: 501).
        self.seed = SeedAPI(dataplane, config, dataplane.tasks)
        self.seed.install(router)
        #: The ``twisted.web`` site to listen with.
        self.site = TwinferSite(
            router,
            dataplane,
            max_body_size=config.server.http_max_body_size,
            body_timeout=config.server.http_timeout,
            reactor=reactor,
            header_timeout=config.server.http_header_timeout,
            max_connections=config.server.max_connections,
            max_inflight=config.server.max_inflight_per_connection,
        )

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
