"""Shared pytest fixtures: a real ``twistd -n twinfer`` server in a subprocess.

The in-process :class:`support.ServerTestCase` runs the reactor in the test's
own thread, so blocking clients, the CLI and end-to-end checks talk to a real
``twistd`` process instead (see :mod:`twistd_process`):

- ``start_twistd(config_text, *, port=LOOPBACK_PORT, args=(), timeout=60.0)
  -> ServerProcess`` (session scope) starts one server and waits until it
  listens; every server it started is stopped at the end of the session, or
  earlier with ``ServerProcess.stop()``.
- ``twistd_server`` (module scope) is a server for the builtin ``tiny`` model
  (f32 precision, two CPU replicas), stopped after the module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import pytest

# The gRPC tests leave gRPC's core threads running in this process, and
# other tests fork children (reactor.spawnProcess) that only exec: gRPC's
# fork handlers, run while its threads are busy, abort such a child
# (SIGABRT). They are only for children that go on using gRPC, which no
# test does. Set before anything imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from twistd_process import (
    LOOPBACK_PORT,
    TWISTD_TINY_CONFIG,
    ServerProcess,
    StartTwistd,
    launch_twistd,
)


@pytest.fixture(scope="session")
def start_twistd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartTwistd]:
    """A factory ``start(config_text, *, port=LOOPBACK_PORT, args=(), timeout=60.0)
    -> ServerProcess``; the servers it starts are stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(
        config_text: str | None,
        *,
        port: str = LOOPBACK_PORT,
        args: Sequence[str] = (),
        timeout: float = 60.0,
    ) -> ServerProcess:
        directory = tmp_path_factory.mktemp("twistd")
        server = launch_twistd(config_text, directory, port=port, args=args, timeout=timeout)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def twistd_server(start_twistd: StartTwistd) -> Iterator[ServerProcess]:
    """A ``twistd`` serving the builtin ``tiny`` model on 127.0.0.1, for this module."""
    server = start_twistd(TWISTD_TINY_CONFIG)
    yield server
    server.stop()
