"""The KServe v2 / Open Inference Protocol JSON data plane: schemas and the tensor codec.

This module knows JSON and numpy and nothing about HTTP or ONNX Runtime sessions. It turns an infer
request body into named numpy arrays and an answer back into the v2 response document. Every
problem raises ``ProtocolError`` whose message starts with the field at fault
(``inputs[0].data: ...``) so a client can fix its request without reading server logs; where a
request has several problems they are all reported at once.

Datatypes follow the v2 table (BOOL, UINT8..64, INT8..64, FP16/32/64, BYTES); ``DATATYPES`` maps
each to its numpy dtype and to the ONNX Runtime type string, and is the only place that does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError


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


def from_numpy(dtype: np.dtype) -> DataType:
    """The v2 datatype for a numpy dtype (str and bytes arrays count as BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OUS":
        return DATATYPES["BYTES"]
    for d in DATATYPES.values():
        if d.numpy == dtype:
            return d
    raise ProtocolError(f"numpy dtype {dtype} has no v2 datatype")


def format_shape(shape: Sequence[int]) -> str:
    """``[2,1,8,8]``: compact, the way error messages quote shapes."""
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


# --- request and response schemas (the JSON documents of the v2 REST API) ------------------------

# extra="forbid": a misspelt key ("datatyp") is an error, not silently ignored. strict=True: a
# shape of ["2"] or [2.0] is refused rather than coerced. `data` stays Any: numpy checks it below,
# far faster than validating millions of numbers one by one in pydantic.
_STRICT = ConfigDict(extra="forbid", strict=True)
Parameters = dict[str, Any]


class RequestInput(BaseModel):
    model_config = _STRICT
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any]


class RequestOutput(BaseModel):
    model_config = _STRICT
    name: str
    parameters: Parameters | None = None  # e.g. binary_data (extension not implemented yet)


class InferRequestBody(BaseModel):
    model_config = _STRICT
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class Tensor:
    """A named array: what flows between the codec, the runtime and (later) the batcher."""

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


# --- decoding --------------------------------------------------------------------------------

def parse_infer_request(body: bytes | str) -> InferRequest:
    """Parse and check an infer request body; every array has its declared dtype and shape."""
    try:
        doc = InferRequestBody.model_validate_json(body)
    except ValidationError as e:
        raise ProtocolError(_describe_validation_error(e)) from None
    problems: list[str] = []
    tensors: list[Tensor] = []
    seen: set[str] = set()
    for i, inp in enumerate(doc.inputs):
        if inp.name in seen:
            problems.append(f"inputs[{i}].name: input {inp.name!r} is given twice")
        seen.add(inp.name)
        try:
            tensors.append(Tensor(inp.name, decode_tensor(inp, f"inputs[{i}]")))
        except ProtocolError as e:
            problems.append(str(e))
    outputs = None
    if doc.outputs is not None:
        outputs = [o.name for o in doc.outputs]
        for j, name in enumerate(outputs):
            if name in outputs[:j]:
                problems.append(f"outputs[{j}].name: output {name!r} is requested twice")
    if problems:
        raise ProtocolError("; ".join(problems))
    return InferRequest(inputs=tensors, outputs=outputs, id=doc.id, parameters=doc.parameters)


def decode_tensor(inp: RequestInput, where: str) -> np.ndarray:
    """``data`` (flat or nested lists, row-major) -> an array of ``datatype`` shaped ``shape``."""
    dt = DATATYPES.get(inp.datatype)
    if dt is None:
        raise ProtocolError(f"{where}.datatype: unknown datatype {inp.datatype!r}; expected one of {list(DATATYPES)}")
    needed = math.prod(inp.shape)
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
    if needed:
        _check_values(raw, dt, where)
    return raw.astype(dt.numpy, copy=False).reshape(inp.shape)


def _check_values(raw: np.ndarray, dt: DataType, where: str) -> None:
    """Refuse values the datatype would silently mangle (1.5 as INT64, 300 as UINT8, "a" as FP32)."""
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
                raise ProtocolError(f"{where}.data: {dt.name} holds {info.min}..{info.max}, got values in {lo}..{hi}")
    elif target == "f":
        ok = kind in "iuf"
    else:  # BYTES: every element a string
        ok = all(isinstance(v, str) for v in raw.flat)
        found = "non-string values"
    if not ok:
        raise ProtocolError(f"{where}.data: {dt.name} needs {_wants(dt)}, got {found}")


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

def encode_tensor(tensor: Tensor) -> dict:
    array = tensor.array
    if array.dtype.kind in "OS":  # BYTES come back from ONNX Runtime as str or bytes objects
        data = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    else:
        data = array.ravel().tolist()  # Python floats/ints/bools: json can write them directly
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(array.shape), "data": data}


def infer_response(model_name: str, model_version: str, outputs: Sequence[Tensor], id: str | None = None) -> dict:
    """The v2 infer response document; ``id`` is echoed only when the request had one."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if id is not None:
        doc["id"] = id
    doc["outputs"] = [encode_tensor(t) for t in outputs]
    return doc


def dumps(doc: Any) -> bytes:
    # allow_nan: a model that emits NaN/inf should still answer; Python, numpy and Triton's clients
    # read the NaN/Infinity tokens, although strict JSON parsers refuse them.
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode("utf-8")
