#!/usr/bin/env python3
"""Measure twinfer's transports against each other on one server, in one run (issue 11).

One ``twistd`` with ``--port``, ``--grpc-port``, ``--http-port`` and
``--allow-shm`` on loopback serves ``light_squeezenet`` (a 600 KB input);
at concurrency 1 and 16 it is driven over

- **binary**: ``twinfer bench`` (one process, one connection);
- **binary+shm**: ``twinfer bench --shared-memory``;
- **grpc**: ``tritonclient.grpc``, raw tensors;
- **grpc+shm**: ``tritonclient.grpc`` with ``tritonclient.utils.shared_memory``
  regions for inputs and outputs ("not available" if the server answers
  UNIMPLEMENTED);
- **http**: ``tritonclient.http`` with ``binary_data=True``.

The Triton clients run as ``transports_clients.py`` processes, each user a
thread with its own client calling the blocking ``infer()``; at concurrency
16 the users are spread over ``--client-processes`` processes (default 4 × 4
users), so that one Python process's GIL does not cap the rate (compare with
``--client-processes 1``).

Per row: throughput, p50, p99, errors, the client processes' own CPU per
request, and the server's CPU per request by thread role from ``/proc``
(the front ends' threads named by ``transports_server.py``, which starts
twistd).  benchmark_app's two hints give the ceiling.  Then issue 11's
targets, ``transports.json`` and ``TRANSPORTS.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat  # noqa: E402 - this directory first
from run_measure import (  # noqa: E402
    HERE,
    Interference,
    ProcSampler,
    base_config,
    benchmark_app,
    log,
    machine,
    run_bench,
    server_config,
    stop_process,
    to_toml,
)
from run_report import machine_lines  # noqa: E402
from transports_report import (  # noqa: E402
    CONCURRENCIES,
    TRANSPORTS,
    bench_client_cpu_us,
    compute_targets,
    cpu_by_role,
    fine_role,
    merge_client_parts,
    per_request,
    render_markdown,
    target_lines,
)

#: Seconds the server takes to start and compile, benchmark_app to compile,
#: and a client process to start and connect (the 2-core AMD kind), for the estimate.
SERVER_START_S = 10.0
BENCHMARK_APP_START_S = 6.0
CLIENT_START_S = 4.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="squeezenet", help="a model of the default config")
    parser.add_argument("--duration", type=float, help="seconds per point (default 15, quick 2)")
    parser.add_argument("--warmup", type=float, help="warm-up per point (default 2, quick 1)")
    parser.add_argument(
        "--ceiling-seconds", type=float, help="benchmark_app -t per hint (default 15, quick 2)"
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=4,
        help="Triton client processes at concurrency 16 (users split over them; default 4)",
    )
    parser.add_argument(
        "--transports", default=",".join(TRANSPORTS), help="which rows (default: all five)"
    )
    parser.add_argument("--config", help="twinfer config to start from (default: embedded)")
    parser.add_argument("--quick", action="store_true", help="everything short: a smoke run")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)

    def pick(value: float | None, default: float, quick: float) -> float:
        return value if value is not None else (quick if args.quick else default)

    args.duration = pick(args.duration, 15.0, 2.0)
    args.warmup = pick(args.warmup, 2.0, 1.0)
    args.ceiling_seconds = pick(args.ceiling_seconds, 15.0, 2.0)
    args.transports = [t for t in args.transports.split(",") if t]
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown:
        parser.error(f"unknown transports {sorted(unknown)}; known: {', '.join(TRANSPORTS)}")
    if args.client_processes < 1:
        parser.error("--client-processes must be at least 1")
    return args


def estimate_seconds(args: argparse.Namespace) -> float:
    """How long the run should take (without other load on the machine)."""
    ceiling = 2 * (args.ceiling_seconds + BENCHMARK_APP_START_S)
    points = len(args.transports) * len(CONCURRENCIES)
    return SERVER_START_S + ceiling + points * (args.duration + args.warmup + CLIENT_START_S)


class OtherProcesses:
    """Cores used by other processes during a phase: :class:`run_measure.Interference`
    (the machine's busy time minus this script's and its reaped children's) less
    the server's, which runs on unreaped."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._started = time.monotonic()
        self._server_cpu = self._server_seconds()
        self._machine = Interference()

    def _server_seconds(self) -> float:
        return sum(cpu for _, cpu in procstat.sample(self.server_pid).values())

    def stop(self) -> float:
        cores = self._machine.stop()
        wall = max(time.monotonic() - self._started, 1e-9)
        server = (self._server_seconds() - self._server_cpu) / wall
        return max(0.0, cores - server)


class TransportServer:
    """``twistd twinfer`` (through ``transports_server.py``) listening on every transport."""

    def __init__(self, workdir: Path, config: Mapping[str, Any], timeout: float = 300) -> None:
        config_path = workdir / "config.toml"
        config_path.write_text(to_toml(config))
        self.log_path = workdir / "twistd.log"
        # The port file is a pipe: its one JSON line says every port listens,
        # its end that the server exited first (no polling).
        port_read, port_write = os.pipe()
        command = [sys.executable, str(HERE / "transports_server.py")]
        command += ["-n", "--pidfile=", "--logfile=-", "twinfer", "--allow-shm"]
        for option in ("--port", "--grpc-port", "--http-port"):
            command += [option, "tcp:0:interface=127.0.0.1"]
        command += ["--config", str(config_path), f"--port-file=/dev/fd/{port_write}"]
        self._out = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.process = subprocess.Popen(
                command,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                pass_fds=(port_write,),
            )
        finally:
            os.close(port_write)
        try:
            line = _read_line(port_read, timeout)
        finally:
            os.close(port_read)
        if not line:
            self.stop()
            raise RuntimeError(f"twistd did not start:\n{self.log_path.read_text()[-3000:]}")
        self.ports: dict[str, int] = json.loads(line)
        self.sampler = ProcSampler(self.process.pid)
        self.sampler.start()

    def cpu_per_request(self, point: Mapping[str, Any]) -> dict[str, Any] | None:
        """The server's CPU per request by role over ``point``'s window (None: too short)."""
        inside = [
            s
            for s in self.sampler.samples
            if point["window_start_ns"] <= s[0] <= point["window_end_ns"]
        ]
        if len(inside) < 2:
            return None
        (t0, _, before), (t1, _, after) = inside[0], inside[-1]
        seconds = cpu_by_role(self.process.pid, procstat.delta(before, after))
        return per_request(seconds, (t1 - t0) / 1e9, point["throughput"])

    def others(self) -> OtherProcesses:
        """Starts measuring the CPU of every process but this script, its children and
        the server."""
        return OtherProcesses(self.process.pid)

    def threads_by_role(self) -> dict[str, dict[str, int]]:
        """The server's threads now: ``{role: {OS name: how many}}`` (for the report)."""
        found: dict[str, dict[str, int]] = {}
        for tid, (name, _) in procstat.sample(self.process.pid).items():
            names = found.setdefault(fine_role(self.process.pid, tid, name), {})
            names[name] = names.get(name, 0) + 1
        return found

    def stop(self) -> None:
        if hasattr(self, "sampler"):
            self.sampler.stop()
        stop_process(self.process)
        self._out.close()


def _read_line(fd: int, timeout: float) -> bytes:
    """The first line written to the pipe ``fd`` (``b""`` if it closed or ``timeout`` passed)."""
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b""
        chunk = os.read(fd, 4096)
        if not chunk:
            return b""
        data += chunk
    return data.split(b"\n", 1)[0]


def split_users(concurrency: int, processes: int) -> list[int]:
    """``concurrency`` users over at most ``processes`` processes, as evenly as possible."""
    n = max(1, min(processes, concurrency))
    return [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]


def run_triton_clients(
    kind: str, url: str, model: str, users: Sequence[int], args: argparse.Namespace
) -> dict[str, Any]:
    """One point from ``transports_clients.py`` processes; a merged point, or
    ``{"unavailable": reason}``."""
    script = str(HERE / "transports_clients.py")
    settings = [str(args.duration), str(args.warmup)]
    children = [
        subprocess.Popen(
            [sys.executable, script, kind, url, model, str(n), *settings],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in users
    ]
    try:
        answers = [_read_json(child) for child in children]
        refused = next((a["unavailable"] for a in answers if "unavailable" in a), None)
        if refused is not None or not all(a.get("ready") for a in answers):
            return {
                "unavailable": refused or "a client process failed to start (see the run's stderr)"
            }
        start_at = time.monotonic_ns() + 200_000_000  # everyone starts together
        for child in children:
            assert child.stdin is not None
            child.stdin.write(f"{start_at}\n")
            child.stdin.flush()
        parts = [_read_json(child) for child in children]
        if not all("latencies_us" in part for part in parts):
            return {"unavailable": "a client process failed (see the run's stderr)"}
        return merge_client_parts(parts)
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
            try:
                child.wait(timeout=args.duration + args.warmup + 60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _read_json(child: subprocess.Popen[str]) -> dict[str, Any]:
    """The next JSON line a client process printed (``{}`` if it ended instead)."""
    assert child.stdout is not None
    line = child.stdout.readline()
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        return {}
    return answer


def measure_point(
    transport: str, concurrency: int, server: TransportServer, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: ``transport`` at ``concurrency``, with client and server CPU."""
    row: dict[str, Any] = {"transport": transport, "concurrency": concurrency}
    binary = f"tcp:127.0.0.1:{server.ports['binary']}"
    phase = server.others()
    if transport.startswith("binary"):
        row["clients"] = "1 twinfer bench process, 1 connection"
        options = ["--concurrency", str(concurrency), "--duration", str(args.duration)]
        options += ["--warmup", str(args.warmup)]
        if transport == "binary+shm":
            options.append("--shared-memory")
        try:
            budget = args.duration + args.warmup
            point = run_bench(binary, args.model, options, budget)["points"][0]
            point["client_cpu_us"] = bench_client_cpu_us(point)
        except RuntimeError as e:  # twinfer bench could not run: say why, go on
            point = {"unavailable": str(e).strip().splitlines()[-1]}
    else:
        kind = {"grpc": "grpc", "grpc+shm": "grpc-shm", "http": "http"}[transport]
        url = f"127.0.0.1:{server.ports['grpc' if kind.startswith('grpc') else 'http']}"
        users = split_users(concurrency, args.client_processes)
        per_process = "/".join(map(str, sorted(set(users), reverse=True)))
        row["clients"] = f"{len(users)} process(es) x {per_process} thread(s)"
        point = run_triton_clients(kind, url, args.model, users, args)
    row["other_processes_cores"] = phase.stop()
    if "unavailable" in point:
        return {**row, "available": False, "reason": point["unavailable"]}
    return {
        **row,
        "available": True,
        "reason": None,
        "throughput": point["throughput"],
        "latency_ms": point["latency_ms"],
        "errors": point["errors"],
        "error_count": point["error_count"],
        "client_cpu_us": point["client_cpu_us"],
        "server_cpu": server.cpu_per_request(point),
    }


def print_row(row: Mapping[str, Any]) -> None:
    name = f"{row['transport']:>10} c={row['concurrency']:<3}"
    if not row["available"]:
        print(f"{name} not available: {row['reason']}", flush=True)
        return
    us = (row["server_cpu"] or {}).get("us_per_request") or {}

    def n(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    print(
        f"{name} {row['throughput']:8.1f} inf/s  p50 {row['latency_ms']['p50'] or 0:7.2f} ms  "
        f"p99 {row['latency_ms']['p99'] or 0:7.2f} ms  errors {row['error_count']}  "
        f"client {n(row['client_cpu_us'])} µs/req  server µs/req: reactor {n(us.get('reactor'))} "
        f"device {n(us.get('device'))} other {n(us.get('other'))} total {n(us.get('total'))} "
        f"outside-OpenVINO {n(us.get('outside_openvino'))}",
        flush=True,
    )


def main(argv: Sequence[str]) -> int:
    from twinfer.engines.builtin import onnx_light_model_path

    args = parse_args(argv)
    started = time.monotonic()
    results: dict[str, Any] = {
        "argv": list(argv),
        "machine": machine(),
        "estimate_s": estimate_seconds(args),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "benchmark_app": {},
        "rows": [],
    }
    head = machine_lines(results["machine"])
    print("\n".join(head).replace("**", ""), flush=True)
    print(f"Estimated time: {results['estimate_s'] / 60:.1f} min", flush=True)
    path = str(onnx_light_model_path(args.model))
    for hint in ("throughput", "latency"):
        log(f"benchmark_app -hint {hint} ({args.ceiling_seconds:g} s)")
        results["benchmark_app"][hint] = benchmark_app(path, hint, args.ceiling_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="twinfer-transports-") as tmp:
        server = TransportServer(
            Path(tmp), server_config(base_config(args.config), args.model, None)
        )
        try:
            log(f"twistd pid {server.process.pid} on {server.ports}")
            for transport in args.transports:
                for concurrency in CONCURRENCIES:
                    log(f"{transport} at concurrency {concurrency}")
                    row = measure_point(transport, concurrency, server, args)
                    results["rows"].append(row)
                    print_row(row)
            results["server_threads"] = server.threads_by_role()
        finally:
            server.stop()
    results["elapsed_s"] = time.monotonic() - started
    results["targets"] = compute_targets(results)
    (args.out / "transports.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "TRANSPORTS.md").write_text(render_markdown(results, head))
    print("\n".join(target_lines(results["targets"])).replace("**", ""), flush=True)
    log(f"wrote {args.out / 'TRANSPORTS.md'} in {results['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
