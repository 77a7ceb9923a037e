"""The HTTP front end in-process: routing, limits, error statuses, sharing the dispatcher.

Conformance with a real third-party client (tritonclient.http) is in
``test_http_tritonclient.py``; the OpenAPI document in ``test_http_openapi.py``.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread

from http_support import (
    IMAGE_CONFIG,
    TINY_HTTP_CONFIG,
    Gate,
    HTTPServerTestCase,
    gated,
    write_image_models,
)
from tasks_support import blank_png
from twinfer.client import connect
from twinfer.engines.builtin import tiny_reference
from twinfer.errors import ErrorCode
from twinfer.frontends.http import STATUS_BY_CODE, status_for
from twinfer.ops.control import job_settled
from waiting import queue_depth_reaches


def infer_body(x: np.ndarray, **extra: object) -> bytes:
    document = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ],
        **extra,
    }
    return json.dumps(document).encode()


def status_line(raw: bytes) -> str:
    return raw.split(b"\r\n", 1)[0].decode()


def raw_body(raw: bytes) -> dict[str, str]:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])  # type: ignore[no-any-return]


def test_every_error_code_has_an_http_status() -> None:
    for code in ErrorCode:
        if code.closes_connection or code in (
            ErrorCode.UNSUPPORTED_MESSAGE,
            ErrorCode.DUPLICATE_REQUEST_ID,
        ):
            continue  # binary-protocol-only codes: never raised by the dispatcher
        assert code in STATUS_BY_CODE, code
    assert status_for(ErrorCode.UNKNOWN_MODEL) == 404
    assert status_for(ErrorCode.INVALID_SHAPE) == 400
    assert status_for(ErrorCode.OVERLOADED) == 429
    assert status_for(ErrorCode.UNAVAILABLE) == 503
    assert status_for(ErrorCode.DEADLINE_EXCEEDED) == 504
    assert status_for(ErrorCode.INFERENCE_FAILED) == 500
    assert status_for(9999) == 500


class RoutingTests(HTTPServerTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await self.start_http()

    async def test_json_infer_answers_like_the_reference(self) -> None:
        x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
        result = await self.request("POST", "/v2/models/tiny/infer", infer_body(x, id="q"))
        assert result.status == 200, result.body
        assert result.header("Content-Type") == "application/json"
        document = result.json()
        assert document["id"] == "q" and document["model_name"] == "tiny"
        outputs = {o["name"]: o for o in document["outputs"]}
        expected = tiny_reference(x)
        np.testing.assert_allclose(
            np.array(outputs["y"]["data"], np.float32).reshape(outputs["y"]["shape"]),
            expected["y"],
            rtol=1e-5,
        )
        assert outputs["label"]["data"] == expected["label"].tolist()

    async def test_http_and_binary_clients_share_one_dispatcher(self) -> None:
        x = np.ones((2, 4), np.float32)
        client = await connect(reactor, f"tcp:127.0.0.1:{self.port}")
        self.addCleanup(client.close)
        before = sum(w.jobs_done for w in self.dispatcher.workers)
        binary = await client.infer("tiny", {"x": x})
        result = await self.request("POST", "/v2/models/tiny/infer", infer_body(x))
        assert sum(w.jobs_done for w in self.dispatcher.workers) == before + 2
        y = {o["name"]: o["data"] for o in result.json()["outputs"]}["y"]
        np.testing.assert_array_equal(np.array(y, np.float32).reshape(2, 3), binary["y"])

    async def test_bad_requests_get_400_with_a_precise_message(self) -> None:
        cases = [
            (b"{not json", "not valid JSON"),
            (infer_body(np.ones((2, 5), np.float32)), "takes shape [?,4], got [2,5]"),
            (
                json.dumps(
                    {
                        "inputs": [
                            {"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}
                        ]
                    }
                ).encode(),
                "input 'x' takes f32, got f64",
            ),
            (
                json.dumps(
                    {
                        "inputs": [
                            {"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                        ]
                    }
                ).encode(),
                "missing ['x'], unexpected ['z']",
            ),
            (
                infer_body(np.ones((1, 4), np.float32), outputs=[{"name": "nope"}]),
                "has no output 'nope'",
            ),
        ]
        for body, needle in cases:
            result = await self.request("POST", "/v2/models/tiny/infer", body)
            assert result.status == 400, (result.status, result.body)
            assert needle in result.json()["error"]

    async def test_unknown_model_and_version_are_404(self) -> None:
        for path in ("/v2/models/nope/infer", "/v2/models/tiny/versions/7/infer"):
            result = await self.request("POST", path, infer_body(np.ones((1, 4), np.float32)))
            assert result.status == 404
            assert "nope" in result.json()["error"] or "no version '7'" in result.json()["error"]
        for path in ("/v2/models/nope", "/v2/models/nope/ready"):
            result = await self.request("GET", path)
            assert result.status == 404 and "not served here" in result.json()["error"]
        ok = await self.request(
            "POST", "/v2/models/tiny/versions/1/infer", infer_body(np.ones((1, 4), np.float32))
        )
        assert ok.status == 200

    async def test_unknown_paths_are_404_and_wrong_methods_405(self) -> None:
        missing = await self.request("GET", "/v3/whatever")
        assert missing.status == 404 and "no such endpoint" in missing.json()["error"]
        wrong = await self.request("GET", "/v2/models/tiny/infer")
        assert wrong.status == 405
        assert wrong.header("Allow") == "POST"
        assert "GET is not allowed" in wrong.json()["error"]

    async def test_health_and_metadata(self) -> None:
        assert (await self.request("GET", "/v2/health/live")).json() == {"live": True}
        assert (await self.request("GET", "/v2/health/ready")).json() == {"ready": True}
        ready = await self.request("GET", "/v2/models/tiny/versions/1/ready")
        assert ready.status == 200 and ready.json() == {"name": "tiny", "ready": True}
        metadata = (await self.request("GET", "/v2/models/tiny")).json()
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert (await self.request("GET", "/v2")).json()["name"] == "twinfer"

    async def test_not_ready_when_the_dispatcher_is_not_running(self) -> None:
        # What Dispatcher.stop() does first; the workers themselves are left
        # for the test's cleanup to stop (a thread pool cannot be stopped twice).
        self.dispatcher.stop_accepting()
        ready = await self.request("GET", "/v2/health/ready")
        assert ready.status == 503 and ready.json() == {"ready": False}
        result = await self.request(
            "POST", "/v2/models/tiny/infer", infer_body(np.ones((1, 4), np.float32))
        )
        assert result.status == 503 and "not running" in result.json()["error"]

    async def test_compressed_bodies_are_415(self) -> None:
        result = await self.request(
            "POST", "/v2/models/tiny/infer", b"\x1f\x8b", {"Content-Encoding": "gzip"}
        )
        assert result.status == 415 and "Content-Encoding 'gzip'" in result.json()["error"]

    async def test_seed_api_greeting_and_services(self) -> None:
        greeting = (await self.request("GET", "/")).json()
        assert greeting["type"] == "greeting"
        paths = [api["path"] for api in greeting["supported APIs"]]
        assert "POST /inference" in paths and "POST /v2/models/{name}/infer" in paths
        services = (await self.request("GET", "/services")).json()
        assert services == [
            {"name": "tiny", "model": "builtin:tiny", "device": "cpu=CPU", "default": True}
        ]

    async def test_seed_inference_checks_model_and_content_type_then_answers_501(self) -> None:
        png = b"\x89PNG\r\n\x1a\n" + bytes(32)
        unknown = await self.request(
            "POST", "/inference?model=nope", png, {"Content-Type": "image/png"}
        )
        assert unknown.status == 404 and "'nope'" in unknown.json()["error"]
        text = await self.request("POST", "/inference", b"hello", {"Content-Type": "text/plain"})
        assert text.status == 415
        assert "image/jpeg or image/png, got 'text/plain'" in text.json()["error"]
        empty = await self.request("POST", "/inference", b"", {"Content-Type": "image/jpeg"})
        assert empty.status == 400 and "empty" in empty.json()["error"]
        missing = await self.request(
            "POST", "/inference", png, {"Content-Type": "image/png; charset=binary"}
        )
        assert missing.status == 501
        assert "no image tasks (twinfer.tasks)" in missing.json()["error"]


class SeedTasksTests(HTTPServerTestCase):
    """``POST /inference`` with an image-task module.  twinfer.tasks is built on
    another branch; this stand-in implements the agreed interface by
    submitting a real tensor through the dispatcher, so the route's wiring
    (model choice, Deferred, JSON answer, /services merge) is what is tested."""

    async def test_predictions_come_from_the_tasks_module_through_the_dispatcher(self) -> None:
        calls = []

        class Tasks:
            @staticmethod
            async def _predict(dispatcher, model, image):  # type: ignore[no-untyped-def]
                x = np.frombuffer(image[:16], np.float32).reshape(1, 4).copy()
                result = await dispatcher.submit(model, {"x": x})
                label = int(result.outputs["label"][0])
                return [
                    {
                        "label_id": label,
                        "label": f"class{label}",
                        "confidences": 0.5,
                        "detection_box": [0, 0, 4, 1],
                    }
                ]

            @staticmethod
            def submit_image(dispatcher, model, image, task):  # type: ignore[no-untyped-def]
                from twisted.internet.defer import Deferred

                calls.append((model, bytes(image)))
                return "classify", Deferred.fromCoroutine(Tasks._predict(dispatcher, model, image))

            @staticmethod
            def task_info(dispatcher, model):  # type: ignore[no-untyped-def]
                assert dispatcher.entry(model)
                return {"task": "classify", "labels": ["a", "b", "c"]}

        await self.start_http(tasks=Tasks)
        x = np.array([[0.0, 0.0, 1.0, 0.0]], np.float32)  # y = [0, 0, 1.5]: label 2
        image = x.tobytes() + b"rest of the image"
        result = await self.request("POST", "/inference", image, {"Content-Type": "image/jpeg"})
        assert result.status == 200, result.body
        assert calls == [("tiny", image)]
        assert result.json() == {
            "status": "ok",
            "model": "tiny",
            "predictions": [
                {
                    "label_id": 2,
                    "label": "class2",
                    "confidences": 0.5,
                    "detection_box": [0, 0, 4, 1],
                }
            ],
        }
        services = (await self.request("GET", "/services")).json()
        assert services[0]["task"] == "classify" and services[0]["labels"] == ["a", "b", "c"]


class LimitTests(HTTPServerTestCase):
    config_text = TINY_HTTP_CONFIG.replace(
        "http_max_body_size = 65536", "http_max_body_size = 4096\nhttp_timeout = 1"
    )

    async def setUp(self) -> None:  # type: ignore[override]
        await self.start_http()

    async def test_oversized_content_length_is_413_before_any_body_is_sent(self) -> None:
        # Only the headers go out: the answer cannot depend on reading the body.
        raw = await self.raw(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
        )
        assert status_line(raw) == "HTTP/1.1 413 Request Entity Too Large"
        assert raw_body(raw) == {
            "error": "the request body (1000000000 bytes) is larger than the limit "
            "(4096 bytes, server.http_max_body_size)"
        }

    async def test_chunked_upload_over_the_limit_is_cut_off_at_the_limit(self) -> None:
        chunk = b"1000\r\n" + b"a" * 4096 + b"\r\n"
        raw = await self.raw(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk + chunk
        )
        assert status_line(raw) == "HTTP/1.1 413 Request Entity Too Large"
        assert "larger than the limit (4096 bytes" in raw_body(raw)["error"]

    async def test_a_body_under_the_limit_is_served_on_a_kept_alive_connection(self) -> None:
        body = infer_body(np.ones((1, 4), np.float32))
        request = (
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        # Two pipelined requests, the second one closing: both answered.
        raw = await self.raw(
            request + request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
        )
        assert len(re.findall(rb"HTTP/1.1 200 OK", raw)) == 2

    async def test_a_stalled_upload_is_answered_408_and_disconnected(self) -> None:
        started = reactor.seconds()
        raw = await self.raw(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs":'
        )
        assert status_line(raw).startswith("HTTP/1.1 408 ")
        assert "did not arrive within 1 seconds" in raw_body(raw)["error"]
        assert 0.9 <= reactor.seconds() - started < 5


GATED_CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"
path = "builtin:tiny"
queue_size = 1
"""


class OverloadTests(HTTPServerTestCase):
    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.gate = Gate()
        await self.start_http(GATED_CONFIG, gated(self.gate))
        self.addCleanup(self.gate.open)  # before the workers are joined (LIFO)

    async def busy(self) -> None:
        """Occupy the one device replica with a request, and wait until it runs."""
        self.first = Deferred.fromCoroutine(
            self.request("POST", "/v2/models/tiny/infer", infer_body(np.ones((1, 4), np.float32)))
        )
        # The device thread releases the semaphore as the job starts.
        assert await deferToThread(self.gate.started.acquire, True, 30)

    async def test_a_full_queue_answers_429_and_the_others_complete(self) -> None:
        await self.busy()
        queued = Deferred.fromCoroutine(
            self.request("POST", "/v2/models/tiny/infer", infer_body(np.ones((1, 4), np.float32)))
        )
        await queue_depth_reaches(self.dispatcher.models["tiny"].queues[0], 1)
        refused = await self.request(
            "POST", "/v2/models/tiny/infer", infer_body(np.ones((1, 4), np.float32))
        )
        assert refused.status == 429
        assert refused.headers.getRawHeaders("Content-Type") == ["application/json"]
        assert refused.header("Retry-After") == "1"
        assert "queue 'tiny' is full" in refused.json()["error"]
        self.gate.open()
        done = await gatherResults([self.first, queued])
        assert [r.status for r in done] == [200, 200]

    async def test_a_passed_timeout_is_504_and_withdraws_the_queued_job(self) -> None:
        await self.busy()
        late = await self.request(
            "POST",
            "/v2/models/tiny/infer",
            infer_body(np.ones((1, 4), np.float32), parameters={"timeout": 100_000}),
        )
        assert late.status == 504
        assert "waited 100 ms for model 'tiny' without reaching a device" in late.json()["error"]
        assert self.dispatcher.models["tiny"].queues[0].depth == 0
        self.gate.open()
        assert (await self.first).status == 200
        assert self.dispatcher.workers[0].jobs_done == 1  # the withdrawn job never ran

    async def test_a_client_that_hangs_up_frees_its_queue_slot(self) -> None:
        await self.busy()
        body = infer_body(np.ones((1, 4), np.float32))
        client = await self.connect_raw()
        client.transport.write(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        queue = self.dispatcher.models["tiny"].queues[0]
        await queue_depth_reaches(queue, 1)
        [job] = queue.waiting()
        withdrawn = job_settled(job)
        client.transport.loseConnection()
        await withdrawn  # the server saw the hang-up and cancelled the job
        assert queue.depth == 0
        self.gate.open()
        assert (await self.first).status == 200


class PriorityTests(HTTPServerTestCase):
    timeout = 30

    async def test_tritons_priority_1_is_the_highest_level(self) -> None:
        gate = Gate()
        config = GATED_CONFIG.replace("queue_size = 1", "queue_size = 4\npriority_levels = 2")
        await self.start_http(config, gated(gate))
        self.addCleanup(gate.open)
        self.first = Deferred.fromCoroutine(
            self.request("POST", "/v2/models/tiny/infer", infer_body(np.ones((1, 4), np.float32)))
        )
        assert await deferToThread(gate.started.acquire, True, 30)  # the first job runs
        finished: list[str] = []
        queue = self.dispatcher.models["tiny"].queues[0]
        pending = []
        for name, priority in (("low", 2), ("high", 1)):
            d = Deferred.fromCoroutine(
                self.request(
                    "POST",
                    "/v2/models/tiny/infer",
                    infer_body(np.ones((1, 4), np.float32), parameters={"priority": priority}),
                )
            )
            d.addCallback(lambda result, name=name: finished.append(name) or result)
            pending.append(d)
            await queue_depth_reaches(queue, len(pending))
        refused = await self.request(
            "POST",
            "/v2/models/tiny/infer",
            infer_body(np.ones((1, 4), np.float32), parameters={"priority": 3}),
        )
        assert refused.status == 400
        assert "priorities 1 (highest) to 2, got 3" in refused.json()["error"]
        gate.open()
        results = await gatherResults([self.first, *pending])
        assert [r.status for r in results] == [200, 200, 200]
        assert finished == ["high", "low"]


class SeedImageTests(HTTPServerTestCase):
    """``POST /inference`` with the real image tasks (twinfer.tasks) and real models."""

    async def setUp(self) -> None:  # type: ignore[override]
        directory = Path(tempfile.mkdtemp(prefix="twinfer-http-images-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        await self.start_http(IMAGE_CONFIG, tasks=True, base_dir=write_image_models(directory))

    async def test_detection_boxes_are_in_the_original_images_pixels(self) -> None:
        # No ?model=: the first model with an image task ("det"), not "tiny".
        result = await self.request(
            "POST", "/inference", blank_png(300, 200), {"Content-Type": "image/png"}
        )
        assert result.status == 200, result.body
        document = result.json()
        assert document["status"] == "ok" and document["model"] == "det"
        [car] = document["predictions"]
        assert (car["label_id"], car["label"]) == (2, "car")
        assert car["confidences"] == pytest.approx(0.95)
        assert car["detection_box"] == [30.0, 40.0, 150.0, 120.0]

    async def test_classification_of_a_jpeg(self) -> None:
        buffer = io.BytesIO()
        Image.new("RGB", (20, 10), (0, 51, 255)).save(buffer, "JPEG", quality=100)
        result = await self.request(
            "POST", "/inference?model=colours", buffer.getvalue(), {"Content-Type": "image/jpeg"}
        )
        assert result.status == 200, result.body
        predictions = result.json()["predictions"]
        assert [p["label"] for p in predictions] == ["blue", "green", "red"]
        assert predictions[0]["detection_box"] == [0.0, 0.0, 20.0, 10.0]

    async def test_image_errors(self) -> None:
        not_an_image = await self.request(
            "POST", "/inference?model=det", b"\x89PNG but not really", {"Content-Type": "image/png"}
        )
        assert not_an_image.status == 400, not_an_image.body
        tensor_model = await self.request(
            "POST", "/inference?model=tiny", blank_png(8, 8), {"Content-Type": "image/png"}
        )
        assert tensor_model.status == 400
        assert "'tiny' is not an image model" in tensor_model.json()["error"]

    async def test_services_list_tasks_and_labels(self) -> None:
        services = {s["name"]: s for s in (await self.request("GET", "/services")).json()}
        assert services["det"]["task"] == "detect" and services["det"]["default"] is True
        assert services["det"]["labels"] == ["background", "person", "car"]
        assert services["colours"]["task"] == "classify"
        assert "task" not in services["tiny"]


def test_the_body_buffer_behaves_as_the_file_twisted_web_expects() -> None:
    from twinfer.frontends.http.site import _Body

    body = _Body()
    body.write(b"hello ")
    body.write(b"world")
    assert body.tell() == 11  # twisted.web reads the body's length from tell()
    body.seek(0)
    assert (body.read(5), body.read(), body.read()) == (b"hello", b" world", b"")
    data = body.data
    view = np.frombuffer(data, np.uint8)
    body.close()  # must not invalidate arrays still viewing the bytes
    assert bytes(view) == b"hello world"
