#!/usr/bin/env python3
"""Measure twinfer against OpenVINO's own figures on this machine, in one run.

For each model (default: ``squeezenet`` and ``resnet50``, the onnx package's
``light_squeezenet`` / ``light_resnet50``, plus ``tiny`` for the server's
own CPU cost):

(a) ``benchmark_app -hint throughput`` and ``-hint latency``: FPS and median
    latency of each (not for ``tiny``);
(b) a bare Python loop over one THROUGHPUT-compiled infer request, and the
    RSS a second (LATENCY-compiled) copy of the model adds (not for ``tiny``);
(c) twinfer as a real ``twistd`` process serving that model alone, driven by
    ``twinfer bench`` at each concurrency (``tiny``: 1 and 16), then by a
    step load (``twinfer bench --steps``, 1 → 16 → 1) on the same server,
    while a sampler reads the server's RSS and per-thread CPU time from
    ``/proc`` (``procstat.py``).  With ``--execution MODE[,MODE]`` (c) runs
    once per mode, the server's devices configured with ``execution = MODE``.

Then it checks issue 10's targets and writes ``results.json``, ``RESULTS.md``
and ``results.png`` (p50 latency against throughput per model, both hints as
points) into ``--out`` (default: this directory).  See README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_measure import (  # noqa: E402 - this directory first, for procstat
    HERE,
    Interference,
    Server,
    base_config,
    benchmark_app,
    log,
    machine,
    python_loop,
    rss_summary,
    run_bench,
    run_python_loop,
    server_config,
    server_cpu,
)
from run_report import (  # noqa: E402
    CPU_CONCURRENCIES,
    OVERHEAD_MODEL,
    compute_targets,
    machine_lines,
    render_markdown,
    target_lines,
    write_plot,
)

#: Seconds a server takes to start and compile its model, and benchmark_app to
#: compile, for the estimate (measured on the 2-core AMD kind).
SERVER_START_S = 10.0
BENCHMARK_APP_START_S = 6.0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="squeezenet,resnet50,tiny")
    parser.add_argument("--concurrency", default="1,2,4,16,64")
    parser.add_argument("--duration", type=float, help="seconds per point (default 12, quick 3)")
    parser.add_argument("--warmup", type=float, help="warm-up per point (default 2, quick 1)")
    parser.add_argument("--steps", default="1,16,1", help="step load users per phase")
    parser.add_argument(
        "--step-duration", type=float, help="seconds per step phase (default 20, quick 3)"
    )
    parser.add_argument(
        "--settle", type=float, help="unmeasured start of each step phase (default 2, quick 1)"
    )
    parser.add_argument(
        "--ceiling-seconds", type=float, help="benchmark_app -t per hint (default 15, quick 3)"
    )
    parser.add_argument(
        "--loop-seconds", type=float, help="Python loop seconds (default 5, quick 2; 0: skip)"
    )
    parser.add_argument(
        "--execution",
        default="",
        metavar="MODE[,MODE]",
        help="serve each model once per mode, devices configured with execution = MODE "
        "(e.g. throughput,adaptive: the RSS target compares those two); default: the "
        "configuration as it is",
    )
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1, help="twinfer bench processes")
    parser.add_argument("--config", help="twinfer config to start from (default: embedded)")
    parser.add_argument("--quick", action="store_true", help="everything short: a smoke run")
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--soak-model", default="resnet50")
    parser.add_argument("--soak-concurrency", type=int, default=64)
    parser.add_argument("--note", default="", help="a note printed at the top of RESULTS.md")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    q = args.quick

    def pick(value: float | None, default: float, quick: float) -> float:
        return value if value is not None else (quick if q else default)

    args.duration = pick(args.duration, 12.0, 3.0)
    args.warmup = pick(args.warmup, 2.0, 1.0)
    args.step_duration = pick(args.step_duration, 20.0, 3.0)
    args.settle = pick(args.settle, 2.0, 1.0)
    args.ceiling_seconds = pick(args.ceiling_seconds, 15.0, 3.0)
    args.loop_seconds = pick(args.loop_seconds, 5.0, 2.0)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    args.steps = [int(c) for c in args.steps.split(",") if c]
    args.models = [m for m in args.models.split(",") if m]
    args.execution = [m for m in args.execution.split(",") if m]
    if args.step_duration <= args.settle:
        parser.error("--step-duration must be longer than --settle")
    return args


def concurrency_for(model: str, args: argparse.Namespace) -> list[int]:
    """The sweep: ``tiny`` is there for its CPU per request, at 1 and 16 only."""
    return list(CPU_CONCURRENCIES) if model == OVERHEAD_MODEL else args.concurrency


def runs_of(args: argparse.Namespace) -> list[str | None]:
    return list(args.execution) or [None]


def estimate_seconds(args: argparse.Namespace) -> float:
    """How long the run should take (without other load on the machine)."""
    total = 0.0
    for model in args.models:
        per_run = SERVER_START_S + len(concurrency_for(model, args)) * (
            args.duration + args.warmup + 1
        )
        if model != OVERHEAD_MODEL:
            total += 2 * (args.ceiling_seconds + BENCHMARK_APP_START_S)
            total += args.loop_seconds + 5 if args.loop_seconds else 0
            per_run += len(args.steps) * args.step_duration + 3
        if args.soak and model == args.soak_model:
            total += args.soak + args.warmup
        total += per_run * len(runs_of(args))
    return total


def bench_options(args: argparse.Namespace, concurrency: Sequence[int]) -> list[str]:
    return [
        "--concurrency",
        ",".join(map(str, concurrency)),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--connections",
        str(args.connections),
        "--processes",
        str(args.processes),
    ]


def measure_run(
    model: str, execution: str | None, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One server for ``model``: the sweep, the step load, RSS and CPU."""
    config = server_config(base_config(args.config), model, execution)
    server = Server(workdir, config, f"{model}-{execution or 'default'}")
    try:
        log(f"  twistd pid {server.process.pid} on {server.endpoint}")
        time.sleep(1.0)
        idle = server.sampler.rss_now()
        sweep = concurrency_for(model, args)
        log(f"  sweep at concurrency {sweep}")
        budget = len(sweep) * (args.duration + args.warmup + 30)
        points = run_bench(server.endpoint, model, bench_options(args, sweep), budget)["points"]
        for point in points:
            point["server_cpu"] = server_cpu(server.sampler, point)
        steps: list[dict[str, Any]] = []
        if model != OVERHEAD_MODEL and args.steps:
            log(f"  step load {args.steps} users, {args.step_duration:g} s each")
            options = ["--steps", ",".join(map(str, args.steps))]
            options += ["--step-duration", str(args.step_duration), "--settle", str(args.settle)]
            options += ["--connections", str(args.connections)]
            budget = len(args.steps) * args.step_duration
            steps = run_bench(server.endpoint, model, options, budget)["steps"]
        after = server.sampler.rss_now()
        result: dict[str, Any] = {
            "execution": execution,
            "sweep": points,
            "steps": steps,
            "rss_idle_mib": idle / 2**20,
            "rss_after_load_mib": after / 2**20,
            "rss_max_mib": max((s[1] for s in server.sampler.samples), default=after) / 2**20,
        }
        if args.soak and model == args.soak_model:
            log(f"  soak: concurrency {args.soak_concurrency} for {args.soak:g} s")
            options = bench_options(args, [args.soak_concurrency])
            options[options.index("--duration") + 1] = str(args.soak)
            soak = run_bench(server.endpoint, model, options, args.soak)["points"][0]
            window = [
                s
                for s in server.sampler.samples
                if soak["window_start_ns"] <= s[0] <= soak["window_end_ns"]
            ]
            result["soak"] = {"point": soak, "rss": rss_summary(window)}
        return result
    finally:
        server.stop()


def measure_model(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from twinfer.engines.builtin import onnx_light_model_path

    other: dict[str, float] = {}
    result: dict[str, Any] = {"model_path": None, "benchmark_app": {}, "python_loop": None}
    if name != OVERHEAD_MODEL:
        path = str(onnx_light_model_path(name))
        result["model_path"] = path
        for hint in ("throughput", "latency"):
            log(f"{name}: benchmark_app -hint {hint} ({args.ceiling_seconds:g} s)")
            phase = Interference()
            result["benchmark_app"][hint] = benchmark_app(path, hint, args.ceiling_seconds)
            other[f"benchmark_app -hint {hint}"] = phase.stop()
        if args.loop_seconds:
            log(f"{name}: Python loop ({args.loop_seconds:g} s)")
            phase = Interference()
            result["python_loop"] = run_python_loop(path, args.loop_seconds)
            other["Python loop"] = phase.stop()
    result["runs"] = {}
    for execution in runs_of(args):
        label = execution or "default"
        log(f"{name}: twinfer ({label})")
        phase = Interference()
        result["runs"][label] = measure_run(name, execution, args, workdir)
        other[f"twinfer ({label})"] = phase.stop()
    result["other_processes_cores"] = other
    return result


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


REPRODUCE = [
    "## Reproduce",
    "",
    "```",
    "python benchmarks/run.py                                # under 15 minutes",
    "python benchmarks/run.py --execution throughput,adaptive # the RSS target, both modes",
    "python benchmarks/run.py --quick --models tiny          # a smoke run",
    "```",
    "",
    "Raw figures: `results.json`.",
    "",
]


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["python-loop"]:
        print(json.dumps(python_loop(argv[1], float(argv[2]))))
        return 0
    args = parse_args(argv)
    started = time.monotonic()
    results: dict[str, Any] = {
        "argv": list(argv),
        "machine": machine(),
        "note": args.note,
        "estimate_s": estimate_seconds(args),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {},
    }
    print("\n".join(machine_lines(results["machine"])).replace("**", ""), flush=True)
    print(
        f"Estimated time: {results['estimate_s'] / 60:.1f} min "
        f"(models {', '.join(args.models)}; servers per model: "
        f"{', '.join(m or 'default' for m in runs_of(args))})",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="twinfer-bench-") as tmp:
        for name in args.models:
            results["models"][name] = measure_model(name, args, Path(tmp))
    results["elapsed_s"] = time.monotonic() - started
    results["targets"] = compute_targets(results)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot = write_plot(results, args.out / "results.png")
    if plot is None:
        log("no plot: matplotlib is missing (pip install 'twinfer[bench]') or no model to plot")
    markdown = render_markdown(
        results, plot.name if plot else None, scheduling_sections(args.out) + REPRODUCE
    )
    (args.out / "RESULTS.md").write_text(markdown)
    print("\n".join(target_lines(results["targets"])).replace("**", ""), flush=True)
    log(f"wrote {args.out / 'RESULTS.md'} in {results['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
