"""The targets of issue 10, RESULTS.md and the plot, from ``run.py``'s figures.

Pure functions of the ``results`` dict (``results.json``) except the two
writers at the end.  The figures' shape, per model::

    {"model_path": ..., "benchmark_app": {"throughput": {...}, "latency": {...}},
     "python_loop": {... "rss_mib": {"second_engine": MiB}},
     "runs": {LABEL: {"execution": MODE or None,
                      "sweep": [POINT...],      # twinfer bench points + "server_cpu"
                      "steps": [PHASE...],      # twinfer bench --steps phases
                      "rss_idle_mib": ..., "rss_after_load_mib": ...}},
     "other_processes_cores": {PHASE: cores}}

A run is one server: LABEL is its ``execution`` mode, or ``default``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Issue 10's targets.
LATENCY_FACTOR = 1.10
LATENCY_SLACK_MS = 0.5
THROUGHPUT_FRACTION = 0.95
THROUGHPUT_CONCURRENCIES = (16, 64)
REACTOR_US_PER_REQUEST = 150.0
#: The model whose reactor CPU per request is the target; the other is reported.
OVERHEAD_MODEL = "tiny"
LARGE_INPUT_MODEL = "squeezenet"
#: CPU per request is reported at these concurrencies.
CPU_CONCURRENCIES = (1, 16)

PASS, FAIL, NOT_MEASURED, INFO = "PASS", "FAIL", "N/A", "INFO"


def latency_limit_ms(ceiling: Mapping[str, Any]) -> float:
    """The concurrency-1 p50 allowed: 1.10 x benchmark_app -hint latency's median + 0.5 ms."""
    return LATENCY_FACTOR * ceiling["latency"]["latency_ms"]["p50"] + LATENCY_SLACK_MS


def throughput_floor(ceiling: Mapping[str, Any]) -> float:
    """The throughput required under load: 0.95 x the better hint's FPS."""
    best = max(ceiling["throughput"]["throughput"], ceiling["latency"]["throughput"])
    return THROUGHPUT_FRACTION * best


def _point(points: Sequence[Mapping[str, Any]], concurrency: int) -> Mapping[str, Any] | None:
    return next((p for p in points if p["concurrency"] == concurrency), None)


def _verdict(ok: bool) -> str:
    return PASS if ok else FAIL


def _line(status: str, model: str, run: str, target: str, text: str) -> dict[str, str]:
    return {"status": status, "model": model, "run": run, "target": target, "text": text}


def _c1_latency(model: str, run: str, r: Mapping[str, Any], ceiling: Mapping[str, Any]) -> dict:
    limit = latency_limit_ms(ceiling)
    point = _point(r["sweep"], 1)
    target = "c=1 p50 <= 1.10 x benchmark_app latency median + 0.5 ms"
    if point is None or point["latency_ms"]["p50"] is None:
        return _line(NOT_MEASURED, model, run, target, "no concurrency-1 point")
    p50 = point["latency_ms"]["p50"]
    median = ceiling["latency"]["latency_ms"]["p50"]
    return _line(
        _verdict(p50 <= limit),
        model,
        run,
        target,
        f"p50 {p50:.2f} ms vs limit {limit:.2f} ms (benchmark_app -hint latency median "
        f"{median:.2f} ms; ratio {p50 / median:.2f}x)",
    )


def _throughput(model: str, run: str, r: Mapping[str, Any], ceiling: Mapping[str, Any]) -> dict:
    floor = throughput_floor(ceiling)
    target = "best of c=16/c=64 throughput >= 0.95 x max(both hints' FPS)"
    loaded = [p for p in r["sweep"] if p["concurrency"] in THROUGHPUT_CONCURRENCIES]
    if not loaded:
        return _line(NOT_MEASURED, model, run, target, "no concurrency 16 or 64 point")
    best = max(loaded, key=lambda p: p["throughput"])
    hints = ceiling["throughput"]["throughput"], ceiling["latency"]["throughput"]
    return _line(
        _verdict(best["throughput"] >= floor),
        model,
        run,
        target,
        f"{best['throughput']:.1f} inf/s at c={best['concurrency']} vs floor {floor:.1f} "
        f"(hints: throughput {hints[0]:.1f}, latency {hints[1]:.1f} FPS; "
        f"{best['throughput'] / max(hints):.0%} of the better)",
    )


def _steps(model: str, run: str, r: Mapping[str, Any], ceiling: Mapping[str, Any]) -> dict:
    target = "step load: 0 errors, each settled phase meets its concurrency's figure"
    phases = r.get("steps") or []
    if not phases:
        return _line(NOT_MEASURED, model, run, target, "no step load")
    limit, floor = latency_limit_ms(ceiling), throughput_floor(ceiling)
    errors = sum(p["error_count"] for p in phases)
    ok = errors == 0
    parts = [f"{errors} errors"]
    for i, phase in enumerate(phases, 1):
        users, p50, rate = phase["concurrency"], phase["latency_ms"]["p50"], phase["throughput"]
        if users == 1:
            met = p50 is not None and p50 <= limit
            parts.append(f"phase {i} (c=1): p50 {_ms(p50)} ms vs {limit:.2f}")
        elif users in THROUGHPUT_CONCURRENCIES:
            met = rate >= floor
            parts.append(f"phase {i} (c={users}): {rate:.1f} inf/s vs {floor:.1f}")
        else:
            met = True
            parts.append(f"phase {i} (c={users}): {rate:.1f} inf/s, p50 {_ms(p50)} ms (no figure)")
        ok = ok and met
    return _line(_verdict(ok), model, run, target, "; ".join(parts))


def _cpu_text(r: Mapping[str, Any]) -> tuple[list[float], str]:
    """The reactor's µs/request at each CPU concurrency, and a description."""
    reactor, parts = [], []
    for c in CPU_CONCURRENCIES:
        point = _point(r["sweep"], c)
        cpu = point.get("server_cpu") if point else None
        if not cpu:
            parts.append(f"c={c}: not measured")
            continue
        us = cpu["us_per_request"]
        if us["reactor"] is not None:
            reactor.append(us["reactor"])
        parts.append(
            f"c={c}: reactor {_us(us['reactor'])}, device threads {_us(us['device'])}, "
            f"other {_us(us['other'])}, total {_us(us['total'])} µs/request"
        )
    return reactor, "; ".join(parts)


def _rss(model: str, runs: Mapping[str, Any], loop: Mapping[str, Any] | None) -> dict:
    target = "RSS: the second engine costs at most the compiled model's size"
    by_mode = {r.get("execution"): r for r in runs.values()}
    text = ", ".join(
        f"{label} {_mib(r.get('rss_after_load_mib'))} MiB after load" for label, r in runs.items()
    )
    second = (loop or {}).get("rss_mib", {}).get("second_engine")
    size = f"; a second compiled model costs {second:.0f} MiB in a plain process" if second else ""
    single = by_mode.get("throughput")
    double = by_mode.get("adaptive")
    if single is None or double is None or second is None:
        why = "needs --execution throughput,adaptive" if second is not None else "no yardstick"
        return _line(INFO, model, "all", target, f"{text}{size} (not checked: {why})")
    extra = double["rss_after_load_mib"] - single["rss_after_load_mib"]
    return _line(
        _verdict(extra <= second),
        model,
        "adaptive vs throughput",
        target,
        f"adaptive costs {extra:+.0f} MiB over throughput-only vs {second:.0f} MiB ({text})",
    )


def compute_targets(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """One line per target, model and run: status, and the numbers behind it."""
    lines = []
    for model, m in results["models"].items():
        ceiling = m.get("benchmark_app") or {}
        for run, r in m["runs"].items():
            if ceiling:
                lines.append(_c1_latency(model, run, r, ceiling))
                lines.append(_throughput(model, run, r, ceiling))
                lines.append(_steps(model, run, r, ceiling))
            if model == OVERHEAD_MODEL:
                reactor, text = _cpu_text(r)
                ok = (
                    len(reactor) == len(CPU_CONCURRENCIES)
                    and max(reactor) <= REACTOR_US_PER_REQUEST
                )
                status = _verdict(ok) if reactor else NOT_MEASURED
                lines.append(
                    _line(status, model, run, "server CPU/request outside OpenVINO <= 150 µs", text)
                )
            elif model == LARGE_INPUT_MODEL:
                _, text = _cpu_text(r)
                lines.append(
                    _line(INFO, model, run, "server CPU/request, 600 KB input (reported)", text)
                )
            soak = r.get("soak")
            if soak and soak.get("rss"):
                rss = soak["rss"]
                flat = abs(rss["change_percent"]) <= 10 and rss["max_mib"] <= rss["start_mib"] * 1.1
                lines.append(
                    _line(
                        _verdict(flat),
                        model,
                        run,
                        "RSS flat (±10 %) over the soak",
                        f"c={soak['point']['concurrency']} for {soak['point']['window_s']:.0f} s: "
                        f"start {rss['start_mib']:.0f} MiB, end {rss['end_mib']:.0f} MiB, max "
                        f"{rss['max_mib']:.0f} MiB ({rss['change_percent']:+.1f} %), "
                        f"{soak['point']['error_count']} errors",
                    )
                )
        if ceiling:
            lines.append(_rss(model, m["runs"], m.get("python_loop")))
    return lines


# -- text ------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _us(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def machine_lines(m: Mapping[str, Any]) -> list[str]:
    """The CPU, its vector extensions, and the versions: the top of every report."""
    flags = [
        f"AVX2 {'yes' if m['avx2'] else 'no'}",
        "AVX-512 " + (", ".join(m["avx512"][:4]) + ("…" if len(m["avx512"]) > 4 else "") or "no"),
        "AMX " + (", ".join(m["amx"]) or "no"),
    ]
    v = m["versions"]
    return [
        f"**CPU:** {m['cpu']}, {m['cores']} cores ({'; '.join(flags)}), "
        f"{m['memory_gib']:.1f} GiB, Linux {m['kernel']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.  ",
        f"**Versions:** OpenVINO {v.get('openvino')}, Python {m['python']}, "
        f"Twisted {v.get('twisted')}, twinfer {v.get('twinfer')}, numpy {v.get('numpy')}, "
        f"onnx {v.get('onnx')}"
        + (f"; commit {m['git_commit']}" if m.get("git_commit") else "")
        + ".",
    ]


def target_lines(targets: Sequence[Mapping[str, str]]) -> list[str]:
    """The targets section's lines (Markdown list items)."""
    return [
        f"- **{t['status']}** {t['model']} [{t['run']}] {t['target']}: {t['text']}" for t in targets
    ]


def _model_section(name: str, m: Mapping[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    ceiling = m.get("benchmark_app") or {}
    if ceiling:
        lines += ["| benchmark_app | FPS | median ms | mean ms |", "|---|---|---|---|"]
        for hint in ("throughput", "latency"):
            b = ceiling[hint]
            lines.append(
                f"| -hint {hint} | {b['throughput']:.1f} | {_ms(b['latency_ms']['p50'])} | "
                f"{_ms(b['latency_ms']['mean'])} |"
            )
        lines.append("")
    loop = m.get("python_loop")
    if loop:
        lines += [
            f"Python loop, one THROUGHPUT-compiled request: {loop['throughput']:.1f} inf/s, "
            f"p50 {_ms(loop['latency_ms']['p50'])} ms.",
            "",
        ]
    for label, r in m["runs"].items():
        lines += [
            f"### twinfer, {label}"
            + (f' (`execution = "{r["execution"]}"`)' if r.get("execution") else ""),
            "",
            "| concurrency | inf/s | p50 ms | p90 ms | p99 ms | errors | reactor µs/req "
            "| device threads µs/req | other µs/req | total µs/req |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in r["sweep"]:
            us = (p.get("server_cpu") or {}).get("us_per_request") or {}
            lat = p["latency_ms"]
            lines.append(
                f"| {p['concurrency']} | {p['throughput']:.1f} | {_ms(lat['p50'])} | "
                f"{_ms(lat['p90'])} | {_ms(lat['p99'])} | {p['error_count']} | "
                f"{_us(us.get('reactor'))} | {_us(us.get('device'))} | {_us(us.get('other'))} "
                f"| {_us(us.get('total'))} |"
            )
        if r.get("steps"):
            first = r["steps"][0]
            lines += [
                "",
                f"Step load ({first['phase_s']:g} s per phase; throughput and latency after the "
                f"first {first['settle_s']:g} s of each, errors over the whole phase):",
                "",
                "| phase | users | inf/s | p50 ms | p99 ms | errors |",
                "|---|---|---|---|---|---|",
            ]
            for i, p in enumerate(r["steps"], 1):
                lines.append(
                    f"| {i} | {p['concurrency']} | {p['throughput']:.1f} | "
                    f"{_ms(p['latency_ms']['p50'])} | {_ms(p['latency_ms']['p99'])} | "
                    f"{p['error_count']} |"
                )
        lines += [
            "",
            f"Server RSS: idle {_mib(r.get('rss_idle_mib'))} MiB, after load "
            f"{_mib(r.get('rss_after_load_mib'))} MiB, max {_mib(r.get('rss_max_mib'))} MiB.",
            "",
        ]
    other = m.get("other_processes_cores") or {}
    if other:
        lines += [
            "CPU used by *other* processes (cores): "
            + ", ".join(f"{phase} {cores:.2f}" for phase, cores in other.items())
            + (". **Above 0.2 cores: not trustworthy.**" if max(other.values()) > 0.2 else "."),
            "",
        ]
    return lines


def render_markdown(
    results: Mapping[str, Any], plot_name: str | None, extra: Sequence[str] = ()
) -> str:
    """RESULTS.md: machine, targets, plot, one section per model, then ``extra`` lines."""
    s = results["settings"]
    lines = [
        "# twinfer benchmark results",
        "",
        *machine_lines(results["machine"]),
        "",
        f"Generated by `benchmarks/run.py {' '.join(results['argv'])}` on "
        f"{results['machine']['date']} in {results['elapsed_s'] / 60:.1f} min "
        f"(estimated {results['estimate_s'] / 60:.1f}). Compare figures within one run only: "
        "the ratios differ by CPU.",
        "",
    ]
    if results.get("note"):
        lines += [f"> **Note:** {results['note']}", ""]
    lines += [
        "twinfer: `twistd -n twinfer` serving one model per run, driven by `twinfer bench` "
        f"(closed loop, {s['duration']:g} s per point after {s['warmup']:g} s warm-up; step "
        f"load {' → '.join(map(str, s['steps']))} users, {s['step_duration']:g} s per phase). "
        "Server CPU per request: per-thread CPU time from `/proc` over each point, divided "
        "by the requests answered: the reactor thread (wholly outside OpenVINO), the device "
        "threads (`twinfer-*`, which call OpenVINO) and other threads (OpenVINO's own).",
        "",
        "## Targets (issue 10)",
        "",
        *target_lines(results["targets"]),
        "",
    ]
    disturbed = [
        name
        for name, m in results["models"].items()
        if max((m.get("other_processes_cores") or {}).values(), default=0.0) > 0.2
    ]
    if disturbed:
        lines += [
            f"⚠ Other processes used more than 0.2 cores while {', '.join(disturbed)} "
            "was measured (see each model's section): these verdicts are not trustworthy.",
            "",
        ]
    if plot_name:
        lines += [f"![p50 latency against throughput, with both hints]({plot_name})", ""]
    for name, m in results["models"].items():
        lines += _model_section(name, m)
    lines += list(extra)
    return "\n".join(lines) + "\n"


# -- the plot ----------------------------------------------------------------------


def plot_series(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model with benchmark_app figures: each run's (throughput, p50 ms,
    concurrency) points, and each hint's (FPS, median ms)."""
    series: dict[str, dict[str, Any]] = {}
    for name, m in results["models"].items():
        ceiling = m.get("benchmark_app") or {}
        if not ceiling:
            continue
        series[name] = {
            "runs": {
                label: [
                    (p["throughput"], p["latency_ms"]["p50"], p["concurrency"])
                    for p in r["sweep"]
                    if p["latency_ms"]["p50"] is not None
                ]
                for label, r in m["runs"].items()
            },
            "hints": {
                hint: (ceiling[hint]["throughput"], ceiling[hint]["latency_ms"]["p50"])
                for hint in ("throughput", "latency")
            },
        }
    return series


def write_plot(results: Mapping[str, Any], path: Path) -> Path | None:
    """Per model, twinfer's p50-vs-throughput curve against both hints' points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = plot_series(results)
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
    for ax, (name, s) in zip(axes[0], series.items()):
        for label, points in s["runs"].items():
            xs, ys, cs = zip(*points) if points else ((), (), ())
            ax.plot(xs, ys, "o-", label=f"twinfer ({label})")
            for x, y, c in zip(xs, ys, cs):
                ax.annotate(f"c={c}", (x, y), textcoords="offset points", xytext=(4, 4))
        for hint, marker in (("throughput", "s"), ("latency", "^")):
            fps, median = s["hints"][hint]
            ax.plot([fps], [median], marker, ms=10, label=f"benchmark_app -hint {hint}")
        ax.set_yscale("log")
        ax.set_xlim(left=0)
        ax.set_xlabel("throughput, inferences/s")
        ax.set_ylabel("p50 latency, ms")
        ax.set_title(name)
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
