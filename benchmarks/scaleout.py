#!/usr/bin/env python3
"""The balancer's cost: twinfer through HAProxy against direct, in one run.

Starts ``--nodes`` real ``twistd -n twinfer`` nodes (default configuration:
SqueezeNet, ResNet-50 and tiny on the CPU; free loopback ports, with
``--metrics-port`` and ``--agent-port``) and HAProxy running
``etc/haproxy.cfg`` itself (its ``${VARIABLE-default}`` addresses filled in
from the environment; with one node, all three server lines point at it).
Then, ``--rounds`` times, alternately, it drives with ``twinfer bench``
(closed loop, ``--connections K``):

- **direct**: node 1's binary port;
- **haproxy**: HAProxy's TCP front end (``balance leastconn``, health and
  agent checks on).

Alternating the two in rounds spreads any drift of a shared machine over
both.  Prints the CPU model with the figures (throughput and p50/p99 per
round, medians, the ratio haproxy/direct) and writes ``SCALEOUT.md`` and
``scaleout.json`` into ``--out`` (default: this directory).

    python benchmarks/scaleout.py                      # squeezenet, concurrency 16: ~3 min
    python benchmarks/scaleout.py --duration 2 --warmup 1 --rounds 1 --out /tmp/x  # tooling check

Needs ``haproxy`` on PATH (``apt-get install haproxy``).  With ``--nodes 3``
the haproxy figure is the fleet's, not the balancer's cost: on one machine
three nodes share the same cores.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_measure import BIN, log, machine, run_bench, stop_process  # noqa: E402

HAPROXY_CFG = HERE.parent / "etc" / "haproxy.cfg"
PORTS = ("binary", "http", "metrics", "agent")
TARGET_RATIO = 0.95


class Node:
    """``twistd -n twinfer`` on free loopback ports; the ports come through a pipe."""

    def __init__(self, workdir: Path, name: str, config: str | None, timeout: float = 180) -> None:
        self.log_path = workdir / f"{name}.log"
        read_end, write_end = os.pipe()
        command = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-", "twinfer"]
        for port in PORTS:
            option = "--port" if port == "binary" else f"--{port}-port"
            command += [option, "tcp:0:interface=127.0.0.1"]
        command += [f"--port-file=/dev/fd/{write_end}"]
        if config:
            command += ["--config", config]
        self._out = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._out, stderr=subprocess.STDOUT, cwd=workdir, pass_fds=(write_end,)
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            line = pipe.readline()  # the server's one JSON line, or b"" if it exited
        if not line:
            self.stop()
            raise RuntimeError(f"{name} did not start:\n{self.log_path.read_text()[-3000:]}")
        self.ports: dict[str, int] = json.loads(line)

    def stop(self) -> None:
        stop_process(self.process, timeout=60)
        self._out.close()


class HAProxy:
    """HAProxy running ``etc/haproxy.cfg``, its front ends on inherited sockets."""

    def __init__(self, workdir: Path, nodes: list[Node]) -> None:
        self.socket_path = str(workdir / "admin.sock")
        self.sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
        binary, http = self.sockets
        self.port = binary.getsockname()[1]
        env = dict(
            os.environ,
            TWINFER_HAPROXY_SOCKET=self.socket_path,
            TWINFER_BINARY_BIND=f"fd@{binary.fileno()}",
            TWINFER_HTTP_BIND=f"fd@{http.fileno()}",
            TWINFER_STATS_BIND=str(workdir / "stats.sock"),
            TWINFER_CHECK_INTER="1s",
            TWINFER_AGENT_INTER="1s",
        )
        for index in range(1, 4):
            node = nodes[(index - 1) % len(nodes)]
            env[f"TWINFER_NODE{index}"] = "127.0.0.1"
            for port in PORTS:
                env[f"TWINFER_NODE{index}_{port.upper()}"] = str(node.ports[port])
        haproxy = shutil.which("haproxy")
        if haproxy is None:
            raise SystemExit("haproxy is not installed (apt-get install haproxy)")
        self.log_path = workdir / "haproxy.log"
        self._out = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [haproxy, "-f", str(HAPROXY_CFG), "-db"],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=[s.fileno() for s in self.sockets],
        )
        self.version = subprocess.run(
            [haproxy, "-v"], capture_output=True, text=True
        ).stdout.splitlines()[0]

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(self.socket_path)
            sock.sendall(line.encode() + b"\n")
            return sock.makefile("r").read()

    def wait_all_up(self, timeout: float = 60) -> None:
        """Until every server of the binary back end is UP (polls: a script, not a test)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log_path.read_text()}")
            try:
                rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
                servers = [
                    r
                    for r in rows
                    if r["pxname"] == "twinfer_binary_nodes" and r["svname"] != "BACKEND"
                ]
                if servers and all(r["status"] == "UP" for r in servers):
                    return
            except OSError:
                pass  # the admin socket is not there yet
            time.sleep(0.2)
        raise RuntimeError(f"HAProxy's servers are not all UP:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self._out.close()
        for sock in self.sockets:
            sock.close()


def point(bench: dict[str, Any]) -> dict[str, Any]:
    only = bench["points"][0]
    return {
        "throughput": only["throughput"],
        "p50_ms": only["latency_ms"]["p50"],
        "p99_ms": only["latency_ms"]["p99"],
        "errors": only["error_count"],
        "count": only["count"],
    }


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    nodes: list[Node] = []
    haproxy: HAProxy | None = None
    try:
        for i in range(args.nodes):
            nodes.append(Node(workdir, f"node{i + 1}", args.config))
            log(f"node{i + 1}: ports {nodes[-1].ports}")
        haproxy = HAProxy(workdir, nodes)
        haproxy.wait_all_up()
        log(f"{haproxy.version}: front end tcp:127.0.0.1:{haproxy.port}, all servers UP")
        targets = {
            "direct": f"tcp:127.0.0.1:{nodes[0].ports['binary']}",
            "haproxy": f"tcp:127.0.0.1:{haproxy.port}",
        }
        rounds: list[dict[str, Any]] = []
        for number in range(1, args.rounds + 1):
            result: dict[str, Any] = {}
            for path, endpoint in targets.items():
                log(f"round {number}: {path} ({endpoint})")
                bench = run_bench(
                    endpoint,
                    args.model,
                    [args.concurrency],
                    args.duration,
                    args.warmup,
                    args.connections,
                    args.processes,
                )
                result[path] = point(bench)
            rounds.append(result)
        return {"haproxy_version": haproxy.version, "rounds": rounds}
    finally:
        if haproxy is not None:
            haproxy.stop()
        for node in nodes:
            node.stop()


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def median(path: str, key: str) -> float:
        return statistics.median(r[path][key] for r in rounds)

    out: dict[str, Any] = {
        path: {key: median(path, key) for key in ("throughput", "p50_ms", "p99_ms")}
        for path in ("direct", "haproxy")
    }
    out["ratio"] = out["haproxy"]["throughput"] / out["direct"]["throughput"]
    out["p50_added_ms"] = out["haproxy"]["p50_ms"] - out["direct"]["p50_ms"]
    return out


def write_markdown(results: dict[str, Any], path: Path) -> None:
    m, s, a = results["machine"], results["summary"], results["settings"]
    verdict = "reached" if s["ratio"] >= TARGET_RATIO else "NOT reached"
    lines = [
        "# twinfer through HAProxy against direct",
        "",
        f"Generated by `benchmarks/scaleout.py {' '.join(results['argv'])}` on {m['date']}.",
        "",
        f"**CPU:** {m['cpu']}, {m['cores']} cores; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.  ",
        f"**Versions:** {results['haproxy_version']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + (f"; twinfer commit {m['git_commit']}" if m["git_commit"] else "")
        + ".",
        "",
        f"Model `{a['model']}`, concurrency {a['concurrency']} over {a['connections']} "
        f"connection(s), {a['processes']} client process(es), {a['duration']:g} s per "
        f"measurement after {a['warmup']:g} s warm-up, {a['nodes']} node(s) "
        "(default configuration), the two paths alternated in "
        f"{len(results['rounds'])} round(s) in one run. HAProxy runs `etc/haproxy.cfg` "
        "(TCP mode, `leastconn`, health and agent checks on).",
        "",
        f"**Target: throughput through HAProxy ≥ {TARGET_RATIO} × direct: {verdict}** "
        f"(ratio {s['ratio']:.3f}; p50 {s['p50_added_ms']:+.2f} ms).",
        "",
        "| path | inf/s (median) | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name in ("direct", "haproxy"):
        p = s[name]
        lines.append(f"| {name} | {p['throughput']:.1f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} |")
    lines += ["", "Per round:", "", "| round | path | inf/s | p50 ms | p99 ms | errors |"]
    lines.append("|---|---|---:|---:|---:|---:|")
    for number, r in enumerate(results["rounds"], start=1):
        for name in ("direct", "haproxy"):
            p = r[name]
            lines.append(
                f"| {number} | {name} | {p['throughput']:.1f} | {p['p50_ms']:.2f} | "
                f"{p['p99_ms']:.2f} | {p['errors']} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="squeezenet")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 2, 3))
    parser.add_argument("--config", help="node configuration (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    info = machine()
    log(f"CPU: {info['cpu']} ({info['cores']} cores)")
    with tempfile.TemporaryDirectory(prefix="scaleout") as tmp:
        measured = measure(args, Path(tmp))
    results = {
        "argv": argv,
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        **measured,
    }
    results["summary"] = s = summary(measured["rounds"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_markdown(results, args.out / "SCALEOUT.md")
    print(f"CPU: {info['cpu']} ({info['cores']} cores)")
    print(f"{'path':<8} {'inf/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("direct", "haproxy"):
        p = s[name]
        print(f"{name:<8} {p['throughput']:>9.1f} {p['p50_ms']:>8.2f} {p['p99_ms']:>8.2f}")
    print(f"haproxy/direct throughput {s['ratio']:.3f} (target >= {TARGET_RATIO})")
    print(f"wrote {args.out / 'SCALEOUT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
