"""The pure parts of ``transports.py``: thread roles, merged points, issue 11's
targets and TRANSPORTS.md, all functions of plain dicts (``transports.json``).

The figures' shape::

    {"machine": {...}, "settings": {...}, "argv": [...], "estimate_s": ..., "elapsed_s": ...,
     "benchmark_app": {"throughput": {...}, "latency": {...}},
     "rows": [ROW...], "targets": [TARGET...]}

A ROW is one transport at one concurrency::

    {"transport": "binary" | "binary+shm" | "grpc" | "grpc+shm" | "http",
     "concurrency": C, "clients": "how the load was made", "available": bool,
     "reason": why not available, or None,
     "throughput": inf/s, "latency_ms": {"p50", "p99", ...}, "error_count": N,
     "errors": {STATUS: N}, "client_cpu_us": µs of client CPU per request,
     "server_cpu": {"span_s": s, "us_per_request": {ROLE: µs}} or None,
     "other_processes_cores": cores used by everybody else meanwhile}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import procstat

#: The transports, in the order they are measured and shown.
TRANSPORTS = ("binary", "binary+shm", "grpc", "grpc+shm", "http")
CONCURRENCIES = (1, 16)
#: Each shared-memory transport and the socket path it is compared with.
SHM_PAIRS = (("binary+shm", "binary"), ("grpc+shm", "grpc"))

#: Issue 11's targets.
GRPC_FRACTION = 0.9
SHM_CPU_FRACTION = 0.5
CEILING_FRACTION = 0.95
TARGET_CONCURRENCY = 16

#: OS thread names (``/proc/PID/task/TID/comm``) of gRPC's threads: the
#: front end's asyncio loop (named by ``transports_server.py``) and gRPC
#: core's own (its timer, its event engine's pollers and their lifeguard).
GRPC_THREAD_PREFIXES = ("py-grpc-loop", "grpc", "event_engine", "lifeguard")
#: The HTTP front end's codec pool threads (named by ``transports_server.py``).
HTTP_CODEC_THREAD = "py-http-codec"
#: Roles of the finer split; ``other`` is what is left: OpenVINO's own pools
#: (and idle Python helper threads).
FINE_ROLES = ("reactor", "device", "grpc", "http_codec", "other")
#: The threads whose CPU is wholly outside OpenVINO (the device threads are
#: not: OpenVINO runs part of each inference on the calling thread).
OUTSIDE_OPENVINO = ("reactor", "grpc", "http_codec")

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "N/A"


# -- server CPU ------------------------------------------------------------------------


def fine_role(pid: int, tid: int, name: str) -> str:
    """``reactor``, ``device``, ``grpc``, ``http_codec`` or ``other`` for one thread."""
    coarse = procstat.role(pid, tid, name)
    if coarse != "other":
        return coarse
    if name.startswith(GRPC_THREAD_PREFIXES):
        return "grpc"
    if name == HTTP_CODEC_THREAD:
        return "http_codec"
    return "other"


def cpu_by_role(pid: int, used: procstat.ThreadSample) -> dict[str, float]:
    """CPU seconds per role: procstat's ``reactor``/``device``/``other``/``total``,
    the finer ``grpc``/``http_codec``/``openvino_other`` (procstat's ``other`` is their
    sum), and ``outside_openvino`` (reactor + gRPC + HTTP codec threads)."""
    coarse = procstat.by_role(pid, used)
    fine = dict.fromkeys(FINE_ROLES, 0.0)
    for tid, (name, seconds) in used.items():
        fine[fine_role(pid, tid, name)] += seconds
    return {
        **coarse,
        "grpc": fine["grpc"],
        "http_codec": fine["http_codec"],
        "openvino_other": fine["other"],
        "outside_openvino": sum(fine[r] for r in OUTSIDE_OPENVINO),
    }


def per_request(seconds: Mapping[str, float], span_s: float, throughput: float) -> dict[str, Any]:
    """Each role's seconds over ``span_s`` as µs per request at ``throughput``."""
    requests = throughput * span_s
    return {
        "span_s": span_s,
        "us_per_request": {
            k: (1e6 * v / requests if requests > 0 else None) for k, v in seconds.items()
        },
    }


# -- client points ---------------------------------------------------------------------


def merge_client_parts(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One point from the client processes' figures (``transports_clients.py``):
    they share one window, so counts add up and latencies pool."""
    from twinfer.bench.report import percentiles

    latencies = np.array([x for p in parts for x in p["latencies_us"]], dtype=float)
    start = min(p["window_start_ns"] for p in parts)
    end = max(p["window_end_ns"] for p in parts)
    window = max(end - start, 1) / 1e9
    errors: dict[str, int] = {}
    for p in parts:
        for status, n in p["errors"].items():
            errors[status] = errors.get(status, 0) + n
    count = len(latencies)
    cpu = sum(p["cpu_seconds"] for p in parts)
    return {
        "count": count,
        "throughput": count / window,
        "latency_ms": percentiles(latencies, 1e-3),
        "errors": errors,
        "error_count": sum(errors.values()),
        "window_start_ns": start,
        "window_end_ns": end,
        "client_cpu_us": 1e6 * cpu / count if count else None,
    }


def bench_client_cpu_us(point: Mapping[str, Any]) -> float | None:
    """Client CPU per request (µs) of a ``twinfer bench`` point (its own CPU over the window)."""
    if not point.get("count"):
        return None
    return 1e4 * point["client_cpu_percent"] * point["window_s"] / point["count"]


# -- targets ---------------------------------------------------------------------------


def find_row(rows: Sequence[Mapping[str, Any]], transport: str, c: int) -> Mapping | None:
    """The measured row of ``transport`` at concurrency ``c`` (``None`` if missing/unavailable)."""
    for row in rows:
        if row["transport"] == transport and row["concurrency"] == c and row["available"]:
            return row if row.get("throughput") else None
    return None


def _outside(row: Mapping[str, Any]) -> float | None:
    cpu = row.get("server_cpu") or {}
    value = (cpu.get("us_per_request") or {}).get("outside_openvino")
    return float(value) if value is not None else None


def _target(status: str, target: str, text: str) -> dict[str, str]:
    return {"status": status, "target": target, "text": text}


def compute_targets(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """Issue 11's targets, PASS/FAIL/N/A each, from the rows and benchmark_app's figures."""
    rows = results["rows"]
    c = TARGET_CONCURRENCY
    targets = []
    name = f"gRPC >= {GRPC_FRACTION} x binary throughput at c={c}"
    grpc, binary = find_row(rows, "grpc", c), find_row(rows, "binary", c)
    if grpc is None or binary is None:
        targets.append(_target(NOT_MEASURED, name, "a row is missing"))
    else:
        ratio = grpc["throughput"] / binary["throughput"]
        targets.append(
            _target(
                PASS if ratio >= GRPC_FRACTION else FAIL,
                name,
                f"{grpc['throughput']:.1f} vs {binary['throughput']:.1f} inf/s ({ratio:.2f}x)",
            )
        )
    for shm_name, socket_name in SHM_PAIRS:
        for conc in CONCURRENCIES:
            name = (
                f"{shm_name} server CPU/request outside OpenVINO <= {SHM_CPU_FRACTION} x "
                f"{socket_name}'s at c={conc}"
            )
            shm, socket = find_row(rows, shm_name, conc), find_row(rows, socket_name, conc)
            a = _outside(shm) if shm else None
            b = _outside(socket) if socket else None
            if a is None or b is None or b <= 0:
                targets.append(_target(NOT_MEASURED, name, "not available or not sampled"))
                continue
            targets.append(
                _target(
                    PASS if a <= SHM_CPU_FRACTION * b else FAIL,
                    name,
                    f"{a:.0f} vs {b:.0f} µs ({a / b:.2f}x)",
                )
            )
    name = f"binary+shm >= {CEILING_FRACTION} x benchmark_app's best hint at c={c}"
    shm = find_row(rows, "binary+shm", c)
    ceiling = results.get("benchmark_app") or {}
    if shm is None or not ceiling:
        targets.append(_target(NOT_MEASURED, name, "a row or benchmark_app is missing"))
    else:
        best_hint = max(ceiling, key=lambda h: ceiling[h]["throughput"])
        best = ceiling[best_hint]["throughput"]
        ratio = shm["throughput"] / best
        targets.append(
            _target(
                PASS if ratio >= CEILING_FRACTION else FAIL,
                name,
                f"{shm['throughput']:.1f} vs {best:.1f} FPS (-hint {best_hint}; {ratio:.2f}x)",
            )
        )
    return targets


def target_lines(targets: Sequence[Mapping[str, str]]) -> list[str]:
    """The targets as Markdown list items (``**`` stripped, they print on a terminal too)."""
    return [f"- **{t['status']}** {t['target']}: {t['text']}" for t in targets]


# -- TRANSPORTS.md ---------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


ROW_HEADER = (
    "| transport | c | clients | inf/s | p50 ms | p99 ms | errors | client µs/req "
    "| reactor | device | other | total | outside OpenVINO |"
)
SPLIT_HEADER = "| transport | c | reactor | gRPC threads | HTTP codec | device | OpenVINO & rest |"


def row_line(row: Mapping[str, Any]) -> str:
    """One row of the main table (server columns: µs of server CPU per request)."""
    head = f"| {row['transport']} | {row['concurrency']} | {row['clients']} |"
    if not row["available"]:
        return head + f" not available: {row['reason']} |" + " |" * 9
    lat = row.get("latency_ms") or {}
    us = (row.get("server_cpu") or {}).get("us_per_request") or {}
    errors = str(row["error_count"]) + (
        " (" + ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) + ")"
        if row["errors"]
        else ""
    )
    return head + " | ".join(
        [
            f" {_num(row['throughput'], 1)}",
            _num(lat.get("p50"), 2),
            _num(lat.get("p99"), 2),
            errors,
            _num(row.get("client_cpu_us")),
            *(_num(us.get(k)) for k in ("reactor", "device", "other", "total")),
            f"**{_num(us.get('outside_openvino'))}** |",
        ]
    )


def split_line(row: Mapping[str, Any]) -> str:
    us = (row.get("server_cpu") or {}).get("us_per_request") or {}
    cells = ("reactor", "grpc", "http_codec", "device", "openvino_other")
    return (
        f"| {row['transport']} | {row['concurrency']} | "
        + " | ".join(_num(us.get(k)) for k in cells)
        + " |"
    )


THREADS_NOTE = [
    "Server CPU per request: each thread's CPU time from `/proc` (`procstat.py`) over "
    "the point's window, divided by the requests answered in it. Roles: **reactor** "
    "(the main thread); **device** (`twinfer-*`: the device workers, which call OpenVINO "
    "and run part of each inference themselves); **other** (procstat's rest), split below "
    "into the **gRPC threads** (the front end's asyncio loop thread `twinfer-grpc`, OS-named "
    "`py-grpc-loop` by `transports_server.py`, and gRPC core's `grpc_global_timer`, "
    "`event_engine` and `lifeguard` threads), the **HTTP codec** pool threads "
    "(`twinfer-http-codec`, OS-named `py-http-codec`) and **OpenVINO & rest** (OpenVINO's "
    "CPU plugin pool and idle Python helpers). **Outside OpenVINO** = reactor + gRPC "
    "threads + HTTP codec threads: the CPU the front ends and the data plane spend per "
    "request, which shared memory is meant to halve. (The HTTP codec pool only takes "
    "large JSON tensors; binary tensors are decoded on the reactor.)",
]


def threads_line(threads: Mapping[str, Mapping[str, int]]) -> str:
    """The server's threads by role, by OS name (``name ×N`` for several)."""
    parts = []
    for role in FINE_ROLES:
        names = threads.get(role) or {}
        listed = ", ".join(
            f"`{name}`" + (f" ×{n}" if n > 1 else "") for name, n in sorted(names.items())
        )
        parts.append(f"{role}: {listed or 'none'}")
    return "Threads of the server at the end of the run, by role: " + "; ".join(parts) + "."


def render_markdown(results: Mapping[str, Any], machine_lines: Sequence[str]) -> str:
    """TRANSPORTS.md: machine, how it was run, targets, the tables, and the threads counted."""
    s = results["settings"]
    ceiling = results.get("benchmark_app") or {}
    lines = [
        "# twinfer transports: binary, shared memory, gRPC, HTTP",
        "",
        *machine_lines,
        "",
        f"Generated by `benchmarks/transports.py {' '.join(results['argv'])}` on "
        f"{results['machine']['date']} in {results['elapsed_s'] / 60:.1f} min (estimated "
        f"{results['estimate_s'] / 60:.1f}). One `twistd` with `--port`, `--grpc-port`, "
        f"`--http-port` and `--allow-shm` on loopback serving `{s['model']}`; each point "
        f"{s['duration']:g} s after {s['warmup']:g} s warm-up, closed loop. Binary rows: "
        "`twinfer bench` (with `--shared-memory` for binary+shm); gRPC and HTTP rows: "
        "`tritonclient` in `transports_clients.py` processes, each user a thread with its "
        "own client calling the blocking `infer()` (the clients column says how many).",
        "",
        "## Targets (issue 11)",
        "",
        *target_lines(results["targets"]),
        "",
        "## Throughput, latency and CPU per request",
        "",
        ROW_HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(row_line(r) for r in results["rows"]),
        "",
        "### Server CPU per request outside the device threads (µs)",
        "",
        SPLIT_HEADER,
        "|---|---|---|---|---|---|---|",
        *(split_line(r) for r in results["rows"] if r["available"]),
        "",
        *THREADS_NOTE,
        "",
    ]
    if results.get("server_threads"):
        lines += [threads_line(results["server_threads"]), ""]
    if ceiling:
        lines += ["| benchmark_app | FPS | median ms |", "|---|---|---|"]
        for hint, b in ceiling.items():
            lines.append(f"| -hint {hint} | {b['throughput']:.1f} | {b['latency_ms']['p50']:.2f} |")
        lines.append("")
    busy = [r for r in results["rows"] if (r.get("other_processes_cores") or 0.0) > 0.2]
    if busy:
        lines += [
            "⚠ Other processes used more than 0.2 cores while "
            + ", ".join(f"{r['transport']} c={r['concurrency']}" for r in busy)
            + " ran: compare those rows with care.",
            "",
        ]
    return "\n".join(lines) + "\n"
