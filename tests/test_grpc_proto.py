"""The committed gRPC modules: generated from the committed ``.proto``, and
wire-compatible with Triton's own definitions (as ``tritonclient.grpc`` ships them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from twinfer.frontends.grpc import generate
from twinfer.frontends.grpc import grpc_service_pb2 as pb


def test_the_committed_modules_are_what_the_proto_generates(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extras) regenerates them")
    fresh = generate.generate(tmp_path)
    for name in generate.MODULES:
        committed = (generate.HERE / name).read_text()
        assert fresh[name] == committed, (
            f"{name} differs from what {generate.PROTO} generates: "
            f"run python -m twinfer.frontends.grpc.generate"
        )


def _messages(
    file: descriptor_pb2.FileDescriptorProto,
) -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        found[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for message in file.message_type:
        walk(file.package, message)
    return found


def _proto(module: object) -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(file)  # type: ignore[attr-defined]
    return file


def test_every_message_and_rpc_matches_tritons_wire_contract() -> None:
    triton = pytest.importorskip("tritonclient.grpc")
    service_pb2 = triton.service_pb2
    theirs = {**_messages(_proto(triton.model_config_pb2)), **_messages(_proto(service_pb2))}
    ours_file = _proto(pb)
    ours = _messages(ours_file)
    assert ours_file.package == "inference"
    for name, message in ours.items():
        assert name in theirs, f"{name} is not one of Triton's messages"
        their_fields = {f.name: f for f in theirs[name].field}
        for field in message.field:
            other = their_fields.get(field.name)
            assert other is not None, f"{name}.{field.name} is not in Triton's {name}"
            assert (field.number, field.type, field.label, field.type_name) == (
                other.number,
                other.type,
                other.label,
                other.type_name,
            ), f"{name}.{field.name} differs from Triton's"
    # Every request and reply of the service is there, with the same signature.
    (service,) = _proto(service_pb2).service
    (our_service,) = ours_file.service
    assert our_service.name == service.name == "GRPCInferenceService"
    signatures = {
        m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
        for m in our_service.method
    }
    for method in service.method:
        expected = (
            method.input_type,
            method.output_type,
            method.client_streaming,
            method.server_streaming,
        )
        assert signatures.get(method.name) == expected, method.name
    # Everything a client sends in a request is understood (no field left out).
    for method in service.method:
        request = method.input_type.lstrip(".")
        assert [f.name for f in ours[request].field] == [f.name for f in theirs[request].field]
