"""A real ``twistd -n twinfer`` server in a subprocess, for tests.

The fixtures built on this live in ``conftest.py``; tests import the types
and the config from here (``from twistd_process import ServerProcess``).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

#: A server for the builtin ``tiny`` model, answering in full f32 precision.
TWISTD_TINY_CONFIG = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 2
properties = { INFERENCE_PRECISION_HINT = "f32" }

[[models]]
name = "tiny"
path = "builtin:tiny"
"""

#: The builtin SqueezeNet, to append to a configuration.
SQUEEZENET_MODEL = """
[[models]]
name = "squeezenet"
path = "builtin:squeezenet"
"""


def with_server_table(config: str, **keys: int) -> str:
    """``config`` with a ``[server]`` table of ``keys`` in front of it."""
    lines = "".join(f"{key} = {value}\n" for key, value in keys.items())
    return f"[server]\n{lines}\n{config}"


LOOPBACK_PORT = "tcp:0:interface=127.0.0.1"


@attrs.define
class ServerProcess:
    """A running ``twistd -n twinfer`` and where it listens."""

    #: ``"tcp"`` or ``"ssl"``, from the binary port's endpoint description.
    kind: str
    host: str
    port: int
    #: The server's log file (``twistd --logfile``).
    log_path: Path
    process: subprocess.Popen[bytes]
    #: Every port the server listens on, by name (``binary``, ``http``...), from its port file.
    ports: dict[str, int] = attrs.field(factory=dict)

    @property
    def endpoint(self) -> str:
        """The client endpoint: ``tcp:HOST:PORT`` (``tls:`` for an ``ssl`` server)."""
        return f"{'tls' if self.kind == 'ssl' else 'tcp'}:{self.host}:{self.port}"

    def log(self) -> str:
        """The server's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); returns its exit status.

        Idempotent.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def read_port_line(fd: int, timeout: float) -> bytes:
    """The first line written to the pipe ``fd``, waiting up to ``timeout`` seconds for it.

    Returns what came before the end of the pipe (possibly nothing) if the
    writer closed it first, and ``b""`` on timeout.
    """
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b""
        chunk = os.read(fd, 4096)
        if not chunk:  # the server exited without writing its ports
            return data
        data += chunk
    return data.split(b"\n", 1)[0]


def twistd_command() -> list[str]:
    """How to run this environment's ``twistd``."""
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def launch_twistd(
    config_text: str | None,
    directory: Path,
    *,
    port: str = LOOPBACK_PORT,
    args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ServerProcess:
    """Write ``config_text`` (``None``: use the embedded default) to ``directory``,
    start ``twistd -n twinfer`` there and wait until it listens.

    The server's ``--port-file`` is a pipe to this process: its JSON line
    ``{"binary": PORT, ...}`` arrives when every port listens, and the end
    of the pipe says at once that the server exited instead.  Raises
    ``RuntimeError`` with the server's log if it exits or does not listen
    within ``timeout`` seconds.
    """
    config_args = []
    if config_text is not None:  # None: the embedded default configuration
        config = directory / "twinfer.toml"
        config.write_text(config_text)
        config_args = [f"--config={config}"]
    log_path = directory / "twistd.log"
    port_read, port_write = os.pipe()
    command = [
        *twistd_command(),
        "--nodaemon",
        "--pidfile=",  # no twistd.pid: parallel runs must not clash
        f"--logfile={log_path}",
        "twinfer",
        f"--port={port}",
        f"--port-file=/dev/fd/{port_write}",
        *config_args,
        *args,
    ]
    stderr_path = directory / "twistd.stderr"
    try:
        with stderr_path.open("wb") as stderr:
            # (A file, not a pipe: nobody reads a pipe while the server runs.)
            process = subprocess.Popen(
                command,
                cwd=directory,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                pass_fds=(port_write,),
            )
    finally:
        os.close(port_write)  # the server holds the only write end now
    try:
        line = read_port_line(port_read, timeout)
    finally:
        os.close(port_read)
    if not line:
        if process.poll() is None:
            process.kill()
        process.wait()
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        raise RuntimeError(
            f"twistd did not start listening (exit status {process.returncode}):\n"
            f"{stderr_path.read_text(errors='replace')}\n{text}"
        )
    ports = json.loads(line)
    interface = re.search(r"interface=([^:]+)", port)
    return ServerProcess(
        "ssl" if port.startswith("ssl:") else "tcp",
        interface[1] if interface else "127.0.0.1",
        ports["binary"],
        log_path,
        process,
        ports,
    )


StartTwistd = Callable[..., ServerProcess]
