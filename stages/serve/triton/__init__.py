"""Triton Inference Server's own protobuf schemas, vendored, and built into message classes at run time.

Triton describes a model in ``config.pbtxt``: a ``inference.ModelConfig`` message (its
``model_config.proto``) in protobuf's text format. Rather than hand-written f-strings and a hand
parser, we read and write it with ``google.protobuf.text_format`` against that very message, so
names are escaped as protobuf escapes them and a misspelt field is refused, naming it, as Triton does.

The schemas are vendored as serialized ``FileDescriptorProto``s (``<name>_desc.py``, NVIDIA's BSD-3
license inside, written by ``vendor.py`` from the tritonclient wheel) and loaded into a private
descriptor pool on first use: no protoc and no generated ``_pb2`` code at run time, so any protobuf
runtime (4.x and later) works, whatever version generated the upstream code. Two are vendored:
``model_config.proto`` (config.pbtxt, /config) and ``grpc_service.proto`` (the gRPC transport's
messages and its service, ``inference.GRPCInferenceService``); to add one, vendor it with
``vendor.py`` and add it to ``FILES``; its imports are added to the pool first.

    ModelConfig = message_class("inference.ModelConfig")
    config = parse_text(path.read_text(), ModelConfig)      # ValueError naming line, column and field
    path.write_text(to_text(config, header="written by ..."))
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

# Vendored .proto file name -> the module holding its serialized FileDescriptorProto.
FILES = {
    "model_config.proto": "stages.serve.triton.model_config_desc",
    "grpc_service.proto": "stages.serve.triton.grpc_service_desc",  # the KServe v2 gRPC API (grpc_server)
}

_lock = threading.Lock()
_pool: Any = None


def _add(pool: Any, name: str, added: set[str]) -> None:
    from google.protobuf import descriptor_pb2

    if name in added:
        return
    if name not in FILES:
        raise KeyError(f"protobuf schema {name!r} is not vendored in stages/serve/triton (have {sorted(FILES)})")
    proto = descriptor_pb2.FileDescriptorProto.FromString(importlib.import_module(FILES[name]).SERIALIZED)
    for dependency in proto.dependency:  # a file's imports must be in the pool before it
        _add(pool, dependency, added)
    pool.Add(proto)
    added.add(name)


def pool() -> Any:
    """The private ``DescriptorPool`` holding every vendored schema (built once, on first use)."""
    global _pool
    with _lock:
        if _pool is None:
            from google.protobuf import descriptor_pool

            new, added = descriptor_pool.DescriptorPool(), set()
            for name in FILES:
                _add(new, name, added)
            _pool = new
        return _pool


def message_class(full_name: str) -> type:
    """The Python class of a vendored message, e.g. ``message_class("inference.ModelConfig")``."""
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(pool().FindMessageTypeByName(full_name))


def model_config_class() -> type:
    """Triton's ``inference.ModelConfig``: what a config.pbtxt holds."""
    return message_class("inference.ModelConfig")


def parse_text(text: str, cls: type) -> Any:
    """A message of ``cls`` from protobuf text format, strictly: an unknown field, a wrong type or a
    repeated singular field is a ValueError naming the line, column and field (as Triton refuses them)."""
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, cls())
    except text_format.ParseError as e:
        raise ValueError(str(e)) from None


def to_text(message: Any, header: str = "") -> str:
    """``message`` in protobuf text format (strings escaped by protobuf itself), after ``header`` as
    ``#`` comment lines. Fields at their default value are not written (proto3): they read back equal."""
    from google.protobuf import text_format

    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + text_format.MessageToString(message, as_utf8=True, use_short_repeated_primitives=True)


def to_json(message: Any) -> dict:
    """``message`` as Triton's HTTP endpoints write it: protobuf's JSON mapping with the proto field names
    and every scalar field (defaults included), but 64-bit integers as JSON numbers, not strings (Triton
    converts them back too; perf_analyzer reads ``max_batch_size`` and ``dims`` as numbers)."""
    from google.protobuf import json_format

    try:
        doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    except TypeError:  # protobuf < 5.26 names the option differently
        doc = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                        including_default_value_fields=True)
    return _numbers(doc, message.DESCRIPTOR)


_INT64 = {3, 4, 6, 16, 18}  # FieldDescriptor.TYPE_INT64, UINT64, FIXED64, SFIXED64, SINT64


def _numbers(doc: Any, descriptor: Any) -> Any:
    for fd in descriptor.fields:
        if fd.name not in doc:
            continue
        value = doc[fd.name]
        if fd.message_type is not None:
            if fd.message_type.GetOptions().map_entry:
                value_fd = fd.message_type.fields_by_name["value"]
                for k, v in value.items():
                    if value_fd.message_type is not None:
                        _numbers(v, value_fd.message_type)
                    elif value_fd.type in _INT64:
                        value[k] = int(v)
            else:
                for item in (value if isinstance(value, list) else [value]):
                    _numbers(item, fd.message_type)
        elif fd.type in _INT64:
            doc[fd.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return doc


def enum_name(message: Any, field: str) -> str:
    """The name of an enum field's value (``TYPE_FP32``, ``KIND_CPU``)."""
    return message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number[getattr(message, field)].name


def enum_value(enum_full_name: str, name: str) -> int:
    """The number of a vendored enum's value, e.g. ``enum_value("inference.DataType", "TYPE_FP32")``."""
    return pool().FindEnumTypeByName(enum_full_name).values_by_name[name].number


def set_fields(message: Any, prefix: str = "") -> list[str]:
    """Dotted names of every field set in ``message`` and its sub-messages (``dynamic_batching.priority_levels``);
    repeated sub-messages are walked through each element."""
    out = []
    for fd, value in message.ListFields():
        name = f"{prefix}{fd.name}"
        out.append(name)
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            for item in (value if _repeated(fd) else [value]):
                out += [n for n in set_fields(item, f"{name}.") if n not in out]
    return out


def _repeated(fd: Any) -> bool:
    # protobuf 7 has is_repeated and no label; protobuf 4 has only label.
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
