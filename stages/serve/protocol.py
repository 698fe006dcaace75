"""The KServe v2 / Open Inference Protocol data plane: schemas and the tensor codec, JSON and binary.

This module knows JSON, bytes and numpy and nothing about HTTP or ONNX Runtime sessions. It turns an
infer request body into named numpy arrays and an answer back into the v2 response body. Every
problem raises ``ProtocolError`` whose message starts with the field at fault
(``inputs[0].data: ...``) so a client can fix its request without reading server logs; where a
request has several problems they are all reported at once.

Datatypes follow the v2 table (BOOL, UINT8..64, INT8..64, FP16/32/64, BYTES); ``DATATYPES`` maps
each to its numpy dtype and to the ONNX Runtime type string, and is the only place that does.

The binary tensor data extension (Triton's, which its clients use by default): the body is the JSON
header (``header_length`` bytes, from the ``Inference-Header-Content-Length`` HTTP header) followed
by the raw little-endian tensors, in input order, of every input whose ``parameters`` carry
``binary_data_size``. BOOL is one byte per element; BYTES elements are a 4-byte little-endian length
then the bytes. Outputs come back binary when the request output says ``binary_data: true`` or the
request says ``binary_data_output: true`` (a per-output ``binary_data`` wins).

Shapes are checked before any arithmetic on them (``check_shape``): every dim an integer in
0..2**63-1, at most ``MAX_RANK`` dims, and the element count (the product of the non-zero dims) within
int64, so ``[9223372036854775808, 0]`` is a 400 naming the field, never a failed reshape.

Non-finite floats. JSON has no NaN or Infinity, so answers write them as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (protobuf's JSON mapping does the same; Python's ``float()``,
numpy and JavaScript's ``Number()`` read them) and never as bare tokens; binary outputs carry the IEEE
bits. In requests, a model refuses NaN and ±Infinity by default (``refuse_non_finite``, called by
the transports per the model's ``serve.inputs.allow_non_finite``); where a model allows them, JSON
may spell them as those strings (or as the bare tokens Python's json module writes).

The gRPC transport's ``ModelInferRequest`` is read by ``parse_grpc_infer_request`` with the same
checks and the same messages (``raw_input_contents`` as the binary section, typed ``contents`` as
JSON's ``data``), so both transports say the same thing about the same mistake.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError


class ProtocolError(ValueError):
    """The request breaks the protocol or does not fit the model; the message names the field."""


# --- datatypes ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataType:
    name: str          # v2 name, e.g. "FP32"
    numpy: np.dtype    # what the array holds in memory
    onnx: str          # ONNX Runtime's NodeArg.type, e.g. "tensor(float)"


DATATYPES: dict[str, DataType] = {d.name: d for d in (
    DataType("BOOL", np.dtype(np.bool_), "tensor(bool)"),
    DataType("UINT8", np.dtype(np.uint8), "tensor(uint8)"),
    DataType("UINT16", np.dtype(np.uint16), "tensor(uint16)"),
    DataType("UINT32", np.dtype(np.uint32), "tensor(uint32)"),
    DataType("UINT64", np.dtype(np.uint64), "tensor(uint64)"),
    DataType("INT8", np.dtype(np.int8), "tensor(int8)"),
    DataType("INT16", np.dtype(np.int16), "tensor(int16)"),
    DataType("INT32", np.dtype(np.int32), "tensor(int32)"),
    DataType("INT64", np.dtype(np.int64), "tensor(int64)"),
    DataType("FP16", np.dtype(np.float16), "tensor(float16)"),
    DataType("FP32", np.dtype(np.float32), "tensor(float)"),
    DataType("FP64", np.dtype(np.float64), "tensor(double)"),
    # JSON carries BYTES as strings; ONNX Runtime takes and returns them as numpy object arrays.
    DataType("BYTES", np.dtype(object), "tensor(string)"),
)}
_BY_ONNX = {d.onnx: d for d in DATATYPES.values()}


def from_onnx(onnx_type: str) -> DataType:
    """The v2 datatype for an ONNX Runtime type string; ProtocolError if JSON cannot carry it."""
    try:
        return _BY_ONNX[onnx_type]
    except KeyError:
        raise ProtocolError(f"ONNX type {onnx_type} has no v2 datatype; supported: {sorted(_BY_ONNX)}") from None


_BY_NUMPY = {d.numpy: d for d in DATATYPES.values() if d.name != "BYTES"}


def from_numpy(dtype: np.dtype) -> DataType:
    """The v2 datatype for a numpy dtype (str and bytes arrays count as BYTES)."""
    found = _BY_NUMPY.get(dtype)  # a dict lookup: this runs for every tensor of every request
    if found is not None:
        return found
    dtype = np.dtype(dtype)
    if dtype.kind in "OUS":
        return DATATYPES["BYTES"]
    found = _BY_NUMPY.get(dtype.newbyteorder("="))
    if found is None:
        raise ProtocolError(f"numpy dtype {dtype} has no v2 datatype")
    return found


def format_shape(shape: Sequence[int]) -> str:
    """``[2,1,8,8]``: compact, the way error messages quote shapes."""
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


INT64_MAX = 2**63 - 1
# numpy refuses a shape whose non-zero dims' product times the item size exceeds int64, even for a zero-size
# array; 8 bytes is the widest item (INT64, FP64, and BYTES' object pointers).
MAX_ELEMENTS = INT64_MAX // 8
MAX_RANK = 32  # numpy's limit was 32 dims before 2.0 (64 since); no served model comes close
NON_FINITE_TOKENS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def check_shape(shape: Sequence[Any], where: str) -> int:
    """The element count of a request tensor's ``shape``, after checking it can be one: every dim an
    integer in 0..2**63-1 (the v2 protocol's int64), at most MAX_RANK dims, and the product of its
    non-zero dims at most MAX_ELEMENTS (2**60: int64's bytes at 8 bytes an element; a zero dim makes the
    count 0, but ``[2**62, 4, 0]`` still cannot be an array). Runs before any arithmetic on the dims;
    ProtocolError naming ``where.shape``."""
    if len(shape) > MAX_RANK:
        raise ProtocolError(f"{where}.shape: at most {MAX_RANK} dims, got {len(shape)}")
    for axis, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= INT64_MAX:
            raise ProtocolError(f"{where}.shape[{axis}]: dims must be integers in 0..{INT64_MAX}, got {d!r}")
    nonzero = 1
    for d in shape:
        if d:
            nonzero *= d
            if nonzero > MAX_ELEMENTS:
                raise ProtocolError(f"{where}.shape: {format_shape(shape)} has more elements than a tensor can "
                                    f"hold (the product of its non-zero dims exceeds 2**60)")
    return 0 if 0 in shape else nonzero


def refuse_non_finite(tensors: Sequence["Tensor"], why: str = "") -> None:
    """ProtocolError naming every float input holding NaN or ±Infinity (``inputs[i]``, by request order)."""
    problems = []
    for i, t in enumerate(tensors):
        a = t.array
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            bad = ~np.isfinite(a.reshape(-1))
            first = int(np.argmax(bad))
            value = a.reshape(-1)[first]
            kinds = sorted({"NaN" if np.isnan(v) else "+Infinity" if v > 0 else "-Infinity" for v in a.reshape(-1)[bad][:1000]})
            problems.append(f"inputs[{i}].data: input {t.name!r} holds {int(bad.sum())} non-finite value(s) "
                            f"({', '.join(kinds)}; the first, {_token(value)}, at flat index {first})")
    if problems:
        raise ProtocolError("; ".join(problems) + f"; this model refuses NaN and Infinity{why}")


def _token(v: float) -> str:
    return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")


# --- request and response schemas (the JSON documents of the v2 REST API) ------------------------

# extra="forbid": a misspelt key ("datatyp") is an error, not silently ignored. strict=True: a
# shape of ["2"] or [2.0] is refused rather than coerced. `data` stays Any: numpy checks it below,
# far faster than validating millions of numbers one by one in pydantic.
_STRICT = ConfigDict(extra="forbid", strict=True)
Parameters = dict[str, Any]


class RequestInput(BaseModel):
    model_config = _STRICT
    name: str
    shape: list[int]  # check_shape: 0..2**63-1, rank and element count (the gRPC transport shares it)
    datatype: str
    parameters: Parameters | None = None  # binary_data_size: the tensor is in the binary section
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = _STRICT
    name: str
    parameters: Parameters | None = None  # binary_data: answer this output in the binary section


class InferRequestBody(BaseModel):
    model_config = _STRICT
    id: str | None = None
    parameters: Parameters | None = None  # binary_data_output: every output binary by default
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class Tensor:
    """A named array: what flows between the codec, the runtime and the batcher."""

    name: str
    array: np.ndarray

    @property
    def datatype(self) -> str:
        return from_numpy(self.array.dtype).name


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: inputs in request order (their index is the one errors quote)."""

    inputs: list[Tensor]
    outputs: list[str] | None  # None: every model output
    id: str | None = None
    parameters: Parameters | None = None
    binary_outputs: dict[str, bool] | None = None  # per requested output; absent: binary_output_default
    binary_output_default: bool = False
    finite: bool = False  # True: every float input is known to hold no NaN or Infinity (no need to look)

    def wants_binary(self, output_name: str) -> bool:
        if self.binary_outputs and output_name in self.binary_outputs:
            return self.binary_outputs[output_name]
        return self.binary_output_default


# --- decoding --------------------------------------------------------------------------------

def parse_infer_request(body: bytes | str, header_length: int | None = None) -> InferRequest:
    """Parse and check an infer request body; every array has its declared dtype and shape.

    ``header_length`` (the ``Inference-Header-Content-Length`` header) says the JSON stops there
    and binary tensor data follows; None means the whole body is JSON.

    The common request (all JSON, flat numeric ``data`` that fits its integer or FP32/FP64 datatype)
    takes ``_parse_fast``; everything else, and every request with a problem, the full path
    (``_parse_full``), which alone writes the error messages.
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    if header_length is None:
        parsed = _parse_fast(body)
        if parsed is not None:
            return parsed
    return _parse_full(body, header_length)


# The datatypes _parse_fast decodes; the rest (BOOL, BYTES, FP16) take the full path.
_FAST_INT = {d.name: (d.numpy, int(np.iinfo(d.numpy).min), int(np.iinfo(d.numpy).max))
             for d in DATATYPES.values() if d.numpy.kind in "iu"}
_FAST_FLOAT = {"FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64)}
_FAST_FLOAT_MAX = {name: float(np.finfo(d).max) for name, d in _FAST_FLOAT.items()}
_REQUEST_KEYS = frozenset(InferRequestBody.model_fields)
_INPUT_KEYS = frozenset(RequestInput.model_fields)
_OUTPUT_KEYS = frozenset(RequestOutput.model_fields)


def _parse_fast(body: bytes) -> InferRequest | None:
    """The plainly well-formed all-JSON request, decoded without pydantic; None at the first doubt (an
    unusual shape of document, any problem, any value the full path might treat otherwise), and then
    the full path decides. Returns exactly what ``_parse_full`` would, arrays included; every float
    array it returns is finite (``InferRequest.finite``)."""
    try:
        doc = orjson.loads(body)  # refuses NaN/Infinity tokens and integers beyond 64 bits: full path
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict or not doc.keys() <= _REQUEST_KEYS:
        return None
    inputs, id_, parameters, outputs = doc.get("inputs"), doc.get("id"), doc.get("parameters"), doc.get("outputs")
    if type(inputs) is not list or not inputs or (id_ is not None and type(id_) is not str):
        return None
    default_binary = False
    if parameters is not None:
        if type(parameters) is not dict:
            return None
        default_binary = parameters.get("binary_data_output", False)
        if type(default_binary) is not bool:
            return None
    tensors: list[Tensor] = []
    seen: set[str] = set()
    for inp in inputs:
        if type(inp) is not dict or not inp.keys() <= _INPUT_KEYS:
            return None
        name, shape, datatype, data = inp.get("name"), inp.get("shape"), inp.get("datatype"), inp.get("data")
        if type(name) is not str or name in seen or type(shape) is not list or type(data) is not list:
            return None
        seen.add(name)
        params = inp.get("parameters")
        if params is not None and (type(params) is not dict or "binary_data_size" in params):
            return None
        if not 0 < len(shape) <= MAX_RANK:
            return None
        needed = 1
        for d in shape:
            if type(d) is not int or not 0 < d <= MAX_ELEMENTS:
                return None
            needed *= d
        if needed > MAX_ELEMENTS or len(data) != needed:  # also: a nested list has fewer items than needed
            return None
        try:
            raw = np.asarray(data)
        except (ValueError, OverflowError):
            return None
        if raw.ndim != 1:
            return None
        kind = raw.dtype.kind
        target = _FAST_FLOAT.get(datatype)
        if target is not None:
            if kind not in "iuf":
                return None
            # orjson reads no NaN or Infinity; a number beyond FP32 (even one the cast would round to its
            # largest) is the full path's to refuse. Written so that a NaN, too, would fall back.
            if kind == "f" and not np.abs(raw).max() <= _FAST_FLOAT_MAX[datatype]:
                return None
            array = raw.astype(target, copy=False)
        else:
            spec = _FAST_INT.get(datatype)
            if spec is None or kind not in "iu":
                return None
            target, lo, hi = spec
            if raw.dtype != target and (raw.min() < lo or raw.max() > hi):
                return None
            array = raw.astype(target, copy=False)
        tensors.append(Tensor(name, array.reshape(shape)))
    names = binary_outputs = None
    if outputs is not None:
        if type(outputs) is not list:
            return None
        names, binary_outputs = [], {}
        for o in outputs:
            if type(o) is not dict or not o.keys() <= _OUTPUT_KEYS:
                return None
            name, params = o.get("name"), o.get("parameters")
            if type(name) is not str or name in names:
                return None
            names.append(name)
            if params is not None:
                if type(params) is not dict:
                    return None
                flag = params.get("binary_data")
                if flag is not None:
                    if type(flag) is not bool:
                        return None
                    binary_outputs[name] = flag
    return InferRequest(inputs=tensors, outputs=names, id=id_, parameters=parameters,
                        binary_outputs=binary_outputs, binary_output_default=default_binary, finite=True)


def _parse_full(body: bytes, header_length: int | None = None) -> InferRequest:
    """``parse_infer_request`` for every request: pydantic's schema, then each input decoded and checked."""
    binary = memoryview(b"")
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length: expected the JSON header's size in bytes, "
                                f"between 1 and the body's {len(body)} bytes, got {header_length}")
        binary = memoryview(body)[header_length:]
        body = body[:header_length]
    try:
        doc = InferRequestBody.model_validate_json(body)
    except ValidationError as e:
        raise ProtocolError(_describe_validation_error(e)) from None
    problems: list[str] = []
    tensors: list[Tensor] = []
    seen: set[str] = set()
    offset = 0  # into the binary section
    for i, inp in enumerate(doc.inputs):
        where = f"inputs[{i}]"
        if inp.name in seen:
            problems.append(f"{where}.name: input {inp.name!r} is given twice")
        seen.add(inp.name)
        size = (inp.parameters or {}).get("binary_data_size")
        try:
            if size is None:
                if inp.data is None:
                    raise ProtocolError(f"{where}.data: Field required (or parameters.binary_data_size with "
                                        "the tensor in the binary section after the JSON)")
                tensors.append(Tensor(inp.name, decode_tensor(inp, where)))
                continue
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ProtocolError(f"{where}.parameters.binary_data_size: expected a byte count >= 0, got {size!r}")
            if inp.data is not None:
                raise ProtocolError(f"{where}.data: give either data or parameters.binary_data_size, not both")
            if header_length is None:
                raise ProtocolError(f"{where}.parameters.binary_data_size: binary tensor data needs the "
                                    "Inference-Header-Content-Length header (the JSON header's size in bytes)")
            if offset + size > len(binary):
                raise ProtocolError(f"{where}.parameters.binary_data_size: {size} bytes from offset {offset} "
                                    f"overrun the binary section ({len(binary)} bytes after the JSON header)")
            chunk = binary[offset:offset + size]
            offset += size
            tensors.append(Tensor(inp.name, decode_binary(chunk, inp.datatype, inp.shape, where)))
        except ProtocolError as e:
            problems.append(str(e))
    if not problems and offset != len(binary):
        problems.append(f"binary data: {len(binary)} bytes follow the JSON header but the inputs' "
                        f"binary_data_size add up to {offset}")
    default_binary = (doc.parameters or {}).get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        problems.append(f"parameters.binary_data_output: expected true or false, got {default_binary!r}")
    outputs = binary_outputs = None
    if doc.outputs is not None:
        outputs, binary_outputs = [], {}
        for j, o in enumerate(doc.outputs):
            if o.name in outputs:
                problems.append(f"outputs[{j}].name: output {o.name!r} is requested twice")
            outputs.append(o.name)
            flag = (o.parameters or {}).get("binary_data")
            if flag is not None:
                if not isinstance(flag, bool):
                    problems.append(f"outputs[{j}].parameters.binary_data: expected true or false, got {flag!r}")
                binary_outputs[o.name] = bool(flag)
    if problems:
        raise ProtocolError("; ".join(problems))
    return InferRequest(inputs=tensors, outputs=outputs, id=doc.id, parameters=doc.parameters,
                        binary_outputs=binary_outputs, binary_output_default=default_binary)


def decode_tensor(inp: RequestInput, where: str) -> np.ndarray:
    """``data`` (flat or nested lists, row-major) -> an array of ``datatype`` shaped ``shape``."""
    dt = _datatype(inp.datatype, where)
    needed = check_shape(inp.shape, where)
    try:
        raw = np.asarray(inp.data, dtype=object if dt.name == "BYTES" else None)
    except (ValueError, OverflowError) as e:  # ragged nesting, or an integer beyond 64 bits
        raise ProtocolError(f"{where}.data: cannot read as a {dt.name} tensor ({_first_line(e)})") from None
    if raw.size != needed:
        raise ProtocolError(f"{where}.data: shape {format_shape(inp.shape)} needs {needed} values, got {raw.size}")
    if needed and dt.numpy.kind in "iu" and raw.dtype.kind in "fO":
        # numpy reads [2**64 - 1, 0] as float64 (no integer dtype holds both) and 2**70 as object:
        # look again at the Python values themselves before calling them non-integers.
        exact = np.asarray(inp.data, dtype=object)
        if all(type(v) is int for v in exact.flat):
            info = np.iinfo(dt.numpy)
            lo, hi = min(exact.flat), max(exact.flat)
            if lo < info.min or hi > info.max:
                raise ProtocolError(f"{where}.data: {dt.name} holds {info.min}..{info.max}, got values in {lo}..{hi}")
            return exact.astype(dt.numpy).reshape(inp.shape)
    if needed and dt.numpy.kind == "f" and raw.dtype.kind in "UO":
        raw = _float_tokens(inp.data, dt, where)  # "NaN", "Infinity", "-Infinity" as JSON strings
    if needed:
        _check_values(raw, dt, where)
    return raw.astype(dt.numpy, copy=False).reshape(inp.shape)


def _float_tokens(data: Any, dt: DataType, where: str) -> np.ndarray:
    """A float tensor's data with the JSON spellings of NaN and ±Infinity among its numbers, as float64."""
    exact = np.asarray(data, dtype=object)
    values = []
    for v in exact.flat:
        if isinstance(v, str) and v in NON_FINITE_TOKENS:
            values.append(NON_FINITE_TOKENS[v])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            values.append(v)
        else:
            found = "strings" if isinstance(v, str) else "nulls, integers beyond 64 bits or mixed values"
            raise ProtocolError(f"{where}.data: {dt.name} needs numbers (or the strings \"NaN\", \"Infinity\", "
                                f"\"-Infinity\"), got {found}")
    try:
        return np.array(values, dtype=np.float64).reshape(exact.shape)
    except OverflowError:  # an integer beyond float64
        raise ProtocolError(f"{where}.data: {dt.name} needs numbers within float64's range") from None


def decode_binary(chunk: memoryview, datatype: str, shape: Sequence[int], where: str,
                  size_field: str | None = None) -> np.ndarray:
    """One tensor's bytes from the binary section -> an array of ``datatype`` shaped ``shape``.
    ``size_field`` names where the byte count came from in messages (HTTP: the input's
    ``parameters.binary_data_size``; gRPC: ``raw_input_contents[i]``)."""
    dt = _datatype(datatype, where)
    needed = check_shape(shape, where)
    size_field = size_field or f"{where}.parameters.binary_data_size"
    if dt.name == "BYTES":
        items, pos = [], 0
        while pos < len(chunk):
            if len(items) == needed:
                raise ProtocolError(f"{size_field}: shape {format_shape(shape)} needs {needed} BYTES elements, "
                                    f"the binary data holds more")
            if pos + 4 > len(chunk):
                raise ProtocolError(f"{where}: BYTES element {len(items)} has a truncated 4-byte length prefix")
            (length,) = struct.unpack_from("<I", chunk, pos)
            pos += 4
            if pos + length > len(chunk):
                raise ProtocolError(f"{where}: BYTES element {len(items)} claims {length} bytes, "
                                    f"only {len(chunk) - pos} left in {size_field.rsplit('.', 1)[-1]}")
            try:
                items.append(bytes(chunk[pos:pos + length]).decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(f"{where}: BYTES element {len(items)} is not UTF-8 text "
                                    "(ONNX string tensors hold text)") from None
            pos += length
        if len(items) != needed:
            raise ProtocolError(f"{size_field}: shape {format_shape(shape)} needs {needed} "
                                f"BYTES elements, the binary data holds {len(items)}")
        return np.array(items, dtype=object).reshape(shape)
    expected = needed * dt.numpy.itemsize
    if len(chunk) != expected:
        raise ProtocolError(f"{size_field}: shape {format_shape(shape)} of {dt.name} needs "
                            f"{expected} bytes ({needed} x {dt.numpy.itemsize}), got {len(chunk)}")
    if dt.name == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if needed and raw.max() > 1:
            raise ProtocolError(f"{where}: BOOL binary data must be bytes 0 or 1, got {int(raw.max())}")
        return raw.view(np.bool_).reshape(shape)
    # The wire is little-endian; astype is a no-op on little-endian hosts. frombuffer of a body
    # slice may be misaligned for the dtype, and ONNX Runtime wants aligned memory: copy then.
    array = np.frombuffer(chunk, dtype=dt.numpy.newbyteorder("<")).astype(dt.numpy, copy=False)
    if not array.flags.aligned:
        array = array.copy()
    return array.reshape(shape)


# The gRPC ModelInferRequest's typed contents: which InferTensorContents field carries each datatype
# (FP16 has none: it travels in raw_input_contents only).
GRPC_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                 "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                 "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                 "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parse_grpc_infer_request(request: Any) -> InferRequest:
    """A gRPC ``inference.ModelInferRequest`` (any object with its fields) -> an InferRequest, with the
    checks and the messages of ``parse_infer_request``: ``raw_input_contents[i]`` is input i's binary
    data (one per input, in order, or none at all), else each input's typed ``contents``."""
    problems: list[str] = []
    tensors: list[Tensor] = []
    seen: set[str] = set()
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents: {len(raw)} given for {len(request.inputs)} inputs; give one per "
                            "input, in input order, or none (then each input's contents)")
    if not request.inputs:
        raise ProtocolError("inputs: Field required (at least one input tensor)")
    for i, inp in enumerate(request.inputs):
        where = f"inputs[{i}]"
        if inp.name in seen:
            problems.append(f"{where}.name: input {inp.name!r} is given twice")
        seen.add(inp.name)
        try:
            set_fields = [fd.name for fd, _ in inp.contents.ListFields()] if inp.HasField("contents") else []
            shape = list(inp.shape)
            if raw:
                if set_fields:
                    raise ProtocolError(f"{where}.contents: give either contents or raw_input_contents, not both")
                tensors.append(Tensor(inp.name, decode_binary(memoryview(raw[i]), inp.datatype, shape, where,
                                                              size_field=f"raw_input_contents[{i}]")))
                continue
            tensors.append(Tensor(inp.name, _decode_contents(inp, shape, set_fields, where)))
        except ProtocolError as e:
            problems.append(str(e))
    outputs = []
    for j, o in enumerate(request.outputs):
        if o.name in outputs:
            problems.append(f"outputs[{j}].name: output {o.name!r} is requested twice")
        outputs.append(o.name)
    if problems:
        raise ProtocolError("; ".join(problems))
    return InferRequest(inputs=tensors, outputs=outputs or None, id=request.id or None)


def _decode_contents(inp: Any, shape: list[int], set_fields: list[str], where: str) -> np.ndarray:
    dt = _datatype(inp.datatype, where)
    needed = check_shape(shape, where)
    field = GRPC_CONTENTS.get(dt.name)
    if field is None:
        raise ProtocolError(f"{where}.contents: {dt.name} has no typed contents field; send it in raw_input_contents")
    wrong = [f for f in set_fields if f != field]
    if wrong:
        raise ProtocolError(f"{where}.contents: {dt.name} data goes in {field}, got {', '.join(wrong)}")
    values = getattr(inp.contents, field)
    if len(values) != needed:
        raise ProtocolError(f"{where}.contents.{field}: shape {format_shape(shape)} needs {needed} values, "
                            f"got {len(values)}")
    if dt.name == "BYTES":
        items = []
        for k, v in enumerate(values):
            try:
                items.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                raise ProtocolError(f"{where}.contents.bytes_contents[{k}]: not UTF-8 text (ONNX string tensors "
                                    "hold text)") from None
        return np.array(items, dtype=object).reshape(shape)
    # The wire types are wider than INT8/16 and UINT8/16 (int32/uint32): check the range before the cast.
    wire = {"int_contents": np.int32, "uint_contents": np.uint32}.get(field, dt.numpy)
    array = np.array(values, dtype=wire)
    if needed and array.dtype != dt.numpy:
        _check_values(array, dt, where, f"contents.{field}")
    return array.astype(dt.numpy, copy=False).reshape(shape)


def _datatype(name: str, where: str) -> DataType:
    dt = DATATYPES.get(name)
    if dt is None:
        raise ProtocolError(f"{where}.datatype: unknown datatype {name!r}; expected one of {list(DATATYPES)}")
    return dt


def _check_values(raw: np.ndarray, dt: DataType, where: str, field: str = "data") -> None:
    """Refuse values the datatype would silently mangle (1.5 as INT64, 300 as UINT8, "a" as FP32);
    messages name ``where.field``."""
    where = f"{where}.{field}"
    kind, target = raw.dtype.kind, dt.numpy.kind
    found = {"b": "booleans", "i": "integers", "u": "integers", "f": "non-integer numbers",
             "U": "strings", "O": "nulls, integers beyond 64 bits or mixed values"}.get(kind, str(raw.dtype))
    if target == "b":
        ok = kind == "b"
    elif target in "iu":
        ok = kind in "iu"
        if ok:
            info = np.iinfo(dt.numpy)
            lo, hi = raw.min(), raw.max()
            if lo < info.min or hi > info.max:
                raise ProtocolError(f"{where}: {dt.name} holds {info.min}..{info.max}, got values in {lo}..{hi}")
    elif target == "f":
        ok = kind in "iuf"
        top = np.finfo(dt.numpy).max
        if ok and top < (np.finfo(raw.dtype).max if kind == "f" else np.iinfo(raw.dtype).max):
            # FP16 holds +-65504, FP32 +-3.4e38: a finite number beyond would become Infinity in the cast.
            # Two reductions first (NaN compares false); the exact look only when something is that large.
            if raw.max() > top or raw.min() < -top:
                finite = np.abs(raw[np.isfinite(raw)] if kind == "f" else raw.astype(np.float64))
            else:
                finite = raw[:0]
            if finite.size and finite.max() > top:
                raise ProtocolError(f"{where}: {dt.name} holds finite values up to +-{float(top):g}, "
                                    f"got {float(finite.max()):g}")
    else:  # BYTES: every element a string
        ok = all(isinstance(v, str) for v in raw.flat)
        found = "non-string values"
    if not ok:
        raise ProtocolError(f"{where}: {dt.name} needs {_wants(dt)}, got {found}")


def _wants(dt: DataType) -> str:
    return {"b": "true/false values", "i": "integers", "u": "integers", "f": "numbers"}.get(dt.numpy.kind, "strings")


def _describe_validation_error(e: ValidationError) -> str:
    problems = []
    for err in e.errors(include_url=False):
        if err["type"] == "json_invalid":
            return f"request body is not valid JSON: {err['ctx'].get('error', err['msg'])}"
        where = _json_path(err["loc"]) or "request body"
        problems.append(f"{where}: {err['msg']}")
    return "; ".join(problems)


def _json_path(loc: tuple) -> str:
    """('inputs', 0, 'datatype') -> 'inputs[0].datatype'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# --- encoding --------------------------------------------------------------------------------

def _json_data(array: np.ndarray) -> Any:
    """What goes in ``data``: a flat numpy array that orjson writes natively, or a list (BYTES as text,
    and floats with NaN or Infinity among them, which are written as the strings "NaN", "Infinity" and
    "-Infinity": JSON has no such numbers, and orjson would write null)."""
    if array.dtype.kind in "OSU":  # BYTES come back from ONNX Runtime as str or bytes objects
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    flat = np.ascontiguousarray(array).ravel()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return [v if v - v == 0 else _token(v) for v in flat.tolist()]
    return flat


def tensor_bytes(array: np.ndarray) -> bytes:
    """The binary-extension encoding of one tensor (little-endian, row-major; BYTES length-prefixed)."""
    if array.dtype.kind in "OSU":
        parts = []
        for v in array.ravel():
            b = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts += (struct.pack("<I", len(b)), b)
        return b"".join(parts)
    if array.dtype.kind == "b":
        return np.ascontiguousarray(array).view(np.uint8).tobytes()
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_tensor(tensor: Tensor) -> dict:
    """The JSON form of one output tensor (data as a plain list)."""
    data = _json_data(tensor.array)
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.array.shape),
            "data": data if isinstance(data, list) else data.tolist()}


def infer_response(model_name: str, model_version: str, outputs: Sequence[Tensor], id: str | None = None) -> dict:
    """The v2 infer response document, all outputs as JSON; ``id`` is echoed only when the request had one."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if id is not None:
        doc["id"] = id
    doc["outputs"] = [encode_tensor(t) for t in outputs]
    return doc


def encode_infer_response(model_name: str, model_version: str, outputs: Sequence[Tensor],
                          binary: Sequence[bool], id: str | None = None) -> tuple[bytes, int | None]:
    """The response body and, when some outputs travel binary, the JSON header's length (for the
    ``Inference-Header-Content-Length`` header); None means the body is all JSON."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if id is not None:
        doc["id"] = id
    entries, blobs = [], []
    for t, as_binary in zip(outputs, binary):
        entry = {"name": t.name, "datatype": t.datatype, "shape": list(t.array.shape)}
        if as_binary:
            blob = tensor_bytes(t.array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(t.array)
        entries.append(entry)
    doc["outputs"] = entries
    header = dumps(doc)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def dumps(doc: Any) -> bytes:
    """Compact JSON; numpy arrays are written natively (no Python float per element). Strings that are not
    valid Unicode (a lone surrogate quoted in an error) are written with U+FFFD in its place."""
    try:
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:
        return orjson.dumps(_valid_text(doc), option=orjson.OPT_SERIALIZE_NUMPY)


def _valid_text(v: Any) -> Any:
    if isinstance(v, str):
        return v.encode("utf-8", "replace").decode("utf-8")
    if isinstance(v, dict):
        return {_valid_text(k): _valid_text(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_valid_text(x) for x in v]
    return v
