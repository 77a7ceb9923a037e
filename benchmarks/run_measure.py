"""What ``run.py`` measures with: the machine, benchmark_app, the Python loop,
a real ``twistd`` server sampled from ``/proc``, and ``twinfer bench``.

Every function here starts processes or reads ``/proc``; the figures it
returns are plain dicts (``results.json``), turned into targets, RESULTS.md
and the plot by ``run_report.py``.
"""

from __future__ import annotations

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
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import procstat

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LISTENING = re.compile(r"twinfer listening on tcp:127\.0\.0\.1:(\d+)")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(message: str) -> None:
    """Progress on stderr, timestamped (the results go to files)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the machine -----------------------------------------------------------------


def cpu_facts(cpuinfo: str) -> dict[str, Any]:
    """The CPU model and the vector extensions OpenVINO's CPU plugin uses,
    from the text of ``/proc/cpuinfo`` (ratios between engines differ by CPU:
    Intel with AMX against AMD with AVX2 only)."""
    found = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    flags_line = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    return {
        "cpu": found.group(1).strip() if found else "unknown",
        "avx2": "avx2" in flags,
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "amx": sorted(f for f in flags if f.startswith("amx")),
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from importlib import metadata

    try:
        facts = cpu_facts(Path("/proc/cpuinfo").read_text())
    except OSError:
        facts = cpu_facts("")
    versions: dict[str, str | None] = {}
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
        **facts,
        "cores": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


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


# -- benchmark_app and the Python loop ---------------------------------------------


def parse_benchmark_app(text: str) -> dict[str, Any]:
    """Throughput (FPS) and latency (ms) from ``benchmark_app``'s output."""

    def number(label: str) -> float:
        found = re.search(rf"{label}:\s+([\d.]+)", text)
        if not found:
            raise RuntimeError(f"no {label!r} in benchmark_app's output:\n{text[-2000:]}")
        return float(found.group(1))

    return {
        "throughput": number("Throughput"),
        "latency_ms": {
            "p50": number("Median"),
            "mean": number("Average"),
            "min": number("Min"),
            "max": number("Max"),
        },
        "count": int(number("Count")),
    }


def benchmark_app(model_path: str, hint: str, seconds: float) -> dict[str, Any]:
    """Run OpenVINO's ``benchmark_app -hint HINT``; its throughput and latency figures."""
    command = [str(BIN / "benchmark_app"), "-m", model_path, "-d", "CPU", "-hint", hint]
    command += ["-t", str(max(1, round(seconds)))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 300)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark_app failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {"hint": hint, **parse_benchmark_app(done.stdout), "command": " ".join(command)}


def python_loop(model_path: str, seconds: float) -> dict[str, Any]:
    """One infer request, called in a loop from one Python thread (run in a child).

    The model is compiled with ``PERFORMANCE_HINT=THROUGHPUT`` and fed a
    writable float32 array shared with OpenVINO, as the server's worker does.
    Afterwards the same model is compiled a second time with
    ``PERFORMANCE_HINT=LATENCY`` and run once: the RSS that second compiled
    model adds is the yardstick of the issue's target "the second engine
    costs at most the compiled model's size".
    """
    import numpy as np
    import openvino as ov

    from twinfer.bench.report import percentiles

    pid = os.getpid()
    rss_start = procstat.rss_bytes(pid) or 0
    core = ov.Core()
    model = core.read_model(model_path)
    compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    request = compiled.create_infer_request()
    port = compiled.inputs[0]
    shape = [d.get_length() if d.is_static else 1 for d in port.get_partial_shape()]
    data = np.random.default_rng(0).random(shape).astype(port.get_element_type().to_dtype())
    for _ in range(20):  # warm-up
        request.infer({0: data}, share_inputs=True, share_outputs=True)
    rss_first = procstat.rss_bytes(pid) or 0
    latencies = []
    started = time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        request.infer({0: data}, share_inputs=True, share_outputs=True)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    second = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    second_request = second.create_infer_request()
    for _ in range(5):
        second_request.infer({0: data}, share_inputs=True, share_outputs=True)
    rss_second = procstat.rss_bytes(pid) or 0
    return {
        "count": len(latencies),
        "throughput": len(latencies) / wall,
        "latency_ms": percentiles(np.array(latencies), 1e3),
        "cpu_percent": 100 * cpu / wall,
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "rss_mib": {
            "runtime_and_first_engine": (rss_first - rss_start) / 2**20,
            "second_engine": (rss_second - rss_first) / 2**20,
        },
    }


def run_python_loop(model_path: str, seconds: float) -> dict[str, Any]:
    """:func:`python_loop` in a child (``run.py python-loop PATH SECONDS``)."""
    done = subprocess.run(
        [sys.executable, str(HERE / "run.py"), "python-loop", model_path, str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Python loop failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- the server's configuration ----------------------------------------------------


def base_config(path: str | None) -> dict[str, Any]:
    """The configuration to serve: ``path``, or twinfer's embedded default."""
    if path:
        return tomllib.loads(Path(path).read_text("utf-8"))
    return tomllib.loads(resources.files("twinfer").joinpath("default.toml").read_text("utf-8"))


def server_config(base: Mapping[str, Any], model: str, execution: str | None) -> dict[str, Any]:
    """``base`` serving only ``model`` (so its RSS is that model's alone); with
    ``execution``, every device gets ``execution = EXECUTION`` and loses a
    ``PERFORMANCE_HINT`` property (an explicit hint would override the mode)."""
    config = json.loads(json.dumps(base))  # a deep copy
    models = [m for m in config.get("models", []) if m.get("name") == model]
    if not models:
        raise ValueError(f"the configuration serves no model named {model!r}")
    config["models"] = models
    if execution is not None:
        for device in config.get("devices", []):
            device["execution"] = execution
            properties = device.get("properties")
            if isinstance(properties, dict):
                properties.pop("PERFORMANCE_HINT", None)
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def to_toml(config: Mapping[str, Any]) -> str:
    """``config`` as TOML: top-level tables and arrays of tables, nested values inline."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in config.items() if not _is_table(v)]
    for key, value in config.items():
        if isinstance(value, dict):
            lines += ["", f"[{_toml_key(key)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                lines += ["", f"[[{_toml_key(key)}]]"]
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


# -- the server, sampled -------------------------------------------------------------


def stop_process(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """Stop ``process`` if it still runs: SIGTERM (a server drains and exits),
    then SIGKILL if it has not exited after ``timeout`` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ProcSampler(threading.Thread):
    """Samples a process's RSS and per-thread CPU time (:mod:`procstat`) periodically."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name=f"sampler-{pid}")
        self.pid = pid
        self.interval = interval
        #: ``(monotonic_ns, rss_bytes, {tid: (name, cpu_seconds)})`` tuples.
        self.samples: list[tuple[int, int, procstat.ThreadSample]] = []
        self._halt = threading.Event()

    def sample(self) -> tuple[int, int, procstat.ThreadSample] | None:
        threads = procstat.sample(self.pid)
        rss = procstat.rss_bytes(self.pid)
        if rss is None or not threads:
            return None
        return time.monotonic_ns(), rss, threads

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

    def rss_now(self) -> int:
        return procstat.rss_bytes(self.pid) or 0

    def cpu_between(
        self, start_ns: int, end_ns: int
    ) -> tuple[float, dict[str, float | None]] | None:
        """``(seconds spanned, CPU seconds per role)`` between the first and last
        samples inside ``[start_ns, end_ns]``; ``None`` with fewer than two.
        ``device`` is ``None`` if the server does not name its device threads
        (their time is then in ``other``)."""
        inside = [s for s in self.samples if start_ns <= s[0] <= end_ns]
        if len(inside) < 2:
            return None
        (t0, _, before), (t1, _, after) = inside[0], inside[-1]
        used: dict[str, float | None] = {
            **procstat.by_role(self.pid, procstat.delta(before, after))
        }
        if not any(procstat.role(self.pid, t, name) == "device" for t, (name, _) in after.items()):
            used["device"] = None
        return (t1 - t0) / 1e9, used


class Server:
    """``twistd -n twinfer`` on a free loopback port, serving ``config``."""

    def __init__(self, workdir: Path, config: Mapping[str, Any], label: str) -> None:
        stamp = time.monotonic_ns()
        self.config_path = workdir / f"config-{label}-{stamp}.toml"
        self.config_path.write_text(to_toml(config))
        self.log_path = workdir / f"twistd-{label}-{stamp}.log"
        command = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "twinfer"]
        command += ["--port", "tcp:0:interface=127.0.0.1", "--config", str(self.config_path)]
        self._out = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, cwd=workdir
        )
        self.port = self._wait_listening()
        self.endpoint = f"tcp:127.0.0.1:{self.port}"
        self.sampler = ProcSampler(self.process.pid)
        self.sampler.start()

    def _wait_listening(self, timeout: float = 300) -> int:
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
        stop_process(self.process)
        self._out.close()


def run_bench(endpoint: str, model: str, options: Sequence[str], budget: float) -> dict[str, Any]:
    """``python -m twinfer.bench`` with ``options`` in a child process; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "twinfer.bench", "--model", model]
        command += ["--server", endpoint, *options, "--quiet", "--json", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget + 120)
        if done.returncode not in (0, 1):  # 1: some requests failed, reported in the JSON
            raise RuntimeError(f"twinfer bench failed:\n{done.stdout}\n{done.stderr}")
        sys.stderr.write(done.stdout)
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def server_cpu(sampler: ProcSampler, point: Mapping[str, Any]) -> dict[str, Any] | None:
    """The server's CPU over a point's window: percent of one core and
    microseconds per request for each role (reactor, device, other, total)."""
    found = sampler.cpu_between(point["window_start_ns"], point["window_end_ns"])
    if found is None:
        return None
    span, seconds = found
    # Requests answered in the sampled span, at the point's measured rate.
    requests = point["throughput"] * span
    return {
        "span_s": span,
        "percent": {k: None if v is None else 100 * v / span for k, v in seconds.items()},
        "us_per_request": {
            k: (1e6 * v / requests if requests and v is not None else None)
            for k, v in seconds.items()
        },
    }


def rss_summary(samples: Sequence[tuple[int, int, Any]]) -> dict[str, Any]:
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
