"""The HTTP front end's limits in memory: each refusal, its count, and the
clients it leaves alone.

The connection limit, the header (slowloris) and keep-alive timeouts, the
buffer budget shared with the binary front end, and the per-connection
in-flight limit (see docs/operations.md, "Limits"); a real site and channel
over StringTransports with a Clock (see http_memory.py).
"""

from __future__ import annotations

import attrs
import numpy as np
from twisted.internet.task import Clock

from http_memory import Connection, MemoryHTTPTestCase, request_bytes
from support import TINY_CONFIG, config_from
from test_http_router import X, infer_body
from twinfer.budget import BufferBudget
from twinfer.config import ServerConfig
from twinfer.engines.builtin import tiny_reference
from twinfer.frontends.http import HTTPFrontEnd
from twinfer.scheduling import InferResult

CHUNKED = {"Transfer-Encoding": "chunked"}
LIVE = request_bytes("GET", "/v2/health/live")
BODY = infer_body(X)
INFER = request_bytes("POST", "/v2/models/tiny/infer", BODY)


class LimitFixture(MemoryHTTPTestCase):
    def refused(self) -> dict[str, int]:
        return self.plane.frontend("http").refused

    def served(self, connection: Connection) -> bool:
        connection.send(LIVE)
        return connection.response().status == 200

    def answer(self) -> None:
        self.take_job().deferred.callback(InferResult(tiny_reference(X), 0, 0))


class ConnectionLimitTests(LimitFixture):
    def test_connections_beyond_the_limit_get_503_and_are_closed(self) -> None:
        self.site.max_connections = 2
        first, second = self.connect(), self.connect()
        third = self.connect()
        response = third.response()
        assert response.status == 503 and "max_connections" in response.json()["error"]
        assert third.closed_by_server and response.headers["retry-after"] == "1"
        third.send(LIVE)  # nothing more is read from it
        assert third.transport.value() == b""
        third.closed()
        assert self.refused() == {"max_connections": 1}
        assert len(self.plane.frontend("http").sessions) == 2
        assert self.served(first) and self.served(second)
        second.hang_up()
        assert self.served(self.connect())  # a freed place is taken again


class TimeoutTests(LimitFixture):
    def test_headers_not_complete_in_time_get_408_and_the_connection_closes(self) -> None:
        self.site.header_timeout = 4  # (less than the idle timeout, body_timeout)
        slow, other = self.connect(), self.connect()
        slow.send(LIVE[:20])  # a slowloris: the start of a request line...
        self.clock.advance(2)
        slow.send(LIVE[20:30])  # ...a trickle that keeps the idle timer away...
        assert self.served(other)
        self.clock.advance(1.5)
        slow.send(LIVE[30:32])
        assert slow.transport.value() == b""
        self.clock.advance(0.5)  # ...but the headers never end
        response = slow.response()
        assert response.status == 408 and "http_header_timeout" in response.json()["error"]
        assert slow.closed_by_server and not other.closed_by_server
        assert self.refused() == {"http_header_timeout": 1}

    def test_the_header_clock_starts_at_a_requests_first_byte(self) -> None:
        self.site.header_timeout = 3
        connection = self.connect()
        assert self.served(connection)
        self.clock.advance(4)  # idle between requests: the idle timeout's business
        connection.send(LIVE[:10])
        self.clock.advance(2)
        connection.send(LIVE[10:])
        assert connection.response().status == 200
        connection.send(LIVE[:10])
        self.clock.advance(3)
        assert connection.response().status == 408
        assert self.refused() == {"http_header_timeout": 1}

    def test_an_idle_kept_alive_connection_is_closed_and_counted(self) -> None:
        idle, busy = self.connect(), self.connect()
        assert self.served(idle)
        self.clock.advance(self.body_timeout - 1)
        assert self.served(busy)
        self.clock.advance(1)
        assert idle.closed_by_server and idle.transport.value() == b""
        assert not busy.closed_by_server
        assert self.refused() == {"http_timeout": 1}

    def test_a_stalled_body_is_counted_too(self) -> None:
        connection = self.connect()
        connection.send(INFER[:-10])
        self.clock.advance(self.body_timeout)
        assert connection.response().status == 408
        assert self.refused() == {"http_timeout": 1}


class BudgetTests(LimitFixture):
    def setUp(self) -> None:
        super().setUp()
        self.plane.budget = BufferBudget(len(BODY) + len(BODY) // 2, small=0)

    def test_a_body_that_does_not_fit_pauses_its_connection_until_bytes_are_released(
        self,
    ) -> None:
        budget = self.plane.budget
        first, second = self.connect(), self.connect()
        first.send(INFER)
        assert budget.used == len(BODY) and self.queue.depth == 1
        head = INFER[: -len(BODY)]
        second.send(head)  # its headers announce a body that does not fit
        assert second.transport.producerState == "paused"
        assert budget.used == len(BODY) and self.refused() == {"max_buffered_bytes": 1}
        self.clock.advance(self.body_timeout * 3)  # the server keeps it waiting: no 408
        assert not second.closed_by_server
        assert self.served(self.connect())  # small requests go on
        self.answer()
        assert first.response().status == 200
        assert second.transport.producerState == "producing"
        assert budget.used == len(BODY)  # now reserved for the second body
        second.send(INFER[len(head) :])
        self.answer()
        assert second.response().status == 200 and budget.used == 0

    def test_a_body_larger_than_the_whole_budget_is_413(self) -> None:
        self.plane.budget = BufferBudget(len(BODY) - 1, small=0)
        connection, other = self.connect(), self.connect()
        connection.send(INFER)
        response = connection.response()
        assert response.status == 413 and "max_buffered_bytes" in response.json()["error"]
        assert connection.closed_by_server and self.plane.budget.used == 0
        assert self.served(other)

    def test_a_client_that_leaves_gives_its_bytes_back(self) -> None:
        first, second = self.connect(), self.connect()
        first.send(INFER)
        second.send(INFER[: -len(BODY)])
        assert self.plane.budget.waiting == 1
        second.hang_up()
        first.hang_up()
        assert self.plane.budget.used == 0 and self.plane.budget.waiting == 0

    def test_a_chunked_upload_over_the_budget_pauses_reading(self) -> None:
        budget = self.plane.budget
        first, second = self.connect(), self.connect()
        first.send(INFER)
        head = (
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        second.send(head + b"%x\r\n" % len(BODY) + BODY + b"\r\n")
        assert second.transport.producerState == "paused"
        assert budget.used == 2 * len(BODY)  # read before it could be refused
        self.answer()
        assert second.transport.producerState == "producing"
        second.send(b"0\r\n\r\n")
        self.answer()
        assert second.response().status == 200 and budget.used == 0


class InflightTests(LimitFixture):
    def test_each_http_session_has_the_per_connection_inflight_limit(self) -> None:
        self.site.max_inflight = 7
        assert self.connect().session.max_inflight == 7

    def test_the_front_end_takes_its_limits_from_the_configuration(self) -> None:
        config = config_from(TINY_CONFIG)
        server = ServerConfig(
            max_connections=3, http_header_timeout=4, max_inflight_per_connection=2
        )
        front = HTTPFrontEnd(self.plane, attrs.evolve(config, server=server), Clock())
        site = front.site
        assert (site.max_connections, site.header_timeout, site.max_inflight) == (3, 4, 2)
        assert np.isfinite(site.body_timeout)
