"""The memory attack of issue 13, measured: 20 clients that each send a 60 MiB request.

Runs a real ``twistd -n twinfer`` (default configuration, binary and HTTP
ports on loopback) and, one phase after the other:

1. ``before HELLO``: 20 connections each send a frame header declaring
   60 MiB, then body bytes, without the handshake;
2. ``binary``: 20 connections complete HELLO, then each send a 60 MiB
   INFER_REQUEST frame;
3. ``http``: 20 connections each POST a 60 MiB body to the KServe v2 route.

During each phase a well-behaved client keeps asking the ``tiny`` model and
the server's resident memory is sampled from ``/proc``; the report gives the
peak RSS over the idle baseline against the buffered-bytes budget
(``[server] max_buffered_bytes``, 512 MiB by default), the server's
``twinfer_buffered_bytes`` and ``twinfer_refused_total``, and how the good
client fared.  Bounded: each phase lasts ``--seconds`` and every socket has a
timeout; loopback only.

    python benchmarks/attack.py [--seconds 20] [--clients 20] [--mib 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from twinfer.blocking import BlockingClient
from twinfer.wire.encode import encode_bytes
from twinfer.wire.frames import frame_header
from twinfer.wire.messages import Hello, MessageType

HERE = Path(__file__).parent
CHUNK = 1024 * 1024


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    port_file = directory / "ports.json"
    twistd = str(Path(sys.executable).parent / "twistd")
    argv = [twistd, "-n", "--pidfile=", "twinfer", "--port", "tcp:0:interface=127.0.0.1"]
    argv += ["--http-port", "tcp:0:interface=127.0.0.1"]
    argv += ["--metrics-port", "tcp:0:interface=127.0.0.1", f"--port-file={port_file}"]
    log = open(directory / "server.log", "wb")  # noqa: SIM115 (kept open for the child)
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not port_file.exists() or not port_file.read_text().strip():
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: see {directory / 'server.log'}")
        time.sleep(0.2)  # a child process: nothing to wait on but its file
    return server, json.loads(port_file.read_text())


def metric(port: int, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    found: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def attacker(kind: str, port: int, size: int, stop: threading.Event, sent: list[int]) -> None:
    """One hostile client: send ``size`` bytes of request as fast as the server reads."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return
    sock.settimeout(1.0)
    total = 0
    try:
        if kind == "binary":
            sock.sendall(encode_bytes(0, Hello(agent="attack")))
            sock.recv(4096)  # the server's HELLO
        if kind == "http":
            head = (
                "POST /v2/models/tiny/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
            )
            sock.sendall(head.encode())
        else:
            sock.sendall(frame_header(MessageType.INFER_REQUEST, 1, size))
        chunk = bytes(CHUNK)
        while total < size and not stop.is_set():
            try:
                total += sock.send(chunk[: min(CHUNK, size - total)])
            except TimeoutError:
                continue  # the server is not reading: wait, as an attacker would
        stop.wait()
    except OSError:
        pass  # the server closed the connection: the refusal we expect for some
    finally:
        sent.append(total)
        sock.close()


def good_client(port: int, stop: threading.Event, results: dict[str, list[float]]) -> None:
    x = np.ones((2, 4), np.float32)
    while not stop.is_set():
        started = time.monotonic()
        try:
            with BlockingClient.connect(f"tcp:127.0.0.1:{port}", timeout=10) as client:
                while not stop.is_set():
                    started = time.monotonic()
                    client.infer("tiny", {"x": x})
                    results["ok"].append(time.monotonic() - started)
        except Exception as e:  # noqa: BLE001 (reported, not raised: it is the finding)
            results["errors"].append(time.monotonic() - started)
            results.setdefault("messages", []).append(str(e)[:200])  # type: ignore[arg-type]


def phase(name: str, kind: str, ports: dict[str, int], pid: int, args: argparse.Namespace) -> dict:
    port = ports["http"] if kind == "http" else ports["binary"]
    stop = threading.Event()
    sent: list[int] = []
    size = args.mib * 1024 * 1024
    good: dict[str, list[float]] = {"ok": [], "errors": []}
    base = rss_mib(pid)
    threads = [threading.Thread(target=good_client, args=(ports["binary"], stop, good))]
    threads += [
        threading.Thread(target=attacker, args=(kind, port, size, stop, sent))
        for _ in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    peak = base
    buffered_peak = 0.0
    ends = time.monotonic() + args.seconds
    while time.monotonic() < ends:
        peak = max(peak, rss_mib(pid))
        buffered = metric(ports["metrics"], "twinfer_buffered_bytes")
        buffered_peak = max([buffered_peak, *buffered.values()])
        time.sleep(0.25)  # sampling period of the figures, not a wait for a condition
    stop.set()
    for thread in threads:
        thread.join(30)
    time.sleep(1.0)  # let the server release what the closed connections held
    ok = sorted(good["ok"])
    return {
        "phase": name,
        "rss_idle_mib": round(base, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_growth_mib": round(peak - base, 1),
        "buffered_peak_mib": round(buffered_peak / 2**20, 1),
        "attackers_bytes_sent_mib": round(sum(sent) / 2**20, 1),
        "good_ok": len(ok),
        "good_errors": len(good["errors"]),
        "good_p50_ms": round(1000 * ok[len(ok) // 2], 2) if ok else None,
        "good_p99_ms": round(1000 * ok[int(len(ok) * 0.99)], 2) if ok else None,
        "rss_after_mib": round(rss_mib(pid), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--mib", type=int, default=60)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="twinfer-attack-") as tmp:
        server, ports = start_server(Path(tmp))
        try:
            time.sleep(2.0)  # let the first requests' allocations settle before the baseline
            rows = [
                phase("before HELLO", "prehello", ports, server.pid, args),
                phase("binary", "binary", ports, server.pid, args),
                phase("http", "http", ports, server.pid, args),
            ]
            refused = metric(ports["metrics"], "twinfer_refused_total")
        finally:
            server.terminate()
            server.wait(60)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    lines = [
        f"# The memory attack: {args.clients} clients × {args.mib} MiB requests",
        "",
        f"Generated by `benchmarks/attack.py` on {when} UTC.",
        f"CPU: {cpu_model()}, {os.cpu_count()} cores. Server: default configuration "
        "(`max_buffered_bytes` = 512 MiB, `max_frame_size` = 64 MiB).",
        f"{args.clients} attackers × {args.mib} MiB per phase, {args.seconds:.0f} s each; "
        "a good client asks `tiny` over the binary port meanwhile.",
        "",
        "| phase | RSS idle MiB | RSS peak MiB | growth MiB | buffered peak MiB "
        "| attackers sent MiB | good OK | good errors | good p50 ms | good p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['phase']} | {r['rss_idle_mib']} | {r['rss_peak_mib']} | {r['rss_growth_mib']} "
            f"| {r['buffered_peak_mib']} | {r['attackers_bytes_sent_mib']} | {r['good_ok']} "
            f"| {r['good_errors']} | {r['good_p50_ms']} | {r['good_p99_ms']} |"
        )
    lines += ["", "Refusals counted by the server (`twinfer_refused_total`):", ""]
    lines += [f"- `{key}`: {value:.0f}" for key, value in sorted(refused.items())]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ATTACK.md").write_text("\n".join(lines) + "\n")
    (args.out / "attack.json").write_text(
        json.dumps({"phases": rows, "refused": refused}, indent=2)
    )
    print("\n".join(lines))
    budget_mib = 512
    return 0 if all(r["rss_growth_mib"] <= budget_mib * 1.25 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
