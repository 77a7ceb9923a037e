"""``twinfer bench``: closed-loop load against a running twinfer server.

The twinfer counterpart of Triton's ``perf_analyzer``.  For each point of a
concurrency sweep, C simulated users each keep exactly one inference request
in flight (a new one leaves as soon as the previous reply arrives), spread
over ``--connections`` connections and, with ``--processes N``, over N client
processes so that the load generator is not the bottleneck.  Each point
reports inferences/s, latency percentiles, errors by code, the server's own
split of queue time and compute time (``InferReply.queue_us``/``compute_us``)
and how much CPU the client itself used.

The package, one module per job:

- :mod:`~twinfer.bench.report`: the statistics (:class:`~.report.Samples`,
  :func:`~.report.merge`, :func:`~.report.summarize`), pure functions over
  raw per-request samples (several processes' samples are merged by
  concatenation, so percentiles are those of the union), and what the user
  sees: the table, the JSON, the live progress line;
- :mod:`~twinfer.bench.inputs`: the tensors sent, from files or random;
- :mod:`~twinfer.bench.loop`: the load driver (:class:`~.loop.ClosedLoop`),
  Twisted, one reactor, any number of connections;
- :mod:`~twinfer.bench.load`: a point's load in this process or over child
  processes, and the exit status of a run that cannot be set up;
- :mod:`~twinfer.bench.command`: the options, the sweep and the report.

Run as ``twinfer bench ...`` or ``python -m twinfer.bench ...``.
:mod:`twinfer.cli` imports this package (it is optional there) and calls
:func:`add_arguments` and :func:`run`.
"""

from twinfer.bench.command import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
