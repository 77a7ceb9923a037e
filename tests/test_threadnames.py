"""Tests of :mod:`twinfer.threadnames`: OS thread names seen from ``/proc``."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from twinfer.threadnames import name_os_thread

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def os_name_of(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_a_thread_names_itself_for_tools_outside_the_process() -> None:
    seen: dict[str, object] = {}

    def run() -> None:
        seen["set"] = name_os_thread("twinfer-cpu-0")
        seen["tid"] = threading.get_native_id()
        seen["name"] = os_name_of(threading.get_native_id())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["set"] is True
    assert seen["name"] == "twinfer-cpu-0"
    # Only the calling thread is renamed.
    assert os_name_of(threading.get_native_id()) != "twinfer-cpu-0"


def test_a_long_name_keeps_its_first_15_bytes() -> None:
    seen: dict[str, str] = {}

    def run() -> None:
        name_os_thread("twinfer-a-very-long-worker-name")
        seen["name"] = os_name_of(threading.get_native_id())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen["name"] == "twinfer-a-very-"
