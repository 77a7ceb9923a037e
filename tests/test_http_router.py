"""The HTTP front end in memory: routing, error mapping, body limits, sessions, KServe v2.

A real site and channel over a StringTransport, a Clock for the timeouts and a
hand-operated worker (see http_memory.py): every path is exact and nothing
waits.  The same front end over loopback sockets is in test_http.py.
"""

from __future__ import annotations

import json

import numpy as np
from twisted.internet.defer import Deferred
from twisted.web.server import Request

from http_memory import MemoryHTTPTestCase, request_bytes
from twinfer.engines.builtin import tiny_reference
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.http.site import HTTPError, Response
from twinfer.outcomes import outcome
from twinfer.scheduling import InferResult

X = np.arange(8, dtype=np.float32).reshape(2, 4)


def infer_body(x: np.ndarray) -> bytes:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


class RouterTests(MemoryHTTPTestCase):
    """Routing and the mapping of a handler's result or failure to a response."""

    def setUp(self) -> None:
        super().setUp()
        #: What the slow handler waits for, and whether it was cancelled.
        self.slow_cancelled: list[Deferred[None]] = []
        self.slow: Deferred[None] = Deferred(self.slow_cancelled.append)
        self.router.route("GET", "/things/{id}", self.get_thing)
        self.router.route("PUT", "/things/{id}", self.get_thing)
        self.router.route("GET", "/things/{id}/parts/{part}", self.get_part)
        self.router.route("GET", "/fail/{code}", self.fail_with)
        self.router.route("GET", "/teapot", self.teapot)
        self.router.route("GET", "/bug", self.bug)
        self.router.route("GET", "/slow", self.wait_for_slow)

    async def get_thing(self, request: Request, ident: str) -> Response:
        return Response.json({"id": ident, "method": request.method.decode()})

    async def get_part(self, request: Request, ident: str, part: str) -> Response:
        return Response.json({"id": ident, "part": part})

    async def fail_with(self, request: Request, code: str) -> Response:
        raise TwinferError(ErrorCode[code], f"failed with {code}")

    async def teapot(self, request: Request) -> Response:
        raise HTTPError(418, "short and stout", {"X-Handle": "yes"})

    async def bug(self, request: Request) -> Response:
        return Response.json({"ratio": 1 / 0})

    async def wait_for_slow(self, request: Request) -> Response:
        await self.slow
        return Response.json({"slow": "done"})

    def get(self, path: str, method: str = "GET") -> bytes:
        return request_bytes(method, path)

    def test_path_variables_are_the_handlers_arguments(self) -> None:
        connection = self.connect()
        connection.send(self.get("/things/42") + self.get("/things/a%20b/parts/wheel"))
        first, second = connection.responses()
        assert (first.status, first.json()) == (200, {"id": "42", "method": "GET"})
        assert first.headers["content-type"] == "application/json"
        assert int(first.headers["content-length"]) == len(first.body)
        # Segments come percent-decoded (twisted.web decodes the path).
        assert second.json() == {"id": "a b", "part": "wheel"}
        assert not connection.closed_by_server  # both on one kept-alive connection

    def test_an_unknown_path_is_404(self) -> None:
        connection = self.connect()
        for path in ("/nothing", "/things", "/things/1/parts", "/things/1/parts/2/3"):
            connection.send(self.get(path))
            response = connection.response()
            assert response.status == 404, path
            assert response.json() == {"error": f"no such endpoint: {path}"}

    def test_a_wrong_method_is_405_with_the_allowed_ones(self) -> None:
        connection = self.connect()
        connection.send(self.get("/things/7", "POST"))
        response = connection.response()
        assert (response.status, response.reason) == (405, "Method Not Allowed")
        assert response.headers["allow"] == "GET, PUT"
        assert response.json() == {"error": "POST is not allowed on /things/7 (allowed: GET, PUT)"}
        connection.send(self.get("/things/7", "PUT"))
        assert connection.response().json() == {"id": "7", "method": "PUT"}

    def test_head_on_a_get_route_has_the_headers_and_no_body(self) -> None:
        connection = self.connect()
        connection.send(self.get("/things/7/parts/x"))
        length = connection.response().headers["content-length"]
        connection.send(self.get("/things/7/parts/x", "HEAD"))
        response = connection.response(head=True)
        assert response.status == 200 and response.body == b""
        assert response.headers["content-length"] == length
        assert connection.transport.value() == b""  # nothing after the headers either

    def test_every_error_code_gets_its_status_and_retry_after_when_temporary(self) -> None:
        connection = self.connect()
        for code in ErrorCode:
            connection.send(self.get(f"/fail/{code.name}"))
            response = connection.response()
            result = outcome(code)
            assert response.status == result.http_status, code
            assert response.json() == {"error": f"failed with {code.name}"}
            assert ("retry-after" in response.headers) is result.retryable, code
            if result.retryable:
                assert response.headers["retry-after"] == "1"
        # Statuses twisted.web has no reason phrase for get ours.
        connection.send(self.get("/fail/OVERLOADED") + self.get("/fail/CANCELLED"))
        reasons = [(r.status, r.reason) for r in connection.responses()]
        assert reasons == [(429, "Too Many Requests"), (499, "Client Closed Request")]

    def test_an_http_error_keeps_its_status_and_headers(self) -> None:
        connection = self.connect()
        connection.send(self.get("/teapot"))
        response = connection.response()
        assert (response.status, response.reason) == (418, "I'm a teapot")
        assert response.headers["x-handle"] == "yes"
        assert response.json() == {"error": "short and stout"}

    def test_an_unexpected_exception_is_500_and_logged(self) -> None:
        connection = self.connect()
        connection.send(self.get("/bug"))
        response = connection.response()
        assert response.status == 500
        assert response.json() == {"error": "internal error: division by zero"}
        assert len(self.flushLoggedErrors(ZeroDivisionError)) == 1
        connection.send(self.get("/things/1"))  # the connection still serves
        assert connection.response().status == 200

    def test_a_client_that_hangs_up_cancels_its_handler(self) -> None:
        connection = self.connect()
        connection.send(self.get("/slow"))
        assert connection.transport.value() == b""  # the handler is waiting
        assert self.slow_cancelled == []
        connection.hang_up()
        assert self.slow_cancelled == [self.slow]
        assert connection.transport.value() == b""  # nobody to answer

    def test_a_slow_handler_answers_when_its_work_is_done(self) -> None:
        connection = self.connect()
        connection.send(self.get("/slow"))
        assert connection.transport.value() == b""
        self.slow.callback(None)
        assert connection.response().json() == {"slow": "done"}


class BodyLimitTests(MemoryHTTPTestCase):
    """``max_body_size`` is 1024 bytes and ``body_timeout`` 5 seconds (on the Clock)."""

    head = b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: test\r\n"

    def test_a_content_length_over_the_limit_is_413_before_any_body_byte(self) -> None:
        connection = self.connect()
        connection.send(self.head + b"Content-Length: 1025\r\n\r\n")  # the headers only
        response = connection.response()
        assert (response.status, response.reason) == (413, "Request Entity Too Large")
        assert response.json() == {
            "error": "the request body (1025 bytes) is larger than the limit "
            "(1024 bytes, server.http_max_body_size)"
        }
        assert response.headers["connection"] == "close"
        assert connection.closed_by_server
        connection.send(b"x" * 1025)  # what still arrives is dropped, not answered
        assert connection.transport.value() == b""
        connection.closed()
        assert self.queue.depth == 0 and self.counts() == {}

    def test_a_chunked_upload_is_cut_off_when_it_passes_the_limit(self) -> None:
        connection = self.connect()
        connection.send(self.head + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"200\r\n" + b"a" * 0x200 + b"\r\n"
        connection.send(chunk + chunk)  # exactly the limit: still fine
        assert connection.transport.value() == b""
        connection.send(b"1\r\na\r\n")
        response = connection.response()
        assert response.status == 413 and connection.closed_by_server
        assert response.json() == {
            "error": "the request body is larger than the limit "
            "(1024 bytes, server.http_max_body_size)"
        }

    def test_a_stalled_body_is_408_after_the_body_timeout(self) -> None:
        connection = self.connect()
        connection.send(self.head + b"Content-Length: 100\r\n\r\n" + b'{"inputs":')
        self.clock.advance(self.body_timeout - 0.5)
        assert connection.transport.value() == b"" and not connection.closed_by_server
        self.clock.advance(0.5)
        response = connection.response()
        assert (response.status, response.reason) == (408, "Request Time-out")
        assert response.json() == {
            "error": "the request body did not arrive within 5.0 seconds (server.http_timeout)"
        }
        assert connection.closed_by_server
        connection.closed()
        assert self.clock.getDelayedCalls() == []  # no timer left behind

    def test_a_body_that_arrives_in_time_is_served(self) -> None:
        connection = self.connect()
        body = infer_body(X)
        connection.send(self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        self.clock.advance(self.body_timeout - 0.5)
        connection.send(body[10:])
        self.clock.advance(1)  # past the first deadline: the body is in, no 408
        assert connection.transport.value() == b"" and self.queue.depth == 1
        self.take_job().deferred.callback(InferResult(tiny_reference(X), 0, 0))
        assert connection.response().status == 200


class SessionTests(MemoryHTTPTestCase):
    """Each HTTP connection is one data-plane session."""

    def test_each_connection_opens_one_session_and_closing_it_closes_it(self) -> None:
        http = self.plane.frontends["http"]  # registered by the site, before any client
        assert http.sessions == set()
        first, second = self.connect(), self.connect()
        assert http.sessions == {first.session, second.session}
        request = request_bytes("POST", "/v2/models/tiny/infer", infer_body(X))
        session = first.session
        first.send(request)
        self.take_job().deferred.callback(InferResult(tiny_reference(X), 0, 0))
        assert first.response().status == 200
        first.send(request)  # the same kept-alive connection: the same session
        assert http.sessions == {session, second.session}
        assert session.requests == 2 and http.inflight == 1 and self.queue.depth == 1
        first.hang_up()
        assert session.closed and http.sessions == {second.session}
        assert http.inflight == 0 and self.queue.depth == 0
        second.hang_up()
        assert http.sessions == set() and list(self.plane.sessions()) == []


class KServeInferTests(MemoryHTTPTestCase):
    """``POST /v2/models/{name}/infer`` through the data plane, answered by hand."""

    def infer(self, body: bytes, model: str = "tiny", **headers: str) -> bytes:
        return request_bytes("POST", f"/v2/models/{model}/infer", body, headers)

    def test_an_answered_request_is_200_and_counted(self) -> None:
        connection = self.connect()
        connection.send(self.infer(infer_body(X)))
        job = self.take_job()
        np.testing.assert_array_equal(job.inputs["x"], X)
        assert connection.session.inflight  # queued for this connection
        job.deferred.callback(InferResult(tiny_reference(X), 3, 4, 1))
        response = connection.response()
        assert response.status == 200
        document = response.json()
        assert document["model_name"] == "tiny"
        outputs = {o["name"]: o for o in document["outputs"]}
        expected = tiny_reference(X)
        assert outputs["y"]["shape"] == [2, 3]
        np.testing.assert_allclose(outputs["y"]["data"], expected["y"].ravel(), rtol=1e-6)
        assert outputs["label"]["data"] == expected["label"].tolist()
        assert self.counts() == {("tiny", "OK", "http"): 1}
        assert connection.session.inflight == {}

    def test_a_bad_shape_is_400_and_counted_with_its_front_end(self) -> None:
        connection = self.connect()
        connection.send(self.infer(infer_body(np.ones((2, 5), np.float32))))
        response = connection.response()
        assert response.status == 400
        assert "takes shape [?,4], got [2,5]" in response.json()["error"]
        assert self.queue.depth == 0
        assert self.counts() == {("tiny", "INVALID_SHAPE", "http"): 1}

    def test_an_unknown_model_is_404_and_counted_under_no_model(self) -> None:
        connection = self.connect()
        connection.send(self.infer(infer_body(X), model="nope"))
        response = connection.response()
        assert response.status == 404 and "nope" in response.json()["error"]
        assert self.counts() == {("", "UNKNOWN_MODEL", "http"): 1}
        assert "nope" not in self.plane.stats.models

    def test_a_compressed_body_is_415_and_counted(self) -> None:
        connection = self.connect()
        connection.send(self.infer(b"\x1f\x8b", **{"Content-Encoding": "gzip"}))
        response = connection.response()
        assert response.status == 415 and "Content-Encoding 'gzip'" in response.json()["error"]
        assert self.counts() == {("tiny", "INVALID_INPUT", "http"): 1}

    def test_a_full_queue_is_429_with_retry_after(self) -> None:
        queued = [self.connect() for _ in range(self.queue_size)]
        for connection in queued:
            connection.send(self.infer(infer_body(X)))
        assert self.queue.depth == self.queue_size
        refused = self.connect()
        refused.send(self.infer(infer_body(X)))
        response = refused.response()
        assert (response.status, response.headers["retry-after"]) == (429, "1")
        assert "queue 'tiny' is full" in response.json()["error"]
        for connection in queued:
            assert connection.transport.value() == b""
            self.take_job().deferred.callback(InferResult(tiny_reference(X), 0, 0))
            assert "retry-after" not in connection.response().headers
        assert self.counts() == {("tiny", "OK", "http"): 2, ("tiny", "OVERLOADED", "http"): 1}

    def test_a_client_that_hangs_up_while_queued_withdraws_its_job(self) -> None:
        connection = self.connect()
        connection.send(self.infer(infer_body(X)))
        [job] = self.queue.waiting()
        connection.hang_up()
        assert self.queue.depth == 0 and self.queue.take() is None  # no device will run it
        assert job.deferred.called and self.dispatcher.counters.cancelled == 1
        assert self.counts() == {("tiny", "CANCELLED", "http"): 1}
        assert list(self.plane.sessions()) == []
