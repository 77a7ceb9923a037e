"""What runs a model on a device: :mod:`twinfer.engines.openvino` (read,
compile, validate requests against a model's signature, run) and
:mod:`twinfer.engines.builtin` (the embedded models of the default
configuration)."""
