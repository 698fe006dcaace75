"""Re-vendor a Triton protobuf schema from an installed ``tritonclient``: ``python -m stages.serve.triton.vendor PB2``.

NVIDIA's tritonclient wheel ships protoc's Python output (``tritonclient/grpc/model_config_pb2.py``,
``service_pb2.py``), and each holds its ``.proto`` file as a serialized ``FileDescriptorProto``. This
reads that byte string out of the file (without importing it: the generated code refuses a protobuf
runtime of another major version) and writes it, with NVIDIA's BSD-3 license, as a module beside this
one that ``stages.serve.triton`` loads into its private descriptor pool. Run it with any Python; it
needs the standard library only:

    python -m stages.serve.triton.vendor .venv-triton/lib/python3.11/site-packages/tritonclient/grpc/model_config_pb2.py
    python -m stages.serve.triton.vendor .venv-triton/lib/python3.11/site-packages/tritonclient/grpc/service_pb2.py

(The vendored copies come from the tritonclient 2.73.0 wheel: ``pip download --no-deps tritonclient==2.73.0``
and unzip it; .venv-triton pins 2.46.0, whose wheel still carries perf_analyzer.)
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LICENSE = """\
# Copyright (c) 2020, NVIDIA CORPORATION. All rights reserved.
#
# Redistribution and use in source and binary forms, with or without
# modification, are permitted provided that the following conditions
# are met:
#  * Redistributions of source code must retain the above copyright
#    notice, this list of conditions and the following disclaimer.
#  * Redistributions in binary form must reproduce the above copyright
#    notice, this list of conditions and the following disclaimer in the
#    documentation and/or other materials provided with the distribution.
#  * Neither the name of NVIDIA CORPORATION nor the names of its
#    contributors may be used to endorse or promote products derived
#    from this software without specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS ``AS IS'' AND ANY
# EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
# IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR
# PURPOSE ARE DISCLAIMED.  IN NO EVENT SHALL THE COPYRIGHT OWNER OR
# CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL,
# EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
# PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR
# PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY
# OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT
# (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
# OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def serialized_descriptor(pb2: Path) -> bytes:
    """The ``FileDescriptorProto`` bytes that protoc embedded in a generated ``*_pb2.py``."""
    calls = [n for n in ast.walk(ast.parse(Path(pb2).read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "AddSerializedFile"]
    if len(calls) != 1:
        raise ValueError(f"{pb2}: expected one AddSerializedFile(...) call (protoc's Python output), found {len(calls)}")
    return ast.literal_eval(calls[0].args[0])


def schema_shape(serialized: bytes) -> dict:
    """Every RPC, message field and enum value of a serialized FileDescriptorProto, by name: what a
    vendored copy must keep of an upstream schema (a superset check compares two of these)."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    found: dict = {("rpc", m.name): (m.input_type, m.output_type, m.server_streaming)
                   for service in proto.service for m in service.method}

    def walk(messages, enums, prefix):
        for enum in enums:
            found.update({(f"{prefix}{enum.name}", v.name): v.number for v in enum.value})
        for msg in messages:
            found.update({(f"{prefix}{msg.name}", f.name): (f.number, f.type, f.label, f.type_name) for f in msg.field})
            walk(msg.nested_type, msg.enum_type, f"{prefix}{msg.name}.")

    walk(proto.message_type, proto.enum_type, "")
    return found


def module_text(pb2: Path, data: bytes) -> str:
    """The vendored module: license, provenance, and the bytes as a literal of short lines."""
    text = Path(pb2).read_text()
    source = re.search(r"^# source: (\S+)", text, re.M)
    protoc = re.search(r"^# Protobuf Python Version: (\S+)", text, re.M)
    dist = next((p.name for p in Path(pb2).resolve().parents[2].glob("tritonclient-*.dist-info")), "tritonclient")
    chunks, start = [], 0
    while start < len(data):  # as many bytes per line as fit in ~100 characters of their repr
        end = start + 1
        while end < len(data) and len(repr(data[start:end + 1])) <= 100:
            end += 1
        chunks.append(data[start:end])
        start = end
    body = "\n".join(f"    {chunk!r}" for chunk in chunks)
    return (f"{LICENSE}\n"
            f'"""Triton\'s ``{source.group(1) if source else "?"}`` as a serialized ``FileDescriptorProto`` (vendored).\n\n'
            f"Taken by ``stages/serve/triton/vendor.py`` from NVIDIA's ``{dist.removesuffix('.dist-info')}`` wheel\n"
            f"(``tritonclient/grpc/{Path(pb2).name}``, protoc {protoc.group(1) if protoc else '?'}), which is built from\n"
            "triton-inference-server/common's ``protobuf/`` directory under the BSD-3-Clause license above.\n"
            "Do not edit: re-run the vendor script.\n"
            '"""\n\n'
            f"SERIALIZED = (\n{body}\n)\n")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    pb2 = Path(argv[0])
    data = serialized_descriptor(pb2)
    # Named after the .proto it holds (grpc_service.proto -> grpc_service_desc.py), not the _pb2 file
    # (tritonclient calls grpc_service.proto's output service_pb2.py).
    source = re.search(r"^# source: (\S+)\.proto", Path(pb2).read_text(), re.M)
    name = source.group(1) if source else pb2.name.removesuffix("_pb2.py")
    out = HERE / f"{name}_desc.py"
    out.write_text(module_text(pb2, data))
    print(f"wrote {out} ({len(data)} bytes of descriptor)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
