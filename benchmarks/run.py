#!/usr/bin/env python3
"""Measure twinfer against OpenVINO's own ceiling on this machine, in one run.

For each model (default: the builtin ``resnet50`` and ``squeezenet``, i.e. the
onnx package's ``light_resnet50`` / ``light_squeezenet``):

(a) ``benchmark_app -hint throughput`` and ``-hint latency``: the ceiling;
(b) a bare Python loop over one infer request of the model compiled as the
    server compiles it (``PERFORMANCE_HINT=THROUGHPUT``): the single-thread
    floor and the "direct infer" latency;
(c) twinfer as a real ``twistd`` process (default configuration, free
    loopback port), driven by ``twinfer bench`` at each concurrency, while a
    sampler records the server's RSS and CPU time from ``/proc/PID``.

Writes ``results.json``, ``RESULTS.md`` and ``results.png`` (throughput and
p99 latency against concurrency, the ceiling as a line) into ``--out``
(default: this directory).  ``--soak SECONDS`` adds a long run at
concurrency 64 to check that the server's RSS stays flat.  See README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LISTENING = re.compile(r"twinfer listening on tcp:127\.0\.0\.1:(\d+)")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


class Interference:
    """How much CPU *other* processes used during a phase of the run.

    On a shared machine the ceiling and twinfer are measured at different
    moments, so their ratio means little if something else was running.
    This compares the machine's busy time (``/proc/stat``) with the CPU time
    of this script and its reaped children (benchmark_app, the Python loop,
    twistd, twinfer bench): the difference, in cores, is everybody else.
    """

    def __init__(self) -> None:
        self._start = self._now()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest is inside user)
        busy = (sum(fields[:3]) + sum(fields[5:8])) / TICKS
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        ours = children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime
        return time.monotonic(), busy, ours

    def stop(self) -> float:
        """Cores used by other processes on average since construction."""
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._now()
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-9))


def log(message: str) -> None:
    """Progress on stderr, timestamped (the results go to files)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- (a) benchmark_app ---------------------------------------------------------


def benchmark_app(model_path: str, hint: str, seconds: float) -> dict[str, Any]:
    """Run OpenVINO's ``benchmark_app``; return its throughput and latency figures."""
    command = [
        str(BIN / "benchmark_app"),
        "-m",
        model_path,
        "-d",
        "CPU",
        "-hint",
        hint,
        "-t",
        str(max(1, round(seconds))),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 300)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark_app failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    text = done.stdout

    def number(label: str) -> float:
        found = re.search(rf"{label}:\s+([\d.]+)", text)
        if not found:
            raise RuntimeError(f"no {label!r} in benchmark_app's output:\n{text[-2000:]}")
        return float(found.group(1))

    return {
        "hint": hint,
        "throughput": number("Throughput"),
        "latency_ms": {
            "p50": number("Median"),
            "mean": number("Average"),
            "min": number("Min"),
            "max": number("Max"),
        },
        "count": int(number("Count")),
        "command": " ".join(command),
    }


# -- (b) the bare Python loop (run in a child: `run.py python-loop ...`) -----------


def python_loop(model_path: str, seconds: float) -> dict[str, Any]:
    """One infer request, called in a loop from one Python thread.

    The model is compiled with ``PERFORMANCE_HINT=THROUGHPUT`` like the
    server's default configuration compiles it, and fed a writable
    float32 array shared with OpenVINO (``share_inputs=True``), as the
    server's worker does: the difference between twinfer's latency at
    concurrency 1 and this loop's is what the server adds.
    """
    import numpy as np
    import openvino as ov

    from twinfer.bench.report import percentiles

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(model_path), "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"}
    )
    request = compiled.create_infer_request()
    port = compiled.inputs[0]
    shape = [d.get_length() if d.is_static else 1 for d in port.get_partial_shape()]
    data = np.random.default_rng(0).random(shape).astype(port.get_element_type().to_dtype())
    for _ in range(20):  # warm-up
        request.infer({0: data}, share_inputs=True, share_outputs=True)
    latencies = []
    started = time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        request.infer({0: data}, share_inputs=True, share_outputs=True)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    return {
        "count": len(latencies),
        "throughput": len(latencies) / wall,
        # The same percentiles as twinfer bench's, so the two compare like for like.
        "latency_ms": percentiles(np.array(latencies), 1e3),
        "cpu_percent": 100 * cpu / wall,
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
    }


def run_python_loop(model_path: str, seconds: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "python-loop", model_path, str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Python loop failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- (c) twinfer in twistd ---------------------------------------------------------


class ProcSampler(threading.Thread):
    """Samples a process's RSS (``VmRSS``) and CPU time from ``/proc`` periodically."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name=f"sampler-{pid}")
        self.pid = pid
        self.interval = interval
        #: ``(monotonic_ns, rss_bytes, cpu_seconds)`` tuples.
        self.samples: list[tuple[int, int, float]] = []
        self._halt = threading.Event()

    def sample(self) -> tuple[int, int, float] | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                status = f.read()
            with open(f"/proc/{self.pid}/stat") as f:
                stat = f.read()
        except OSError:
            return None
        rss = re.search(r"VmRSS:\s+(\d+) kB", status)
        # Fields after the ")" closing the command name: utime is the 12th, stime the 13th.
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICKS
        return (time.monotonic_ns(), int(rss.group(1)) * 1024 if rss else 0, cpu)

    def run(self) -> None:
        while not self._halt.is_set():
            sample = self.sample()
            if sample is None:
                return
            self.samples.append(sample)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def between(self, start_ns: int, end_ns: int) -> list[tuple[int, int, float]]:
        return [s for s in self.samples if start_ns <= s[0] <= end_ns]

    def cpu_percent(self, start_ns: int, end_ns: int) -> float | None:
        inside = self.between(start_ns, end_ns)
        if len(inside) < 2:
            return None
        (t0, _, c0), (t1, _, c1) = inside[0], inside[-1]
        return 100 * (c1 - c0) / ((t1 - t0) / 1e9)


class Server:
    """``twistd -n twinfer`` on a free loopback port, default configuration."""

    def __init__(self, workdir: Path, config: str | None = None) -> None:
        self.log_path = workdir / f"twistd-{time.monotonic_ns()}.log"
        command = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile=",
            "--logfile=-",
            "twinfer",
            "--port",
            "tcp:0:interface=127.0.0.1",
        ]
        if config:
            command += ["--config", config]
        self._out = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, cwd=workdir
        )
        self.port = self._wait_listening()
        self.endpoint = f"tcp:127.0.0.1:{self.port}"
        self.sampler = ProcSampler(self.process.pid)
        self.sampler.start()

    def _wait_listening(self, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_path.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"twistd did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if hasattr(self, "sampler"):
            self.sampler.stop()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()


def run_bench(
    endpoint: str,
    model: str,
    concurrency: Sequence[int],
    duration: float,
    warmup: float,
    connections: int,
    processes: int,
) -> dict[str, Any]:
    """``python -m twinfer.bench`` in a child process; returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [
            sys.executable,
            "-m",
            "twinfer.bench",
            "--model",
            model,
            "--server",
            endpoint,
            "--concurrency",
            ",".join(map(str, concurrency)),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--connections",
            str(connections),
            "--processes",
            str(processes),
            "--quiet",
            "--json",
            str(out),
        ]
        budget = len(concurrency) * (duration + warmup + 30) + 60
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
        if done.returncode not in (0, 1):  # 1: some requests failed, reported in the JSON
            raise RuntimeError(f"twinfer bench failed:\n{done.stdout}\n{done.stderr}")
        sys.stderr.write(done.stdout)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def rss_summary(samples: Sequence[tuple[int, int, float]]) -> dict[str, Any]:
    """Start/end/max RSS (MiB) of a series, and end vs start in percent."""
    if not samples:
        return {}
    rss = [s[1] / 2**20 for s in samples]
    return {
        "start_mib": rss[0],
        "end_mib": rss[-1],
        "max_mib": max(rss),
        "min_mib": min(rss),
        "change_percent": 100 * (rss[-1] - rss[0]) / rss[0],
        "samples": len(rss),
    }


def measure_twinfer(model: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    server = Server(workdir, args.config)
    try:
        log(f"  twistd pid {server.process.pid} listening on {server.endpoint}")
        time.sleep(1.0)
        idle_rss = server.sampler.samples[-1][1] if server.sampler.samples else 0
        bench = run_bench(
            server.endpoint,
            model,
            args.concurrency,
            args.duration,
            args.warmup,
            args.connections,
            args.processes,
        )
        for point in bench["points"]:
            point["server_cpu_percent"] = server.sampler.cpu_percent(
                point["window_start_ns"], point["window_end_ns"]
            )
        series = server.sampler.samples
        result: dict[str, Any] = {
            "bench": bench,
            "rss": rss_summary(series),
            "rss_idle_mib": idle_rss / 2**20,
            "rss_series": [((t - series[0][0]) / 1e9, r / 2**20) for t, r, _ in series],
        }
        if args.soak and model == args.soak_model:
            log(f"  soak: concurrency {args.soak_concurrency} for {args.soak:g} s")
            soak = run_bench(
                server.endpoint,
                model,
                [args.soak_concurrency],
                args.soak,
                args.warmup,
                args.connections,
                args.processes,
            )
            point = soak["points"][0]
            window = server.sampler.between(point["window_start_ns"], point["window_end_ns"])
            point["server_cpu_percent"] = server.sampler.cpu_percent(
                point["window_start_ns"], point["window_end_ns"]
            )
            result["soak"] = {
                "bench": soak,
                "rss": rss_summary(window),
                "rss_series": [((t - window[0][0]) / 1e9, r / 2**20) for t, r, _ in window],
            }
        return result
    finally:
        server.stop()


# -- machine and report ------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from importlib import metadata

    cpu = "unknown"
    try:
        found = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    versions = {}
    for package in ("twinfer", "openvino", "twisted", "numpy", "onnx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} %"


def write_markdown(results: dict[str, Any], path: Path, plot: Path | None) -> None:
    m = results["machine"]
    lines = [
        "# twinfer benchmark results",
        "",
        f"Generated by `benchmarks/run.py {' '.join(results['argv'])}` on {m['date']}"
        f" in {results['elapsed_s'] / 60:.1f} min.",
        "",
    ]
    if results.get("note"):
        lines += [f"> **Note:** {results['note']}", ""]
    lines += [
        f"**Machine:** {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.1f} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.  ",
        "**Versions:** "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + (f"; twinfer commit {m['git_commit']}" if m["git_commit"] else "")
        + ".",
        "",
        "Ceiling: OpenVINO `benchmark_app -d CPU -hint throughput` (same model file, same "
        "machine). Floor: one infer request called in a Python loop (model compiled with "
        "`PERFORMANCE_HINT=THROUGHPUT`, as the server compiles it). twinfer: `twistd -n "
        "twinfer` with the default configuration, driven by `twinfer bench` (closed loop, "
        f"{results['settings']['duration']:g} s per point after "
        f"{results['settings']['warmup']:g} s warm-up, "
        f"{results['settings']['connections']} connection(s), "
        f"{results['settings']['processes']} client process(es)).",
        "",
        "## Targets",
        "",
        "| model | target | reached | |",
        "|---|---|---|---|",
    ]
    for name, r in results["models"].items():
        t = r["targets"]
        goal = results["targets"].get(name)
        if goal is not None:
            lines.append(
                f"| {name} | throughput ≥ {goal:.0%} of benchmark_app | "
                f"{_pct(100 * t['best_ratio'])} (best {t['best_throughput']:.1f} inf/s at "
                f"concurrency {t['best_concurrency']}) | "
                f"{'✅' if t['best_ratio'] >= goal else '❌'} |"
            )
        added = t["server_added_p50_us"]
        lines.append(
            f"| {name} | server-added latency at concurrency 1 ≤ 150 µs (p50) | "
            f"{added:.0f} µs (twinfer p50 {t['twinfer_p50_c1_ms']:.3f} ms − direct "
            f"{t['direct_p50_ms']:.3f} ms) | {'✅' if added <= 150 else '❌'} |"
        )
        soak = r["twinfer"].get("soak")
        if soak:
            rss = soak["rss"]
            flat = abs(rss["change_percent"]) <= 10 and rss["max_mib"] <= rss["start_mib"] * 1.1
            lines.append(
                f"| {name} | RSS flat (±10 %) over {soak['bench']['duration_s']:g} s at "
                f"concurrency {soak['bench']['points'][0]['concurrency']} | start "
                f"{rss['start_mib']:.0f} MiB, end {rss['end_mib']:.0f} MiB, max "
                f"{rss['max_mib']:.0f} MiB ({rss['change_percent']:+.1f} %) | "
                f"{'✅' if flat else '❌'} |"
            )
    disturbed = [
        name
        for name, r in results["models"].items()
        if max(r.get("other_processes_cores", {}).values(), default=0.0) > 0.2
    ]
    if disturbed:
        lines += [
            "",
            f"⚠ Other processes used more than 0.2 cores while {', '.join(disturbed)} "
            "was measured (see below): the verdicts above are not trustworthy.",
        ]
    lines += [""]
    if plot is not None:
        lines += [f"![throughput and p99 latency against concurrency]({plot.name})", ""]
    for name, r in results["models"].items():
        ceiling = r["benchmark_app"]["throughput"]["throughput"]
        lines += [
            f"## {name}",
            "",
            "| run | inf/s | vs ceiling | p50 ms | p90 ms | p99 ms | max ms | server queue p50 ms "
            "| server compute p50 ms | other p50 ms | errors | server CPU | client CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for hint in ("throughput", "latency"):
            b = r["benchmark_app"][hint]
            lines.append(
                f"| benchmark_app -hint {hint} | {b['throughput']:.1f} | "
                f"{_pct(100 * b['throughput'] / ceiling)} | {_f(b['latency_ms']['p50'])} | – | – | "
                f"{_f(b['latency_ms']['max'])} | – | – | – | – | – | – |"
            )
        p = r["python_loop"]
        lines.append(
            f"| Python loop, 1 request | {p['throughput']:.1f} | "
            f"{_pct(100 * p['throughput'] / ceiling)} | {_f(p['latency_ms']['p50'])} | "
            f"{_f(p['latency_ms']['p90'])} | {_f(p['latency_ms']['p99'])} | "
            f"{_f(p['latency_ms']['max'])} | – | – | – | – | {_pct(p['cpu_percent'])} | – |"
        )
        for point in r["twinfer"]["bench"]["points"]:
            lat = point["latency_ms"]
            lines.append(
                f"| twinfer, concurrency {point['concurrency']} | {point['throughput']:.1f} | "
                f"{_pct(100 * point['throughput'] / ceiling)} | {_f(lat['p50'])} | "
                f"{_f(lat['p90'])} | {_f(lat['p99'])} | {_f(lat['max'])} | "
                f"{_f(point['queue_ms']['p50'])} | {_f(point['compute_ms']['p50'])} | "
                f"{_f(point['overhead_ms']['p50'])} | {point['error_count']} | "
                f"{_pct(point.get('server_cpu_percent'))} | {_pct(point['client_cpu_percent'])} |"
            )
        rss = r["twinfer"]["rss"]
        other = r.get("other_processes_cores", {})
        if other:
            worst = max(other.values())
            lines += [
                "",
                "CPU used by *other* processes during each phase (cores, out of "
                f"{m['cores']}): "
                + ", ".join(f"{phase} {cores:.2f}" for phase, cores in other.items())
                + (
                    ". **Other load above 0.2 cores: these figures, and the ratios between "
                    "phases measured at different moments, are not trustworthy.**"
                    if worst > 0.2
                    else "."
                ),
            ]
        lines += [
            "",
            f"Server RSS during the sweep: idle {r['twinfer']['rss_idle_mib']:.0f} MiB, start "
            f"{rss['start_mib']:.0f} MiB, end {rss['end_mib']:.0f} MiB, max "
            f"{rss['max_mib']:.0f} MiB. CPU figures are percent of one core; the server's "
            'is its whole process (reactor and device threads). "other" is client latency '
            "minus the server's queue and compute times: network, both codecs, both event "
            "loops.",
            "",
        ]
    lines += scheduling_sections(path.parent)
    lines += [
        "## Reproduce",
        "",
        "```",
        "python benchmarks/run.py            # both models, under 15 minutes",
        "python benchmarks/run.py --soak 300 # plus a 5-minute RSS soak at concurrency 64",
        "```",
        "",
        "Raw figures: `results.json`.",
        "",
    ]
    path.write_text("\n".join(lines))


def scheduling_sections(directory: Path) -> list[str]:
    """The latest batching and failover measurements (``batching.py``,
    ``failover.py``), quoted so that RESULTS.md keeps every figure in one place."""
    lines: list[str] = []
    batching = directory / "BATCHING.md"
    if batching.exists():
        body = batching.read_text("utf-8").splitlines()
        lines += ["## Dynamic batching (`batching.py`)", "", *body[1:], ""]
    failover = directory / "failover.json"
    if failover.exists():
        f = json.loads(failover.read_text("utf-8"))
        lines += [
            "## Failover (`failover.py`)",
            "",
            f"Two devices serve `{f['model']}` from one shared queue; device `a` is made to "
            f"fail (every inference raises `DeviceError`) after half of the {f['requests']} "
            f"requests, with {f['concurrency']} clients in a closed loop.",
            "",
            f"- answered: {f['answered']} of {f['requests']}; **lost: {f['lost']}**; "
            f"outcomes: {f['outcomes']}",
            f"- device a: {f['device_a']['state']} after "
            f"{f['device_a']['jobs_done_before_fault']} jobs; device b carried "
            f"{f['device_b']['jobs_done']} jobs",
            f"- dispatcher: {f['dispatcher']}",
            "",
        ]
    return lines


def write_plot(results: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install 'twinfer[bench]'): no plot")
        return None
    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        r = results["models"][name]
        points = r["twinfer"]["bench"]["points"]
        conc = [p["concurrency"] for p in points]
        ax = axes[row][0]
        ax.plot(conc, [p["throughput"] for p in points], "o-", label="twinfer")
        ax.axhline(
            r["benchmark_app"]["throughput"]["throughput"],
            color="tab:red",
            ls="--",
            label="benchmark_app -hint throughput (ceiling)",
        )
        ax.axhline(
            r["python_loop"]["throughput"], color="tab:gray", ls=":", label="Python loop, 1 request"
        )
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("inferences/s")
        ax.set_title(f"{name}: throughput")
        ax.legend(fontsize="small", loc="lower right")
        ax = axes[row][1]
        ax.plot(conc, [p["latency_ms"]["p99"] for p in points], "o-", label="twinfer p99")
        ax.plot(
            conc, [p["latency_ms"]["p50"] for p in points], "s--", alpha=0.6, label="twinfer p50"
        )
        ax.axhline(
            r["python_loop"]["latency_ms"]["p50"],
            color="tab:gray",
            ls=":",
            label="Python loop p50 (direct infer)",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("latency, ms")
        ax.set_title(f"{name}: latency")
        ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- main --------------------------------------------------------------------------

#: Throughput targets as a fraction of benchmark_app's (issue 3).
TARGETS = {"resnet50": 0.95, "squeezenet": 0.85}


def targets(r: dict[str, Any]) -> dict[str, Any]:
    ceiling = r["benchmark_app"]["throughput"]["throughput"]
    points = r["twinfer"]["bench"]["points"]
    best = max(points, key=lambda p: p["throughput"])
    c1 = next((p for p in points if p["concurrency"] == 1), points[0])
    direct = r["python_loop"]["latency_ms"]["p50"]
    return {
        "best_throughput": best["throughput"],
        "best_concurrency": best["concurrency"],
        "best_ratio": best["throughput"] / ceiling,
        "twinfer_p50_c1_ms": c1["latency_ms"]["p50"],
        "direct_p50_ms": direct,
        "server_added_p50_us": 1e3 * (c1["latency_ms"]["p50"] - direct),
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="resnet50,squeezenet",
        help="builtin models to measure (default resnet50,squeezenet)",
    )
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per twinfer point (default 20, --quick 4)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds per point (default 3, --quick 1)",
    )
    parser.add_argument(
        "--ceiling-seconds",
        type=float,
        default=None,
        help="benchmark_app -t per hint (default 20, --quick 5)",
    )
    parser.add_argument(
        "--loop-seconds",
        type=float,
        default=None,
        help="seconds of the Python loop (default 10, --quick 3)",
    )
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument(
        "--processes", type=int, default=1, help="twinfer bench client processes (default 1)"
    )
    parser.add_argument("--config", help="twinfer config for the server (default: embedded)")
    parser.add_argument("--quick", action="store_true", help="short runs, to check the tooling")
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also run a long RSS soak of this many seconds (e.g. 300)",
    )
    parser.add_argument("--soak-model", default="resnet50")
    parser.add_argument("--soak-concurrency", type=int, default=64)
    parser.add_argument("--note", default="", help="a note printed at the top of RESULTS.md")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (4.0 if quick else 20.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 3.0)
    args.ceiling_seconds = args.ceiling_seconds or (5.0 if quick else 20.0)
    args.loop_seconds = args.loop_seconds or (3.0 if quick else 10.0)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.models = [m for m in args.models.split(",") if m]
    return args


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["python-loop"]:
        print(json.dumps(python_loop(argv[1], float(argv[2]))))
        return 0
    args = parse_args(argv)
    from twinfer.engines.builtin import onnx_light_model_path

    started = time.monotonic()
    results: dict[str, Any] = {
        "argv": list(argv),
        "machine": machine(),
        "note": args.note,
        "targets": TARGETS,
        "settings": {k: v for k, v in vars(args).items() if k != "out" and k != "models"},
        "models": {},
    }
    results["settings"]["out"] = str(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="twinfer-bench-") as tmp:
        for name in args.models:
            path = str(onnx_light_model_path(name))
            log(f"{name}: benchmark_app -hint throughput ({args.ceiling_seconds:g} s)")
            other: dict[str, float] = {}
            phase = Interference()
            ceiling = {"throughput": benchmark_app(path, "throughput", args.ceiling_seconds)}
            other["benchmark_app -hint throughput"] = phase.stop()
            log(f"{name}: benchmark_app -hint latency ({args.ceiling_seconds:g} s)")
            phase = Interference()
            ceiling["latency"] = benchmark_app(path, "latency", args.ceiling_seconds)
            other["benchmark_app -hint latency"] = phase.stop()
            log(f"{name}: Python loop ({args.loop_seconds:g} s)")
            phase = Interference()
            loop = run_python_loop(path, args.loop_seconds)
            other["Python loop"] = phase.stop()
            log(f"{name}: twinfer at concurrency {args.concurrency}")
            phase = Interference()
            twinfer = measure_twinfer(name, args, Path(tmp))
            other["twinfer (sweep and soak)"] = phase.stop()
            r = {
                "model_path": path,
                "benchmark_app": ceiling,
                "python_loop": loop,
                "twinfer": twinfer,
                "other_processes_cores": other,
            }
            r["targets"] = targets(r)
            results["models"][name] = r
            log(
                f"{name}: ceiling {ceiling['throughput']['throughput']:.1f} inf/s, best twinfer "
                f"{r['targets']['best_throughput']:.1f} ({r['targets']['best_ratio']:.0%}), "
                f"server-added p50 at c=1 {r['targets']['server_added_p50_us']:.0f} µs"
            )
    results["elapsed_s"] = time.monotonic() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot = write_plot(results, args.out / "results.png")
    write_markdown(results, args.out / "RESULTS.md", plot)
    log(f"wrote {args.out / 'RESULTS.md'} in {results['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
