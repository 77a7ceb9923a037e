"""Packaging: the twistd plugin is found after both editable and regular installs."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD_HELP = "from twisted.scripts.twistd import run; import sys; sys.argv[0] = 'twistd'; run()"


def test_twistd_lists_twinfer_in_this_environment() -> None:
    out = subprocess.run(
        [sys.executable, "-c", TWISTD_HELP, "--help"], capture_output=True, text=True, timeout=120
    )
    assert "twinfer" in out.stdout, out.stdout + out.stderr
    sub = subprocess.run(
        [sys.executable, "-c", TWISTD_HELP, "twinfer", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--port" in sub.stdout and "--config" in sub.stdout, sub.stdout + sub.stderr


def test_a_regular_install_ships_the_plugin_without_shadowing_twisted(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    [wheel] = wheels.glob("twinfer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/twinfer_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
        check=True,
        timeout=300,
    )
    # -S: no site processing, so the editable install of this checkout is invisible;
    # dependencies come from this environment's site-packages, twinfer from `target` only.
    site_packages = sysconfig.get_paths()["purelib"]
    script = (
        f"import sys; sys.path[:0] = [{str(target)!r}, {site_packages!r}]\n"
        "import twinfer; assert twinfer.__file__.startswith(sys.path[0]), twinfer.__file__\n"
        + TWISTD_HELP
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", script, "--help"], capture_output=True, text=True, timeout=120
    )
    assert "twinfer" in out.stdout, out.stdout + out.stderr
