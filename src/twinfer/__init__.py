"""twinfer: a Twisted inference server for OpenVINO models.

The package is layered so that each module has one reason to change:

- :mod:`twinfer.errors`, :mod:`twinfer.wire` (messages, frames, readers,
  writers and the per-side connection state) — the wire protocol, sans-I/O
  (no Twisted import);
- :mod:`twinfer.config`, :mod:`twinfer.taskconfig` — the TOML configuration,
  structured into attrs classes by cattrs (:mod:`twinfer.schema`);
- :mod:`twinfer.engines.openvino` — OpenVINO: reading, compiling, validating, running;
- :mod:`twinfer.scheduling` — routing, bounded job queues, dynamic batching
  and one single-thread worker per device replica;
- :mod:`twinfer.frontends.binary` — the Twisted ``Protocol``/``Factory`` adapter over
  :class:`twinfer.wire.connection.Connection`;
- :mod:`twinfer.tap` — ``twistd`` options and service construction;
- :mod:`twinfer.client`, :mod:`twinfer.blocking`, :mod:`twinfer.cli` — clients.
"""

__version__ = "0.1.0"
