"""The configuration as cattrs structures it: exact one-line errors, every shipped file, imports.

test_config.py and test_tasks_config.py check the messages people know;
these check what the structuring adds (key paths into lists and nested
tables, strict types) and that the example files load to what they say.
"""

from __future__ import annotations

import ast
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import pytest

from twinfer.config import ConfigError, ModelConfig, default_config, load_config, loads_config
from twinfer.taskconfig import MODEL_KEYS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src" / "twinfer"
DEVICE = '[[devices]]\nname = "cpu"\ntarget = "CPU"\n'
MODEL = '[[models]]\nname = "m"\npath = "builtin:tiny"\n'
DETECT = 'task = "detect"\n[models.detect]\ndecoder = "anchors"\n[models.detect.anchors]\n'
ANCHORS = "num_layers = 2\nmin_scale = 0.1\nmax_scale = 0.7\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Wrong types inside lists name the index.
        (
            DEVICE + MODEL + 'devices = ["cpu", 3]\n',
            "models[0].devices[1]: expected str, got 3",
        ),
        (
            DEVICE + MODEL + 'preferred_batch_sizes = [2, "x"]\n',
            "models[0].preferred_batch_sizes[1]: expected int, got 'x'",
        ),
        (
            DEVICE + MODEL + "preferred_batch_sizes = [0]\n",
            "models[0].preferred_batch_sizes[0]: must be at least 1, got 0",
        ),
        (
            DEVICE + MODEL + 'task = "classify"\n[models.preprocess]\nmean = [1, "x", 3]\n',
            "models[0].preprocess.mean[1]: expected a number, got 'x'",
        ),
        (
            DEVICE + MODEL + DETECT + ANCHORS + "strides = [8, 0]\n",
            "models[0].detect.anchors.strides[1]: must be at least 1, got 0",
        ),
        (
            DEVICE + MODEL + 'devices = ["cpu", "cpu"]\n',
            "models[0].devices[1]: 'cpu' is listed twice",
        ),
        # The second of several tables, and keys deep down.
        (
            DEVICE + MODEL + MODEL.replace('"m"', '"n"') + "queue_size = 0\n",
            "models[1].queue_size: must be at least 1, got 0",
        ),
        (
            DEVICE + DEVICE.replace('"cpu"', '"gpu"') + "replicas = 0\n" + MODEL,
            "devices[1].replicas: must be between 1 and 64, got 0",
        ),
        (
            DEVICE + MODEL + DETECT + ANCHORS + "strides = [8, 16]\nbogus = 1\n",
            "models[0].detect.anchors.bogus: unknown key (allowed: anchor_offset_x,",
        ),
        (
            DEVICE + MODEL + DETECT + "num_layers = 2\n",
            "models[0].detect.anchors.min_scale: required key is missing",
        ),
        (
            DEVICE + MODEL + DETECT + ANCHORS + "strides = [8, 16]\nfixed_anchor_size = 1\n",
            "models[0].detect.anchors.fixed_anchor_size: expected true or false, got 1",
        ),
        (
            DEVICE + MODEL + 'task = "detect"\n[models.detect]\ndecoder = "ssd"\nx_scale = 0\n',
            "models[0].detect.x_scale: must be positive, got 0.0",
        ),
        (
            DEVICE + "properties = { A = [1] }\n" + MODEL,
            "devices[0].properties.A: expected a scalar, got [1]",
        ),
        # Names from the file appear as written, braces and all.
        (
            DEVICE.replace('"cpu"', '"g{0}"') + MODEL + 'devices = ["x{1}"]\n',
            "models[0].devices: unknown device 'x{1}' (defined: g{0})",
        ),
        # Strict types: no coercion between TOML's types.
        (
            DEVICE + MODEL + "max_batch_size = 2.0\n",
            "models[0].max_batch_size: expected int, got 2.0",
        ),
        (DEVICE + MODEL + 'devices = "cpu"\n', "models[0].devices: expected a list, got 'cpu'"),
        (
            DEVICE + "health_check_interval_s = nan\n" + MODEL,
            "devices[0].health_check_interval_s: expected a number, got nan",
        ),
        (DEVICE + MODEL + 'queue = "fifo"\n', 'models[0].queue: expected "shared" or "per-device"'),
        (DEVICE + MODEL + 'queue = ""\n', "models[0].queue: must not be empty"),
        (
            DEVICE + MODEL + 'task = "classify"\npreprocess = 3\n',
            "models[0].preprocess: expected a table, got 3",
        ),
        # The top-level table's own keys are named config.KEY.
        ('[devices]\nname = "cpu"\n' + MODEL, "config.devices: expected an array of tables, got {"),
        ("devices = []\n" + MODEL, "config.devices: must not be empty"),
        (MODEL, "config.devices: required key is missing"),
        ("server = 3\n" + DEVICE + MODEL, "config.server: expected a table, got 3"),
    ],
)
def test_structuring_errors_name_the_full_key_path(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(text)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_a_table_given_twice_is_refused_by_toml_itself() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        loads_config(DEVICE + MODEL + "[models.preprocess]\n[models.preprocess]\n")


def test_a_labels_file_that_is_not_text_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_bytes(b"cat\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"^models\[0\]\.labels: .*labels\.txt: not UTF-8 text"):
        loads_config(DEVICE + MODEL + 'task = "classify"\nlabels = "labels.txt"\n', tmp_path)


def test_a_labels_path_with_a_nul_byte_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^models\[0\]\.labels: .*NUL byte"):
        loads_config(DEVICE + MODEL + 'task = "classify"\nlabels = "a\\u0000b"\n', tmp_path)


def test_durations_take_any_number_and_drop_fractions() -> None:
    [model] = loads_config(DEVICE + MODEL + "default_timeout_ms = 2.7\n").models
    assert model.default_timeout_ms == 2 and type(model.default_timeout_ms) is int


def test_a_config_object_built_in_code_is_not_checked() -> None:
    # The checks belong to reading TOML: code (the console's load, SIGHUP's
    # reload) keeps building and evolving configs without re-validation.
    model = ModelConfig(name="m", path="builtin:tiny", devices=("cpu",))
    assert attrs.evolve(model, queue_size=0).queue_size == 0


# --------------------------------------------------------------------------
# Every shipped file loads to the values it writes


def _assert_loaded_as_written(written: dict[str, Any], loaded: Any, where: str) -> None:
    """Every key of the TOML table ``written`` has its value in ``loaded``."""
    for key, value in written.items():
        here = f"{where}.{key}"
        owner = loaded.task if isinstance(loaded, ModelConfig) and key in MODEL_KEYS else loaded
        actual = getattr(owner, {"task": "kind", "labels": "labels_path"}.get(key, key))
        if key == "properties":
            assert actual == {k: str(v) for k, v in value.items()}, here
        elif key == "labels":
            assert actual.endswith(value), here
        elif isinstance(value, dict):
            _assert_loaded_as_written(value, actual, here)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(actual) == len(value), here
            for i, (table, item) in enumerate(zip(value, actual)):
                _assert_loaded_as_written(table, item, f"{here}[{i}]")
        elif isinstance(value, list):
            assert actual == tuple(value), here
        elif isinstance(actual, tuple):  # one number where a list is allowed (mean = 127.5)
            assert actual == (value,), here
        else:
            # A written integer may load as a float (seconds); nothing else changes type.
            assert actual == value and type(actual) in {type(value), float}, here


SHIPPED = [*sorted((ROOT / "etc").glob("*.toml")), Path("default.toml")]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_to_the_values_it_writes(path: Path, tmp_path: Path) -> None:
    if path.name == "default.toml":
        text = resources.files("twinfer").joinpath("default.toml").read_text("utf-8")
        config = default_config()
    else:
        # A copy, with stand-ins for model files that ship outside the repository:
        # only their existence is checked when the configuration is read.
        etc = shutil.copytree(path.parent, tmp_path / "etc")
        text = path.read_text("utf-8")
        for table in tomllib.loads(text)["models"]:
            if not table["path"].startswith("builtin:"):
                (etc / table["path"]).touch()
        config = load_config(etc / path.name)
    written = tomllib.loads(text)
    _assert_loaded_as_written(written, config, path.name)
    assert [m.name for m in config.models] == [m["name"] for m in written["models"]]


# --------------------------------------------------------------------------
# The import graph: config and the task options do not import each other


def _imports(path: Path) -> set[str]:
    """The twinfer modules ``path`` imports anywhere (functions, TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "twinfer"}


def _import_graph() -> dict[str, set[str]]:
    """Module -> modules it imports; importing ``a.b.c`` also imports ``a`` and ``a.b``."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = set()
        for name in _imports(path):
            steps = name.split(".")
            graph[module] |= {".".join(steps[:n]) for n in range(1, len(steps) + 1)}
    return {m: {n for n in targets if n in graph and n != m} for m, targets in graph.items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_config_and_task_options_import_no_cycle() -> None:
    graph = _import_graph()
    assert "twinfer.tasks.config" in graph and "twinfer.taskconfig" in graph["twinfer.config"]
    from_config = _reachable(graph, "twinfer.config")
    assert not {m for m in from_config if m.startswith("twinfer.tasks")}, from_config
    assert "twinfer.config" not in graph["twinfer.tasks.config"]
    assert "twinfer.config" not in from_config  # no cycle through config at all
    assert "twinfer.config" not in _reachable(graph, "twinfer.taskconfig")
