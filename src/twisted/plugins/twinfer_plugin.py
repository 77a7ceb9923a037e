"""twistd plugin: ``twistd -n twinfer --port 9000``.

Kept tiny and import-light (twistd imports every plugin to list them): the
real work lives in :mod:`twinfer.tap`.
"""

from twisted.application.service import ServiceMaker

twinfer = ServiceMaker(
    "twinfer",
    "twinfer.tap",
    "Serve OpenVINO models over twinfer's binary protocol.",
    "twinfer",
)
