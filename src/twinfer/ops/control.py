"""Runtime control: load, unload and reload models, drain devices, report health.

:class:`Controller` is the one place that changes the serving graph while the
server runs.  Every operation is serialized by a ``DeferredLock`` and follows
the same discipline:

- reading and compiling a model (and creating its infer requests) happens in
  a reactor pool thread (``deferToThread``), never on the reactor;
- the new :class:`~twinfer.scheduling.ModelEntry` (with fresh queues) replaces
  the old one in ``Dispatcher.models`` in one assignment on the reactor thread,
  so each request is validated and queued against exactly one version;
- jobs already queued for the old version stay in the old queues and run on
  the old engines; only when every one of them has been answered do the
  device workers drop the old queues and engines and take the new queue.
  Requests that arrive meanwhile wait in the new queue, behind the old ones
  exactly as FIFO order would have them, so a reload fails no request;
- a device that gets a model but has no worker yet gets new workers.

An unload removes the entry (new requests get ``UNKNOWN_MODEL``), answers the
jobs still queued with ``UNAVAILABLE`` and lets the running ones finish.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail, gatherResults, maybeDeferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from twinfer.config import (
    Config,
    ConfigError,
    ModelConfig,
    load_config,
)
from twinfer.dataplane import DataPlane, Session
from twinfer.engines.openvino import Engine
from twinfer.errors import ErrorCode, TwinferError
from twinfer.ops.compiling import Compiled, check_model_path, compile_model, file_stamp
from twinfer.registry import (
    EngineFactory,
    batch_policy,
    make_entry,
    make_policy,
    make_queues,
    make_worker,
    openvino_engine,
)
from twinfer.scheduling import Job, JobQueue, ModelEntry, Worker
from twinfer.wire.messages import AdminRequest, Health

log = Logger()


def _relay(result: Any, done: Deferred[None]) -> Any:
    done.callback(None)
    return result


def job_settled(job: Job) -> Deferred[None]:
    """A Deferred firing (with None) once ``job`` has been answered, however.

    It is chained after the job's consumers and passes their result on
    unchanged, so it never alters what the protocol sees.
    """
    done: Deferred[None] = Deferred()
    job.deferred.addBoth(_relay, done)
    return done


class Controller:
    """Owns runtime changes to the served models, and reports on the server's state.

    Connections, requests in flight and request statistics are the data
    plane's, over every front end.
    """

    def __init__(
        self,
        config: Config,
        dataplane: DataPlane,
        reactor: Any,
        *,
        engine_factory: EngineFactory = openvino_engine,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        self.dataplane = dataplane
        self.dispatcher = dispatcher = dataplane.dispatcher
        self.reactor = reactor
        self.stats = dataplane.stats
        self.engine_factory = engine_factory
        #: The file re-read on SIGHUP (None: the embedded default).
        self.config_path = config_path
        #: The models that should be served, as last loaded.
        self.models: dict[str, ModelConfig] = {m.name: m for m in config.models}
        #: Models unloaded at run time, as they were last served (so that
        #: :meth:`restore` can load them again by name).
        self.unloaded: dict[str, ModelConfig] = {}
        self._lock = DeferredLock()
        self._stamps = {m.name: file_stamp(config.model_path(m)) for m in config.models}
        now = time.monotonic()
        #: When each worker was created (for its busy percentage).
        self.born: dict[Worker, float] = {w: now for w in dispatcher.workers}
        #: Busy seconds and jobs of workers that were stopped, per device, so
        #: that the metrics' counters never go down.
        self.retired_busy: dict[str, float] = {}
        self.retired_jobs: dict[str, int] = {}
        #: What the control lock is doing now (for the console's ``status``).
        self.busy_with = ""

    # -- public operations: each fires with a one-line summary ---------------

    def load(self, name: str, path: str, devices: Sequence[str] = ()) -> Deferred[str]:
        """Load a new model ``name`` from ``path`` onto ``devices``.

        Fires with a summary; fails with :class:`TwinferError` (``INVALID_INPUT``
        for a bad name, path or device, or an existing name).
        """
        return self._locked(f"load {name}", self._load, name, path, tuple(devices))

    def unload(self, name: str) -> Deferred[str]:
        """Stop serving ``name``; queued requests get UNAVAILABLE, running ones finish."""
        return self._locked(f"unload {name}", self._unload, name)

    def restore(self, name: str) -> Deferred[str]:
        """Load ``name`` again as it was served before it was unloaded.

        Fires with a summary; fails with :class:`TwinferError`
        (``UNKNOWN_MODEL`` if ``name`` was never unloaded, ``INVALID_INPUT``
        if it is loaded).
        """
        return self._locked(f"load {name}", self._restore, name)

    def reload(self, name: str, path: str = "", config: ModelConfig | None = None) -> Deferred[str]:
        """Compile ``name`` again (from ``path`` or ``config`` if given) and swap it in.

        In-flight and queued requests finish on the old version.
        """
        return self._locked(f"reload {name}", self._reload, name, path, config)

    def reload_config(self) -> Deferred[str]:
        """Re-read the configuration file (SIGHUP): load new models, reload changed
        ones (config entry or file changed), unload removed ones."""
        return Deferred.fromCoroutine(self._reload_config())

    def drain(self, device: str) -> str:
        """Pause ``device``'s workers after their current job; returns a summary."""
        workers = self._device_workers(device)
        for worker in workers:
            worker.pause()
        log.info("device {device} drained", device=device)
        return f"device {device} drained: {len(workers)} worker(s) take no new jobs"

    def undrain(self, device: str) -> str:
        """Let ``device``'s workers take jobs again; returns a summary."""
        workers = self._device_workers(device)
        for worker in workers:
            worker.resume()
        log.info("device {device} undrained", device=device)
        return f"device {device} undrained: {len(workers)} worker(s) serving"

    def execute(self, request: AdminRequest) -> Deferred[str]:
        """Run an ADMIN_REQUEST; fires with a summary or fails with :class:`TwinferError`."""
        op = request.op
        if op in ("load", "unload", "reload") and not request.model:
            return fail(TwinferError(ErrorCode.INVALID_INPUT, f"{op} needs a model name"))
        if op == "load":
            if not request.path:
                return fail(TwinferError(ErrorCode.INVALID_INPUT, "load needs a model path"))
            return self.load(request.model, request.path, request.devices)
        if op == "unload":
            return self.unload(request.model)
        if op == "reload":
            return self.reload(request.model, request.path)
        if op in ("drain", "undrain"):
            action = self.drain if op == "drain" else self.undrain
            return maybeDeferred(action, request.device)
        return fail(TwinferError(ErrorCode.INVALID_INPUT, f"unknown admin operation {op!r}"))

    # -- state, for the console, metrics and health -------------------------

    @property
    def closing(self) -> bool:
        """Whether the server is shutting down (readiness is then false)."""
        return self.dataplane.draining

    def begin_drain(self) -> None:
        """Start shutting down: every front end refuses new requests."""
        self.dataplane.begin_drain()

    def health(self) -> Health:
        """Liveness (the reactor answered) and readiness (see
        :class:`~twinfer.wire.messages.Health`)."""
        if self.closing:
            return Health(True, False, "the server is shutting down")
        if not self.dispatcher.started:
            return Health(True, False, "the server is not started")
        serving = {w.device for w in self.dispatcher.workers if w.alive and w.available}
        problems = []
        for name in self.models:
            entry = self.dispatcher.model(name)
            if entry is None:
                problems.append(f"model {name!r} is not loaded")
            elif not serving.intersection(entry.devices):
                problems.append(f"model {name!r} has no healthy device")
        return Health(True, not problems, "; ".join(problems))

    def connections(self) -> list[Session]:
        """Open client connections, over every front end."""
        return list(self.dataplane.sessions())

    def inflight(self) -> int:
        """Requests queued or running, over every front end."""
        return self.dataplane.inflight()

    def device_names(self) -> list[str]:
        """Configured device names."""
        return [d.name for d in self.config.devices]

    def busy_seconds(self, device: str) -> float:
        """Seconds ``device``'s workers spent computing, stopped workers included."""
        live = sum(w.busy_seconds for w in self.dispatcher.workers_on(device))
        return self.retired_busy.get(device, 0.0) + live

    def jobs_done(self, device: str) -> int:
        """Jobs ``device``'s workers completed, stopped workers included."""
        live = sum(w.jobs_done for w in self.dispatcher.workers_on(device))
        return self.retired_jobs.get(device, 0) + live

    # -- implementation -------------------------------------------------------

    def _locked(self, what: str, op: Any, *args: Any) -> Deferred[str]:
        async def run() -> str:
            self.busy_with = what
            try:
                return str(await op(*args))
            finally:
                self.busy_with = ""

        return self._lock.run(lambda: Deferred.fromCoroutine(run()))

    def _device_workers(self, device: str) -> list[Worker]:
        if device not in self.device_names():
            raise TwinferError(
                ErrorCode.INVALID_INPUT,
                f"no device {device!r} (devices: {', '.join(self.device_names())})",
            )
        return [w for w in self.dispatcher.workers_on(device) if w.alive]

    def _check_devices(self, devices: Sequence[str]) -> None:
        known = self.device_names()
        for device in devices:
            if device not in known:
                raise TwinferError(
                    ErrorCode.INVALID_INPUT,
                    f"no device {device!r} (devices: {', '.join(known)})",
                )
        if len(set(devices)) != len(devices):
            raise TwinferError(ErrorCode.INVALID_INPUT, "a device is listed twice")

    async def _load(self, name: str, path: str, devices: tuple[str, ...]) -> str:
        if not name or len(name) > 200 or any(c.isspace() for c in name):
            raise TwinferError(
                ErrorCode.INVALID_INPUT, f"model name {name!r} must be 1-200 characters, no spaces"
            )
        if self.dispatcher.model(name) is not None or name in self.models:
            raise TwinferError(
                ErrorCode.INVALID_INPUT, f"model {name!r} is already loaded (use reload)"
            )
        if not devices:
            known = self.device_names()
            if len(known) != 1:
                raise TwinferError(
                    ErrorCode.INVALID_INPUT,
                    f"name the devices for {name!r} (devices: {', '.join(known)})",
                )
            devices = (known[0],)
        self._check_devices(devices)
        if not path.startswith("builtin:"):
            path = str(Path(path).resolve())
        check_model_path(path)
        model_config = ModelConfig(name=name, path=path, devices=devices)
        return await self._install(model_config, None, "loaded")

    async def _reload(self, name: str, path: str, config: ModelConfig | None) -> str:
        current = self.models.get(name)
        old = self.dispatcher.model(name)
        if current is None or old is None:
            raise TwinferError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} is not loaded")
        if config is None:
            if path and not path.startswith("builtin:"):
                path = str(Path(path).resolve())
            config = attrs.evolve(current, path=path or current.path)
        self._check_devices(config.devices)
        check_model_path(config.path)
        return await self._install(config, old, "reloaded")

    async def _restore(self, name: str) -> str:
        if name in self.models:
            raise TwinferError(
                ErrorCode.INVALID_INPUT, f"model {name!r} is already loaded (use reload)"
            )
        config = self.unloaded.get(name)
        if config is None:
            raise TwinferError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} was never unloaded")
        return await self._install(config, None, "loaded")

    async def _unload(self, name: str) -> str:
        entry = self.dispatcher.uninstall(name)
        if entry is None:
            raise TwinferError(ErrorCode.UNKNOWN_MODEL, f"model {name!r} is not loaded")
        config = self.models.pop(name, None)
        if config is not None:
            self.unloaded[name] = config
        self._stamps.pop(name, None)
        self._sync_config()
        failed = 0
        for queue in entry.queues:
            for job in queue.drain():
                if not job.deferred.called:
                    failed += 1
                    job.deferred.errback(
                        TwinferError(ErrorCode.UNAVAILABLE, f"model {name!r} was unloaded")
                    )
        await self._settled(entry.queues)
        self._detach(name, entry.queues)
        log.info(
            "model {name} unloaded ({failed} queued requests refused)", name=name, failed=failed
        )
        return f"unloaded {name} ({failed} queued request(s) answered UNAVAILABLE)"

    async def _install(self, config: ModelConfig, old: ModelEntry | None, verb: str) -> str:
        started = time.monotonic()
        full = attrs.evolve(self.config, models=(config,))
        path = full.model_path(config)
        existing = {
            device: [w for w in self.dispatcher.workers_on(device) if w.alive]
            for device in config.devices
        }
        counts = {device: len(ws) for device, ws in existing.items() if ws}
        try:
            compiled: Compiled = await deferToThread(
                compile_model, full, config, counts, self.engine_factory
            )
        except ValueError as e:
            raise TwinferError(ErrorCode.INVALID_INPUT, str(e)) from e

        # On the reactor thread from here on: the swap is one assignment.
        by_device = make_queues(config)
        entry = make_entry(config, compiled.loaded, by_device)
        # New requests wait in the new queues until workers take them (below).
        entry.attaching = True
        self.dispatcher.install(entry)
        self.models[config.name] = config
        self.unloaded.pop(config.name, None)
        self._stamps[config.name] = file_stamp(path)
        self._sync_config()

        # Devices without workers get new ones at once: they hold no old jobs.
        for device in config.devices:
            if device in counts:
                continue
            fast = compiled.latency[device]
            execution = make_policy(self.config.device(device), len(fast), self.reactor)
            for replica, engine in enumerate(compiled.engines[device]):
                worker = make_worker(
                    self.config.device(device),
                    replica,
                    self.reactor,
                    {config.name: engine},
                    [by_device[device]],
                    [config],
                    execution,
                    {config.name: fast[replica]},
                )
                self.born[worker] = time.monotonic()
                self.dispatcher.add_worker(worker)

        try:
            if old is not None:
                # The old version's jobs finish on the old engines first.
                await self._settled(old.queues)
                self._detach(config.name, old.queues, keep=set(counts))
            policy = {config.name: batch_policy(config)}
            for device in counts:
                fast = compiled.latency[device]
                for worker, engine, latency in zip(
                    existing[device], compiled.engines[device], fast, strict=True
                ):
                    worker.reconfigure(
                        {config.name: engine},
                        add=[by_device[device]],
                        batching=policy,
                        latency_engines={config.name: latency},
                    )
        finally:
            entry.attaching = False
            self.dispatcher.reindex()
        seconds = time.monotonic() - started
        log.info(
            "model {name} {verb} from {path} on {devices} in {seconds:.2f}s",
            name=config.name,
            verb=verb,
            path=config.path,
            devices="+".join(config.devices),
            seconds=seconds,
        )
        where = ",".join(config.devices)
        return f"{verb} {config.name} from {config.path} on {where} in {seconds:.2f}s"

    def _settled(self, queues: Sequence[JobQueue]) -> Deferred[Any]:
        """Fires once every job now waiting in or running from ``queues`` is answered."""
        jobs = self.dispatcher.pending_jobs(queues)
        return gatherResults([job_settled(job) for job in jobs])

    def _detach(
        self, model: str, queues: Sequence[JobQueue], keep: frozenset[str] | set[str] = frozenset()
    ) -> None:
        """Take ``queues`` (and the model's engine) off the workers; stop idle-forever ones.

        Workers on devices in ``keep`` keep their engine slot (it is replaced next).
        """
        for worker in list(self.dispatcher.workers):
            if not any(q in worker.queues for q in queues):
                continue
            engines: dict[str, Engine | None] = {} if worker.device in keep else {model: None}
            worker.reconfigure(engines, remove=queues, latency_engines=dict(engines))
            if not worker.queues and worker.device not in keep:
                self._retire(worker)
        self.dispatcher.reindex()

    def _retire(self, worker: Worker) -> None:
        self.dispatcher.remove_worker(worker)
        self.born.pop(worker, None)
        self.retired_busy[worker.device] = (
            self.retired_busy.get(worker.device, 0.0) + worker.busy_seconds
        )
        jobs = self.retired_jobs.get(worker.device, 0) + worker.jobs_done
        self.retired_jobs[worker.device] = jobs

    def _sync_config(self) -> None:
        self.config = attrs.evolve(self.config, models=tuple(self.models.values()))

    async def _reload_config(self) -> str:
        if self.config_path is None:
            return "no configuration file to re-read (serving the embedded default)"
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("SIGHUP: configuration not reloaded: {error}", error=str(e))
            return f"configuration not reloaded: {e}"
        if new.devices != self.config.devices:
            log.warn("SIGHUP: device changes take effect only after a restart")
        new = attrs.evolve(new, devices=self.config.devices)
        self.config = attrs.evolve(self.config, base_dir=new.base_dir, server=self.config.server)
        done = []
        wanted = {m.name: m for m in new.models}
        for name in list(self.models):
            if name not in wanted:
                done.append(await self.unload(name))
        for name, model in wanted.items():
            resolved = attrs.evolve(model, path=new.model_path(model))
            try:
                if name not in self.models:
                    done.append(
                        await self._locked(f"load {name}", self._install, resolved, None, "loaded")
                    )
                elif self._changed(name, resolved):
                    done.append(await self.reload(name, config=resolved))
            except TwinferError as e:
                log.error("SIGHUP: {name}: {error}", name=name, error=e.message)
                done.append(f"{name}: {e.message}")
        summary = "; ".join(done) or "no model changed"
        log.info("SIGHUP: configuration re-read: {summary}", summary=summary)
        return summary

    def _changed(self, name: str, model: ModelConfig) -> bool:
        current = self.models[name]
        current_path = self.config.model_path(current)
        if attrs.evolve(current, path=current_path) != model:
            return True
        return file_stamp(model.path) != self._stamps.get(name)
