"""The server's CPU per request, by thread: what twinfer adds around OpenVINO.

Starts ``twistd -n twinfer`` (default configuration, a free loopback port)
unless ``--server``/``--pid`` name one already running, then, for each model
and concurrency, drives it with ``twinfer bench -n N -w 0`` (exactly N
requests) and reads every thread's CPU time before and after from
``/proc/PID/task/TID/schedstat`` (nanoseconds; ``stat``'s utime+stime in
clock ticks where schedstat is missing).  Per request it prints:

* **reactor**: the main thread (TID = PID), which runs the Twisted reactor:
  parsing, validation, queueing, Deferred chains, encoding, writing;
* **device**: the worker threads' Python side (``PoolThread-twinfer-*``,
  named by ``py-spy dump`` when it is installed): the thread hop and the
  ``infer()`` call around OpenVINO;
* **other**: every other thread, mostly OpenVINO's own inference threads;
* **total**: the whole process.

CPU *time* per request is much less sensitive than latency to other load on
the machine, but not immune (caches, frequency): ``--repeat`` runs each
point several times and prints the spread.  The CPU model is printed first:
figures compare only within one machine kind.

    .venv/bin/python benchmarks/server_cpu.py               # tiny and squeezenet, c=1 and 16, 3x
    .venv/bin/python benchmarks/server_cpu.py -m tiny -c 16 --repeat 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"twinfer listening on tcp:127\.0\.0\.1:(\d+)")
TICKS = os.sysconf("SC_CLK_TCK")
#: Requests per measured point, by model (the light models take ~10 ms each here).
DEFAULT_REQUESTS = {"tiny": 4000, "squeezenet": 600}
ROLES = ("reactor", "device", "other", "total")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``) and the number of CPUs."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """CPU time so far of every thread of ``pid``, in nanoseconds, by TID."""
    times: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the thread ended meanwhile
            times[int(task.name)] = (int(fields[11]) + int(fields[12])) * 10**9 // TICKS
    return times


def device_threads(pid: int) -> set[int]:
    """TIDs of the device workers' Python threads, from ``py-spy dump`` (empty
    without py-spy, or without the right to trace the process)."""
    spy = shutil.which("py-spy", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None:
        return set()
    try:
        dump = subprocess.run(
            [spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {
        int(m.group(1))
        for m in re.finditer(r'^Thread (\d+) \([^)]*\): "PoolThread-twinfer-', dump, re.M)
    }


def split_by_role(
    before: dict[int, int], after: dict[int, int], pid: int, devices: set[int]
) -> dict[str, int]:
    """Nanoseconds spent between two snapshots, by role (threads that ended
    meanwhile are lost; those born meanwhile count from zero)."""
    spent = {role: 0 for role in ROLES}
    for tid, ns in after.items():
        delta = ns - before.get(tid, 0)
        role = "reactor" if tid == pid else "device" if tid in devices else "other"
        spent[role] += delta
        spent["total"] += delta
    return spent


class Server:
    """``twistd -n twinfer`` on a free loopback port, default configuration."""

    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "twistd.log"
        command = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "twinfer"]
        command += ["--port", "tcp:0:interface=127.0.0.1"]
        self._out = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, cwd=workdir
        )
        self.pid = self.process.pid
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.process.poll() is None:
            found = LISTENING.search(self.log_path.read_text(errors="replace"))
            if found:
                self.endpoint = f"tcp:127.0.0.1:{found.group(1)}"
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"twistd did not start:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()


def bench(endpoint: str, model: str, concurrency: int, requests: int) -> int:
    """Run ``twinfer bench`` for exactly ``requests`` requests; returns how many were answered."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [sys.executable, "-m", "twinfer.bench", "-m", model, "-s", endpoint]
        command += ["-c", str(concurrency), "-n", str(requests), "-w", "0", "-q"]
        subprocess.run([*command, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
        point = json.loads(out.read_text())["points"][0]
    return int(point["count"]) + int(point["error_count"])


def measure(
    pid: int, endpoint: str, model: str, concurrency: int, requests: int, devices: set[int]
) -> dict[str, float]:
    """Microseconds of CPU per request, by role, over one bench run."""
    before = thread_cpu_ns(pid)
    answered = bench(endpoint, model, concurrency, requests)
    spent = split_by_role(before, thread_cpu_ns(pid), pid, devices)
    return {role: ns / 1000 / answered for role, ns in spent.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--models", default="tiny,squeezenet", help="comma-separated")
    parser.add_argument("-c", "--concurrency", default="1,16", help="comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="runs per point (default 3)")
    parser.add_argument(
        "-n", "--requests", type=int, help="requests per run (default: tiny 4000, others 600)"
    )
    parser.add_argument("--server", help="measure this running server (tcp:HOST:PORT)")
    parser.add_argument("--pid", type=int, help="the process id of --server")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    args = parser.parse_args(argv)
    if (args.server is None) != (args.pid is None):
        parser.error("--server and --pid go together")
    models = args.models.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    print(f"CPU: {cpu_model()}")
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if args.server is None:
            server = Server(Path(tmp))
            pid, endpoint = server.pid, server.endpoint
        else:
            pid, endpoint = args.pid, args.server
        try:
            runs = run_points(pid, endpoint, models, concurrencies, args)
        finally:
            if server is not None:
                server.stop()
    if args.json is not None:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "runs": runs}, indent=1) + "\n")
    return 0


def run_points(
    pid: int, endpoint: str, models: list[str], concurrencies: list[int], args: Any
) -> list[dict[str, Any]]:
    """Warm each model up, then measure every point ``args.repeat`` times and print a table."""
    runs: list[dict[str, Any]] = []
    devices: set[int] = set()
    for model in models:
        bench(endpoint, model, max(concurrencies), 50)  # compile caches, connections, threads
        devices = devices or device_threads(pid)
    print(f"server pid {pid} at {endpoint}; device threads: {sorted(devices) or 'not named'}")
    print("µs of CPU per request, median of runs [min-max]")
    print(f"{'model':<12}{'conc':>5}" + "".join(f"{role:>22}" for role in ROLES))
    for model in models:
        requests = args.requests or DEFAULT_REQUESTS.get(model, 600)
        for concurrency in concurrencies:
            figures = [
                measure(pid, endpoint, model, concurrency, requests, devices)
                for _ in range(args.repeat)
            ]
            runs += [
                {"model": model, "concurrency": concurrency, "requests": requests, **f}
                for f in figures
            ]
            cells = []
            for role in ROLES:
                values = [f[role] for f in figures]
                cells.append(
                    f"{statistics.median(values):8.0f} [{min(values):.0f}-{max(values):.0f}]"
                )
            print(f"{model:<12}{concurrency:>5}" + "".join(f"{c:>22}" for c in cells), flush=True)
    return runs


if __name__ == "__main__":
    raise SystemExit(main())
