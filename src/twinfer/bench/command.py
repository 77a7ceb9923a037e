"""The ``twinfer bench`` command: its options, the sweep and the report it prints.

:func:`add_arguments` and :func:`run` are what ``twinfer bench`` (see
:mod:`twinfer.cli`) calls; :func:`main` is ``python -m twinfer.bench``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import twinfer
from twinfer.bench.load import (
    EXIT_FAILED_REQUESTS,
    EXIT_OK,
    BenchError,
    run_in_process,
    run_point_processes,
)
from twinfer.bench.report import Progress, Samples, print_point, summarize, write_json
from twinfer.bench.steps import run_steps_in_process
from twinfer.client import DEFAULT_SERVER

# -- options -----------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,4,16, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``twinfer bench``'s options to ``parser``."""
    parser.add_argument("-m", "--model", required=True, help="model to load")
    parser.add_argument(
        "-s",
        "--server",
        default=DEFAULT_SERVER,
        help="server endpoint: tcp:HOST:PORT or tls:HOST:PORT, or several separated by "
        "commas (connections are spread over them; inference lost with a connection "
        f"or refused by a GOAWAY is re-sent once) (default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--ca-file",
        "--ca",
        "--trust-root",
        dest="ca_file",
        metavar="PEM",
        help="for tls: CA certificate the server's certificate must chain to "
        "(default: the system's)",
    )
    parser.add_argument(
        "--cert",
        metavar="PEM",
        help="client certificate for a tls: server that requires one (mutual TLS)",
    )
    parser.add_argument(
        "--key", metavar="PEM", help="the private key of --cert (default: in the --cert file)"
    )
    parser.add_argument(
        "-c",
        "--concurrency",
        type=_int_list,
        default=[1],
        metavar="C[,C...]",
        help="requests kept in flight; a comma-separated list is a sweep (default 1)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "-d",
        "--duration",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="measurement window per concurrency point (default 10)",
    )
    amount.add_argument(
        "-n",
        "--requests",
        type=_positive_int,
        metavar="N",
        help="measure exactly N requests per point instead of a duration",
    )
    parser.add_argument(
        "-w",
        "--warmup",
        type=_non_negative,
        default=2.0,
        metavar="SECONDS",
        help="unmeasured load before each point's window (default 2)",
    )
    parser.add_argument(
        "--steps",
        type=_int_list,
        metavar="C[,C...]",
        help="instead of a sweep, a step load: users per phase, changed mid-run on the same "
        "connections without a pause (e.g. 1,16,1)",
    )
    parser.add_argument(
        "--step-duration",
        type=_positive,
        default=20.0,
        metavar="SECONDS",
        help="length of each --steps phase (default 20)",
    )
    parser.add_argument(
        "--settle",
        type=_non_negative,
        default=2.0,
        metavar="SECONDS",
        help="start of each --steps phase left out of its throughput and latency "
        "(errors still count) (default 2)",
    )
    parser.add_argument(
        "--connections",
        type=_positive_int,
        default=1,
        metavar="K",
        help="spread the concurrency over K connections, round-robin over the servers (default 1)",
    )
    parser.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run the load from N client processes; samples are merged (default 1)",
    )
    parser.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="take input NAME from a .npy file (repeatable); others are random",
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="shape of a random input with dynamic dimensions (default: 1 for each)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument(
        "--timeout-ms",
        type=int,
        default=0,
        help="per-request queueing deadline sent to the server (default: server's)",
    )
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="pass tensors through POSIX shared memory (a server on this host, --allow-shm): "
        "each user's inputs in its own registered region, outputs of static shape written there",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no live progress line even on a terminal"
    )


def _parse_inputs(args: argparse.Namespace) -> None:
    files: dict[str, np.ndarray] = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BenchError(f"--input expects NAME=FILE.npy, got {item!r}")
        try:
            files[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BenchError(f"--input {name}: cannot read {path}: {e}") from e
    shapes: dict[str, tuple[int, ...]] = {}
    for item in args.shape:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 0 for d in shape):
            raise BenchError(f"--shape expects NAME=D0,D1,... (non-negative), got {item!r}")
        shapes[name] = shape
    args.input_files = files
    args.shapes = shapes


# -- the run -----------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run the sweep described by ``args``; print the report; return an exit status.

    0: every measured request succeeded; 1: some requests failed (see the
    errors column / JSON); 2: a bad argument or input file, or the server
    refused the model; 3: the server cannot be reached.
    """
    progress = Progress(enabled=False if args.quiet else None)
    points: list[dict[str, Any]] = []
    out = sys.stdout

    def report(concurrency: int, processes: int, samples: Samples) -> None:
        point = {
            "concurrency": concurrency,
            "connections": min(max(args.connections, processes), concurrency),
            "processes": processes,
            **summarize(samples),
        }
        points.append(point)
        print_point(point, out, header=len(points) == 1)

    steps = getattr(args, "steps", None)
    if steps:
        return _run_steps(args, progress)
    try:
        _parse_inputs(args)
        print(
            f"twinfer bench: model {args.model!r} at {args.server}, "
            + (f"{args.requests} requests" if args.requests else f"{args.duration:g} s")
            + f" per point after {args.warmup:g} s warm-up, {args.connections} connection(s), "
            f"{args.processes} process(es)",
            file=out,
        )
        if args.processes == 1:
            run_in_process(args, progress, report)
        else:
            for concurrency in args.concurrency:
                samples = run_point_processes(args, concurrency, progress)
                report(concurrency, min(args.processes, concurrency), samples)
    except BenchError as e:
        progress.clear()
        print(f"twinfer bench: {e}", file=sys.stderr)
        return e.status
    if args.json:
        result = {
            "twinfer": twinfer.__version__,
            "model": args.model,
            "server": args.server,
            "duration_s": None if args.requests else args.duration,
            "requests": args.requests,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "processes": args.processes,
            "client_pid": os.getpid(),
            "points": points,
        }
        write_json(args.json, result)
    return EXIT_FAILED_REQUESTS if any(p["error_count"] for p in points) else EXIT_OK


def _run_steps(args: argparse.Namespace, progress: Progress) -> int:
    """The ``--steps`` load: one row per phase, then the JSON (``steps``)."""
    out = sys.stdout
    phases: list[dict[str, Any]] = []

    def report(phase: dict[str, Any]) -> None:
        phases.append(phase)
        print_point(phase, out, header=len(phases) == 1)

    try:
        if args.processes != 1:
            raise BenchError("--steps runs in one client process (drop --processes)")
        if args.step_duration <= args.settle:
            raise BenchError("--step-duration must be longer than --settle")
        _parse_inputs(args)
        print(
            f"twinfer bench: model {args.model!r} at {args.server}, step load "
            + " -> ".join(map(str, args.steps))
            + f" users, {args.step_duration:g} s per phase, the first {args.settle:g} s of "
            f"each left out of throughput and latency, {args.connections} connection(s)",
            file=out,
        )
        run_steps_in_process(args, progress, report)
    except BenchError as e:
        progress.clear()
        print(f"twinfer bench: {e}", file=sys.stderr)
        return e.status
    if args.json:
        write_json(
            args.json,
            {
                "twinfer": twinfer.__version__,
                "model": args.model,
                "server": args.server,
                "step_duration_s": args.step_duration,
                "settle_s": args.settle,
                "connections": args.connections,
                "client_pid": os.getpid(),
                "points": [],
                "steps": phases,
            },
        )
    return EXIT_FAILED_REQUESTS if any(p["error_count"] for p in phases) else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m twinfer.bench``: parse ``argv`` and :func:`run`."""
    parser = argparse.ArgumentParser(
        prog="twinfer bench",
        description="Closed-loop load against a running twinfer server "
        "(the twinfer counterpart of Triton's perf_analyzer).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
