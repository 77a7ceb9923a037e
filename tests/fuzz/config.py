"""Fuzz target: the TOML configuration loader.

:func:`~twinfer.config.loads_config` gets any text (TOML syntax errors
included).  Allowed: a :class:`~twinfer.config.Config` or a
:class:`~twinfer.errors.ConfigError`.  Paths in the text resolve against an
empty temporary directory.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from twinfer.config import loads_config
from twinfer.errors import ConfigError

BASE_DIR = Path(tempfile.mkdtemp(prefix="twinfer-fuzz-config-"))


def TestOneInput(data: bytes) -> None:  # noqa: N802 (libFuzzer's name)
    # The first byte chooses how the rest becomes text: odd, as Latin-1 (any
    # code point below 256); even, as UTF-8 (as the seeds are written).
    if data[:1] and data[0] & 1:
        text = data[1:].decode("latin-1")
    else:
        text = data[1:].decode("utf-8", "replace")
    with contextlib.suppress(ConfigError):
        loads_config(text, BASE_DIR, "fuzz.toml")
