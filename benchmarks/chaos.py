"""Chaos soak: a real twinfer server under load and misbehaviour, with exact accounting.

    python benchmarks/chaos.py --minutes 10 [--out DIR] [--seed N]

Starts ``twistd twinfer`` (through ``chaos_server.py``: the real server with
device ``a``'s engines wrapped in a stand-in that fails on command) on
127.0.0.1 with the binary, HTTP, metrics and debug-console ports and
``--allow-admin``, serving ``tiny`` and ``squeezenet`` on two CPU devices
``a`` and ``b``.  For the whole run, pipelined binary clients and KServe v2
HTTP clients (JSON and the binary extension) keep the server loaded while,
at random: clients vanish with requests in flight, cancel, miss deadlines
(``timeout_ms``), send garbage or half a frame and leave; device ``a``
fails (``DeviceError``) and recovers; device ``b`` is drained and undrained
(console or ADMIN); every 30 s a model is reloaded (console ``reload`` or an
ADMIN request, alternately).  Everything stops by itself.

The run has two quiet points (all clients gone, nothing in flight): after
the warm-up and at the end.  The server's RSS and open fds are read there
(and every 5 s) from ``/proc/PID``.  At the end every request sent is
answered (OK or an error code), withdrawn by its own client (cancelled, or
in flight when its client vanished) or unanswered, and the counts are
checked against the server's ``twinfer_requests_total``.  Writes
``CHAOS.md`` and ``chaos.json`` into ``--out`` (default: this directory);
exits 1 if a request is unanswered, the server's counts disagree, RSS moved
more than 10 % or fds did not come back to the baseline.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

sys.path.insert(0, str(Path(__file__).parent))

from chaos_clients import BinaryUser, HTTPUser, Inputs, Ledger, Mix, Vandals  # noqa: E402
from chaos_ops import (  # noqa: E402
    ServerProcess,
    console,
    cpu_model,
    metrics,
    proc_sample,
    requests_by_frontend,
)
from chaos_report import write_report  # noqa: E402

from twinfer.client import connect  # noqa: E402
from twinfer.wire.messages import AdminRequest  # noqa: E402

CONFIG = """
[[devices]]
name = "a"
target = "CPU"
replicas = 1
health_check_interval_s = 0.5
properties = { PERFORMANCE_HINT = "LATENCY", NUM_STREAMS = 1, INFERENCE_NUM_THREADS = 1 }

[[devices]]
name = "b"
target = "CPU"
replicas = 1
health_check_interval_s = 1.0
properties = { PERFORMANCE_HINT = "LATENCY", NUM_STREAMS = 1, INFERENCE_NUM_THREADS = 1 }

[[models]]
name = "tiny"
path = "builtin:tiny"
devices = ["a", "b"]
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "squeezenet"
path = "builtin:squeezenet"
devices = ["a", "b"]
queue_size = 24
"""

#: Served models; reloads alternate between them, the heavy one first.
MODELS = ["squeezenet", "tiny"]


class Soak:
    """One run: the server, the clients, the operators' chaos and the samples."""

    def __init__(self, reactor: Any, args: argparse.Namespace, workdir: Path) -> None:
        self.reactor = reactor
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.ledger = Ledger()
        self.fault_file = workdir / "device-a.fault"
        self.server = ServerProcess(reactor, workdir, CONFIG, self.fault_file, "a")
        self.samples: list[dict[str, Any]] = []
        self.operations: list[dict[str, Any]] = []
        self.users: list[Any] = []
        self.runs: list[Deferred] = []
        self.chaos_calls: list[Any] = []
        self.started = 0.0
        self.pauses: dict[Deferred[None], Any] = {}
        self.chaos_on = False

    def pause(self, seconds: float) -> Deferred[None]:
        """Wait ``seconds``, or less: a quiet point ends every pause at once."""
        if not self.chaos_on:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        timer = self.reactor.callLater(seconds, d.callback, None)
        self.pauses[d] = timer
        d.addBoth(lambda result: (self.pauses.pop(d, None), result)[1])
        return d

    def end_pauses(self) -> None:
        pauses, self.pauses = self.pauses, {}
        for d, timer in pauses.items():
            if timer.active():
                timer.cancel()
            if not d.called:
                d.callback(None)

    # -- operators -----------------------------------------------------------

    def _log(self, what: str, result: str) -> None:
        self.operations.append(
            {"t": round(time.monotonic() - self.started, 1), "what": what, "result": result}
        )

    async def _admin(self, request: AdminRequest) -> str:
        client = await connect(self.reactor, f"tcp:127.0.0.1:{self.server.ports['binary']}")
        try:
            return await client.admin(request)
        finally:
            await client.close()

    async def reload(self) -> None:
        n = sum(1 for op in self.operations if op["what"].startswith("reload"))
        model = MODELS[n % 2]
        via_console = n % 4 < 2
        started = time.monotonic()
        try:
            if via_console:
                result = await console(
                    self.reactor, self.server.ports["console"], f"reload {model}"
                )
            else:
                result = await self._admin(AdminRequest("reload", model=model))
        except Exception as e:
            result = f"FAILED: {e}"
            self.ledger.events["ANOMALY: reload failed"] += 1
        took = time.monotonic() - started
        self._log(
            f"reload {model} via {'console' if via_console else 'ADMIN'}",
            f"{result} ({took:.1f} s)",
        )
        self.ledger.events["reloads"] += 1

    async def device_fault(self) -> None:
        self.fault_file.touch()
        self._log("device a fails", "fault file created")
        self.ledger.events["device a failures"] += 1
        await self.pause(self.rng.uniform(2, 8))
        self.fault_file.unlink(missing_ok=True)
        self._log("device a recovers", "fault file removed")

    async def drain(self) -> None:
        via_console = self.rng.random() < 0.5
        for op in ("drain", "undrain"):
            if via_console:
                result = await console(self.reactor, self.server.ports["console"], f"{op} b")
            else:
                result = await self._admin(AdminRequest(op, device="b"))
            self._log(f"{op} b via {'console' if via_console else 'ADMIN'}", result)
            if op == "drain":
                self.ledger.events["device b drains"] += 1
                await self.pause(self.rng.uniform(2, 8))

    def _every(self, mean: float, action: Any) -> None:
        """Run ``action`` (an async function) at exponential intervals, one at a time."""

        async def loop() -> None:
            while self.chaos_on:
                await self.pause(self.rng.expovariate(1 / mean))
                if self.chaos_on:
                    await action()

        self.chaos_calls.append(defer.ensureDeferred(loop()))

    # -- phases ----------------------------------------------------------------

    def start_load(self, inputs: Inputs, vandals: Vandals) -> None:
        ports = self.server.ports
        mix = Mix(self.rng, "tiny", "squeezenet")
        self.users = [
            BinaryUser(self.reactor, ports["binary"], self.ledger, inputs, mix, self.args.pipeline)
            for _ in range(self.args.binary_clients)
        ] + [
            HTTPUser(self.reactor, ports["http"], self.ledger, inputs, mix)
            for _ in range(self.args.http_clients)
        ]
        self.runs = [defer.ensureDeferred(u.run()) for u in self.users]
        self.chaos_on = True
        self.chaos_calls = []

        async def reloads() -> None:
            while self.chaos_on:
                await self.pause(self.args.reload_every)
                if self.chaos_on:
                    await self.reload()

        self.chaos_calls.append(defer.ensureDeferred(reloads()))
        self._every(15, self.device_fault)
        self._every(15, self.drain)

        async def vandalise() -> None:
            while self.chaos_on:
                await self.pause(self.rng.expovariate(self.args.vandals))
                if self.chaos_on:
                    vandals.launch()

        self.chaos_calls.append(defer.ensureDeferred(vandalise()))

    async def quiesce(self, vandals: Vandals) -> dict[str, Any]:
        """Stop everything, wait until nothing is in flight; return a sample."""
        self.chaos_on = False
        for user in self.users:
            user.stopping = True
        self.end_pauses()
        await defer.DeferredList(self.chaos_calls)
        self.fault_file.unlink(missing_ok=True)
        waiting = defer.DeferredList([*self.runs, *vandals.running])
        waiting.addTimeout(self.args.grace, self.reactor)
        try:
            await waiting
        except defer.TimeoutError:
            self.ledger.events["ANOMALY: clients still waiting after the grace period"] += 1
        deadline = time.monotonic() + self.args.grace
        while True:  # the server's own view: no connection, nothing in flight
            families = await metrics(self.reactor, self.server.ports["metrics"])
            busy = sum(
                s.value
                for f in families
                if f.name in ("twinfer_inflight", "twinfer_connections")
                for s in f.samples
            )
            if busy == 0 or time.monotonic() > deadline:
                break
            await task.deferLater(self.reactor, 0.5)
        await task.deferLater(self.reactor, 2)  # closed sockets' fds are released
        sample = self.sample("quiet")
        sample["server_busy"] = busy
        return sample

    def sample(self, label: str = "") -> dict[str, Any]:
        sample = proc_sample(self.server.pid)
        sample["t"] = round(time.monotonic() - self.started, 1)
        sample["label"] = label
        self.samples.append(sample)
        return sample

    async def run(self) -> dict[str, Any]:
        ports = await self.server.start()
        self.started = time.monotonic()
        client = await connect(self.reactor, f"tcp:127.0.0.1:{ports['binary']}")
        specs = {}
        for model in MODELS:
            metadata = await client.metadata(model)
            spec = metadata.inputs[0]
            specs[model] = (spec.name, tuple(1 if d < 0 else d for d in spec.shape or ()))
        await client.close()
        inputs = Inputs(specs)
        vandals = Vandals(
            self.reactor, ports, self.ledger, inputs, Mix(self.rng, "tiny", "squeezenet")
        )
        total = self.args.minutes * 60
        warmup = min(60.0, max(10.0, total * 0.1))
        sampler = LoopingCall(self.sample)
        sampler.start(5, now=True)
        self.start_load(inputs, vandals)
        # The first reload of each model allocates for good (the compiler's
        # caches, a pool thread's malloc arena): part of the warm-up, so that
        # the baseline has it and the run measures what repeated reloads add.
        for _ in MODELS:
            await self.reload()
        await task.deferLater(self.reactor, max(0.0, warmup - (time.monotonic() - self.started)))
        baseline = await self.quiesce(vandals)
        baseline["label"] = "baseline (after warm-up)"
        self.start_load(inputs, vandals)
        await task.deferLater(self.reactor, max(0.0, total - (time.monotonic() - self.started)))
        end = await self.quiesce(vandals)
        end["label"] = "end"
        sampler.stop()
        final = await metrics(self.reactor, ports["metrics"])
        server_counts = requests_by_frontend(final)
        log_errors = self.server.log_errors()
        exit_status = await self.server.stop()
        return {
            "minutes": self.args.minutes,
            "seed": self.args.seed,
            "warmup_s": warmup,
            "clients": {
                "binary": self.args.binary_clients,
                "pipeline": self.args.pipeline,
                "http": self.args.http_clients,
                "vandals_per_s": self.args.vandals,
            },
            "sent": dict(self.ledger.sent),
            "answered": {k: dict(v) for k, v in self.ledger.answered.items()},
            "withdrawn": {k: dict(v) for k, v in self.ledger.withdrawn.items()},
            "unanswered": len(self.ledger.pending),
            "events": dict(sorted(self.ledger.events.items())),
            "server_counts": server_counts,
            "protocol_errors": protocol_errors(final),
            "baseline": baseline,
            "end": end,
            "samples": self.samples,
            "operations": self.operations,
            "server_exit_status": exit_status,
            "server_log_errors": log_errors,
        }


def protocol_errors(families: list[Any]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for family in families:
        if family.name == "twinfer_protocol_errors":
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[f"{s.labels['frontend']} {s.labels['code']}"] += int(s.value)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--binary-clients", type=int, default=4)
    parser.add_argument(
        "--pipeline", type=int, default=8, help="requests in flight per binary connection"
    )
    parser.add_argument("--http-clients", type=int, default=4)
    parser.add_argument(
        "--vandals", type=float, default=2.0, help="misbehaving connections per second"
    )
    parser.add_argument("--reload-every", type=float, default=30.0)
    parser.add_argument(
        "--grace", type=float, default=60.0, help="seconds to wait for answers at a quiet point"
    )
    args = parser.parse_args()

    async def go(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="twinfer-chaos-") as workdir:
            soak = Soak(reactor, args, Path(workdir))
            try:
                result = await soak.run()
            finally:
                await soak.server.stop()
            result["cpu"] = cpu_model()
            ok = write_report(result, Path(args.out))
            if not ok:  # keep the server's log for the post-mortem
                shutil.copy(soak.server.log, Path(args.out) / "chaos-server.log")
                print(f"server log: {Path(args.out) / 'chaos-server.log'}")
        if not ok:
            raise SystemExit(1)

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
