"""The console's commands: one function per command and the table that names them.

A command takes the session and its arguments and returns the reply's text
(a Deferred firing with it for the slow ones: load, unload, reload), raises
:class:`UsageError` for wrong arguments or :class:`~twinfer.errors.TwinferError`
for a refusal; the session (:mod:`.protocol`) turns all of them into lines.
Commands read the server through the session's
:class:`~twinfer.ops.control.Controller`: request counts and front ends from
its data plane (:class:`~twinfer.dataplane.DataPlane`, the one place every
front end's requests are counted), devices and queues from its dispatcher.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

import twinfer
from twinfer.dataplane import DataPlane, FrontendState
from twinfer.errors import ErrorCode, TwinferError
from twinfer.frontends.console.text import counts, duration, ms, table
from twinfer.ops.stats import Stats
from twinfer.scheduling import Mode, ModelEntry, Worker, WorkerState

if TYPE_CHECKING:
    from twinfer.frontends.console.protocol import ConsoleProtocol

log = Logger()


class UsageError(Exception):
    """Wrong arguments to a console command."""


def _nargs(args: list[str], low: int, high: int | None = None) -> None:
    high = low if high is None else high
    if not low <= len(args) <= high:
        raise UsageError(f"expected {low}{'' if high == low else f'-{high}'} argument(s)")


def _frontends(plane: DataPlane) -> list[FrontendState]:
    """The data plane's front ends, by name."""
    return sorted(plane.frontends.values(), key=lambda state: state.name)


def outcomes_by_frontend(stats: Stats, model: str | None = None) -> dict[str, dict[str, int]]:
    """Requests answered, ``{front end: {outcome: count}}``, over every model
    (unknown ones included) or for ``model`` only."""
    by_frontend: dict[str, dict[str, int]] = {}
    for (name, code, frontend), n in list(stats.requests.items()):
        if model is None or name == model:
            outcomes = by_frontend.setdefault(frontend, {})
            outcomes[code] = outcomes.get(code, 0) + n
    return by_frontend


def cmd_help(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    return table(("COMMAND", "DESCRIPTION"), [(u, d) for _, u, d in COMMANDS.values()])


def cmd_status(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    stats = c.stats
    health = c.health()
    frontends = _frontends(c.dataplane)
    errors = sum(n for code, n in stats.totals.items() if code != "OK")
    rows = [
        ("version", twinfer.__version__),
        ("uptime", duration(time.monotonic() - stats.started)),
        ("state", "ready" if health.ready else f"not ready: {health.detail}"),
        ("connections", len(c.connections())),
        *((f"  {state.name}", len(state.sessions)) for state in frontends),
        ("console sessions", len(session.factory.sessions)),
        ("in flight", c.inflight()),
        *((f"  {state.name}", state.inflight) for state in frontends),
        ("requests", stats.answered),
        ("ok", stats.totals.get("OK", 0)),
        ("errors", errors),
        ("models", len(c.dispatcher.model_names())),
        ("workers", len(c.dispatcher.workers)),
        ("control", c.busy_with or "idle"),
    ]
    return table(("FIELD", "VALUE"), rows)


def cmd_frontends(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    plane = session.factory.controller.dataplane
    answered = outcomes_by_frontend(plane.stats)
    states = {state.name: state for state in _frontends(plane)}
    rows = []
    for name in sorted(set(states) | set(answered)):
        state = states.get(name)
        outcomes = answered.get(name, {})
        rows.append(
            (
                name or "-",
                len(state.sessions) if state else 0,
                state.inflight if state else 0,
                sum(outcomes.values()),
                counts(outcomes),
                counts(state.protocol_errors) if state else "-",
            )
        )
    header = ("FRONTEND", "CONNECTIONS", "IN FLIGHT", "ANSWERED", "OUTCOMES", "PROTOCOL ERRORS")
    return table(header, rows)


def cmd_models(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    rows = []
    for entry in c.dispatcher.entries():
        name = entry.name
        config = c.models.get(name)
        model_stats = c.stats.models.get(name)
        inputs = ",".join(
            f"{p.name}:{p.dtype.short_name}{p.describe_shape()}" for p in entry.signature.inputs
        )
        rows.append(
            (
                name,
                ",".join(entry.devices),
                sum(q.depth for q in entry.queues),
                inputs,
                model_stats.count if model_stats else 0,
                model_stats.errors if model_stats else 0,
                config.path if config else "?",
                describe_execution(entry),
            )
        )
    header = ("MODEL", "DEVICES", "QUEUED", "INPUTS", "REQUESTS", "ERRORS", "PATH", "EXECUTION")
    return table(header, rows)


def describe_execution(entry: ModelEntry) -> str:
    """How a model runs per device and, where its engines were timed at load,
    their figures: ``cpu:adaptive(lat 5.9ms 181/s, thr 9.1ms 194/s)``."""
    parts = []
    for device, execution in entry.execution.items():
        timing = entry.tuning.get(device)
        figures = ""
        if timing is not None:
            fast, streams = timing.latency, timing.throughput
            figures = (
                f"(lat {fast.latency_ms:.1f}ms {fast.throughput:.0f}/s, "
                f"thr {streams.latency_ms:.1f}ms {streams.throughput:.0f}/s)"
            )
        parts.append(f"{device}:{execution}{figures}")
    return " ".join(parts) or "-"


def cmd_devices(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    now = time.monotonic()
    rows = []
    for worker in c.dispatcher.workers:
        if not worker.alive:
            state = "stopped"
        elif worker.paused:
            state = "draining" if worker.busy else "drained"
        elif worker.state is WorkerState.FAILED:
            state = "failed"
        else:
            state = "busy" if worker.busy else "idle"
        jobs = worker.jobs()
        current = "-"
        if jobs:
            batch = f" x{len(jobs)}" if len(jobs) > 1 else ""
            current = f"{jobs[0].model}{batch} ({ms(now - jobs[0].enqueued)} ms)"
        age = max(now - c.born.get(worker, c.stats.started), 1e-9)
        busy = 100.0 * min(worker.busy_seconds / age, 1.0)
        rows.append(
            (
                worker.device,
                worker.name,
                state,
                current,
                worker.jobs_done,
                worker.jobs_failed,
                f"{busy:.1f}",
                describe_engines(worker),
            )
        )
    header = ("DEVICE", "WORKER", "STATE", "CURRENT", "DONE", "FAILED", "BUSY%", "ENGINES")
    return table(header, rows)


def describe_engines(worker: Worker) -> str:
    """Which engines an adaptive device's replica runs now: ``latency`` (the
    leader), ``standby`` (another replica in LATENCY mode), ``throughput``,
    with ``->MODE`` while a switch waits; ``single`` with one engine per model."""
    policy = worker.policy
    if policy is None or not policy.adaptive:
        return "single"
    mode = policy.mode.value
    if policy.mode is Mode.LATENCY and policy.leader() is not worker:
        mode = "standby"
    return f"{mode}->{policy.target.value}" if policy.switching else mode


def cmd_queues(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 0)
    c = session.factory.controller
    now = time.monotonic()
    rows = []
    for entry in c.dispatcher.entries():
        for queue in entry.queues:
            waiting = queue.waiting()
            devices = queue.name.split("@", 1)[1] if "@" in queue.name else ",".join(entry.devices)
            oldest = f"{ms(now - waiting[0].enqueued)} ms" if waiting else "-"
            rows.append((queue.name, entry.name, devices, queue.depth, queue.size, oldest))
    return table(("QUEUE", "MODEL", "DEVICES", "DEPTH", "SIZE", "OLDEST WAIT"), rows)


def cmd_stats(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1)
    c = session.factory.controller
    name = args[0]
    model_stats = c.stats.models.get(name)
    if model_stats is None:
        if c.dispatcher.model(name) is None:
            known = ", ".join(c.dispatcher.model_names())
            raise TwinferError(ErrorCode.UNKNOWN_MODEL, f"no model {name!r} (models: {known})")
        return f"{name}: no requests yet"
    lines = [f"{name}: {model_stats.count} requests, {model_stats.errors} errors"]
    # The outcomes again by the front end that answered them.
    by_frontend = outcomes_by_frontend(c.stats, name)
    frontends = sorted(by_frontend)
    header = ("CODE", "COUNT", *((f.upper() or "-") for f in frontends))
    rows = [
        (code, n, *(by_frontend[f].get(code, 0) for f in frontends))
        for code, n in sorted(model_stats.codes.items())
    ]
    lines.append(table(header, rows))
    rows = []
    for label, histogram in (
        ("queue", model_stats.queue),
        ("compute", model_stats.compute),
        ("end-to-end", model_stats.latency),
    ):
        p = histogram.percentiles()
        window = len(histogram.recent or ())
        rows.append((label, *(ms(v) for v in p), window) if p else (label, "-", "-", "-", 0))
    lines.append("")
    lines.append(table(("TIME (ms)", "P50", "P90", "P99", "OVER LAST"), rows))
    return "\n".join(lines)


def cmd_load(session: ConsoleProtocol, args: list[str]) -> Deferred[str]:
    _nargs(args, 2, 3)
    devices = tuple(d for d in args[2].split(",") if d) if len(args) == 3 else ()
    return session.factory.controller.load(args[0], args[1], devices)


def cmd_unload(session: ConsoleProtocol, args: list[str]) -> Deferred[str]:
    _nargs(args, 1)
    return session.factory.controller.unload(args[0])


def cmd_reload(session: ConsoleProtocol, args: list[str]) -> Deferred[str]:
    _nargs(args, 1, 2)
    return session.factory.controller.reload(args[0], args[1] if len(args) == 2 else "")


def cmd_drain(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1)
    log.info("console: {user} drains {device}", user=session.user, device=args[0])
    return session.factory.controller.drain(args[0])


def cmd_undrain(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1)
    log.info("console: {user} undrains {device}", user=session.user, device=args[0])
    return session.factory.controller.undrain(args[0])


def cmd_loglevel(session: ConsoleProtocol, args: list[str]) -> str:
    _nargs(args, 1, 2)
    try:
        level = LogLevel.levelWithName(args[0].lower())
    except Exception:
        names = ", ".join(lv.name for lv in LogLevel.iterconstants())
        raise UsageError(f"unknown level {args[0]!r} (levels: {names})") from None
    namespace = args[1] if len(args) == 2 else ""
    session.factory.log_levels.set(level, namespace)
    log.info(
        "console: {user} set the log level of {ns} to {new}",
        user=session.user,
        ns=namespace or "everything",
        new=level.name,
    )
    return f"log level of {namespace or 'everything'} set to {level.name}"


def cmd_quit(session: ConsoleProtocol, args: list[str]) -> None:
    _nargs(args, 0)
    session.transport.write(b"bye\r\n")
    session.transport.loseConnection()
    return None


#: name -> (handler, usage, description)
COMMANDS: dict[str, tuple[Any, str, str]] = {
    "help": (cmd_help, "help", "this list"),
    "status": (cmd_status, "status", "uptime, connections, in-flight requests, totals"),
    "frontends": (
        cmd_frontends,
        "frontends",
        "per front end: connections, in flight, answers by outcome, protocol errors",
    ),
    "models": (cmd_models, "models", "served models, their devices, inputs and counts"),
    "devices": (cmd_devices, "devices", "device workers: state, current job, jobs, busy %"),
    "queues": (cmd_queues, "queues", "queue depth per model and device, oldest wait"),
    "stats": (cmd_stats, "stats MODEL", "requests, errors by code and front end, percentiles"),
    "load": (cmd_load, "load NAME PATH [DEV1,DEV2]", "compile and serve a new model"),
    "unload": (cmd_unload, "unload NAME", "stop serving a model (queued: UNAVAILABLE)"),
    "reload": (cmd_reload, "reload NAME [PATH]", "recompile a model and swap it in"),
    "drain": (cmd_drain, "drain DEVICE", "finish current jobs, take no new ones"),
    "undrain": (cmd_undrain, "undrain DEVICE", "take jobs again"),
    "loglevel": (cmd_loglevel, "loglevel LEVEL [NAMESPACE]", "debug, info, warn, error"),
    "quit": (cmd_quit, "quit", "close this session"),
}
