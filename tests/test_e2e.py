"""End to end: a real ``twistd -n twinfer`` process, real clients, real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from certs import TLSFiles, make_tls_files
from twinfer import cli
from twinfer.client import connect
from twinfer.config import default_config
from twinfer.engines import builtin
from twinfer.errors import ErrorCode, TwinferError
from twistd_process import TWISTD_TINY_CONFIG, ServerProcess, StartTwistd, launch_twistd


@pytest.fixture(scope="module")
def default_server(start_twistd: StartTwistd) -> ServerProcess:
    """``twistd -n twinfer`` with no --config: the embedded default."""
    return start_twistd(None)


def direct_openvino(model_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a default-config model straight in OpenVINO, compiled as the server does."""
    config = default_config()
    model_config = next(m for m in config.models if m.name == model_name)
    device = config.device(model_config.devices[0])
    core = ov.Core()
    model = builtin.read_builtin(core, model_config.path)
    compiled = core.compile_model(
        model, device.target, {**device.properties, **model_config.properties}
    )
    result = compiled.create_infer_request().infer(inputs)
    return {port.any_name: result[port] for port in compiled.outputs}


@pytest.mark.parametrize("model", ["squeezenet", "tiny"])
def test_cli_infer_on_the_default_server_matches_openvino(
    model: str, default_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(7)
    if model == "squeezenet":
        inputs = {"data_0": rng.random((1, 3, 224, 224), dtype=np.float32)}
    else:
        inputs = {"x": rng.standard_normal((5, 4)).astype(np.float32)}
    args = ["infer", model, "--server", default_server.endpoint, "--save", str(tmp_path)]
    for name, array in inputs.items():
        np.save(tmp_path / f"{name}.npy", array)
        args += ["--input", f"{name}={tmp_path / f'{name}.npy'}"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    expected = direct_openvino(model, inputs)
    for name, want in expected.items():
        assert name in printed
        got = np.load(tmp_path / f"{name.replace('/', '_')}.npy")
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.max(np.abs(got.astype(np.float64) - want)) <= 1e-5
    if model == "tiny":
        reference = builtin.tiny_reference(inputs["x"])
        np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference["y"], atol=1e-5)


def test_the_default_server_logs_what_it_serves(default_server: ServerProcess) -> None:
    log = default_server.log()
    assert "models squeezenet on cpu, resnet50 on cpu, tiny on cpu" in log
    assert f"twinfer listening on tcp:127.0.0.1:{default_server.port}" in log


class TwistedClientOverTLSTests(unittest.TestCase):
    """The Twisted client against a real twistd over TLS, verified by service_identity."""

    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir(parents=True)
        self.tls: TLSFiles = make_tls_files(directory, "localhost")
        port = f"ssl:0:interface=127.0.0.1:privateKey={self.tls.key}:certKey={self.tls.cert}"
        self.server = launch_twistd(TWISTD_TINY_CONFIG, directory, port=port)
        self.addCleanup(self.server.stop)

    async def test_infer_over_tls_with_hostname_verification(self) -> None:
        client = await connect(
            reactor, f"tls:localhost:{self.server.port}", trust_root=str(self.tls.ca)
        )
        self.addCleanup(client.close)
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        results = await defer.gatherResults([client.infer("tiny", {"x": x * i}) for i in range(32)])
        for i, out in enumerate(results):
            np.testing.assert_allclose(out["y"], builtin.tiny_reference(x * i)["y"], atol=1e-5)
        with self.assertRaises(TwinferError) as e:
            await client.infer("nope", {"x": x})
        assert e.exception.code == ErrorCode.UNKNOWN_MODEL

    async def test_a_certificate_for_another_name_is_refused(self) -> None:
        # The certificate names "localhost" only; asking for 127.0.0.1 must fail.
        with self.assertRaises(TwinferError) as e:
            await connect(reactor, f"tls:127.0.0.1:{self.server.port}", trust_root=str(self.tls.ca))
        assert e.exception.code == ErrorCode.UNAVAILABLE
        assert "IPAddressMismatch" in e.exception.message

    async def test_an_untrusted_ca_is_refused(self) -> None:
        elsewhere = Path(self.mktemp()).resolve()
        elsewhere.mkdir(parents=True)
        other = make_tls_files(elsewhere, "localhost")
        with self.assertRaises(TwinferError) as e:
            await connect(reactor, f"tls:localhost:{self.server.port}", trust_root=str(other.ca))
        assert e.exception.code == ErrorCode.UNAVAILABLE
        assert "certificate verify failed" in e.exception.message
