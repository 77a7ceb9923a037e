"""Run the fuzz targets: ``python -m tests.fuzz.run [--seconds S | --runs N] [target ...]``.

Each target runs in its own process (``atheris.Fuzz`` never returns), one
after the other, with twinfer's modules instrumented for coverage and the
committed seed corpus (``tests/fuzz/corpus/<target>/``) read but never
written: the inputs libFuzzer finds go to ``--workdir``/<target>/corpus,
crashing inputs to ``--workdir``/<target>/crash-*.  Prints, per target, the
executions, libFuzzer's final ``cov:`` and ``ft:`` figures and the crashes,
and exits 1 if any target crashed.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import TARGETS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = HERE / "corpus"
# libFuzzer's status lines: "#4096 pulse  cov: 812 ft: 1201 corp: 90/2Kb ... exec/s: 2048 ..."
STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)")
EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")


def fuzz_one(name: str, libfuzzer_args: list[str]) -> None:
    """(In the child process.) Fuzz target ``name``; does not return."""
    import atheris

    with atheris.instrument_imports(include=["twinfer"]):
        module = importlib.import_module(f"{__package__}.{name}")
    atheris.Setup([sys.argv[0], *libfuzzer_args], module.TestOneInput)
    atheris.Fuzz()


def run_target(name: str, seconds: float | None, runs: int | None, workdir: Path) -> dict:
    """Fuzz ``name`` in a child process; returns its figures from libFuzzer's output."""
    found = workdir / name / "corpus"
    found.mkdir(parents=True, exist_ok=True)
    args = [
        str(found),
        str(CORPUS / name),
        f"-artifact_prefix={workdir / name}/",
        "-print_final_stats=1",
        "-timeout=20",  # seconds for one input: a hang is a crash
        "-rss_limit_mb=2048",
        "-max_len=65536",
    ]
    if seconds is not None:
        args.append(f"-max_total_time={int(seconds)}")
    if runs is not None:
        args.append(f"-runs={runs}")
    command = [sys.executable, "-m", f"{__package__}.run", "--child", name, "--", *args]
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, errors="replace")
    elapsed = time.monotonic() - started
    log = result.stderr
    (workdir / name / "log.txt").write_text(log)
    statuses = [m for line in log.splitlines() if (m := STATUS.match(line))]
    executed = EXECUTED.search(log)
    crashes = sorted(str(p) for p in (workdir / name).glob("crash-*"))
    crashes += sorted(str(p) for p in (workdir / name).glob("oom-*"))
    crashes += sorted(str(p) for p in (workdir / name).glob("timeout-*"))
    return {
        "target": name,
        "executions": int(executed.group(1)) if executed else 0,
        "seconds": elapsed,
        "cov": int(statuses[-1].group(2)) if statuses else 0,
        "ft": int(statuses[-1].group(3)) if statuses else 0,
        "exit": result.returncode,
        "crashes": crashes,
        "tail": _failure(log) if result.returncode else "",
    }


def _failure(log: str) -> str:
    """The Python traceback and libFuzzer's error report from a failed run's log."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "Uncaught Python exception" in line]
    errors = [i for i, line in enumerate(lines) if "ERROR: libFuzzer" in line]
    start = starts[0] if starts else errors[0] if errors else max(len(lines) - 40, 0)
    return "\n".join(lines[start : start + 60])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__)
    parser.add_argument("targets", nargs="*", metavar="target", help=f"of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=float, help="time per target")
    parser.add_argument("--runs", type=int, help="executions per target")
    parser.add_argument("--workdir", type=Path, help="where found inputs and crashes go")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("libfuzzer_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    if argv is None:
        argv = sys.argv[1:]
    if "--child" in argv:  # a child: the rest goes to libFuzzer untouched
        split = argv.index("--")
        fuzz_one(argv[argv.index("--child") + 1], argv[split + 1 :])
    args = parser.parse_args(argv)
    if args.seconds is None and args.runs is None:
        parser.error("give --seconds or --runs")
    if unknown := set(args.targets) - set(TARGETS):
        parser.error(f"no such target: {', '.join(sorted(unknown))}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="twinfer-fuzz-"))
    failed = False
    for name in args.targets or TARGETS:
        figures = run_target(name, args.seconds, args.runs, workdir)
        rate = figures["executions"] / figures["seconds"] if figures["seconds"] else 0
        print(
            f"{name:<11} executions {figures['executions']:>9} in {figures['seconds']:7.1f} s "
            f"({rate:,.0f}/s)  cov {figures['cov']:>5}  ft {figures['ft']:>6}  "
            f"crashes {len(figures['crashes'])}  exit {figures['exit']}",
            flush=True,
        )
        for crash in figures["crashes"]:
            print(f"    {crash}")
        if figures["exit"] != 0:
            failed = True
            print(figures["tail"], flush=True)
    print(f"logs and found inputs in {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
