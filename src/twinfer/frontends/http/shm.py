"""Triton's system shared-memory extension over HTTP (``--allow-shm``).

Routes, in Triton's shapes (``tritonclient.http`` calls them):

* ``POST /v2/systemsharedmemory/region/{name}/register`` with
  ``{"key": ..., "offset": ..., "byte_size": ...}``;
* ``POST /v2/systemsharedmemory/region/{name}/unregister`` and
  ``POST /v2/systemsharedmemory/unregister`` (every region);
* ``GET /v2/systemsharedmemory/region/{name}/status`` and
  ``GET /v2/systemsharedmemory/status``: a list of
  ``{"name", "key", "offset", "byte_size"}``.

Regions registered over HTTP are server-wide (Triton's semantics: any HTTP
or gRPC client may name them), in the one
:class:`~twinfer.sharedmem.RegionTable` the gRPC front end shares, with its
own limits (``server.http_shm_max_regions`` / ``http_shm_max_bytes``).
Without ``--allow-shm`` every route answers 501 naming the flag.  Every
refusal is counted as a protocol error of the HTTP front end, by code.
"""

from __future__ import annotations

import json
from typing import Any

from twinfer.dataplane import DataPlane
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http.site import FRONTEND, Handler, LimitedRequest, Response, Router
from twinfer.sharedmem import RegionTable, regions_of
from twinfer.wire.messages import RegionInfo


def _status(regions: list[RegionInfo]) -> list[dict[str, Any]]:
    return [
        {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
        for r in regions
    ]


class SharedMemoryAPI:
    """The ``/v2/systemsharedmemory`` routes over the server-wide regions
    (``None``: shared memory is off); ``plane`` counts the refusals."""

    def __init__(self, table: RegionTable | None, plane: DataPlane) -> None:
        self.table = table
        self._plane = plane

    def install(self, router: Router) -> None:
        """Add the routes to ``router``."""
        base = "/v2/systemsharedmemory"
        router.route("POST", base + "/region/{name}/register", self._counted(self.register))
        router.route("POST", base + "/region/{name}/unregister", self._counted(self.unregister))
        router.route("POST", base + "/unregister", self._counted(self.unregister))
        router.route("GET", base + "/region/{name}/status", self._counted(self.status))
        router.route("GET", base + "/status", self._counted(self.status))

    def _counted(self, handler: Handler) -> Handler:
        async def counted(request: LimitedRequest, *args: str) -> Response:
            try:
                return await handler(request, *args)
            except TwinferError as e:
                self._plane.protocol_error(FRONTEND, e.code)
                raise

        return counted

    async def register(self, request: LimitedRequest, name: str) -> Response:
        """Register the region ``name``; 200 with an empty body."""
        table = regions_of(self.table)
        try:
            body = json.loads(bytes(request.content.data) or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise TwinferError(ErrorCode.INVALID_REGION, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict) or not {"key", "byte_size"} <= body.keys():
            raise TwinferError(
                ErrorCode.INVALID_REGION,
                'expected a JSON object {"key": ..., "offset": ..., "byte_size": ...}',
            )
        table.register(name, body["key"], body.get("offset", 0), body["byte_size"])
        return Response.json({})

    async def unregister(self, request: LimitedRequest, name: str = "") -> Response:
        """Unregister the region ``name`` (none named: every region)."""
        table = regions_of(self.table)
        if name:
            table.unregister(name)
        else:
            table.unregister_all()
        return Response.json({})

    async def status(self, request: LimitedRequest, name: str = "") -> Response:
        """The regions registered, or the one named (404 if it is not)."""
        return Response.json(_status(regions_of(self.table).status(name)))
