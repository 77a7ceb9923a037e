"""Tests of ``twinfer bench``: its statistics, its inputs, its closed loop and the command.

The statistics are checked against numpy on the union of the samples; the
load driver runs against a real in-process server; the command runs as a
real ``python -m twinfer.bench`` against a real ``twistd`` process.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twisted.internet import reactor

from support import ServerTestCase
from twinfer.bench.inputs import make_inputs
from twinfer.bench.load import split
from twinfer.bench.loop import ClosedLoop
from twinfer.bench.report import Progress, Samples, format_row, merge, summarize
from twinfer.client import connect
from twinfer.wire.encode import tensor_payload
from twinfer.wire.messages import DType, InferRequest, Metadata, TensorSpec
from twistd_process import ServerProcess

# -- statistics ----------------------------------------------------------------


def samples(
    latency_ms: list[float],
    start: int = 0,
    end: int = 1_000_000_000,
    errors: dict[str, int] | None = None,
    cpu: float = 0.0,
) -> Samples:
    latency = np.array([int(ms * 1e6) for ms in latency_ms], dtype=np.int64)
    return Samples(
        latency_ns=latency,
        queue_us=np.full(len(latency), 100, dtype=np.int64),
        compute_us=np.full(len(latency), 200, dtype=np.int64),
        errors=errors or {},
        start_ns=start,
        end_ns=end,
        cpu_seconds=cpu,
    )


def test_merged_percentiles_are_those_of_the_union() -> None:
    # A fast process with many samples and a slow one with few: averaging the
    # two processes' p50 would give ~50 ms; the union's p50 is ~1 ms.
    rng = np.random.default_rng(1)
    fast = list(rng.uniform(0.5, 1.5, 990))
    slow = list(rng.uniform(99.0, 101.0, 10))
    merged = summarize(merge([samples(fast), samples(slow)]))
    union = np.array(fast + slow)
    expected = np.percentile(union, [50, 90, 99])
    assert merged["latency_ms"]["p50"] == pytest.approx(expected[0], rel=1e-6)
    assert merged["latency_ms"]["p90"] == pytest.approx(expected[1], rel=1e-6)
    assert merged["latency_ms"]["p99"] == pytest.approx(expected[2], rel=1e-6)
    assert merged["latency_ms"]["max"] == pytest.approx(union.max(), rel=1e-6)
    assert merged["latency_ms"]["p50"] < 2.0
    assert merged["count"] == 1000


def test_merge_adds_errors_and_cpu_and_spans_the_windows() -> None:
    a = samples(
        [1.0] * 10, start=1_000_000_000, end=3_000_000_000, errors={"OVERLOADED": 2}, cpu=0.5
    )
    b = samples(
        [2.0] * 30,
        start=1_200_000_000,
        end=3_500_000_000,
        errors={"OVERLOADED": 1, "CANCELLED": 4},
        cpu=0.25,
    )
    merged = merge([a, b])
    assert merged.errors == {"OVERLOADED": 3, "CANCELLED": 4}
    assert merged.start_ns == 1_000_000_000 and merged.end_ns == 3_500_000_000
    assert merged.cpu_seconds == 0.75
    summary = summarize(merged)
    assert summary["window_s"] == pytest.approx(2.5)
    assert summary["throughput"] == pytest.approx(40 / 2.5)
    assert summary["error_count"] == 7
    assert summary["client_cpu_percent"] == pytest.approx(30.0)


def test_summarize_reports_the_servers_split_and_the_rest() -> None:
    summary = summarize(samples([1.0, 1.0, 1.0]))
    assert summary["queue_ms"]["p50"] == pytest.approx(0.1)
    assert summary["compute_ms"]["p50"] == pytest.approx(0.2)
    # 1 ms observed, 0.3 ms of it accounted for by the server's queue and device.
    assert summary["overhead_ms"]["p50"] == pytest.approx(0.7)


def test_summarize_with_no_successful_request_has_no_percentiles() -> None:
    summary = summarize(samples([], errors={"UNAVAILABLE": 5}))
    assert summary["count"] == 0
    assert summary["latency_ms"]["p50"] is None
    json.dumps(summary, allow_nan=False)  # stays valid JSON
    assert "-" in format_row({**summary, "concurrency": 1})


def test_merge_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        merge([])


@pytest.mark.parametrize("total,parts", [(1, 1), (7, 3), (64, 2), (2, 4)])
def test_split_is_near_equal_and_complete(total: int, parts: int) -> None:
    shares = split(total, parts)
    assert len(shares) == parts and sum(shares) == total
    assert max(shares) - min(shares) <= 1


# -- inputs --------------------------------------------------------------------

IMAGE = Metadata(
    "m",
    (TensorSpec("image", DType.F32, (-1, 3, 8, 8)), TensorSpec("ids", DType.I64, (4,))),
    (TensorSpec("out", DType.F32, (-1, 10)),),
)


def test_random_inputs_match_the_metadata_and_are_sent_without_copy() -> None:
    inputs = make_inputs(IMAGE, shapes={"image": (2, 3, 8, 8)})
    assert inputs["image"].shape == (2, 3, 8, 8) and inputs["image"].dtype == np.float32
    assert inputs["ids"].shape == (4,) and inputs["ids"].dtype == np.int64
    for array in inputs.values():
        # The codec hands the very bytes object to the transport.
        assert type(tensor_payload(array)) is bytes
    # Dynamic dimensions default to 1.
    assert make_inputs(IMAGE)["image"].shape == (1, 3, 8, 8)


def test_file_inputs_are_used_and_checked() -> None:
    image = np.arange(192, dtype=np.float32).reshape(1, 3, 8, 8)
    inputs = make_inputs(IMAGE, files={"image": image})
    np.testing.assert_array_equal(inputs["image"], image)
    with pytest.raises(ValueError, match="'image'.*float64.*f32"):
        make_inputs(IMAGE, files={"image": image.astype(np.float64)})
    with pytest.raises(ValueError, match="no input 'label'"):
        make_inputs(IMAGE, files={"label": image})
    with pytest.raises(ValueError, match="'image'.*does not fit"):
        make_inputs(IMAGE, shapes={"image": (1, 4, 8, 8)})


# -- the closed loop against a real in-process server ---------------------------


class ClosedLoopTests(ServerTestCase):
    async def test_requests_mode_sends_exactly_the_requests_asked_for(self) -> None:
        port = await self.start_server()
        clients = [await connect(reactor, f"tcp:127.0.0.1:{port}") for _ in range(2)]
        self.close_clients_on_cleanup(*clients)
        message = InferRequest("tiny", {"x": np.ones((1, 4), np.float32)})
        loop = ClosedLoop(reactor, [c.protocol for c in clients], message, 4, requests=37)
        result = await loop.start()
        assert result.count == 37 and not result.errors
        # Closed loop: nothing beyond the 37 went out, over both connections.
        served = sorted(p.requests for p in self.factory.connections)
        assert sum(served) == 37 and served[0] > 0
        assert all(c.protocol.in_flight == 0 for c in clients)
        assert result.end_ns > result.start_ns
        assert (result.compute_us > 0).all()

    async def test_duration_mode_measures_only_the_window(self) -> None:
        port = await self.start_server()
        client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(client)
        message = InferRequest("tiny", {"x": np.ones((1, 4), np.float32)})
        loop = ClosedLoop(reactor, [client.protocol], message, 2, duration=0.3, warmup=0.1)
        started = time.monotonic_ns()
        result = await loop.start()
        assert result.end_ns - result.start_ns == 300_000_000
        assert result.start_ns - started >= 100_000_000  # the warm-up is not measured
        assert 0 < result.count < loop.completed
        assert not result.errors

    async def test_server_errors_are_counted_by_code(self) -> None:
        port = await self.start_server()
        client = await connect(reactor, f"tcp:127.0.0.1:{port}")
        self.close_clients_on_cleanup(client)
        wrong = InferRequest("tiny", {"x": np.ones((1, 5), np.float32)})  # 5 != 4 columns
        loop = ClosedLoop(reactor, [client.protocol], wrong, 3, requests=20)
        result = await loop.start()
        assert result.count == 0
        assert result.errors == {"INVALID_SHAPE": 20}


# -- the command against a real twistd -----------------------------------------


@pytest.fixture(scope="module")
def server(twistd_server: ServerProcess) -> str:
    """The endpoint of a real ``twistd twinfer`` serving ``tiny`` (see conftest.py)."""
    return twistd_server.endpoint


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twinfer.bench", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_points(path: Path, concurrencies: list[int], requests: int) -> dict[str, Any]:
    result = json.loads(path.read_text())
    assert [p["concurrency"] for p in result["points"]] == concurrencies
    for point in result["points"]:
        assert point["count"] == requests
        assert point["errors"] == {} and point["error_count"] == 0
        lat = point["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert point["throughput"] > 0
        assert point["compute_ms"]["p50"] > 0
        assert point["client_cpu_percent"] >= 0
    return result


@pytest.mark.parametrize("processes", [1, 2])
def test_bench_command_end_to_end(server: str, tmp_path: Path, processes: int) -> None:
    out = tmp_path / "result.json"
    done = run_bench(
        "--model",
        "tiny",
        "--server",
        server,
        "--requests",
        "50",
        "--concurrency",
        "1,4",
        "--warmup",
        "0",
        "--connections",
        "2",
        "--processes",
        str(processes),
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    result = check_points(out, [1, 4], 50)
    assert result["processes"] == processes
    assert "inf/s" in done.stdout  # the text table
    assert done.stderr == ""  # no progress line when not on a terminal


def test_bench_command_sends_npy_inputs_and_counts_errors_by_code(
    server: str, tmp_path: Path
) -> None:
    good = tmp_path / "good.npy"
    np.save(good, np.ones((3, 4), np.float32))
    out = tmp_path / "good.json"
    done = run_bench(
        "--model",
        "tiny",
        "--server",
        server,
        "--requests",
        "20",
        "--warmup",
        "0",
        "--input",
        f"x={good}",
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    check_points(out, [1], 20)
    # A file the server rejects: every request fails, counted under its code.
    bad = tmp_path / "bad.npy"
    np.save(bad, np.ones((3, 5), np.float32))
    out = tmp_path / "bad.json"
    done = run_bench(
        "--model",
        "tiny",
        "--server",
        server,
        "--requests",
        "20",
        "--warmup",
        "0",
        "--concurrency",
        "2",
        "--input",
        f"x={bad}",
        "--json",
        str(out),
    )
    assert done.returncode == 1, done.stderr
    point = json.loads(out.read_text())["points"][0]
    assert point["count"] == 0 and point["errors"] == {"INVALID_SHAPE": 20}
    assert "error INVALID_SHAPE: 20" in done.stdout


@pytest.mark.parametrize("processes", [1, 2])
def test_bench_command_names_an_unknown_model(server: str, processes: int) -> None:
    done = run_bench(
        "--model",
        "nope",
        "--server",
        server,
        "--requests",
        "5",
        "--concurrency",
        "2",
        "--processes",
        str(processes),
    )
    assert done.returncode == 2, done.stderr
    assert "UNKNOWN_MODEL" in done.stderr and "'nope'" in done.stderr


def test_bench_command_reports_an_unreachable_server() -> None:
    done = run_bench("--model", "tiny", "--server", "tcp:127.0.0.1:1", "--requests", "5")
    assert done.returncode == 3
    assert "twinfer bench: cannot reach the server" in done.stderr


def test_progress_line_only_when_enabled() -> None:
    stream = io.StringIO()
    progress = Progress(stream)  # a StringIO is not a terminal
    progress.reset()
    progress.update("concurrency 4", 100, 1.0, 10.0)
    assert stream.getvalue() == ""
    progress = Progress(stream, enabled=True)
    progress.interval = 0.0
    progress.reset()
    progress.update("concurrency 4", 100, 1.5, 12.5)
    line = stream.getvalue()
    assert line.startswith("\rconcurrency 4:") and "inf/s" in line and "1.5/12.5 s" in line
    progress.interval = 3600.0
    progress.update("concurrency 4", 200, 1.6, 12.5)  # too soon: skipped
    assert stream.getvalue() == line
