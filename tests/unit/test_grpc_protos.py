"""TorchServe's gRPC interface: the committed stubs are what the .proto files generate,
and the descriptors carry exactly the reference's packages, services, methods, field
numbers and types (a client generated from TorchServe's own protos must work unchanged)."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor

from control.grpc.protos import HERE, PROTOS, ROOT, generate, inference_pb2, management_pb2

T = FieldDescriptor
# (name, number, type, label) per message: the reference tables of TorchServe 0.12.
INFERENCE_MESSAGES = {
    "PredictionsRequest": [
        ("model_name", 1, T.TYPE_STRING),
        ("model_version", 2, T.TYPE_STRING),
        ("input", 3, "map<string, bytes>"),
        ("sequence_id", 4, "optional string"),
    ],
    "PredictionResponse": [
        ("prediction", 1, T.TYPE_BYTES),
        ("sequence_id", 2, "optional string"),
        ("status", 3, "optional google.rpc.Status"),
    ],
    "TorchServeHealthResponse": [("health", 1, T.TYPE_STRING)],
}
S, N, B = T.TYPE_STRING, T.TYPE_INT32, T.TYPE_BOOL
MANAGEMENT_MESSAGES = {
    "ManagementResponse": [("msg", 1, S)],
    "DescribeModelRequest": [("model_name", 1, S), ("model_version", 2, S), ("customized", 3, B)],
    "ListModelsRequest": [("limit", 1, N), ("next_page_token", 2, N)],
    "RegisterModelRequest": [
        ("batch_size", 1, N), ("handler", 2, S), ("initial_workers", 3, N),
        ("max_batch_delay", 4, N), ("model_name", 5, S), ("response_timeout", 6, N),
        ("runtime", 7, S), ("synchronous", 8, B), ("url", 9, S), ("s3_sse_kms", 10, B),
        ("startup_timeout", 11, N),
    ],
    "ScaleWorkerRequest": [
        ("model_name", 1, S), ("model_version", 2, S), ("max_worker", 3, N),
        ("min_worker", 4, N), ("number_gpu", 5, N), ("synchronous", 6, B), ("timeout", 7, N),
    ],
    "SetDefaultRequest": [("model_name", 1, S), ("model_version", 2, S)],
    "UnregisterModelRequest": [("model_name", 1, S), ("model_version", 2, S)],
}  # fmt: skip


def _kind(field: FieldDescriptor) -> object:
    """A field's type as the reference writes it."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields
        names = {T.TYPE_STRING: "string", T.TYPE_BYTES: "bytes"}
        return f"map<{names[key.type]}, {names[value.type]}>"
    if field.has_presence and field.containing_oneof is not None:  # proto3 `optional`
        inner = field.message_type.full_name if field.message_type else "string"
        return f"optional {inner}"
    assert not field.is_repeated, field.full_name
    return field.type


def _fields(message: Descriptor) -> list[tuple[str, int, object]]:
    return [(f.name, f.number, _kind(f)) for f in message.fields]


@pytest.mark.parametrize(
    ("module", "package", "messages"),
    [
        (inference_pb2, "org.pytorch.serve.grpc.inference", INFERENCE_MESSAGES),
        (management_pb2, "org.pytorch.serve.grpc.management", MANAGEMENT_MESSAGES),
    ],
)
def test_every_message_has_the_reference_fields(
    module: object, package: str, messages: dict[str, list[tuple[str, int, object]]]
) -> None:
    file = module.DESCRIPTOR  # type: ignore[attr-defined]
    assert file.package == package
    assert set(file.message_types_by_name) == set(messages)
    for name, fields in messages.items():
        assert _fields(file.message_types_by_name[name]) == fields, name


def _methods(service: ServiceDescriptor) -> list[tuple[str, str, str, bool, bool]]:
    return [
        (
            m.name,
            m.input_type.full_name,
            m.output_type.full_name,
            m.client_streaming,
            m.server_streaming,
        )
        for m in service.methods
    ]


def test_the_inference_service_has_the_reference_methods() -> None:
    service = inference_pb2.DESCRIPTOR.services_by_name["InferenceAPIsService"]
    assert service.full_name == "org.pytorch.serve.grpc.inference.InferenceAPIsService"
    req = "org.pytorch.serve.grpc.inference.PredictionsRequest"
    resp = "org.pytorch.serve.grpc.inference.PredictionResponse"
    assert _methods(service) == [
        (
            "Ping",
            "google.protobuf.Empty",
            "org.pytorch.serve.grpc.inference.TorchServeHealthResponse",
            False,
            False,
        ),
        ("Predictions", req, resp, False, False),
        ("StreamPredictions", req, resp, False, True),
        ("StreamPredictions2", req, resp, True, True),
    ]
    assert [d.name for d in inference_pb2.DESCRIPTOR.dependencies] == [
        "google/protobuf/empty.proto",
        "google/rpc/status.proto",
    ]


def test_the_management_service_has_the_reference_methods() -> None:
    service = management_pb2.DESCRIPTOR.services_by_name["ManagementAPIsService"]
    assert service.full_name == "org.pytorch.serve.grpc.management.ManagementAPIsService"
    pkg = "org.pytorch.serve.grpc.management"
    requests = {
        "DescribeModel": "DescribeModelRequest",
        "ListModels": "ListModelsRequest",
        "RegisterModel": "RegisterModelRequest",
        "ScaleWorker": "ScaleWorkerRequest",
        "SetDefault": "SetDefaultRequest",
        "UnregisterModel": "UnregisterModelRequest",
    }
    assert _methods(service) == [
        (name, f"{pkg}.{request}", f"{pkg}.ManagementResponse", False, False)
        for name, request in requests.items()
    ]


def test_the_committed_stubs_are_what_the_protos_generate(tmp_path: Path) -> None:
    assert generate(tmp_path) == 0
    out = tmp_path / HERE.relative_to(ROOT)
    generated = sorted(p.name for p in out.iterdir())
    expected = sorted(
        f"{Path(proto).stem}{suffix}"
        for proto in PROTOS
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    )
    assert generated == expected
    stale = [name for name in generated if (out / name).read_bytes() != (HERE / name).read_bytes()]
    assert stale == [], f"regenerate with scripts/gen-protos: {stale} differ"
