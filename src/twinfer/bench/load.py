"""Running the load of a point: in this process, or split over child processes.

A point is cut into one :class:`Share` per load-generating process
(:func:`shares_for`).  With one process, every point of the sweep runs on
this process's reactor over one set of connections (:func:`run_in_process`).
With ``--processes N``, each point runs in N ``spawn`` children that
connect, report ready, start together at an agreed ``monotonic_ns`` time
and send back their raw samples, merged so that percentiles are those of
the union (:func:`run_point_processes`).  A run that cannot be set up
raises :class:`BenchError`, which carries the command's exit status.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import numpy as np
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError

from twinfer.bench.inputs import make_inputs
from twinfer.bench.loop import ClosedLoop
from twinfer.bench.report import Progress, Samples, merge
from twinfer.client import TwinferClient, Unreachable, connect, parse_servers
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.messages import InferRequest, Metadata

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


def _describe(error: BaseException) -> tuple[int, str]:
    """The exit status and message for a failure to set a run up."""
    if isinstance(error, Unreachable):
        return EXIT_UNREACHABLE, f"cannot reach the server: {error.message}"
    if isinstance(error, TwinferError):
        if error.code == ErrorCode.UNAVAILABLE:
            return EXIT_UNREACHABLE, str(error)
        return EXIT_ERROR, str(error)
    if isinstance(error, (ConnectError, ConnectionError, OSError)):
        return EXIT_UNREACHABLE, f"cannot reach the server: {error}"
    return EXIT_ERROR, f"{type(error).__name__}: {error}"


def _planned(args: argparse.Namespace) -> float | None:
    return None if args.requests is not None else args.warmup + args.duration


# -- one process's share of a point -----------------------------------------


def split(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal non-negative integers (larger first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@attrs.frozen
class Share:
    """What one load-generating process does for one concurrency point."""

    #: One endpoint, or several separated by commas.
    server: str
    model: str
    users: int
    connections: int
    duration: float | None
    requests: int | None
    warmup: float
    trust_root: str | None = None
    #: A client certificate and its key (PEM files) for servers that require one.
    client_cert: str | None = None
    client_key: str | None = None
    files: Mapping[str, np.ndarray] = attrs.field(factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = attrs.field(factory=dict)
    seed: int = 0
    timeout_ms: int = 0
    #: Tensors through shared memory (``--shared-memory``): one region per user.
    shared_memory: bool = False


def close_all(clients: Iterable[TwinferClient]) -> None:
    """Close every client's connection."""
    for client in clients:
        client.close()


async def open_clients(reactor: Any, share: Share) -> list[TwinferClient]:
    """Open ``share.connections`` connections spread over ``share.server``'s
    endpoints (comma-separated), handshakes done, as one client that moves
    (:class:`~twinfer.failover.ClientPool`); fires with ``[client]``.
    With shared memory: one plain connection."""
    if share.shared_memory:
        if share.connections > 1 or len(parse_servers(share.server)) > 1:
            raise BenchError("--shared-memory takes one server and one connection per process")
        return [await connect(reactor, share.server, trust_root=share.trust_root)]
    client = await connect(
        reactor,
        parse_servers(share.server),
        connections=share.connections,
        trust_root=share.trust_root,
        client_cert=share.client_cert,
        client_key=share.client_key,
    )
    return [client]


async def prepare(
    reactor: Any, share: Share
) -> tuple[list[TwinferClient], InferRequest | list[InferRequest]]:
    """Connect and pre-build the request message every user will send (with
    shared memory: one per user, each in its own registered region)."""
    clients = await open_clients(reactor, share)
    try:
        metadata = await clients[0].metadata(share.model)
        inputs = make_inputs(metadata, share.files, share.shapes, share.seed)
        if share.shared_memory:
            return clients, await _shared_messages(clients[0], metadata, inputs, share)
    except Exception:
        close_all(clients)
        raise
    return clients, InferRequest(share.model, inputs, (), share.timeout_ms)


async def _shared_messages(
    client: TwinferClient, metadata: Metadata, inputs: dict[str, Any], share: Share
) -> list[InferRequest]:
    """One region per user, registered, holding the inputs (and the outputs
    of static shape, which the server writes there)."""
    pool = client.shared_memory_pool()
    if pool is None:
        raise BenchError(f"--shared-memory: {client.shared_memory_off}")
    messages = []
    for _ in range(share.users):
        prepared = pool.prepare(metadata, inputs, (), share.timeout_ms)
        if prepared.register is not None:
            await client.protocol.request(prepared.register)
        messages.append(prepared.request)
    return messages


def _loop(
    reactor: Any,
    clients: Sequence[TwinferClient],
    message: InferRequest | list[InferRequest],
    share: Share,
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
            client_cert=args.cert,
            client_key=args.key,
            files=args.input_files,
            shapes=args.shapes,
            seed=args.seed + i,
            timeout_ms=args.timeout_ms,
            shared_memory=args.shared_memory,
        )
        for i in range(processes)
    ]


# -- every point in this process ---------------------------------------------


def run_in_process(
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
            close_all(clients)

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


# -- one point over child processes ------------------------------------------


def run_point_processes(args: argparse.Namespace, concurrency: int, progress: Progress) -> Samples:
    """One point over several child processes; blocks until done, returns the merged samples."""
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
        close_all(clients)
        conn.send(("result", samples.to_dict()))

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
