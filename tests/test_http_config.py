"""The HTTP front end's configuration keys and its ``twistd twinfer --http-port`` wiring."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinfer import tap
from twinfer.config import DEFAULT_MAX_FRAME_SIZE, ConfigError, loads_config
from twinfer.frontends.http import HTTPFrontEnd

MODELS = """
[[devices]]
name = "cpu"
target = "CPU"
replicas = 1

[[models]]
name = "tiny"
path = "builtin:tiny"
"""


def test_http_keys_parse_and_default() -> None:
    default = loads_config(MODELS).server
    assert (default.http_max_body_size, default.http_timeout, default.http_default_model) == (
        DEFAULT_MAX_FRAME_SIZE,
        60,
        None,
    )
    server = loads_config(
        '[server]\nhttp_max_body_size = 1024\nhttp_timeout = 5\nhttp_default_model = "tiny"\n'
        + MODELS
    ).server
    assert (server.http_max_body_size, server.http_timeout, server.http_default_model) == (
        1024,
        5,
        "tiny",
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("http_max_body_size = 0", "server.http_max_body_size: must be at least 1, got 0"),
        ('http_timeout = "soon"', "server.http_timeout: expected int, got 'soon'"),
        ("http_default_model = 3", "server.http_default_model: expected str, got 3"),
        (
            'http_default_model = "nope"',
            "server.http_default_model: unknown model 'nope' (defined: tiny)",
        ),
        ("http_port = 8080", "server.http_port: unknown key"),
    ],
)
def test_bad_http_keys_name_the_key(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(f"[server]\n{line}\n{MODELS}")
    assert message in str(info.value)


def test_http_port_is_off_by_default_and_takes_a_bare_port(tmp_path: Path) -> None:
    config = tmp_path / "twinfer.toml"
    config.write_text(MODELS)
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    assert options["http-port"] is None
    options = tap.Options()
    options.parseOptions(["--config", str(config), "--http-port", "8080"])
    assert options["http-port"] == "tcp:8080"


def test_make_service_adds_the_http_front_end_only_when_asked(tmp_path: Path) -> None:
    config = tmp_path / "twinfer.toml"
    config.write_text(MODELS)
    without = tap.Options()
    without.parseOptions(["--config", str(config)])
    assert not [s for s in tap.makeService(without) if isinstance(s, HTTPFrontEnd)]
    with_http = tap.Options()
    with_http.parseOptions(["--config", str(config), "--http-port", "tcp:0"])
    services = list(tap.makeService(with_http))
    [front] = [s for s in services if isinstance(s, HTTPFrontEnd)]
    listening = [s for s in services if isinstance(s, tap.ListeningService)]
    assert len(listening) == 2
    assert listening[1].factory is front.site
    assert front.site.max_body_size == DEFAULT_MAX_FRAME_SIZE
