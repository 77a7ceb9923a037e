"""The ``twinfer`` command: talk to a running twinfer server from the shell.

::

    twinfer models
    twinfer metadata tiny
    twinfer infer tiny --input x=batch.npy --save out/
    twinfer infer squeezenet --random
    twinfer detect face photo.jpg --draw faces.png   (image task models)
    twinfer classify MODEL photo.jpg
    twinfer bench ...            (when twinfer.bench is installed)
    twinfer tune squeezenet --config etc/twinfer.toml   (no server: local OpenVINO)

Every subcommand takes ``--server ENDPOINT`` (``tcp:HOST:PORT`` or
``tls:HOST:PORT``, default ``tcp:127.0.0.1:9000``, or several separated by
commas: see :meth:`twinfer.blocking.BlockingClient.connect`), ``--ca-file``
(or ``--ca``) for ``tls:``, ``--cert``/``--key`` for a server that requires a
client certificate (mutual TLS), and ``--timeout``.  Exit status: 0 on
success, 2 for an error the server reported or a bad argument/input file, 3
when the server cannot be reached or stops answering.  Users never see a traceback for these.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import twinfer
from twinfer.blocking import (
    DEFAULT_SERVER,
    DEFAULT_TIMEOUT,
    BlockingClient,
    ConnectFailed,
    TransportError,
    split_endpoints,
)
from twinfer.errors import ErrorCode, TwinferError
from twinfer.wire.messages import Metadata, TensorSpec

#: Exit status for errors the server reported, and for bad arguments or files.
EXIT_ERROR = 2
#: Exit status when the server cannot be reached or stops answering.
EXIT_UNREACHABLE = 3

_START_HINT = "is the server running? start one with: twistd -n twinfer --port 9000"


class UserError(Exception):
    """A mistake in the command line or an input file; printed, exit status 2."""


# -- formatting ----------------------------------------------------------------


def format_shape(shape: Sequence[int] | None) -> str:
    """``[?, 3, 224, 224]``: dynamic dims (``-1``) as ``?``, a dynamic rank as ``[...]``."""
    if shape is None:
        return "[...]"
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out
        )


def summarize(array: np.ndarray, top: int = 5) -> list[str]:
    """Human-readable lines describing an output tensor.

    Numbers get min/max/mean; a float score vector (one dimension above 1,
    such as ``[1, 1000]`` or ``[1, 1000, 1, 1]``) also gets its ``top``
    largest values with their flat indices; small tensors are printed in full.
    """
    lines = []
    if array.size == 0:
        return ["(empty)"]
    if array.dtype == np.bool_:
        lines.append(f"true: {int(array.sum())} of {array.size}")
    else:
        values = array.astype(np.float64)
        lines.append(
            f"min {_num(values.min())}  max {_num(values.max())}  mean {_num(values.mean())}"
        )
        if array.dtype.kind == "f" and sum(1 for d in array.shape if d > 1) == 1:
            flat = array.reshape(-1)
            # argsort on the negation keeps the lowest index first among ties.
            order = np.argsort(-flat.astype(np.float64), kind="stable")[:top]
            lines.append(
                f"top {len(order)}: " + ", ".join(f"{int(i)}={_num(flat[i])}" for i in order)
            )
    if array.size <= 16:
        lines.append(
            "values: " + np.array2string(array, separator=", ", precision=6).replace("\n", "")
        )
    return lines


def _num(value: Any) -> str:
    return f"{float(value):.6g}"


def sanitize_filename(name: str) -> str:
    """A file name for an output tensor (``a/b:0`` -> ``a_b_0``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".")
    return safe or "output"


# -- subcommands -----------------------------------------------------------------


def _connect(args: argparse.Namespace) -> BlockingClient:
    if args.key and not args.cert:
        raise UserError("--key needs --cert")
    return BlockingClient.connect(
        args.server,
        ca_file=args.ca_file,
        cert_file=args.cert,
        key_file=args.key,
        timeout=args.timeout,
    )


def cmd_models(args: argparse.Namespace) -> int:
    """``twinfer models``: a table of the served models."""
    with _connect(args) as client:
        models = client.models()
    rows = [["NAME", "DEVICES", "READY"]]
    rows += [[m.name, ",".join(m.devices), "yes" if m.ready else "no"] for m in models]
    _table(rows, sys.stdout)
    return 0


def _spec_rows(specs: Sequence[TensorSpec]) -> list[list[str]]:
    return [["  " + s.name, s.dtype.short_name, format_shape(s.shape)] for s in specs]


def cmd_metadata(args: argparse.Namespace) -> int:
    """``twinfer metadata MODEL``: inputs, outputs and devices."""
    with _connect(args) as client:
        meta = client.metadata(args.model)
    print(f"model: {meta.name}")
    print(f"devices: {', '.join(meta.devices) or '-'}")
    print("inputs:")
    _table(_spec_rows(meta.inputs), sys.stdout)
    print("outputs:")
    _table(_spec_rows(meta.outputs), sys.stdout)
    return 0


def _load_npy(path: str) -> np.ndarray:
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if not isinstance(value, np.ndarray):
        raise UserError(f"{path} is not a .npy file (an .npz archive?)")
    return value


def _random_array(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.shape is None:
        raise TwinferError(
            ErrorCode.INVALID_SHAPE,
            f"input {spec.name!r} has a dynamic rank: give it with --input NAME=FILE.npy",
        )
    shape = tuple(1 if d < 0 else d for d in spec.shape)
    dtype = spec.dtype.numpy
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 10, shape).astype(dtype)


def _gather_inputs(
    args: argparse.Namespace, metadata: Callable[[], Metadata]
) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    unnamed: list[str] = []
    for item in args.inputs:
        name, sep, path = item.partition("=")
        if not sep:
            unnamed.append(item)
            continue
        if not name:
            raise UserError(f"--input {item!r}: the input name before '=' is empty")
        if name in inputs:
            raise UserError(f"--input {name!r} given twice")
        inputs[name] = _load_npy(path)
    meta = metadata() if unnamed or args.random else None
    if unnamed:
        assert meta is not None
        if len(unnamed) > 1 or len(meta.inputs) != 1 or inputs:
            names = ", ".join(s.name for s in meta.inputs)
            raise UserError(
                f"--input FILE without a name works for single-input models only; "
                f"{meta.name} takes {names}: use --input NAME=FILE"
            )
        inputs[meta.inputs[0].name] = _load_npy(unnamed[0])
    if args.random:
        assert meta is not None
        rng = np.random.default_rng(args.seed)
        for spec in meta.inputs:
            if spec.name not in inputs:
                inputs[spec.name] = _random_array(spec, rng)
    if not inputs:
        raise UserError("no inputs: give --input NAME=FILE.npy or --random")
    return inputs


def cmd_infer(args: argparse.Namespace) -> int:
    """``twinfer infer MODEL``: run one inference and describe (or save) the outputs."""
    save_dir = Path(args.save) if args.save else None
    with _connect(args) as client:
        inputs = _gather_inputs(args, lambda: client.metadata(args.model))
        start = time.perf_counter()
        reply = client.infer_reply(args.model, inputs, args.outputs or None)
        elapsed = time.perf_counter() - start
    for name, array in inputs.items():
        print(f"input {name}: {array.dtype} {format_shape(array.shape)}")
    print(
        f"round trip {elapsed * 1e3:.2f} ms "
        f"(queued {reply.queue_us / 1e3:.2f} ms, compute {reply.compute_us / 1e3:.2f} ms)"
    )
    for name, array in reply.outputs.items():
        print(f"{name}: {array.dtype} {format_shape(array.shape)}")
        for line in summarize(array):
            print("  " + line)
    if save_dir is not None:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            used: set[str] = set()
            for name, array in reply.outputs.items():
                stem = base = sanitize_filename(name)
                n = 1
                while stem in used:  # two names that sanitize alike
                    n += 1
                    stem = f"{base}_{n}"
                used.add(stem)
                path = save_dir / f"{stem}.npy"
                np.save(path, array)
                print(f"saved {name} to {path}")
        except OSError as e:
            raise UserError(f"cannot save to {save_dir}: {e}") from e
    return 0


# -- the parser --------------------------------------------------------------------


def _endpoint(value: str) -> str:
    try:
        split_endpoints(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        type=_endpoint,
        metavar="ENDPOINT",
        help="tcp:HOST:PORT or tls:HOST:PORT, or several separated by commas (the first "
        "that answers is used; inference is re-sent once on the next when a connection "
        f"is lost or its server goes away) (default: {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--ca-file",
        "--ca",
        dest="ca_file",
        metavar="PEM",
        help="CA certificates to verify a tls: server with (default: the system's)",
    )
    group.add_argument(
        "--cert",
        metavar="PEM",
        help="client certificate for a tls: server that requires one (mutual TLS)",
    )
    group.add_argument(
        "--key",
        metavar="PEM",
        help="the private key of --cert (default: read from the --cert file)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up waiting for the server after this long (default: {DEFAULT_TIMEOUT:g})",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``twinfer`` argument parser; each subcommand sets ``func(args) -> int``."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="twinfer", description="Talk to a twinfer inference server."
    )
    parser.add_argument("--version", action="version", version=f"twinfer {twinfer.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", parents=[common], help="list the served models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "metadata", parents=[common], help="show a model's inputs, outputs and devices"
    )
    p.add_argument("model")
    p.set_defaults(func=cmd_metadata)

    p = sub.add_parser(
        "infer",
        parents=[common],
        help="run a model once on .npy inputs",
        description="Run MODEL once and print each output's dtype, shape and a summary.",
    )
    p.add_argument("model")
    p.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="an input tensor (repeatable); FILE.npy alone for a single-input model",
    )
    p.add_argument(
        "--output",
        "-o",
        dest="outputs",
        action="append",
        default=[],
        metavar="NAME",
        help="only return this output (repeatable; default: all)",
    )
    p.add_argument("--save", metavar="DIR", help="write each output to DIR/NAME.npy")
    p.add_argument(
        "--random",
        action="store_true",
        help="random inputs matching the model's metadata (dynamic dimensions 1) "
        "for those not given with --input",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --random (default: 0)")
    p.set_defaults(func=cmd_infer)

    from twinfer.tasks import cli as tasks_cli

    tasks_cli.add_arguments(sub)  # classify, detect
    _add_bench(sub, common)
    _add_tune(sub)
    return parser


def _add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``twinfer bench`` if the optional :mod:`twinfer.bench` module exists."""
    try:
        bench = importlib.import_module("twinfer.bench")
    except ImportError as e:
        if e.name == "twinfer.bench":
            return  # not part of this installation
        # Present but broken: keep the other subcommands working.
        message = f"twinfer bench is unavailable: {e}"

        def unavailable(args: argparse.Namespace) -> int:
            raise UserError(message)

        p = sub.add_parser("bench", parents=[common], help="(unavailable)")
        p.set_defaults(func=unavailable)
        return
    # bench defines its own --server/--ca-file. (Not parents=[common] with a
    # "resolve" conflict handler: that edits the shared option objects in
    # place and breaks --server for every other subcommand.)
    p = sub.add_parser("bench", help="measure throughput and latency")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)


def cmd_tune(args: argparse.Namespace) -> int:
    """``twinfer tune MODEL``: time the model's latency and throughput engines
    on this machine, as the server does at load, and print the figures."""
    from twinfer.config import ConfigError, default_config, load_config
    from twinfer.registry import tune_model

    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as e:
        raise UserError(str(e)) from e
    names = [m.name for m in config.models]
    if args.model not in names:
        raise UserError(f"no model {args.model!r} in the configuration (models: {names})")
    try:
        tunings = tune_model(config, args.model, args.seconds)
    except ValueError as e:
        raise UserError(str(e)) from e
    if not tunings:
        raise UserError(f"model {args.model!r} has an input of dynamic rank: nothing to time")
    print(f"model {args.model}: each engine timed for about {args.seconds:g} s")
    rows = [["DEVICE", "ENGINE", "LATENCY", "THROUGHPUT", "THREADS"]]
    for device, tuning in tunings.items():
        for engine, timing in (("latency", tuning.latency), ("throughput", tuning.throughput)):
            rows.append(
                [
                    device,
                    engine,
                    f"{timing.latency_ms:.2f} ms",
                    f"{timing.throughput:.1f}/s",
                    str(timing.threads),
                ]
            )
    _table(rows, sys.stdout)
    model = next(m for m in config.models if m.name == args.model)
    for device, tuning in tunings.items():
        configured = config.execution(model, device)
        print(f"{device}: measured choice {tuning.choice} (configured: {configured})")
    return 0


def _add_tune(sub: Any) -> None:
    p = sub.add_parser(
        "tune",
        help="time a model's latency and throughput engines here (no server)",
        description="Compile MODEL with PERFORMANCE_HINT LATENCY and THROUGHPUT on each "
        "of its devices, time both as the server does at load, and print single-request "
        "latency and throughput per engine and the execution they lead to.",
    )
    p.add_argument("model")
    p.add_argument("--config", metavar="FILE", help="configuration (default: the embedded one)")
    p.add_argument(
        "--seconds",
        type=float,
        default=0.5,
        metavar="S",
        help="time each engine for about S seconds (default: 0.5)",
    )
    p.set_defaults(func=cmd_tune)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``twinfer`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConnectFailed as e:
        hint = f" ({_START_HINT})" if isinstance(e.__cause__, ConnectionRefusedError) else ""
        print(f"twinfer: {e.message}{hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TransportError as e:
        print(f"twinfer: {e.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except TwinferError as e:
        print(f"twinfer: {e}", file=sys.stderr)
        return EXIT_ERROR
    except UserError as e:
        print(f"twinfer: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
