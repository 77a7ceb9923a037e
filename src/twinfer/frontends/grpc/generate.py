"""Regenerate the committed gRPC modules from ``grpc_service.proto``.

Run ``python -m twinfer.frontends.grpc.generate`` (it needs ``grpcio-tools``,
in the test extras) after changing the ``.proto``; ``tests/test_grpc_proto.py``
regenerates them into a temporary directory and fails if they differ from
the committed ones.

Two edits follow ``protoc``, both so that the modules can live inside the
``twinfer`` package:

* the messages go into a descriptor pool of their own instead of protobuf's
  default pool.  Triton's own client registers the same ``inference.*``
  names in the default pool (``tritonclient.grpc``), and one pool refuses a
  second definition of a name, so without this a process could not import
  both (a test, a benchmark, an application serving and calling).
* the service module imports the messages module from this package rather
  than as a top-level module.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

#: Where the .proto and the generated modules live.
HERE = Path(__file__).parent
PROTO = "grpc_service.proto"
MODULES = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py")

_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_OWN_POOL = (
    "# twinfer: a pool of its own, so that tritonclient.grpc's copy of these\n"
    "# names can be imported in the same process (see twinfer.frontends.grpc.generate).\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)
_TOP_LEVEL_IMPORT = "import grpc_service_pb2 as grpc__service__pb2"
_PACKAGE_IMPORT = "from twinfer.frontends.grpc import grpc_service_pb2 as grpc__service__pb2"


def _replace_once(text: str, old: str, new: str, module: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"{module}: expected {old!r} once from protoc; the generator changed")
    return text.replace(old, new)


def generate(out: Path) -> dict[str, str]:
    """Run ``protoc`` on the ``.proto`` into ``out``; returns {module file: text}."""
    from grpc_tools import protoc  # a build tool: imported only here

    with tempfile.TemporaryDirectory() as raw:
        status = protoc.main(
            ["protoc", f"-I{HERE}", f"--python_out={raw}", f"--grpc_python_out={raw}", PROTO]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {HERE / PROTO} (status {status})")
        texts = {name: (Path(raw) / name).read_text() for name in MODULES}
    texts[MODULES[0]] = _replace_once(texts[MODULES[0]], _DEFAULT_POOL, _OWN_POOL, MODULES[0])
    texts[MODULES[1]] = _replace_once(
        texts[MODULES[1]], _TOP_LEVEL_IMPORT, _PACKAGE_IMPORT, MODULES[1]
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out / name).write_text(text)
    return texts


def main() -> int:
    """Regenerate the modules in place."""
    for name in generate(HERE):
        print(f"wrote {HERE / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
