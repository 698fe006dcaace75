"""The JSON infer request's fast path (``protocol._parse_fast``) against the full path (``_parse_full``).

Thousands of seeded request bodies, valid ones of every datatype and broken ones of every kind (wrong
counts, non-finite values, numbers beyond a datatype, wrong types, extra keys, nesting, odd JSON):
``parse_infer_request`` must return the same request as the full path, arrays equal in dtype, shape
and bits, or raise the same ProtocolError message; and where the fast path answers at all, it answers
exactly what the full path does, with every float input finite.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from stages.serve import protocol
from stages.serve.protocol import DATATYPES, ProtocolError, _parse_fast, _parse_full, parse_infer_request

NAMES = list(DATATYPES)

# Values that sit on the edges the checks draw.
EDGE_FLOATS = [0.0, -0.0, 1.5, -2.25, 1e-45, 1e-320, 65504.0, 65520.0, 3.4028234663852886e38,
               3.4028235677973366e38, 3.402823669209385e38, 3.5e38, 1e300, -1e300, 1.7976931348623157e308]
EDGE_INTS = [0, 1, -1, 127, 128, -128, -129, 255, 256, 32767, 32768, 65535, 65536, 2**31 - 1, 2**31, -2**31,
             -2**31 - 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64 - 1, 2**64, 2**70]
ODD = [None, True, False, "a", "NaN", "Infinity", "-Infinity", "1", {}, [], [1], {"a": 1}]


def _value(rng: random.Random, datatype: str, clean: bool):
    if not clean and rng.random() < 0.3:
        return rng.choice(ODD + EDGE_INTS + EDGE_FLOATS)
    if datatype == "BOOL":
        return rng.random() < 0.5
    if datatype == "BYTES":
        return rng.choice(["", "a", "héllo", "x" * 5])
    if datatype.startswith("FP"):
        if rng.random() < 0.1:
            return rng.choice(EDGE_FLOATS) * rng.choice([1, -1])
        return rng.choice([rng.uniform(-10, 10), rng.randint(-100, 100)])
    dt = DATATYPES[datatype].numpy
    info = np.iinfo(dt)
    if rng.random() < 0.1:
        return rng.choice([int(info.min), int(info.max)])
    return rng.randint(max(int(info.min), -1000), min(int(info.max), 1000))


def _nest(flat: list, shape: list[int]) -> list:
    if len(shape) <= 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[k * step:(k + 1) * step], shape[1:]) for k in range(shape[0])]


def _input(rng: random.Random, k: int, clean: bool) -> dict:
    datatype = rng.choice(["FP32", "FP32", "FP64", "INT64", "INT32", "UINT8", *NAMES])
    shape = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
    count = int(np.prod(shape))
    data = [_value(rng, datatype, clean) for _ in range(count)]
    inp = {"name": f"in{k}", "shape": shape, "datatype": datatype, "data": data}
    if rng.random() < 0.2:
        inp["parameters"] = rng.choice([{}, {"content_type": "x"}, None])
    if rng.random() < 0.1:
        inp["data"] = _nest(data, shape)
    if clean:
        return inp
    r = rng.random()
    if r < 0.08:
        inp["data"] = data[:-1] if rng.random() < 0.5 else data + data[:1]
    elif r < 0.14:
        inp["shape"] = [*shape[:-1], rng.choice([0, -1, True, 2.0, "2", 2**63, 2**64, None])]
    elif r < 0.18:
        inp["shape"] = rng.choice([[], [1] * 40, [2**40, 2**40], "3", None])
    elif r < 0.24:
        inp[rng.choice(["datatyp", "extra", "contents"])] = 1
    elif r < 0.30:
        del inp[rng.choice(["name", "shape", "datatype", "data"])]
    elif r < 0.34:
        inp["datatype"] = rng.choice(["fp32", "FLOAT", "", 3, None, "BF16"])
    elif r < 0.38:
        inp["name"] = rng.choice([1, None, ["a"], "in0"])
    elif r < 0.42:
        inp["parameters"] = rng.choice([{"binary_data_size": 4}, {"binary_data_size": None}, [], "x", 3])
    elif r < 0.46:
        inp["data"] = rng.choice([None, {}, "abc", 3, [[1, 2], [3]], [[[]]]])
    elif r < 0.50:
        inp["data"] = [[v] for v in data]
    return inp


def _body(rng: random.Random, clean: bool) -> bytes:
    doc: dict = {"inputs": [_input(rng, k, clean) for k in range(rng.choice([1, 1, 1, 2, 3]))]}
    if rng.random() < 0.3:
        doc["id"] = rng.choice(["req-1", "", "é"] + ([] if clean else [None, 3, ["x"]]))
    if rng.random() < 0.2:
        doc["parameters"] = rng.choice([{}, {"binary_data_output": False}, {"binary_data_output": True}, {"x": [1, 2.5]}]
                                       + ([] if clean else [None, {"binary_data_output": 1}, [], "p"]))
    if rng.random() < 0.3:
        outs = [{"name": rng.choice(["out", "probs", "logits"])} for _ in range(rng.randint(0, 2))]
        for o in outs:
            if rng.random() < 0.5:
                o["parameters"] = rng.choice([{}, {"binary_data": True}, {"binary_data": False}, None]
                                             + ([] if clean else [{"binary_data": 1}, "x"]))
        if not clean and rng.random() < 0.2:
            outs.append(rng.choice([{"name": "out", "extra": 1}, {"nam": "x"}, "out", None, {"name": 3}]))
        doc["outputs"] = outs
    if not clean and rng.random() < 0.1:
        doc[rng.choice(["input", "model_name", "extra"])] = 1
    if not clean and rng.random() < 0.05:
        doc["inputs"] = rng.choice([[], None, {}, "x"])
    text = json.dumps(doc)  # Python's json writes NaN/Infinity as bare tokens and big ints in full
    if not clean and rng.random() < 0.1:
        text = rng.choice([text[:-1], text + " x", text.replace("1", "1e400", 1), "[" + text + "]",
                           text.replace('"in0"', '"\\ud800"'), "\ufeff" + text, text + "\n"])
    if not clean and rng.random() < 0.05:
        try:
            doc2 = json.loads(text)
        except ValueError:
            doc2 = None
        if isinstance(doc2, dict) and doc2.get("inputs") and isinstance(doc2["inputs"], list):
            text = text[:-1] + ', "inputs": ' + json.dumps(doc2["inputs"][:1]) + "}"  # a key given twice
    return text.encode("utf-8", "surrogatepass")


def _outcome(parse, body: bytes):
    try:
        return parse(body)
    except ProtocolError as e:
        return f"ProtocolError: {e}"


def _same(a, b) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert [t.name for t in a.inputs] == [t.name for t in b.inputs]
    for x, y in zip(a.inputs, b.inputs):
        assert x.array.dtype == y.array.dtype and x.array.shape == y.array.shape
        assert x.array.tobytes() == y.array.tobytes() if x.array.dtype != object else x.array.tolist() == y.array.tolist()
        assert x.datatype == y.datatype
    assert (a.outputs, a.id, a.parameters, a.binary_outputs, a.binary_output_default) == \
           (b.outputs, b.id, b.parameters, b.binary_outputs, b.binary_output_default)


@pytest.mark.parametrize("clean", [True, False], ids=["valid", "broken"])
def test_fast_path_answers_what_the_full_path_does(clean):
    rng = random.Random(20240611 + clean)
    fast_taken = 0
    for _ in range(3000):
        body = _body(rng, clean)
        full = _outcome(_parse_full, body)
        _same(_outcome(parse_infer_request, body), full)
        fast = _parse_fast(body)
        if fast is not None:
            fast_taken += 1
            _same(fast, full)
            assert fast.finite
            assert all(np.isfinite(t.array).all() for t in fast.inputs if t.array.dtype.kind == "f")
    assert fast_taken > (1500 if clean else 100), fast_taken  # the generator does reach the fast path


def test_the_common_request_takes_the_fast_path():
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": np.random.default_rng(0).random(64).tolist()}]}).encode()
    fast = _parse_fast(body)
    assert fast is not None and fast.finite
    _same(fast, _parse_full(body))


@pytest.mark.parametrize("data, datatype", [
    ([3.4028235677973366e38], "FP32"),  # rounds to FP32's largest in a cast, yet the full path refuses it
    ([1e39], "FP32"), ([2**63], "INT64"), ([-1], "UINT8"), ([256], "UINT8"), ([1.5], "INT32"),
    ([True], "INT32"), (["NaN"], "FP32"), ([None], "FP64"), ([[1.0]], "FP32"),
])
def test_the_fast_path_leaves_doubtful_data_to_the_full_path(data, datatype):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": datatype, "data": data}]}).encode()
    assert _parse_fast(body) is None
    _same(_outcome(parse_infer_request, body), _outcome(_parse_full, body))


def test_the_binary_extension_never_takes_the_fast_path(monkeypatch):
    calls = []
    monkeypatch.setattr(protocol, "_parse_fast", lambda body: calls.append(body))
    header = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4}}]}).encode()
    parsed = parse_infer_request(header + np.float32(2).tobytes(), len(header))
    assert parsed.inputs[0].array.tolist() == [2.0] and not calls and not parsed.finite
