"""Tests of ``benchmarks/transports.py``'s pure parts (thread roles, merged client
points, issue 11's targets, TRANSPORTS.md, the time estimate) and of the
server wrapper that names the front ends' threads, against a real ``twistd``.

**Every benchmark figure in this file is made up** (see :func:`made_up_results`):
they sit just either side of each target's limit so that each verdict can be
checked; they are not measurements of anything.
"""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import run_measure  # noqa: E402
import transports  # noqa: E402
import transports_report as report  # noqa: E402
import transports_server  # noqa: E402

# -- made-up figures ---------------------------------------------------------------


def made_up_row(transport: str, c: int, rate: float, outside_us: float) -> dict[str, Any]:
    """A made-up row: ``rate`` inf/s, ``outside_us`` µs of server CPU outside OpenVINO."""
    return {
        "transport": transport,
        "concurrency": c,
        "clients": "made up",
        "available": True,
        "reason": None,
        "throughput": rate,
        "latency_ms": {"p50": 10.0, "p99": 20.0},
        "errors": {},
        "error_count": 0,
        "client_cpu_us": 500.0,
        "server_cpu": {
            "span_s": 10.0,
            "us_per_request": {
                "reactor": outside_us,
                "device": 300.0,
                "other": 9000.0,
                "total": outside_us + 9300.0,
                "grpc": 0.0,
                "http_codec": 0.0,
                "openvino_other": 9000.0,
                "outside_openvino": outside_us,
            },
        },
        "other_processes_cores": 0.0,
    }


def made_up_results() -> dict[str, Any]:
    """Made-up figures where every target passes just inside its limit:
    gRPC at 0.9 x binary, each shm path at 0.5 x its socket path's CPU, and
    binary+shm at 0.95 x benchmark_app's better hint (200 FPS)."""
    rows = []
    for c in (1, 16):
        rows += [
            made_up_row("binary", c, 150.0, 1000.0),
            made_up_row("binary+shm", c, 190.0, 500.0),
            made_up_row("grpc", c, 135.0, 2400.0),
            made_up_row("grpc+shm", c, 140.0, 1200.0),
            made_up_row("http", c, 100.0, 2000.0),
        ]
    return {
        "argv": ["--made-up"],
        "machine": {"date": "made up"},
        "settings": {"model": "squeezenet", "duration": 15.0, "warmup": 2.0},
        "estimate_s": 300.0,
        "elapsed_s": 290.0,
        "benchmark_app": {
            "throughput": {"throughput": 200.0, "latency_ms": {"p50": 9.0}},
            "latency": {"throughput": 150.0, "latency_ms": {"p50": 6.0}},
        },
        "rows": rows,
    }


def set_row(results: dict[str, Any], transport: str, c: int, **changes: Any) -> None:
    row = next(r for r in results["rows"] if r["transport"] == transport and r["concurrency"] == c)
    if "outside" in changes:
        row["server_cpu"]["us_per_request"]["outside_openvino"] = changes.pop("outside")
    row.update(changes)


def statuses(results: dict[str, Any]) -> dict[str, str]:
    return {t["target"]: t["status"] for t in report.compute_targets(results)}


# -- targets -----------------------------------------------------------------------


def test_every_target_passes_just_inside_its_limit() -> None:
    found = statuses(made_up_results())
    assert len(found) == 6
    assert set(found.values()) == {"PASS"}


@pytest.mark.parametrize(
    ("transport", "c", "changes", "target"),
    [
        ("grpc", 16, {"throughput": 134.9}, "gRPC >= 0.9 x binary throughput at c=16"),
        (
            "binary+shm",
            1,
            {"outside": 501.0},
            "binary+shm server CPU/request outside OpenVINO <= 0.5 x binary's at c=1",
        ),
        (
            "grpc+shm",
            16,
            {"outside": 1201.0},
            "grpc+shm server CPU/request outside OpenVINO <= 0.5 x grpc's at c=16",
        ),
        (
            "binary+shm",
            16,
            {"throughput": 189.9},
            "binary+shm >= 0.95 x benchmark_app's best hint at c=16",
        ),
    ],
)
def test_a_target_fails_just_outside_its_limit(
    transport: str, c: int, changes: dict[str, Any], target: str
) -> None:
    results = made_up_results()
    set_row(results, transport, c, **changes)
    found = statuses(results)
    assert found.pop(target) == "FAIL"
    assert set(found.values()) == {"PASS"}


def test_grpc_shm_not_available_leaves_its_targets_not_measured() -> None:
    results = made_up_results()
    for c in (1, 16):
        set_row(results, "grpc+shm", c, available=False, reason="UNIMPLEMENTED")
    found = statuses(results)
    not_measured = {t for t, s in found.items() if s == "N/A"}
    assert not_measured == {
        f"grpc+shm server CPU/request outside OpenVINO <= 0.5 x grpc's at c={c}" for c in (1, 16)
    }


def test_the_ceiling_is_the_better_hint() -> None:
    results = made_up_results()
    results["benchmark_app"]["latency"]["throughput"] = 210.0  # now the better one
    [line] = [t for t in report.compute_targets(results) if "benchmark_app" in t["target"]]
    assert line["status"] == "FAIL"
    assert "-hint latency" in line["text"]


# -- CPU by role and client points -------------------------------------------------


def test_threads_are_split_by_role_and_outside_openvino_sums_the_front_ends() -> None:
    pid = 100
    used = {
        100: ("python", 1.0),  # the reactor
        101: ("twinfer-cpu#0", 5.0),
        102: ("py-grpc-loop", 0.5),
        103: ("event_engine", 0.25),
        104: ("grpc_global_tim", 0.125),
        105: ("py-http-codec", 2.0),
        106: ("python", 7.0),  # OpenVINO's pool: created unnamed
    }
    seconds = report.cpu_by_role(pid, used)
    assert seconds["reactor"] == 1.0
    assert seconds["device"] == 5.0
    assert seconds["grpc"] == 0.875
    assert seconds["http_codec"] == 2.0
    assert seconds["openvino_other"] == 7.0
    assert seconds["other"] == 0.875 + 2.0 + 7.0  # procstat's role, unchanged
    assert seconds["outside_openvino"] == 1.0 + 0.875 + 2.0
    assert seconds["total"] == 15.875
    cpu = report.per_request(seconds, span_s=2.0, throughput=50.0)  # 100 requests
    assert cpu["us_per_request"]["outside_openvino"] == pytest.approx(38_750.0)


def test_client_processes_share_one_window() -> None:
    parts = [
        {
            "latencies_us": [1000.0, 3000.0],
            "errors": {"StatusCode.UNAVAILABLE": 1},
            "cpu_seconds": 0.002,
            "window_start_ns": 0,
            "window_end_ns": 2_000_000_000,
        },
        {
            "latencies_us": [2000.0, 2000.0],
            "errors": {"StatusCode.UNAVAILABLE": 2, "ValueError": 1},
            "cpu_seconds": 0.006,
            "window_start_ns": 0,
            "window_end_ns": 2_000_000_000,
        },
    ]
    point = report.merge_client_parts(parts)
    assert point["count"] == 4
    assert point["throughput"] == 2.0
    assert point["latency_ms"]["p50"] == 2.0
    assert point["errors"] == {"StatusCode.UNAVAILABLE": 3, "ValueError": 1}
    assert point["error_count"] == 4
    assert point["client_cpu_us"] == 2000.0


def test_twinfer_bench_client_cpu_per_request() -> None:
    point = {"count": 1000, "client_cpu_percent": 50.0, "window_s": 10.0}
    assert report.bench_client_cpu_us(point) == 5000.0  # 5 s of CPU over 1000 requests
    assert report.bench_client_cpu_us({"count": 0}) is None


# -- the report --------------------------------------------------------------------


def test_transports_md_has_the_cpu_then_targets_rows_and_threads() -> None:
    results = made_up_results()
    set_row(results, "grpc+shm", 1, available=False, reason="UNIMPLEMENTED")
    results["targets"] = report.compute_targets(results)
    results["server_threads"] = {"grpc": {"py-grpc-loop": 1, "event_engine": 4}}
    text = report.render_markdown(results, ["**CPU:** Made-Up CPU", "**Versions:** made up"])
    lines = text.splitlines()
    assert lines[2] == "**CPU:** Made-Up CPU"
    assert text.index("## Targets") < text.index("| binary | 1 |")
    assert "| grpc+shm | 1 | made up | not available: UNIMPLEMENTED |" in text
    # Every table row has as many cells as its header (10 rows, 9 available).
    for header, rows in ((report.ROW_HEADER, 10), (report.SPLIT_HEADER, 9)):
        start = lines.index(header) + 2
        table = lines[start : lines.index("", start)]
        assert len(table) == rows
        assert {line.count("|") for line in table} == {header.count("|")}
    assert "grpc: `event_engine` ×4, `py-grpc-loop`" in text
    assert "**PASS** gRPC >= 0.9 x binary throughput at c=16" in text


def test_a_busy_machine_is_flagged_row_by_row() -> None:
    results = made_up_results()
    set_row(results, "http", 16, other_processes_cores=0.5)
    results["targets"] = report.compute_targets(results)
    text = report.render_markdown(results, [])
    assert "ran: compare those rows with care" in text
    assert "http c=16" in text.split("⚠")[1]


# -- the run's shape ---------------------------------------------------------------


def test_the_default_run_fits_in_8_minutes() -> None:
    args = transports.parse_args([])
    assert (args.duration, args.warmup, args.ceiling_seconds) == (15.0, 2.0, 15.0)
    assert transports.estimate_seconds(args) <= 8 * 60
    quick = transports.parse_args(["--quick"])
    assert transports.estimate_seconds(quick) < transports.estimate_seconds(args)


def test_unknown_transports_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        transports.parse_args(["--transports", "binary,carrier-pigeon"])
    assert "carrier-pigeon" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("concurrency", "processes", "users"),
    [(1, 4, [1]), (16, 4, [4, 4, 4, 4]), (6, 4, [2, 2, 1, 1]), (16, 1, [16])],
)
def test_users_are_spread_evenly_over_the_client_processes(
    concurrency: int, processes: int, users: list[int]
) -> None:
    assert transports.split_users(concurrency, processes) == users


# -- the server wrapper, for real --------------------------------------------------


def os_thread_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names: Linux")
def test_the_wrapper_names_front_end_threads_and_only_them() -> None:
    names: dict[str, str] = {}

    def record() -> None:
        names[threading.current_thread().name] = os_thread_name(threading.get_native_id())

    uninstall = transports_server.install()
    try:
        for name in ("twinfer-grpc", "PoolThread-twinfer-http-codec-1", "bystander"):
            thread = threading.Thread(target=record, name=name)
            thread.start()
            thread.join()
    finally:
        uninstall()
    after = threading.Thread(target=record, name="twinfer-grpc-after")
    after.start()
    after.join()
    assert names["twinfer-grpc"] == "py-grpc-loop"
    assert names["PoolThread-twinfer-http-codec-1"] == "py-http-codec"
    assert (
        names["bystander"]
        == names["twinfer-grpc-after"]
        == os_thread_name(threading.main_thread().native_id or 0)
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_a_real_server_listens_on_every_transport_with_its_grpc_thread_named(
    tmp_path: Path,
) -> None:
    config = run_measure.server_config(run_measure.base_config(None), "tiny", None)
    server = transports.TransportServer(tmp_path, config, timeout=120)
    try:
        assert set(server.ports) == {"binary", "grpc", "http"}
        threads = server.threads_by_role()
        assert "py-grpc-loop" in threads["grpc"]
        assert sum(threads["reactor"].values()) == 1
    finally:
        server.stop()
    assert server.process.returncode is not None


def test_made_up_results_are_not_changed_by_the_report() -> None:
    results = made_up_results()
    before = copy.deepcopy(results)
    report.compute_targets(results)
    assert results == before
