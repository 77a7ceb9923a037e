"""Running the server: statistics, runtime control, the graceful drain,
metrics and health, and the listening ports as Twisted services.

:mod:`twinfer.ops.stats` (request counters and histograms, fed by the data
plane), :mod:`twinfer.ops.control` (load, unload, reload, drain; health),
:mod:`twinfer.ops.lifecycle` (start, SIGHUP, graceful SIGTERM drain),
:mod:`twinfer.ops.metrics` (Prometheus, ``/healthz``, ``/readyz``),
:mod:`twinfer.ops.listening` (ports bound in ``privilegedStartService``),
:mod:`twinfer.ops.agent` (HAProxy's agent check: weight, drain, down).
"""
