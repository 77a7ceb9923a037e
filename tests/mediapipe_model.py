"""MediaPipe's short-range face detector, taken from the released mediapipe wheel.

No model hub is reachable here, but the wheel on PyPI carries the model: it is
downloaded (not installed) once into ``~/.cache/twinfer`` and the ``.tflite``
extracted; offline and without a cached copy, the callers are skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL_VERSION = "0.10.21"
MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
CACHE = Path.home() / ".cache" / "twinfer"
ETC = Path(__file__).parent.parent / "etc"


def face_model() -> Path:
    """The extracted face detector, fetching the wheel once; skips when that is impossible."""
    target = CACHE / "models" / f"mediapipe-{WHEEL_VERSION}" / Path(MEMBER).name
    if target.exists():
        return target
    wheels = CACHE / "wheels"
    found = sorted(wheels.glob(f"mediapipe-{WHEEL_VERSION}-*.whl"))
    if not found:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 f"mediapipe=={WHEEL_VERSION}", "-d", str(wheels)],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", b"") or b""
            pytest.skip(
                f"cannot download the mediapipe=={WHEEL_VERSION} wheel (offline?) for its face "
                f"detector: {e} {detail.decode(errors='replace')[-300:]}"
            )
        found = sorted(wheels.glob(f"mediapipe-{WHEEL_VERSION}-*.whl"))
        if not found:
            pytest.skip(f"pip download left no mediapipe-{WHEEL_VERSION} wheel in {wheels}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as wheel, wheel.open(MEMBER) as source:
        partial = target.with_suffix(".part")
        with open(partial, "wb") as out:
            shutil.copyfileobj(source, out)
        partial.rename(target)
    return target
