"""The ``twinfer`` command against a real ``twistd -n twinfer`` process (see conftest.py)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinfer import cli
from twinfer.engines.builtin import tiny_reference
from twistd_process import ServerProcess


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_models(twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "models", "--server", twistd_server.endpoint)
    assert (status, err) == (0, "")
    assert out.splitlines() == ["NAME  DEVICES  READY", "tiny  cpu      yes"]


def test_metadata(twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "metadata", "tiny", "--server", twistd_server.endpoint)
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "model: tiny",
        "devices: cpu",
        "inputs:",
        "  x  f32  [?, 4]",
        "outputs:",
        "  y      f32  [?, 3]",
        "  label  i64  [?]",
    ]


def test_infer_save_round_trip(
    twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    x = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out_dir = tmp_path / "out" / "nested"
    status, out, err = run(
        capsys,
        "infer",
        "tiny",
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--save",
        str(out_dir),
        "--server",
        twistd_server.endpoint,
    )
    assert (status, err) == (0, "")
    expected = tiny_reference(x)
    assert "y: float32 [2, 3]" in out
    assert "label: int64 [2]" in out
    assert f"mean {expected['y'].astype(np.float64).mean():.6g}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["label.npy", "y.npy"]
    np.testing.assert_allclose(np.load(out_dir / "y.npy"), expected["y"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.load(out_dir / "label.npy"), expected["label"])


def test_infer_unnamed_input_and_output_selection(
    twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    x = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    status, out, err = run(
        capsys,
        "infer",
        "tiny",
        "-i",
        str(tmp_path / "x.npy"),
        "-o",
        "label",
        "--save",
        str(tmp_path),
        "--server",
        twistd_server.endpoint,
    )
    assert (status, err) == (0, "")
    assert "y:" not in out
    np.testing.assert_array_equal(np.load(tmp_path / "label.npy"), tiny_reference(x)["label"])
    assert not (tmp_path / "y.npy").exists()


def test_infer_random(
    twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, out, err = run(
        capsys,
        "infer",
        "tiny",
        "--random",
        "--save",
        str(tmp_path),
        "--server",
        twistd_server.endpoint,
    )
    assert (status, err) == (0, "")
    assert "input x: float32 [1, 4]" in out  # the dynamic batch dimension became 1
    y, label = np.load(tmp_path / "y.npy"), np.load(tmp_path / "label.npy")
    assert y.shape == (1, 3) and label.shape == (1,)
    assert label[0] == y[0].argmax()
    # A score vector: the top values are listed, largest first.
    top = out.split("top 3: ")[1].splitlines()[0]
    assert [int(item.split("=")[0]) for item in top.split(", ")] == list(np.argsort(-y[0]))


def test_unknown_model_exits_2(
    twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "metadata", "nope", "--server", twistd_server.endpoint)
    assert status == 2
    assert err.startswith("twinfer: UNKNOWN_MODEL: model 'nope'")
    assert out == ""


def test_wrong_dtype_exits_2(
    twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float64))
    status, _, err = run(
        capsys,
        "infer",
        "tiny",
        "-i",
        f"x={tmp_path / 'x.npy'}",
        "--server",
        twistd_server.endpoint,
    )
    assert status == 2
    assert err == "twinfer: INVALID_DTYPE: model 'tiny' input 'x' takes f32, got f64\n"


def test_bad_input_files_exit_2(
    twistd_server: ServerProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    server = ("--server", twistd_server.endpoint)
    status, _, err = run(capsys, "infer", "tiny", "-i", f"x={tmp_path / 'missing.npy'}", *server)
    assert status == 2 and err.startswith("twinfer: cannot read ") and "missing.npy" in err
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    status, _, err = run(capsys, "infer", "tiny", "-i", f"x={tmp_path / 'junk.npy'}", *server)
    assert status == 2 and err.startswith("twinfer: cannot read ")
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    x = str(tmp_path / "x.npy")
    status, _, err = run(capsys, "infer", "tiny", "-i", x, "-i", x, *server)
    assert status == 2 and "single-input models only" in err
    status, _, err = run(capsys, "infer", "tiny", *server)
    assert status == 2 and "no inputs" in err


def test_connection_refused_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    port = _closed_port()
    status, out, err = run(capsys, "models", "--server", f"tcp:127.0.0.1:{port}")
    assert status == 3
    assert out == ""
    assert err.count("\n") == 1
    assert "Connection refused" in err
    assert "twistd -n twinfer --port 9000" in err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["models", "--server", "localhost"], ["metadata"], ["infer"]],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: twinfer" in capsys.readouterr().err


def test_bench_is_delegated_to_twinfer_bench() -> None:
    from twinfer import bench

    args = cli.build_parser().parse_args(
        ["bench", "-m", "tiny", "--server", "tcp:h:1", "--requests", "5"]
    )
    assert args.func is bench.run
    assert (args.model, args.server, args.requests) == ("tiny", "tcp:h:1", 5)
    # Registering bench must leave the other subcommands' --server intact.
    args = cli.build_parser().parse_args(["metadata", "tiny", "--server", "tcp:h:2"])
    assert (args.model, args.server) == ("tiny", "tcp:h:2")


def test_no_bench_subcommand_without_the_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "twinfer.bench", None)  # import now fails
    with pytest.raises(SystemExit) as info:
        cli.main(["bench"])
    assert info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "file"),
    [("y", "y"), ("a/b:0", "a_b_0"), ("../etc/passwd", "_etc_passwd"), ("..", "output")],
)
def test_sanitize_filename(name: str, file: str) -> None:
    assert cli.sanitize_filename(name) == file


def test_summarize() -> None:
    scores = np.zeros((1, 10, 1, 1), np.float32)
    scores[0, [7, 2, 9], 0, 0] = [0.5, 0.25, 0.125]
    lines = cli.summarize(scores)
    assert lines[0] == "min 0  max 0.5  mean 0.0875"
    assert lines[1] == "top 5: 7=0.5, 2=0.25, 9=0.125, 0=0, 1=0"
    assert cli.summarize(np.array([True, False, True])) == [
        "true: 2 of 3",
        "values: [ True, False,  True]",
    ]
    assert cli.summarize(np.zeros((0, 3), np.float32)) == ["(empty)"]
    # Not a score vector: no top-k.
    assert not any(line.startswith("top") for line in cli.summarize(np.ones((4, 5))))
    assert cli.format_shape((-1, 3, 224, 224)) == "[?, 3, 224, 224]"


def test_console_script(twistd_server: ServerProcess) -> None:
    script = Path(sys.executable).with_name("twinfer")
    assert script.exists(), "the twinfer console script is not installed"
    done = subprocess.run(
        [str(script), "metadata", "tiny", "--server", twistd_server.endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "  x  f32  [?, 4]" in done.stdout
    done = subprocess.run(
        [str(script), "models", "--server", f"tcp:127.0.0.1:{_closed_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("twinfer: cannot connect to tcp:127.0.0.1:")


def test_tune_prints_both_engines_figures(capsys: pytest.CaptureFixture[str]) -> None:
    # No server: the model is compiled and timed here, as the server would at load.
    status, out, err = run(capsys, "tune", "tiny", "--seconds", "0.05")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "model tiny: each engine timed for about 0.05 s"
    assert lines[1].split() == ["DEVICE", "ENGINE", "LATENCY", "THROUGHPUT", "THREADS"]
    assert re.fullmatch(r"cpu\s+latency\s+[0-9.]+ ms\s+[0-9.]+/s\s+1", lines[2])
    assert re.fullmatch(r"cpu\s+throughput\s+[0-9.]+ ms\s+[0-9.]+/s\s+\d+", lines[3])
    assert re.fullmatch(
        r"cpu: measured choice (adaptive|latency|throughput) \(configured: adaptive\)", lines[4]
    )


def test_tune_an_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "tune", "nope")
    assert status == cli.EXIT_ERROR and out == ""
    assert err.startswith("twinfer: no model 'nope' in the configuration")
