"""Tests of ``twinfer bench --steps``: the step load's users and phases.

:class:`SteppedLoop` runs under ``twisted.internet.task.Clock`` against a
stand-in connection that answers each request a fixed time after it was
sent, so every count below is exact; the command runs for real against a
``twistd`` process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from twinfer.bench.steps import Phase, SteppedLoop, parse_phases, summarize_phase
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.messages import InferReply, InferRequest
from twistd_process import ServerProcess

MESSAGE = InferRequest("tiny", {"x": np.ones((1, 4), np.float32)})


class StandInConnection:
    """Answers every request ``service`` seconds after it is sent (on
    ``clock``), or fails it with ``fail_with`` while that is set; records
    how many requests are in flight at most."""

    def __init__(self, clock: Clock, service: float) -> None:
        self.clock = clock
        self.service = service
        self.usable = True
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent = 0
        self.fail_with: ErrorCode | None = None

    def request(self, message: InferRequest) -> Deferred[InferReply]:
        self.sent += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        d: Deferred[InferReply] = Deferred()
        failing = self.fail_with
        self.clock.callLater(self.service, self._answer, d, failing)
        return d

    def _answer(self, d: Deferred[InferReply], failing: ErrorCode | None) -> None:
        self.in_flight -= 1
        if failing is not None:
            d.errback(TwinferError(failing, "stand-in failure"))
        else:
            d.callback(InferReply({}, queue_us=10, compute_us=100))


def advance(clock: Clock, seconds: float) -> None:
    """Advance ``clock`` by ``seconds`` in 1/64 s ticks (one big step would
    stamp every answer due in between with the step's end)."""
    for _ in range(round(seconds * 64)):
        clock.advance(1 / 64)


def run_to_end(clock: Clock, loop: SteppedLoop, seconds: float) -> None:
    """Advance ``clock`` in 1/64 s ticks until ``loop`` is done (or ``seconds`` passed)."""
    for _ in range(int(seconds * 64) + 1):
        if loop.done.called:
            return
        clock.advance(1 / 64)


#: The stand-in's service time and the test's clock step: 1/64 s is exact in
#: binary floating point, so the clock lands on phase boundaries exactly.
TICK = 1 / 64


def test_users_follow_the_phases_without_a_pause() -> None:
    clock = Clock()
    connection = StandInConnection(clock, service=TICK)
    phases = [Phase(1, 4.0), Phase(8, 4.0), Phase(1, 4.0)]
    loop = SteppedLoop(
        clock,
        [connection],
        MESSAGE,
        phases,
        settle=1.0,
        now_ns=lambda: round(clock.seconds() * 1e9),
    )
    results: list = []
    loop.start().addCallback(results.append)
    in_flight_at: list[int] = []  # in_flight_at[i]: after i + 1 ticks
    while not loop.done.called and len(in_flight_at) < 13 * 64:
        clock.advance(TICK)
        in_flight_at.append(connection.in_flight)
    assert results, "the step load did not finish"
    first, busy, last = [summarize_phase(p) for p in results[0]]

    def seen(start: float, end: float) -> set[int]:
        return set(in_flight_at[int(start * 64) : int(end * 64)])

    # The load changed mid-run: 1 in flight, then 8, then back to 1, never 0
    # in between (no drain between phases) and never more than the phase's users.
    assert connection.most_in_flight == 8 == loop.peak_running
    assert seen(0, 3.9) == {1}
    assert seen(4, 7.9) == {8}
    assert seen(8.1, 11.9) == {1}
    # One user answered every 1/64 s over the 3 settled seconds: 192 requests;
    # eight users: 1536.  Whole phases count every completed request (the
    # first phase's first answer comes one tick after it starts).
    assert [first["count"], busy["count"], last["count"]] == [192, 1536, 192]
    assert first["throughput"] == pytest.approx(64.0)
    assert busy["throughput"] == pytest.approx(512.0)
    assert first["completed"] == 255
    assert 8 * 256 - 8 <= busy["completed"] <= 8 * 256
    assert [p["concurrency"] for p in (first, busy, last)] == [1, 8, 1]
    assert first["latency_ms"]["p50"] == pytest.approx(1e3 * TICK)
    assert first["settle_s"] == pytest.approx(1.0)
    assert all(p["error_count"] == 0 for p in (first, busy, last))
    assert connection.in_flight == 0


def test_errors_count_over_the_whole_phase_and_latency_only_when_settled() -> None:
    clock = Clock()
    connection = StandInConnection(clock, service=0.125)
    loop = SteppedLoop(
        clock,
        [connection],
        MESSAGE,
        [Phase(2, 3.0), Phase(2, 3.0)],
        settle=1.0,
        now_ns=lambda: round(clock.seconds() * 1e9),
    )
    results: list = []
    loop.start().addCallback(results.append)
    # Requests sent in the second phase's first 0.4 s fail (answered within
    # its settling time).
    advance(clock, 3.0)
    connection.fail_with = ErrorCode.OVERLOADED
    advance(clock, 0.375)
    connection.fail_with = None
    run_to_end(clock, loop, 10.0)
    first, second = [summarize_phase(p) for p in results[0]]
    assert first["errors"] == {} and first["count"] == 32  # 2 users x 8/s x 2 s
    # 2 users x the 3 requests each sent at 3.0, 3.125 and 3.25 s.
    assert second["errors"] == {"OVERLOADED": 6}
    assert second["error_count"] == 6 and second["settled_errors"] == {}
    assert second["count"] == 32


def test_phases_must_outlast_the_settling_time() -> None:
    with pytest.raises(ValueError, match="settling"):
        SteppedLoop(Clock(), [], MESSAGE, [Phase(1, 2.0)], settle=2.0)
    with pytest.raises(ValueError):
        parse_phases([], 20.0)
    assert parse_phases([1, 16, 1], 20.0) == [Phase(1, 20.0), Phase(16, 20.0), Phase(1, 20.0)]


# -- the command against a real twistd -----------------------------------------


def test_bench_command_runs_a_step_load(twistd_server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "twinfer.bench",
            "-m",
            "tiny",
            "-s",
            twistd_server.endpoint,
            "--steps",
            "1,3",
            "--step-duration",
            "0.6",
            "--settle",
            "0.2",
            "--json",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["points"] == []
    assert [p["concurrency"] for p in result["steps"]] == [1, 3]
    for phase in result["steps"]:
        assert phase["error_count"] == 0 and phase["count"] > 0
        assert phase["completed"] >= phase["count"]
        assert phase["settle_s"] == pytest.approx(0.2)
    first, second = result["steps"]
    assert second["phase_start_ns"] == first["phase_end_ns"]  # back to back


def test_bench_command_refuses_steps_over_processes(twistd_server: ServerProcess) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "twinfer.bench", "-m", "tiny", "-s", twistd_server.endpoint]
        + ["--steps", "1,2", "--processes", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--steps runs in one client process" in done.stderr
