"""``twinfer bench``: closed-loop load against a running twinfer server.

The twinfer counterpart of Triton's ``perf_analyzer``.  For each point of a
concurrency sweep, C simulated users each keep exactly one inference request
in flight (a new one leaves as soon as the previous reply arrives), spread
over ``--connections`` connections and, with ``--processes N``, over N client
processes so that the load generator is not the bottleneck.  Each point
reports inferences/s, latency percentiles, errors by code, the server's own
split of queue time and compute time (``InferReply.queue_us``/``compute_us``)
and how much CPU the client itself used.

The module has three layers:

- statistics (:class:`Samples`, :func:`merge`, :func:`summarize`): pure
  functions over raw per-request samples; several processes' samples are
  merged by concatenation, so percentiles are those of the union;
- the load driver (:class:`ClosedLoop`): Twisted, one reactor, any number of
  connections; per request it only stamps a clock, sends a pre-built message
  whose tensors are ``bytes``-backed (the codec passes them to the transport
  without copying) and appends three integers to lists;
- the command (:func:`add_arguments`, :func:`run`): sweep orchestration,
  the optional child processes, the live progress line and the report.

Run as ``twinfer bench ...`` or ``python -m twinfer.bench ...``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure

import twinfer
from twinfer.client import DEFAULT_SERVER, ClientProtocol, TwinferClient, connect
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.messages import DType, InferReply, InferRequest, Metadata

# -- statistics (pure) -------------------------------------------------------


@attrs.frozen(eq=False)
class Samples:
    """The raw measurements of one load generator over one measurement window.

    Arrays hold one entry per successful measured request, in completion
    order; times are from ``time.monotonic_ns()``, which on Linux is the
    system-wide ``CLOCK_MONOTONIC`` and so comparable between processes.
    """

    #: Client-observed latency of each request, in nanoseconds (int64).
    latency_ns: np.ndarray
    #: The server's reported queue time of each request, in microseconds.
    queue_us: np.ndarray
    #: The server's reported compute time of each request, in microseconds.
    compute_us: np.ndarray
    #: Failed measured requests by error code name.
    errors: Mapping[str, int]
    #: Measurement window, ``monotonic_ns`` values.
    start_ns: int
    end_ns: int
    #: CPU seconds (user + system) the client process used in the window.
    cpu_seconds: float = 0.0

    @property
    def count(self) -> int:
        """Successful measured requests."""
        return len(self.latency_ns)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (picklable; ``Samples(**d)`` rebuilds it)."""
        return attrs.asdict(self, recurse=False)


def merge(parts: Sequence[Samples]) -> Samples:
    """Combine several load generators' samples of the same point.

    Raw samples are concatenated, so any percentile computed afterwards is the
    percentile of the union (never an average of per-part percentiles);
    error counts and CPU time add up and the window spans all parts.
    """
    if not parts:
        raise ValueError("nothing to merge")
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
    return Samples(
        latency_ns=np.concatenate([p.latency_ns for p in parts]),
        queue_us=np.concatenate([p.queue_us for p in parts]),
        compute_us=np.concatenate([p.compute_us for p in parts]),
        errors=dict(errors),
        start_ns=min(p.start_ns for p in parts),
        end_ns=max(p.end_ns for p in parts),
        cpu_seconds=sum(p.cpu_seconds for p in parts),
    )


PERCENTILES = (50, 90, 99)


def _percentiles(values: np.ndarray, scale: float) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of ``values`` times ``scale``; ``None`` each when empty."""
    if not len(values):
        return {**{f"p{p}": None for p in PERCENTILES}, "max": None, "mean": None}
    points = np.percentile(values, PERCENTILES)
    result: dict[str, float | None] = {
        f"p{p}": float(v) * scale for p, v in zip(PERCENTILES, points, strict=True)
    }
    result["max"] = float(values.max()) * scale
    result["mean"] = float(values.mean()) * scale
    return result


def summarize(samples: Samples) -> dict[str, Any]:
    """The report of one point: throughput, percentiles, errors, server split.

    Latencies are in milliseconds; ``queue_ms``/``compute_ms`` are the
    server's own figures; ``overhead_ms`` is latency minus both, per request
    (the network, the codecs and both event loops: what the server adds on
    top of the device beyond queueing, plus the client's share).
    """
    window = max(samples.end_ns - samples.start_ns, 1) / 1e9
    count = samples.count
    latency_us = samples.latency_ns / 1e3
    overhead_us = latency_us - samples.queue_us - samples.compute_us
    return {
        "count": count,
        "errors": dict(sorted(samples.errors.items())),
        "error_count": sum(samples.errors.values()),
        "window_s": window,
        # The window on the system-wide monotonic clock (to line up with
        # other measurements, e.g. the server's CPU time).
        "window_start_ns": samples.start_ns,
        "window_end_ns": samples.end_ns,
        "throughput": count / window,
        "latency_ms": _percentiles(latency_us, 1e-3),
        "queue_ms": _percentiles(samples.queue_us, 1e-3),
        "compute_ms": _percentiles(samples.compute_us, 1e-3),
        "overhead_ms": _percentiles(overhead_us, 1e-3),
        "client_cpu_percent": 100.0 * samples.cpu_seconds / window,
    }


def split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal non-negative integers (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# -- inputs ------------------------------------------------------------------


def _bytes_backed(array: np.ndarray) -> np.ndarray:
    """A read-only copy of ``array`` whose memory is a ``bytes`` object.

    The codec hands such an array's ``bytes`` to the transport as it is
    (see :func:`twinfer.codec.tensor_payload`), so sending it costs no copy
    and no allocation per request.
    """
    array = np.ascontiguousarray(array)
    return np.ndarray(array.shape, array.dtype, buffer=array.tobytes())


def make_inputs(
    metadata: Metadata,
    files: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The request inputs: ``files`` where given, random data matching the model otherwise.

    Dynamic dimensions (``-1``) of a random input take their size from
    ``shapes`` or default to 1.  Raises ``ValueError`` naming the input when
    a file or shape does not fit the model.
    """
    files = dict(files or {})
    shapes = dict(shapes or {})
    names = [spec.name for spec in metadata.inputs]
    for name in [*files, *shapes]:
        if name not in names:
            raise ValueError(f"model {metadata.name!r} has no input {name!r} (inputs: {names})")
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in metadata.inputs:
        if spec.name in files:
            array = files[spec.name]
            if array.dtype.newbyteorder("<") != spec.dtype.numpy.newbyteorder("<"):
                raise ValueError(
                    f"input {spec.name!r}: the file holds {array.dtype}, the model takes "
                    f"{spec.dtype.short_name}"
                )
            inputs[spec.name] = _bytes_backed(array.astype(spec.dtype.numpy, copy=False))
            continue
        if spec.shape is None:  # dynamic rank: only the user can say
            if spec.name not in shapes:
                raise ValueError(
                    f"input {spec.name!r} has a dynamic rank: give --shape {spec.name}=D,D,..."
                )
            inputs[spec.name] = _bytes_backed(_random(rng, spec.dtype, shapes[spec.name]))
            continue
        shape = shapes.get(spec.name) or tuple(1 if d < 0 else d for d in spec.shape)
        if len(shape) != len(spec.shape) or any(
            d >= 0 and s != d for s, d in zip(shape, spec.shape, strict=True)
        ):
            raise ValueError(
                f"input {spec.name!r}: shape {list(shape)} does not fit the model's "
                f"{list(spec.shape)}"
            )
        inputs[spec.name] = _bytes_backed(_random(rng, spec.dtype, shape))
    return inputs


def _random(rng: np.random.Generator, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    kind = dtype.numpy.kind
    if kind == "f":
        return rng.random(shape).astype(dtype.numpy)
    if kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 10, shape).astype(dtype.numpy)  # small: valid as indices, ids, ...


# -- the load driver (Twisted) ----------------------------------------------


def _error_name(failure: Failure) -> str:
    error = failure.value
    if isinstance(error, TwinferError):
        code = error.code
        return code.name if isinstance(code, ErrorCode) else f"CODE_{code}"
    return f"CLIENT_{type(error).__name__}"


class ClosedLoop:
    """C users, each keeping one request in flight, over some connections.

    User ``i`` sends on connection ``i % len(protocols)``.  What counts as
    measured:

    - ``duration`` mode: requests completing in ``[t0, t0 + duration)``,
      where ``t0 = start + warmup``; users stop sending at the window's end;
    - ``requests`` mode: the first ``requests`` requests sent at or after
      ``t0``; the window ends when the last of them completes.
    """

    def __init__(
        self,
        clock: Any,
        protocols: Sequence[ClientProtocol],
        message: InferRequest,
        users: int,
        *,
        duration: float | None = None,
        requests: int | None = None,
        warmup: float = 0.0,
    ) -> None:
        if (duration is None) == (requests is None):
            raise ValueError("give exactly one of duration and requests")
        self._clock = clock
        self._protocols = list(protocols)
        self._message = message
        self._users = users
        self._duration_ns = None if duration is None else int(duration * 1e9)
        self._limit = requests
        self._warmup_ns = int(warmup * 1e9)
        self._latency: list[int] = []
        self._queue: list[int] = []
        self._compute: list[int] = []
        self._errors: Counter[str] = Counter()
        self._issued = 0
        self._active = 0
        self._t0 = 0
        self._t1: int | None = None  # duration mode: the window's end
        self._last_done = 0
        self._cpu0 = 0.0
        self._cpu1 = 0.0
        #: Completed requests so far (warmup included), for progress displays.
        self.completed = 0
        self.done: Deferred[Samples] = Deferred()

    def start(self, at_ns: int | None = None) -> Deferred[Samples]:
        """Start every user at ``monotonic_ns() == at_ns`` (now if ``None``).

        Returns :attr:`done`, which fires with the measured :class:`Samples`
        once every user has stopped and nothing is in flight.
        """
        delay = 0.0 if at_ns is None else max(0.0, (at_ns - time.monotonic_ns()) / 1e9)
        self._clock.callLater(delay, self._begin)
        return self.done

    @property
    def t0_ns(self) -> int:
        """When measurement starts (0 before :meth:`start` took effect)."""
        return self._t0

    def _begin(self) -> None:
        now = time.monotonic_ns()
        self._t0 = now + self._warmup_ns
        if self._duration_ns is not None:
            self._t1 = self._t0 + self._duration_ns
        self._clock.callLater(self._warmup_ns / 1e9, self._mark_cpu)
        self._active = self._users
        for user in range(self._users):
            self._send(self._protocols[user % len(self._protocols)])

    def _mark_cpu(self) -> None:
        self._cpu0 = time.process_time()

    def _send(self, protocol: ClientProtocol) -> None:
        now = time.monotonic_ns()
        if self._t1 is not None and now >= self._t1:
            self._user_stopped()
            return
        if self._limit is not None and now >= self._t0:
            if self._issued >= self._limit:
                self._user_stopped()
                return
            self._issued += 1
        d = protocol.request(self._message)
        d.addCallbacks(
            self._replied, self._failed, callbackArgs=(protocol, now), errbackArgs=(protocol, now)
        )

    def _measured(self, sent: int, now: int) -> bool:
        if self._t1 is not None:
            return self._t0 <= now < self._t1
        return sent >= self._t0

    def _replied(self, reply: Any, protocol: ClientProtocol, sent: int) -> None:
        now = time.monotonic_ns()
        self.completed += 1
        if type(reply) is not InferReply:
            self._count_error(f"CLIENT_UNEXPECTED_{type(reply).__name__}", sent, now)
        elif self._measured(sent, now):
            self._latency.append(now - sent)
            self._queue.append(reply.queue_us)
            self._compute.append(reply.compute_us)
            self._last_done = now
        # Replies always arrive from dataReceived, never synchronously, so this
        # does not recurse.
        self._send(protocol)

    def _failed(self, failure: Failure, protocol: ClientProtocol, sent: int) -> None:
        now = time.monotonic_ns()
        self.completed += 1
        self._count_error(_error_name(failure), sent, now)
        if protocol.transport is None or not protocol.transport.connected:
            self._user_stopped()  # the connection is gone: this user cannot go on
        else:
            # A failure may fire synchronously (e.g. an encoding error):
            # go through the reactor so a run of them cannot grow the stack.
            self._clock.callLater(0, self._send, protocol)

    def _count_error(self, name: str, sent: int, now: int) -> None:
        if self._measured(sent, now):
            self._errors[name] += 1
            self._last_done = now

    def _user_stopped(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._cpu1 = time.process_time()
            end = self._t1 if self._t1 is not None else max(self._last_done, self._t0)
            self.done.callback(
                Samples(
                    latency_ns=np.array(self._latency, dtype=np.int64),
                    queue_us=np.array(self._queue, dtype=np.int64),
                    compute_us=np.array(self._compute, dtype=np.int64),
                    errors=dict(self._errors),
                    start_ns=self._t0,
                    end_ns=end,
                    cpu_seconds=max(0.0, self._cpu1 - self._cpu0),
                )
            )


# -- one process's share of a point -----------------------------------------


@attrs.frozen
class Share:
    """What one load-generating process does for one concurrency point."""

    server: str
    model: str
    users: int
    connections: int
    duration: float | None
    requests: int | None
    warmup: float
    trust_root: str | None = None
    files: Mapping[str, np.ndarray] = attrs.field(factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = attrs.field(factory=dict)
    seed: int = 0
    timeout_ms: int = 0


async def open_clients(reactor: Any, share: Share) -> list[TwinferClient]:
    """Open ``share.connections`` connections (handshakes done); fires with the clients."""
    ds = [
        connect(reactor, share.server, trust_root=share.trust_root)
        for _ in range(share.connections)
    ]
    results: list[tuple[bool, Any]] = await defer.DeferredList(ds, consumeErrors=True)
    clients: list[TwinferClient] = [c for ok, c in results if ok]
    failures: list[Failure] = [f for ok, f in results if not ok]
    if failures:
        for client in clients:
            client.close()
        failures[0].raiseException()
    return clients


async def prepare(reactor: Any, share: Share) -> tuple[list[TwinferClient], InferRequest]:
    """Connect and pre-build the one request message every user will send."""
    clients = await open_clients(reactor, share)
    try:
        metadata = await clients[0].metadata(share.model)
        inputs = make_inputs(metadata, share.files, share.shapes, share.seed)
    except Exception:
        for client in clients:
            client.close()
        raise
    return clients, InferRequest(share.model, inputs, (), share.timeout_ms)


def _loop(
    reactor: Any, clients: Sequence[TwinferClient], message: InferRequest, share: Share
) -> ClosedLoop:
    return ClosedLoop(
        reactor,
        [c.protocol for c in clients],
        message,
        share.users,
        duration=share.duration,
        requests=share.requests,
        warmup=share.warmup,
    )


def _child_main(
    share: Share, conn: multiprocessing.connection.Connection, counters: Any, index: int
) -> None:
    """A child process: connect, report ready, wait for the start time, run, send samples."""
    from twisted.internet.threads import deferToThread

    async def main(reactor: Any) -> None:
        try:
            clients, message = await prepare(reactor, share)
        except Exception as e:
            conn.send(("error", _describe(e)))  # (status, message)
            return
        conn.send(("ready", None))
        start_at = await deferToThread(conn.recv)
        loop = _loop(reactor, clients, message, share)
        publish = task.LoopingCall(lambda: counters.__setitem__(index, loop.completed))
        publish.start(0.25, now=False)
        samples = await loop.start(start_at)
        publish.stop()
        counters[index] = loop.completed
        for client in clients:
            client.close()
        conn.send(("result", samples.to_dict()))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))


# -- progress line ----------------------------------------------------------


class Progress:
    """A one-line live status on a terminal; silent when ``stream`` is not a TTY."""

    def __init__(self, stream: Any = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._last = (0.0, 0)

    #: Shortest time between two updates, in seconds.
    interval = 0.25

    def reset(self) -> None:
        """Start a new point."""
        self._last = (time.monotonic(), 0)

    def update(self, label: str, completed: int, elapsed: float, total: float | None) -> None:
        """Show the rate since the last update and elapsed/total seconds.

        Updates closer together than :attr:`interval` are skipped, so the
        rate is never taken over a meaninglessly short time.
        """
        if not self.enabled:
            return
        now = time.monotonic()
        then, before = self._last
        if now - then < self.interval:
            return
        rate = (completed - before) / (now - then)
        self._last = (now, completed)
        of = f"/{total:.1f}" if total is not None else ""
        self.stream.write(f"\r{label}: {rate:8.1f} inf/s  {elapsed:5.1f}{of} s  ({completed} done)")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line before the report is printed."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# -- the sweep ---------------------------------------------------------------


def shares_for(concurrency: int, args: argparse.Namespace) -> list[Share]:
    """Split one point over ``--processes`` (never more processes than users)."""
    processes = max(1, min(args.processes, concurrency))
    users = split(concurrency, processes)
    connections = split(max(args.connections, processes), processes)
    requests = split(args.requests, processes) if args.requests is not None else None
    return [
        Share(
            server=args.server,
            model=args.model,
            users=users[i],
            connections=max(1, min(connections[i], users[i])),
            duration=args.duration if args.requests is None else None,
            requests=requests[i] if requests is not None else None,
            warmup=args.warmup,
            trust_root=args.ca_file,
            files=args.input_files,
            shapes=args.shapes,
            seed=args.seed + i,
            timeout_ms=args.timeout_ms,
        )
        for i in range(processes)
    ]


def _run_in_process(
    args: argparse.Namespace, progress: Progress, report: Callable[[int, int, Samples], None]
) -> None:
    """Every point in this process, on one reactor and one set of connections."""

    failures: list[BaseException] = []

    async def main(reactor: Any) -> None:
        widest = max(args.concurrency)
        first = shares_for(widest, argparse.Namespace(**{**vars(args), "processes": 1}))[0]
        try:
            clients, message = await prepare(reactor, first)
        except Exception as e:
            failures.append(e)
            return
        try:
            for concurrency in args.concurrency:
                share = attrs.evolve(first, users=concurrency)
                used = clients[: max(1, min(len(clients), concurrency))]
                loop = _loop(reactor, used, message, share)
                progress.reset()
                started = time.monotonic()
                ticker = task.LoopingCall(
                    lambda c=concurrency, lp=loop, s=started: progress.update(
                        f"concurrency {c}", lp.completed, time.monotonic() - s, _planned(args)
                    ),
                )
                ticker.start(0.5, now=False)
                samples = await loop.start()
                ticker.stop()
                progress.clear()
                report(concurrency, 1, samples)
        finally:
            for client in clients:
                client.close()

    def react_main(reactor: Any) -> Deferred[None]:
        return defer.ensureDeferred(main(reactor))

    try:
        task.react(react_main)
    except SystemExit as e:  # react() always exits; 0 means main() returned
        if e.code:
            raise BenchError("the load run failed (see the traceback above)") from None
    if failures:
        status, message = _describe(failures[0])
        raise BenchError(message, status) from failures[0]


def _describe(error: BaseException) -> tuple[int, str]:
    """The exit status and message for a failure to set a run up."""
    if isinstance(error, TwinferError):
        if error.code == ErrorCode.UNAVAILABLE:
            return EXIT_UNREACHABLE, str(error)
        return EXIT_ERROR, str(error)
    if isinstance(error, (ConnectError, ConnectionError, OSError)):
        return EXIT_UNREACHABLE, f"cannot reach the server: {error}"
    return EXIT_ERROR, f"{type(error).__name__}: {error}"


def _planned(args: argparse.Namespace) -> float | None:
    return None if args.requests is not None else args.warmup + args.duration


#: Exit statuses (those of the ``twinfer`` command, plus 1 for failed requests).
EXIT_OK = 0
EXIT_FAILED_REQUESTS = 1
EXIT_ERROR = 2
EXIT_UNREACHABLE = 3


class BenchError(Exception):
    """The benchmark could not run (no server, unknown model, a child failed...)."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def _run_point_processes(args: argparse.Namespace, concurrency: int, progress: Progress) -> Samples:
    """One point over several child processes; fires nothing, blocks until done."""
    shares = shares_for(concurrency, args)
    context = multiprocessing.get_context("spawn")
    counters = context.RawArray("q", len(shares))
    pipes = []
    processes = []
    for i, share in enumerate(shares):
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(share, child_end, counters, i),
            daemon=True,
            name=f"twinfer-bench-{i}",
        )
        process.start()
        child_end.close()
        pipes.append(parent_end)
        processes.append(process)
    try:
        for pipe, process in zip(pipes, processes, strict=True):
            kind, detail = _receive(pipe, process, timeout=60.0)
            if kind != "ready":
                raise BenchError(*_child_failure(process, detail))
        start_at = time.monotonic_ns() + 50_000_000  # everyone starts together
        for pipe in pipes:
            pipe.send(start_at)
        progress.reset()
        results: dict[int, Samples] = {}
        deadline = None if args.requests is not None else args.warmup + args.duration + 120
        while len(results) < len(pipes):
            ready = multiprocessing.connection.wait(
                [p for i, p in enumerate(pipes) if i not in results], timeout=0.5
            )
            for done in ready:
                i = pipes.index(done)  # type: ignore[arg-type]
                kind, detail = _receive(pipes[i], processes[i], timeout=0)
                if kind != "result":
                    raise BenchError(*_child_failure(processes[i], detail))
                results[i] = Samples(**detail)
            elapsed = (time.monotonic_ns() - start_at) / 1e9
            progress.update(
                f"concurrency {concurrency}", sum(counters), max(0.0, elapsed), _planned(args)
            )
            if deadline is not None and elapsed > deadline:
                raise BenchError("load processes did not finish in time")
        progress.clear()
        return merge([results[i] for i in range(len(pipes))])
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
        for pipe in pipes:
            pipe.close()


def _child_failure(process: Any, detail: Any) -> tuple[str, int]:
    if isinstance(detail, tuple):  # (status, message) from the child's set-up
        status, message = detail
        return message, status
    return f"load process {process.name}: {detail}", EXIT_ERROR


def _receive(
    pipe: multiprocessing.connection.Connection, process: Any, timeout: float
) -> tuple[str, Any]:
    if not pipe.poll(timeout):
        return ("error", "no answer (timed out)")
    try:
        message: tuple[str, Any] = pipe.recv()
    except EOFError:
        process.join(timeout=5)
        return ("error", f"exited with code {process.exitcode} (see its traceback above)")
    return message


# -- the command -------------------------------------------------------------


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
        help=f"server endpoint: tcp:HOST:PORT or tls:HOST:PORT (default {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--ca-file",
        "--trust-root",
        dest="ca_file",
        metavar="PEM",
        help="for tls: CA certificate the server's certificate must chain to "
        "(default: the system's)",
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
        "--connections",
        type=_positive_int,
        default=1,
        metavar="K",
        help="spread the concurrency over K connections (default 1)",
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


HEADER = (
    f"{'conc':>5} {'inf/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
    f"{'queue ms':>9} {'compute ms':>10} {'other ms':>9} {'errors':>7} {'client CPU':>10}"
)


def _ms(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def format_row(point: Mapping[str, Any]) -> str:
    """One line of the text report (server split columns are p50s)."""
    lat = point["latency_ms"]
    return (
        f"{point['concurrency']:>5} {point['throughput']:>9.1f} {_ms(lat['p50'], 8)} "
        f"{_ms(lat['p90'], 8)} {_ms(lat['p99'], 8)} {_ms(lat['max'], 8)} "
        f"{_ms(point['queue_ms']['p50'], 9)} {_ms(point['compute_ms']['p50'], 10)} "
        f"{_ms(point['overhead_ms']['p50'], 9)} {point['error_count']:>7} "
        f"{point['client_cpu_percent']:>9.0f}%"
    )


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
        if len(points) == 1:
            print(HEADER, file=out)
        print(format_row(point), file=out)
        for name, count in point["errors"].items():
            print(f"{'':>5} error {name}: {count}", file=out)
        out.flush()

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
            _run_in_process(args, progress, lambda c, p, s: report(c, p, s))
        else:
            for concurrency in args.concurrency:
                samples = _run_point_processes(args, concurrency, progress)
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
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2, allow_nan=False, default=_json_default)
            f.write("\n")
    return EXIT_FAILED_REQUESTS if any(p["error_count"] for p in points) else EXIT_OK


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialize {value!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m twinfer.bench``: parse ``argv`` and :func:`run`."""
    parser = argparse.ArgumentParser(
        prog="twinfer bench",
        description="Closed-loop load against a running twinfer server "
        "(the twinfer counterpart of Triton's perf_analyzer).",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
