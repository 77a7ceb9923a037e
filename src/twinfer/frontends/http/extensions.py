"""Triton's HTTP extensions: model repository, statistics and configuration.

The routes ``tritonclient.http`` calls for ``get_model_repository_index``,
``load_model``, ``unload_model``, ``get_inference_statistics`` and
``get_model_config``, with the JSON shapes of Triton's HTTP/REST extensions.
What they answer is computed once, for every front end, by
:class:`~twinfer.ops.repository.ModelRepository`; this module only turns its
attrs results into Triton's documents.  Load and unload need
``--allow-admin``: without it they answer 403 naming the flag.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web import http

from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http.site import HTTPError, LimitedRequest, Response, Router
from twinfer.ops.repository import (
    MODEL_VERSION,
    AdminDisabled,
    Duration,
    ModelRepository,
    ModelStatistics,
    TensorConfig,
    TritonModelConfig,
    check_load_parameters,
)
from twinfer.outcomes import PERMISSION_DENIED

__all__ = ["TritonExtensionsAPI", "config_document", "statistics_document"]


def _duration(value: Duration) -> dict[str, int]:
    return {"count": value.count, "ns": value.ns}


def statistics_document(stats: ModelStatistics) -> dict[str, Any]:
    """One entry of ``model_stats`` in Triton's statistics response."""
    none = {"count": 0, "ns": 0}
    return {
        "name": stats.name,
        "version": stats.version,
        "last_inference": stats.last_inference,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success),
            "fail": _duration(stats.fail),
            "queue": _duration(stats.queue),
            "compute_input": _duration(stats.compute_input),
            "compute_infer": _duration(stats.compute_infer),
            "compute_output": _duration(stats.compute_output),
            "cache_hit": none,  # twinfer has no response cache
            "cache_miss": none,
        },
        "batch_stats": [
            {
                "batch_size": batch.batch_size,
                "compute_input": _duration(batch.compute_input),
                "compute_infer": _duration(batch.compute_infer),
                "compute_output": _duration(batch.compute_output),
            }
            for batch in stats.batch_stats
        ],
    }


def _tensor(tensor: TensorConfig) -> dict[str, Any]:
    return {"name": tensor.name, "data_type": tensor.data_type, "dims": list(tensor.dims)}


def config_document(config: TritonModelConfig) -> dict[str, Any]:
    """Triton's model configuration (its protobuf as JSON) for ``config``."""
    document: dict[str, Any] = {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": config.max_batch_size,
        "input": [_tensor(t) for t in config.inputs],
        "output": [_tensor(t) for t in config.outputs],
        "instance_group": [
            {"name": g.name, "kind": g.kind, "count": g.count, "gpus": list(g.gpus)}
            for g in config.instance_groups
        ],
    }
    if config.dynamic_batching is not None:
        document["dynamic_batching"] = dict(config.dynamic_batching)
    return document


def _body(request: LimitedRequest) -> dict[str, Any]:
    """The request's JSON object, ``{}`` for an empty body; 400 otherwise."""
    data = bytes(request.content.data)
    if not data.strip():
        return {}
    try:
        document = json.loads(data)
    except ValueError as e:
        raise TwinferError(ErrorCode.INVALID_INPUT, f"the body is not JSON: {e}") from e
    if not isinstance(document, dict):
        raise TwinferError(ErrorCode.INVALID_INPUT, "the body must be a JSON object")
    return document


def _check_version(name: str, version: str | None) -> None:
    if version is not None and version != MODEL_VERSION:
        raise TwinferError(
            ErrorCode.UNKNOWN_MODEL,
            f"model {name!r} has no version {version!r} (versions: [{MODEL_VERSION!r}])",
        )


async def _admin(d: Any) -> Response:
    """Wait for a load or unload; :class:`AdminDisabled` is 403."""
    try:
        await d
    except AdminDisabled as e:
        raise HTTPError(PERMISSION_DENIED.http_status, e.message) from e
    return Response(http.OK, [], {"Content-Type": "application/json"})


class TritonExtensionsAPI:
    """The repository, statistics and configuration routes over a :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def install(self, router: Router) -> None:
        """Add the routes to ``router`` (before ``/v2/models/{name}``, which
        would otherwise take ``/v2/models/stats``)."""
        router.route("POST", "/v2/repository/index", self.index)
        router.route("POST", "/v2/repository/models/{name}/load", self.load)
        router.route("POST", "/v2/repository/models/{name}/unload", self.unload)
        router.route("GET", "/v2/models/stats", self.statistics)
        router.route("GET", "/v2/models/{name}/stats", self.statistics)
        router.route("GET", "/v2/models/{name}/versions/{version}/stats", self.statistics)
        router.route("GET", "/v2/models/{name}/config", self.config)
        router.route("GET", "/v2/models/{name}/versions/{version}/config", self.config)

    async def index(self, request: LimitedRequest) -> Response:
        """``POST /v2/repository/index``: every known model and its state
        (``{"ready": true}``: only the ready ones)."""
        ready = _body(request).get("ready", False)
        if not isinstance(ready, bool):
            raise TwinferError(ErrorCode.INVALID_INPUT, "ready: expected true or false")
        return Response.json(
            [
                {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason}
                for m in self.repository.index(ready_only=ready)
            ]
        )

    async def load(self, request: LimitedRequest, name: str) -> Response:
        """``POST /v2/repository/models/{name}/load``: load or reload ``name``
        (``--allow-admin``); answers once it serves."""
        parameters = _body(request).get("parameters") or {}
        if not isinstance(parameters, dict):
            raise TwinferError(ErrorCode.INVALID_INPUT, "parameters: expected an object")
        check_load_parameters(parameters)
        return await _admin(self.repository.load(name))

    async def unload(self, request: LimitedRequest, name: str) -> Response:
        """``POST /v2/repository/models/{name}/unload`` (``--allow-admin``);
        answers once its running requests are answered."""
        _body(request)  # parameters such as unload_dependents: nothing depends on a model
        return await _admin(self.repository.unload(name))

    async def statistics(
        self, request: LimitedRequest, name: str = "", version: str | None = None
    ) -> Response:
        """``GET /v2/models[/{name}[/versions/{version}]]/stats``."""
        _check_version(name, version)
        stats = self.repository.statistics(name)
        return Response.json({"model_stats": [statistics_document(s) for s in stats]})

    async def config(
        self, request: LimitedRequest, name: str, version: str | None = None
    ) -> Response:
        """``GET /v2/models/{name}[/versions/{version}]/config``."""
        _check_version(name, version)
        return Response.json(config_document(self.repository.config(name)))
