"""Tests of ``benchmarks/run.py``'s pure parts: issue 10's targets, RESULTS.md,
the plot's data, the generated server configuration, the time estimate, and
``benchmarks/procstat.py`` against real threads and a real ``twistd``.

**Every benchmark figure in this file is made up** (see :func:`made_up_results`):
they are chosen to sit just either side of each target's limit, so that each
verdict can be checked; they are not measurements of anything.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from twinfer.config import loads_config
from twinfer.threadnames import name_os_thread
from twistd_process import ServerProcess

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import procstat  # noqa: E402
import run  # noqa: E402
import run_measure  # noqa: E402
import run_report  # noqa: E402

# -- made-up figures ---------------------------------------------------------------


def point(c: int, rate: float, p50: float, reactor: float | None = None) -> dict[str, Any]:
    """A made-up ``twinfer bench`` point (with made-up server CPU per request)."""
    cpu = None
    if reactor is not None:
        cpu = {
            "span_s": 10.0,
            "percent": {},
            "us_per_request": {
                "reactor": reactor,
                "device": 50.0,
                "other": 400.0,
                "total": reactor + 450.0,
            },
        }
    return {
        "concurrency": c,
        "throughput": rate,
        "latency_ms": {"p50": p50, "p90": p50 * 1.2, "p99": p50 * 1.5, "max": p50 * 2},
        "error_count": 0,
        "server_cpu": cpu,
    }


def phase(c: int, rate: float, p50: float, errors: int = 0) -> dict[str, Any]:
    """A made-up step-load phase."""
    return {
        **point(c, rate, p50),
        "phase_s": 20.0,
        "settle_s": 2.0,
        "error_count": errors,
        "errors": {"OVERLOADED": errors} if errors else {},
    }


def made_up_results() -> dict[str, Any]:
    """MADE-UP figures for one light model and ``tiny``, not measurements.

    squeezenet: benchmark_app -hint latency median 5.0 ms at 190 FPS, -hint
    throughput 180 FPS: the c=1 limit is 1.10 x 5.0 + 0.5 = 6.0 ms and the
    throughput floor 0.95 x 190 = 180.5 inf/s.
    """
    squeezenet_run = {
        "execution": "adaptive",
        "sweep": [
            point(1, 170.0, 5.9, reactor=300.0),
            point(2, 180.0, 11.0),
            point(16, 179.0, 89.0, reactor=250.0),
            point(64, 181.0, 350.0),
        ],
        "steps": [phase(1, 168.0, 5.95), phase(16, 182.0, 88.0), phase(1, 169.0, 5.9)],
        "rss_idle_mib": 150.0,
        "rss_after_load_mib": 198.0,
        "rss_max_mib": 199.0,
    }
    throughput_run = {
        **copy.deepcopy(squeezenet_run),
        "execution": "throughput",
        "rss_after_load_mib": 180.0,
    }
    return {
        "argv": ["--made-up"],
        "machine": {
            "cpu": "Made-up CPU 9000",
            "avx2": True,
            "avx512": ["avx512f", "avx512bw"],
            "amx": ["amx_tile"],
            "cores": 2,
            "memory_gib": 8.0,
            "kernel": "6.0",
            "python": "3.11.7",
            "versions": {"openvino": "2026.4.1", "twisted": "26.10.0", "twinfer": "0.1.0"},
            "git_commit": "abc1234",
            "load_average_at_start": (0.1, 0.2, 0.3),
            "date": "2026-11-29 22:00:00 UTC",
        },
        "note": "",
        "estimate_s": 600.0,
        "elapsed_s": 590.0,
        "settings": {"duration": 12.0, "warmup": 2.0, "steps": [1, 16, 1], "step_duration": 20.0},
        "models": {
            "squeezenet": {
                "model_path": "light_squeezenet.onnx",
                "benchmark_app": {
                    "throughput": {"throughput": 180.0, "latency_ms": {"p50": 9.0, "mean": 9.5}},
                    "latency": {"throughput": 190.0, "latency_ms": {"p50": 5.0, "mean": 5.2}},
                },
                "python_loop": {
                    "throughput": 100.0,
                    "latency_ms": {"p50": 9.8},
                    "rss_mib": {"second_engine": 19.0},
                },
                "runs": {"throughput": throughput_run, "adaptive": squeezenet_run},
                "other_processes_cores": {"benchmark_app -hint latency": 0.05},
            },
            "tiny": {
                "model_path": None,
                "benchmark_app": {},
                "python_loop": None,
                "runs": {
                    "default": {
                        "execution": None,
                        "sweep": [point(1, 900.0, 0.8, 140.0), point(16, 2000.0, 7.0, 120.0)],
                        "steps": [],
                        "rss_idle_mib": 110.0,
                        "rss_after_load_mib": 111.0,
                        "rss_max_mib": 111.0,
                    }
                },
                "other_processes_cores": {"twinfer (default)": 0.5},
            },
        },
    }


def verdicts(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, str]]:
    """The targets by (model, run, first word of the target)."""
    return {
        (t["model"], t["run"], t["target"].split()[0]): t
        for t in run_report.compute_targets(results)
    }


# -- the targets ---------------------------------------------------------------------


def test_every_target_passes_just_inside_its_limit() -> None:
    got = verdicts(made_up_results())
    for run_label in ("adaptive", "throughput"):
        assert got[("squeezenet", run_label, "c=1")]["status"] == "PASS"
        assert got[("squeezenet", run_label, "best")]["status"] == "PASS"
        assert got[("squeezenet", run_label, "step")]["status"] == "PASS"
    c1 = got[("squeezenet", "adaptive", "c=1")]["text"]
    assert "p50 5.90 ms vs limit 6.00 ms" in c1
    best = got[("squeezenet", "adaptive", "best")]["text"]
    assert "181.0 inf/s at c=64 vs floor 180.5" in best  # the better of c=16 and c=64
    rss = got[("squeezenet", "adaptive vs throughput", "RSS:")]
    assert rss["status"] == "PASS" and "+18 MiB" in rss["text"] and "19 MiB" in rss["text"]
    tiny = got[("tiny", "default", "server")]
    assert tiny["status"] == "PASS" and "reactor 140" in tiny["text"]
    assert got[("squeezenet", "adaptive", "server")]["status"] == "INFO"
    assert "reactor 300" in got[("squeezenet", "adaptive", "server")]["text"]


@pytest.mark.parametrize(
    ("change", "target"),
    [
        (lambda r: r["sweep"][0]["latency_ms"].update(p50=6.05), "c=1"),
        (lambda r: r["sweep"][3].update(throughput=180.0), "best"),
        (lambda r: r["steps"][1].update(error_count=1), "step"),
        (lambda r: r["steps"][2]["latency_ms"].update(p50=6.2), "step"),
        (lambda r: r["steps"][1].update(throughput=170.0), "step"),
    ],
)
def test_a_target_fails_just_outside_its_limit(change: Any, target: str) -> None:
    results = made_up_results()
    change(results["models"]["squeezenet"]["runs"]["adaptive"])
    got = verdicts(results)
    assert got[("squeezenet", "adaptive", target)]["status"] == "FAIL"
    assert got[("squeezenet", "throughput", target)]["status"] == "PASS"


def test_the_step_target_names_the_failing_phase() -> None:
    results = made_up_results()
    results["models"]["squeezenet"]["runs"]["adaptive"]["steps"][2]["latency_ms"]["p50"] = 7.5
    text = verdicts(results)[("squeezenet", "adaptive", "step")]["text"]
    assert "phase 3 (c=1): p50 7.50 ms vs 6.00" in text
    assert "phase 2 (c=16): 182.0 inf/s vs 180.5" in text


def test_the_reactor_target_is_150_us_at_both_concurrencies() -> None:
    results = made_up_results()
    tiny = results["models"]["tiny"]["runs"]["default"]
    tiny["sweep"][1]["server_cpu"]["us_per_request"]["reactor"] = 151.0
    assert verdicts(results)[("tiny", "default", "server")]["status"] == "FAIL"
    tiny["sweep"] = tiny["sweep"][:1]  # c=16 not measured: not a pass
    assert verdicts(results)[("tiny", "default", "server")]["status"] == "FAIL"
    for p in tiny["sweep"]:
        p["server_cpu"] = None
    assert verdicts(results)[("tiny", "default", "server")]["status"] == "N/A"


def test_the_rss_target_compares_adaptive_with_throughput_only() -> None:
    results = made_up_results()
    runs = results["models"]["squeezenet"]["runs"]
    runs["adaptive"]["rss_after_load_mib"] = 199.5  # +19.5 MiB over a 19 MiB model
    assert verdicts(results)[("squeezenet", "adaptive vs throughput", "RSS:")]["status"] == "FAIL"
    del runs["throughput"]  # one mode only: reported, not judged
    rss = verdicts(results)[("squeezenet", "all", "RSS:")]
    assert rss["status"] == "INFO" and "--execution throughput,adaptive" in rss["text"]


def test_a_soak_is_judged_by_its_rss_staying_flat() -> None:
    results = made_up_results()
    r = results["models"]["squeezenet"]["runs"]["adaptive"]
    point_64 = {**point(64, 180.0, 350.0), "window_s": 300.0}
    rss = {"start_mib": 200.0, "end_mib": 205.0, "max_mib": 206.0, "change_percent": 2.5}
    r["soak"] = {"point": point_64, "rss": rss}
    soak = verdicts(results)[("squeezenet", "adaptive", "RSS")]
    assert soak["status"] == "PASS" and "start 200 MiB, end 205 MiB" in soak["text"]
    r["soak"]["rss"] = {**rss, "end_mib": 225.0, "max_mib": 225.0, "change_percent": 12.5}
    assert verdicts(results)[("squeezenet", "adaptive", "RSS")]["status"] == "FAIL"


def test_missing_points_are_not_measured_rather_than_passed() -> None:
    results = made_up_results()
    r = results["models"]["squeezenet"]["runs"]["adaptive"]
    r["sweep"] = [p for p in r["sweep"] if p["concurrency"] == 2]
    r["steps"] = []
    got = verdicts(results)
    for target in ("c=1", "best", "step"):
        assert got[("squeezenet", "adaptive", target)]["status"] == "N/A"


# -- the report and the plot's data ----------------------------------------------------


def test_results_md_starts_with_the_cpu_and_versions_then_the_targets() -> None:
    results = made_up_results()
    results["targets"] = run_report.compute_targets(results)
    text = run_report.render_markdown(results, "results.png", ["## Reproduce"])
    lines = text.splitlines()
    assert lines[0] == "# twinfer benchmark results"
    assert lines[2].startswith("**CPU:** Made-up CPU 9000, 2 cores (AVX2 yes; ")
    assert "AVX-512 avx512f, avx512bw" in lines[2] and "AMX amx_tile" in lines[2]
    assert "OpenVINO 2026.4.1, Python 3.11.7, Twisted 26.10.0" in lines[3]
    targets = text.index("## Targets (issue 10)")
    assert text.index("**PASS** squeezenet [adaptive] c=1 p50") > targets
    assert "![p50 latency against throughput, with both hints](results.png)" in text
    assert "| 64 | 181.0 | 350.00 | 420.00 | 525.00 | 0 | – | – | – | – |" in text
    assert "| 1 | 170.0 | 5.90 | 7.08 | 8.85 | 0 | 300 | 50 | 400 | 750 |" in text
    assert "| 2 | 16 | 182.0 | 88.00 | 132.00 | 0 |" in text  # the step table
    assert '### twinfer, adaptive (`execution = "adaptive"`)' in text
    assert "after load 198 MiB" in text
    assert "Other processes used more than 0.2 cores while tiny" in text
    assert text.rstrip().endswith("## Reproduce")


def test_the_plot_shows_each_run_against_both_hints() -> None:
    series = run_report.plot_series(made_up_results())
    assert list(series) == ["squeezenet"]  # tiny has no benchmark_app figures
    s = series["squeezenet"]
    assert s["hints"] == {"throughput": (180.0, 9.0), "latency": (190.0, 5.0)}
    assert s["runs"]["adaptive"][0] == (170.0, 5.9, 1)
    assert [c for _, _, c in s["runs"]["throughput"]] == [1, 2, 16, 64]


# -- the machine, benchmark_app's output, the configuration, the estimate -------------


def test_cpu_facts_name_the_model_and_the_vector_extensions() -> None:
    intel = (
        "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16\n"
    )
    facts = run_measure.cpu_facts(intel)
    assert facts == {
        "cpu": "Intel(R) Xeon(R) Platinum",
        "avx2": True,
        "avx512": ["avx512f"],
        "amx": ["amx_bf16", "amx_tile"],
    }
    amd = run_measure.cpu_facts("model name\t: AMD EPYC\nflags\t\t: fpu avx avx2 fma\n")
    assert amd["avx2"] and amd["avx512"] == [] and amd["amx"] == []
    assert run_measure.cpu_facts("")["cpu"] == "unknown"


def test_benchmark_app_output_is_parsed() -> None:
    # A made-up excerpt in benchmark_app's format.
    text = (
        "[ INFO ] Count:               2790 iterations\n"
        "[ INFO ] Duration:            15011.12 ms\n"
        "[ INFO ] Latency:\n[ INFO ]    Median:        5.10 ms\n"
        "[ INFO ]    Average:       5.35 ms\n[ INFO ]    Min:           4.20 ms\n"
        "[ INFO ]    Max:           19.00 ms\n[ INFO ] Throughput:          185.86 FPS\n"
    )
    parsed = run_measure.parse_benchmark_app(text)
    assert parsed["throughput"] == 185.86 and parsed["count"] == 2790
    assert parsed["latency_ms"] == {"p50": 5.1, "mean": 5.35, "min": 4.2, "max": 19.0}


def test_the_generated_config_serves_one_model_in_the_mode_asked() -> None:
    base = run_measure.base_config(None)
    plain = run_measure.server_config(base, "squeezenet", None)
    assert [m["name"] for m in plain["models"]] == ["squeezenet"]
    assert plain["devices"] == base["devices"]  # no --execution: the device as it is
    text = run_measure.to_toml(plain)
    assert run_measure.tomllib.loads(text) == plain
    config = loads_config(text)  # twinfer accepts it
    assert [m.name for m in config.models] == ["squeezenet"]
    adaptive = run_measure.server_config(base, "tiny", "adaptive")
    for device in adaptive["devices"]:
        assert device["execution"] == "adaptive"
        assert "PERFORMANCE_HINT" not in device.get("properties", {})
    assert run_measure.tomllib.loads(run_measure.to_toml(adaptive)) == adaptive
    assert [m["name"] for m in adaptive["models"]] == ["tiny"]
    with pytest.raises(ValueError, match="no model named 'nope'"):
        run_measure.server_config(base, "nope", None)


def test_the_default_run_fits_in_15_minutes() -> None:
    assert run.estimate_seconds(run.parse_args([])) <= 15 * 60
    both = run.parse_args(["--execution", "throughput,adaptive"])
    assert both.execution == ["throughput", "adaptive"]
    assert run.estimate_seconds(both) <= 15 * 60
    quick = run.parse_args(["--quick"])
    assert run.estimate_seconds(quick) < run.estimate_seconds(run.parse_args([])) / 2
    assert run.concurrency_for("tiny", quick) == [1, 16]
    assert run.parse_args([]).concurrency == [1, 2, 4, 16, 64]
    assert run.parse_args([]).steps == [1, 16, 1]


def test_server_cpu_divides_each_roles_time_by_the_requests() -> None:
    class MadeUpSampler:
        def cpu_between(self, start: int, end: int) -> tuple[float, dict[str, float]]:
            # Made up: 10 s sampled, 1.5 s of reactor CPU.
            return 10.0, {"reactor": 1.5, "device": 0.5, "other": 8.0, "total": 10.0}

    cpu = run_measure.server_cpu(
        MadeUpSampler(),  # type: ignore[arg-type]
        {"window_start_ns": 0, "window_end_ns": 1, "throughput": 1000.0},
    )
    assert cpu is not None
    assert cpu["us_per_request"]["reactor"] == pytest.approx(150.0)
    assert cpu["percent"]["total"] == pytest.approx(100.0)

    class UnnamedThreadsSampler:
        def cpu_between(self, start: int, end: int) -> tuple[float, dict[str, float | None]]:
            # Made up: a server that does not name its device threads.
            return 10.0, {"reactor": 1.5, "device": None, "other": 8.5, "total": 10.0}

    cpu = run_measure.server_cpu(
        UnnamedThreadsSampler(),  # type: ignore[arg-type]
        {"window_start_ns": 0, "window_end_ns": 1, "throughput": 1000.0},
    )
    assert cpu is not None and cpu["us_per_request"]["device"] is None


# -- procstat against real threads -----------------------------------------------------


def test_parse_stat_cpu_counts_fields_after_the_command_name() -> None:
    ticks = procstat.TICKS
    fields = ["S"] + ["0"] * 10 + [str(3 * ticks), str(ticks)] + ["0"] * 30
    stat = "123 (a) b (c) " + " ".join(fields)
    assert procstat.parse_stat_cpu(stat) == pytest.approx(4.0)


def test_thread_cpu_prefers_schedstat_and_falls_back_to_stat(tmp_path: Path) -> None:
    ticks = procstat.TICKS
    fields = ["S"] + ["0"] * 10 + [str(2 * ticks), str(ticks)] + ["0"] * 30
    (tmp_path / "stat").write_text("7 (twinfer-cpu-0) " + " ".join(fields))
    assert procstat.thread_cpu_seconds(tmp_path) == pytest.approx(3.0)  # no schedstat here
    (tmp_path / "schedstat").write_text("2500000123 100 7\n")
    assert procstat.thread_cpu_seconds(tmp_path) == pytest.approx(2.500000123)


def test_procstat_splits_this_process_cpu_by_thread_role() -> None:
    pid = os.getpid()
    ready, stop = threading.Event(), threading.Event()

    def device_thread() -> None:
        name_os_thread("twinfer-test-0")
        ready.set()
        while time.thread_time() < 0.3:
            pass  # burn CPU on this thread
        stop.wait(10)

    before = procstat.sample(pid)
    thread = threading.Thread(target=device_thread)
    thread.start()
    ready.wait(10)
    started = time.thread_time()
    while time.thread_time() - started < 0.05:
        pass  # a little on the main thread too
    after = procstat.sample(pid)
    try:
        names = {tid: name for tid, (name, _) in after.items()}
        assert names[thread.native_id] == "twinfer-test-0"
        assert procstat.role(pid, pid, names[pid]) == "reactor"
        used = procstat.by_role(pid, procstat.delta(before, after))
        assert used["total"] == pytest.approx(
            used["reactor"] + used["device"] + used["other"], abs=1e-9
        )
        assert used["device"] > 0 and used["reactor"] > 0
        assert procstat.rss_bytes(pid)
    finally:
        stop.set()
        thread.join()
    assert procstat.per_request_us({"reactor": 0.15}, 1000) == {"reactor": pytest.approx(150.0)}
    assert procstat.per_request_us({"reactor": 0.15}, 0) == {"reactor": None}


def test_a_real_servers_device_threads_are_named(twistd_server: ServerProcess) -> None:
    # A thread names itself with the first work it runs, which may come after
    # the server listens: load both replicas first (4 users, 2 replicas).
    done = subprocess.run(
        [sys.executable, "-m", "twinfer.bench", "-m", "tiny", "-s", twistd_server.endpoint]
        + ["-c", "4", "-n", "400", "-w", "0", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    pid = twistd_server.process.pid
    threads = procstat.sample(pid)
    roles = [procstat.role(pid, tid, name) for tid, (name, _) in threads.items()]
    # The tiny server has two CPU replicas: two named device threads.
    assert roles.count("device") == 2 and roles.count("reactor") == 1
