"""Triton's HTTP extensions in memory: repository index, load/unload,
statistics and model configuration (:mod:`twinfer.frontends.http.extensions`).

A real site over a StringTransport, a Clock and a hand-operated worker (see
http_memory.py); load and unload go through a stand-in controller whose
operations the tests finish by hand.  With a real controller and
``tritonclient.http``: test_http_tritonclient.py.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import numpy as np
from twisted.internet.defer import Deferred

from http_memory import MemoryHTTPTestCase, request_bytes
from twinfer.config import ModelConfig
from twinfer.engines.builtin import tiny_reference
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http.extensions import TritonExtensionsAPI
from twinfer.frontends.http.site import Router
from twinfer.ops.repository import ModelRepository
from twinfer.scheduling import InferResult

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def infer_body(x: np.ndarray) -> bytes:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


@attrs.define
class _Device:
    name: str
    target: str


@attrs.define
class _Config:
    devices: tuple[_Device, ...] = (_Device("cpu", "CPU"),)


class StandInController:
    """What ModelRepository uses of a Controller; each operation is a
    Deferred the test fires, and the calls are recorded."""

    def __init__(self) -> None:
        self.config = _Config()
        self.models = {"tiny": ModelConfig("tiny", "builtin:tiny")}
        self.unloaded: dict[str, ModelConfig] = {"old": ModelConfig("old", "old.xml")}
        self.busy_with = ""
        self.calls: list[tuple[str, str, Deferred[str]]] = []

    def _call(self, op: str, name: str) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.calls.append((op, name, d))
        return d

    def reload(self, name: str) -> Deferred[str]:
        return self._call("reload", name)

    def restore(self, name: str) -> Deferred[str]:
        return self._call("restore", name)

    def unload(self, name: str) -> Deferred[str]:
        return self._call("unload", name)


class ExtensionsTests(MemoryHTTPTestCase):
    """Without a controller: the read-only extensions, and 403 for load/unload."""

    def exchange(self, method: str, path: str, body: bytes | None = None) -> Any:
        connection = self.connect()
        connection.send(request_bytes(method, path, body))
        return connection.response()

    def test_repository_index(self) -> None:
        response = self.exchange("POST", "/v2/repository/index")
        assert response.status == 200
        assert response.json() == [{"name": "tiny", "version": "1", "state": "READY", "reason": ""}]
        ready = self.exchange("POST", "/v2/repository/index", b'{"ready": true}')
        assert ready.json() == response.json()

    def test_statistics_after_an_inference(self) -> None:
        connection = self.connect()
        connection.send(request_bytes("POST", "/v2/models/tiny/infer", infer_body(X)))
        job = self.take_job()
        outputs = tiny_reference(X)
        job.deferred.callback(InferResult(outputs, 1500, 2500, 2, "tiny", "cpu", 1))
        assert connection.response().status == 200

        response = self.exchange("GET", "/v2/models/tiny/stats")
        assert response.status == 200
        [stats] = response.json()["model_stats"]
        assert (stats["name"], stats["version"]) == ("tiny", "1")
        assert (stats["inference_count"], stats["execution_count"]) == (1, 1)
        assert stats["last_inference"] > 0
        inference = stats["inference_stats"]
        assert inference["success"]["count"] == 1
        assert inference["fail"] == {"count": 0, "ns": 0}
        assert inference["queue"] == {"count": 1, "ns": 1_500_000}
        assert inference["compute_infer"] == {"count": 1, "ns": 2_500_000}
        assert inference["compute_input"] == {"count": 1, "ns": 0}
        assert inference["cache_hit"] == inference["cache_miss"] == {"count": 0, "ns": 0}
        assert stats["batch_stats"] == [
            {
                "batch_size": 2,
                "compute_input": {"count": 1, "ns": 0},
                "compute_infer": {"count": 1, "ns": 2_500_000},
                "compute_output": {"count": 1, "ns": 0},
            }
        ]
        every = self.exchange("GET", "/v2/models/stats").json()
        assert every == {"model_stats": [stats]}
        versioned = self.exchange("GET", "/v2/models/tiny/versions/1/stats").json()
        assert versioned == every

    def test_model_config(self) -> None:
        response = self.exchange("GET", "/v2/models/tiny/config")
        assert response.status == 200
        assert response.json() == {
            "name": "tiny",
            "platform": "openvino",
            "backend": "openvino",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": 0,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
            "output": [
                {"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 3]},
                {"name": "label", "data_type": "TYPE_INT64", "dims": [-1]},
            ],
            "instance_group": [{"name": "tiny_cpu", "kind": "KIND_CPU", "count": 1, "gpus": []}],
        }
        assert self.exchange("GET", "/v2/models/tiny/versions/1/config").json() == response.json()

    def test_unknown_models_and_versions_are_404_naming_them(self) -> None:
        for path in (
            "/v2/models/nope/stats",
            "/v2/models/nope/config",
            "/v2/models/tiny/versions/2/stats",
            "/v2/models/tiny/versions/2/config",
        ):
            response = self.exchange("GET", path)
            assert response.status == 404, path
            name = "'nope'" if "nope" in path else "no version '2'"
            assert name in response.json()["error"], (path, response.json())

    def test_load_and_unload_without_admin_are_403_naming_the_flag(self) -> None:
        for op in ("load", "unload"):
            response = self.exchange("POST", f"/v2/repository/models/tiny/{op}", b"{}")
            assert response.status == 403
            assert response.json() == {
                "error": f"{op}ing models is disabled on this server (start it with --allow-admin)"
            }
        assert self.repository.index()[0].state == "READY"

    def test_bad_bodies_are_400(self) -> None:
        cases = [
            ("/v2/repository/index", b"{nope", "the body is not JSON"),
            ("/v2/repository/index", b"[1]", "must be a JSON object"),
            ("/v2/repository/index", b'{"ready": "yes"}', "ready: expected true or false"),
            ("/v2/repository/models/tiny/load", b'{"parameters": 3}', "expected an object"),
        ]
        for path, body, needle in cases:
            response = self.exchange("POST", path, body)
            assert response.status == 400, (path, body)
            assert needle in response.json()["error"]

    def test_wrong_method_is_405(self) -> None:
        response = self.exchange("GET", "/v2/repository/index")
        assert response.status == 405
        assert response.headers["allow"] == "POST"

    def test_model_metadata_still_answers(self) -> None:
        # The extensions' routes come first; metadata still has its own.
        assert self.exchange("GET", "/v2/models/tiny").json()["name"] == "tiny"


class AdminExtensionsTests(MemoryHTTPTestCase):
    """With a (stand-in) controller and --allow-admin."""

    def setUp(self) -> None:
        super().setUp()
        self.controller = StandInController()
        repository = ModelRepository(
            self.plane,
            controller=self.controller,  # type: ignore[arg-type]
            allow_admin=True,
        )
        self.router = Router()
        TritonExtensionsAPI(repository).install(self.router)
        self.site.resource = self.router

    def test_load_answers_once_the_model_serves(self) -> None:
        connection = self.connect()
        connection.send(request_bytes("POST", "/v2/repository/models/tiny/load", b"{}"))
        [(op, name, d)] = self.controller.calls
        assert (op, name) == ("reload", "tiny")  # served: compiled again
        assert connection.responses() == []  # not before it is done
        d.callback("reloaded tiny")
        response = connection.response()
        assert (response.status, response.body) == (200, b"")

    def test_load_of_an_unloaded_model_restores_it(self) -> None:
        connection = self.connect()
        connection.send(request_bytes("POST", "/v2/repository/models/old/load"))
        [(op, name, d)] = self.controller.calls
        assert (op, name) == ("restore", "old")
        d.callback("loaded old")
        assert connection.response().status == 200

    def test_index_shows_unloaded_and_loading_models(self) -> None:
        self.controller.busy_with = "load old"
        connection = self.connect()
        connection.send(request_bytes("POST", "/v2/repository/index"))
        assert connection.response().json() == [
            {"name": "old", "version": "1", "state": "LOADING", "reason": "being loaded"},
            {"name": "tiny", "version": "1", "state": "READY", "reason": ""},
        ]

    def test_failures_of_load_and_unload(self) -> None:
        connection = self.connect()
        connection.send(request_bytes("POST", "/v2/repository/models/nope/load"))
        response = connection.response()
        assert response.status == 404
        assert response.json()["error"] == (
            "model 'nope' is not in the repository (models: old, tiny)"
        )
        connection.send(request_bytes("POST", "/v2/repository/models/nope/unload"))
        assert connection.response().status == 404
        connection.send(request_bytes("POST", "/v2/repository/models/tiny/unload"))
        [(op, _, d)] = self.controller.calls
        assert op == "unload"
        d.errback(TwinferError(ErrorCode.INVALID_INPUT, "no such model file: /x.xml"))
        response = connection.response()
        assert (response.status, response.json()) == (400, {"error": "no such model file: /x.xml"})
        body = json.dumps({"parameters": {"config": "{}", "file:1/model.xml": "AAAA"}}).encode()
        connection.send(request_bytes("POST", "/v2/repository/models/tiny/load", body))
        response = connection.response()
        assert response.status == 400
        assert "['config', 'file:1/model.xml']" in response.json()["error"]
        assert len(self.controller.calls) == 1  # refused before the controller
