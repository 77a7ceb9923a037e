"""``docs/openapi.yaml`` describes the live HTTP API: every response checked here,
success and failure, is validated against it with ``openapi-core``."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from http_support import (
    IMAGE_CONFIG,
    TINY_HTTP_CONFIG,
    HTTPResult,
    HTTPServerTestCase,
    write_image_models,
)
from tasks_support import blank_png
from twinfer.engines.builtin import tiny_reference
from twinfer.sharedmem import SharedMemory

SPEC_PATH = Path(__file__).parent.parent / "docs" / "openapi.yaml"
HOST = "http://127.0.0.1:8080"


def spec() -> OpenAPI:
    return OpenAPI.from_file_path(str(SPEC_PATH))


def infer_document(**extra: object) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 4],
                "datatype": "FP32",
                "data": np.arange(8, dtype=np.float32).tolist(),
            }
        ],
        **extra,
    }


class OpenAPICase(HTTPServerTestCase):
    """A server with tensor and image models; ``check`` validates a live exchange."""

    tasks: bool | None = True
    #: Whether Triton's load/unload are allowed (``--allow-admin``).
    admin = True

    async def setUp(self) -> None:  # type: ignore[override]
        directory = Path(tempfile.mkdtemp(prefix="twinfer-http-openapi-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        await self.start_http(
            IMAGE_CONFIG, tasks=self.tasks, base_dir=write_image_models(directory), admin=self.admin
        )
        self.openapi = spec()
        self.checked: list[tuple[str, str, int]] = []

    async def check(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        expect: int = 200,
    ) -> HTTPResult:
        headers = {"Content-Type": content_type} if body is not None else {}
        result = await self.request(method, path, body, headers)
        assert result.status == expect, (path, result.status, result.body)
        bare, _, query = path.partition("?")
        args = dict(p.split("=", 1) for p in query.split("&")) if query else {}
        request = MockRequest(
            HOST,
            method.lower(),
            bare,
            args=args,
            data=body,
            content_type=content_type,
            headers=headers,
        )
        if body is not None and expect == 200:
            self.openapi.validate_request(request)  # what clients send is documented too
        response_type = (result.header("Content-Type") or "").split(";")[0]
        response = MockResponse(
            result.body,
            result.status,
            headers={k.decode(): v[0].decode() for k, v in result.headers.getAllRawHeaders()},
            content_type=response_type,
        )
        self.openapi.validate_response(request, response)
        self.checked.append((method, bare, result.status))
        return result


class OpenAPITests(OpenAPICase):
    """With the real image tasks."""

    async def test_the_spec_itself_is_valid(self) -> None:
        self.openapi.check_spec()

    async def test_every_documented_operation_answers_as_documented(self) -> None:
        body = json.dumps(infer_document(id="a")).encode()
        await self.check("GET", "/")
        await self.check("GET", "/services")
        await self.check("GET", "/v2")
        await self.check("GET", "/v2/health/live")
        await self.check("GET", "/v2/health/ready")
        await self.check("GET", "/v2/models/tiny")
        await self.check("GET", "/v2/models/tiny/versions/1")
        await self.check("GET", "/v2/models/tiny/ready")
        await self.check("GET", "/v2/models/tiny/versions/1/ready")
        await self.check("POST", "/v2/models/tiny/infer", body)
        await self.check("POST", "/v2/models/tiny/versions/1/infer", body)
        await self.check("POST", "/inference?model=det", blank_png(64, 48), "image/png")
        # Triton's extensions.
        await self.check("POST", "/v2/repository/index")
        await self.check("POST", "/v2/repository/index", b'{"ready": true}')
        await self.check("GET", "/v2/models/stats")
        await self.check("GET", "/v2/models/tiny/stats")
        await self.check("GET", "/v2/models/tiny/versions/1/stats")
        await self.check("GET", "/v2/models/tiny/config")
        await self.check("GET", "/v2/models/tiny/versions/1/config")
        await self.check("POST", "/v2/repository/models/tiny/unload", b"{}")
        await self.check("POST", "/v2/repository/models/tiny/load", b"{}")
        # Shared memory is off on this server (no --allow-shm): 501 naming the flag.
        shm = "/v2/systemsharedmemory"
        register = json.dumps({"key": "/x", "offset": 0, "byte_size": 16}).encode()
        await self.check("POST", f"{shm}/region/tiny/register", register, expect=501)
        await self.check("POST", f"{shm}/region/tiny/unregister", expect=501)
        await self.check("POST", f"{shm}/unregister", expect=501)
        await self.check("GET", f"{shm}/region/tiny/status", expect=501)
        await self.check("GET", f"{shm}/status", expect=501)
        documented = {
            (method.upper(), path)
            for path, item in yaml.safe_load(SPEC_PATH.read_text())["paths"].items()
            for method in item
            if method in ("get", "post")
        }
        templated = {
            (m, p.replace("tiny", "{name}").replace("/versions/1", "/versions/{version}"))
            for m, p, _ in self.checked
        }
        assert documented == templated  # every documented operation was exercised

    async def test_binary_extension_responses_are_documented(self) -> None:
        document = infer_document(parameters={"binary_data_output": True})
        result = await self.check("POST", "/v2/models/tiny/infer", json.dumps(document).encode())
        assert result.header("Inference-Header-Content-Length") is not None

    async def test_error_responses_are_documented(self) -> None:
        bad = json.dumps(infer_document(outputs=[{"name": "nope"}])).encode()
        await self.check("POST", "/v2/models/tiny/infer", bad, expect=400)
        await self.check("POST", "/v2/models/nope/infer", bad, expect=404)
        await self.check("GET", "/v2/models/nope", expect=404)
        await self.check("GET", "/v2/models/nope/ready", expect=404)
        await self.check("POST", "/inference?model=nope", b"\xff\xd8", "image/jpeg", expect=404)
        await self.check("POST", "/inference", b"\xff\xd8", "image/gif", expect=415)
        await self.check("POST", "/inference", b"\xff\xd8", "image/jpeg", expect=400)
        await self.check("POST", "/inference?model=tiny", blank_png(8, 8), "image/png", expect=400)
        await self.check("GET", "/v2/models/nope/stats", expect=404)
        await self.check("GET", "/v2/models/tiny/versions/2/stats", expect=404)
        await self.check("GET", "/v2/models/nope/config", expect=404)
        await self.check("GET", "/v2/models/nope/versions/1/config", expect=404)
        await self.check("POST", "/v2/repository/index", b'{"ready": 1}', expect=400)
        await self.check("POST", "/v2/repository/models/nope/load", b"{}", expect=404)
        await self.check("POST", "/v2/repository/models/nope/unload", b"{}", expect=404)
        config = b'{"parameters": {"config": "{}"}}'
        await self.check("POST", "/v2/repository/models/tiny/load", config, expect=400)


class SharedMemoryOpenAPITests(OpenAPICase):
    """With ``--allow-shm``: the shared-memory routes and tensors in regions."""

    async def setUp(self) -> None:  # type: ignore[override]
        self.shm_dir = Path(tempfile.mkdtemp(prefix="twinfer-shm-"))
        self.addCleanup(shutil.rmtree, self.shm_dir, ignore_errors=True)
        self.regions = SharedMemory(str(self.shm_dir)).table(4, 1 << 20, "HTTP")
        await self.start_http(TINY_HTTP_CONFIG, shared_regions=self.regions)
        self.openapi = spec()
        self.checked = []

    async def test_shared_memory_routes_and_tensors_answer_as_documented(self) -> None:
        (self.shm_dir / "obj").write_bytes(np.arange(64, dtype=np.float32).tobytes())
        shm = "/v2/systemsharedmemory"
        register = json.dumps({"key": "/obj", "offset": 0, "byte_size": 256}).encode()
        await self.check("POST", f"{shm}/region/tiny/register", register)
        status = await self.check("GET", f"{shm}/status")
        assert json.loads(status.body) == [
            {"name": "tiny", "key": "/obj", "offset": 0, "byte_size": 256}
        ]
        await self.check("GET", f"{shm}/region/tiny/status")
        region = {"shared_memory_region": "tiny", "shared_memory_byte_size": 32}
        document = {
            "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": region}],
            "outputs": [
                {"name": "y", "parameters": {**region, "shared_memory_offset": 128}},
                {"name": "label"},
            ],
        }
        result = await self.check("POST", "/v2/models/tiny/infer", json.dumps(document).encode())
        [y, label] = json.loads(result.body)["outputs"]
        assert y["parameters"]["shared_memory_byte_size"] == 24 and "data" not in y
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        written = np.frombuffer((self.shm_dir / "obj").read_bytes()[128:152], np.float32)
        np.testing.assert_allclose(written.reshape(2, 3), tiny_reference(x)["y"], atol=1e-5)
        assert label["data"] == tiny_reference(x)["label"].tolist()
        bad = json.dumps({"key": "/../etc/passwd", "byte_size": 16}).encode()
        await self.check("POST", f"{shm}/region/other/register", bad, expect=400)
        await self.check("POST", f"{shm}/region/tiny/unregister")
        await self.check("GET", f"{shm}/region/tiny/status", expect=404)
        await self.check("POST", f"{shm}/region/tiny/unregister", expect=404)
        await self.check("POST", "/v2/models/tiny/infer", json.dumps(document).encode(), expect=404)
        await self.check("POST", f"{shm}/unregister")
        errors = self.dataplane.frontends["http"].protocol_errors
        assert errors == {"INVALID_REGION": 1, "UNKNOWN_REGION": 2}


class NoTasksOpenAPITests(OpenAPICase):
    """The same server without image tasks (``POST /inference`` is 501) nor
    administration (Triton's load/unload are 403)."""

    tasks = None
    admin = False

    async def test_not_implemented_is_documented(self) -> None:
        await self.check("POST", "/inference", b"\xff\xd8", "image/jpeg", expect=501)

    async def test_admin_disabled_is_documented(self) -> None:
        for op in ("load", "unload"):
            result = await self.check("POST", f"/v2/repository/models/tiny/{op}", b"{}", expect=403)
            assert "--allow-admin" in result.json()["error"]


def test_the_validator_rejects_responses_that_break_the_spec() -> None:
    """The checks above can fail: answers the spec does not allow are caught."""
    openapi = spec()
    request = MockRequest(HOST, "get", "/v2/models/tiny")
    wrong = [
        MockResponse(b'{"name": "tiny"}', 200),  # metadata without its tensors
        MockResponse(b'{"error": 5}', 404),  # error that is not a string
        MockResponse(b'{"error": "x"}', 418),  # undocumented status
    ]
    for response in wrong:
        with pytest.raises(Exception):  # noqa: B017 - openapi-core's several error types
            openapi.validate_response(request, response)
