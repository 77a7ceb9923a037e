"""Coverage-guided fuzz targets (atheris) for twinfer's parsers.

Each target module has ``TestOneInput(data: bytes)``, the libFuzzer entry
point, and follows the rule of h11 and h2: any input is accepted or raises
the module's own error, never anything else, and memory stays bounded.  A
target raises (so that libFuzzer reports a crash) only when that rule is
broken.  Seed inputs live in ``corpus/<target>/`` (written by
:mod:`tests.fuzz.seeds`); ``python -m tests.fuzz.run`` runs the targets.
"""

#: The targets, by name: each is the module ``tests/fuzz/<name>.py``.
TARGETS = ("frames", "connection", "kserve", "config", "image")
