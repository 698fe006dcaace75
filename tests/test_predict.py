"""`pipeline predict`: image files, a folder, .npy, .npz and .csv rows through the session's exported model give
the top-1 OnnxModel gives on the same raw arrays; foreign files (task, labels or preprocessing unknown), a
regression and a VAE file are read by their own metadata alone; each bad input gets one error saying what the
model expects (exit 2); and predict never imports torch, scikit-learn or MLflow for a file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from stages import dataset
from stages.onnx_model import OnnxModel
from stages.predict import softmax
from tests.conftest import ROOT

N = 24  # test samples used


def invoke(*args: str, code: int | None = 0):
    result = CliRunner().invoke(app, ["predict", *map(str, args)])
    logging.getLogger().handlers.clear()  # the callback bound a handler to the runner's closed stream
    if code is not None:
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def top1(answer: dict) -> list[int]:
    return [r["top_k"][0]["index"] for r in answer["predictions"]]


@pytest.fixture(scope="module")
def files(exported, tmp_path_factory):
    """The exported digits model (8x8 raw intensities 0..16, normalized in its graph) and its first test
    samples written as .npy, .npz, .csv and 8x8 PNGs (pixels round(v * 255 / 16))."""
    d = tmp_path_factory.mktemp("predict-inputs")
    x, _ = dataset.load(exported.data, exported.dataset).split("test", normalized=False)
    x = x[:N]
    np.save(d / "x.npy", x)
    np.savez(d / "x.npz", input=x)
    np.savez(d / "keyed.npz", a=x, b=x[:, 0])
    header = ",".join(f"p{i}" for i in range(64))
    np.savetxt(d / "x.csv", x.reshape(N, -1), delimiter=",", header=header, comments="")
    pngs = d / "pngs" / "nested"
    pngs.mkdir(parents=True)
    for i in range(N):
        Image.fromarray(np.round(x[i, 0] * 255 / 16).astype(np.uint8)).save(pngs / f"{i:02d}.png")
    return SimpleNamespace(dir=d, x=x, model=exported.onnx, pngs=d / "pngs", logits=OnnxModel.open(exported.onnx).predict(x)["logits"])


def test_arrays_give_the_top1_of_onnx_model_on_the_raw_arrays(files, tmp_path):
    d = files.dir
    r = invoke(d / "x.npy", d / "x.npz", d / "x.csv", d / "keyed.npz", "--key", "a", "--model", files.model, "--json",
               "--output", tmp_path / "out", code=None)
    assert r.exit_code == 2 and "--key names an array of an .npz archive; " in r.stderr  # --key with a .npy
    r = invoke(d / "x.npy", d / "x.npz", d / "x.csv", "--model", files.model, "--json", "--output", tmp_path / "out")
    answer = json.loads(r.stdout)
    expected = files.logits.argmax(axis=1).tolist()
    assert top1(answer) == expected * 3
    names = [p["input"] for p in answer["predictions"]]
    assert names[0] == f"{d / 'x.npy'}[0]" and names[N] == f"{d / 'x.npz'}:input[0]" and names[2 * N] == f"{d / 'x.csv'}:2"
    probs = softmax(files.logits.astype(np.float64))
    first = answer["predictions"][0]["top_k"]
    assert len(first) == 3 and [t["label"] for t in first] == [str(i) for i in np.argsort(-probs[0])[:3]]
    assert [t["probability"] for t in first] == pytest.approx(np.sort(probs[0])[::-1][:3].tolist(), abs=1e-6)
    lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "input,label_1,probability_1,label_2,probability_2,label_3,probability_3" and len(lines) == 3 * N + 1
    keyed = json.loads(invoke(d / "keyed.npz", "--key", "a", "--model", files.model, "--json", "-k", "1").stdout)
    assert top1(keyed) == expected


def test_images_and_a_folder_are_decoded_and_mapped_to_the_models_raw_range(files):
    r = invoke(files.pngs, files.pngs / "nested" / "03.png", "--model", files.model, "--json", "-k", "1")
    answer = json.loads(r.stdout)
    paths = sorted((files.pngs / "nested").glob("*.png")) + [files.pngs / "nested" / "03.png"]
    assert [p["input"] for p in answer["predictions"]] == [str(p) for p in paths]
    # What the model must have been fed: each PNG's pixels, 0..255 mapped to the digits' raw range 0..16.
    pixels = np.stack([np.asarray(Image.open(p), dtype=np.float32)[None] * (16 / 255) for p in paths])
    assert top1(answer) == OnnxModel.open(files.model).predict(pixels)["logits"].argmax(axis=1).tolist()
    agree = np.mean(np.array(top1(answer)[:N]) == files.logits.argmax(axis=1))
    assert agree >= 0.9  # the PNGs are the raw arrays up to 8-bit rounding
    assert "image pixels 0..255 are mapped to the model's raw range 0..16" in r.stderr
    table = invoke(files.pngs / "nested" / "00.png", "--model", files.model).stdout
    assert "probability" in table and "00.png" in table


# ---------------------------------------------------------------- bad inputs: one error each, exit 2

def _bad_inputs(d: Path) -> dict:
    """name -> (arguments after the model, words the one error must hold)."""
    x = np.load(d / "x.npy")
    np.save(d / "flat.npy", x.reshape(N, -1))
    np.save(d / "text.npy", np.array(["a", "b"]))
    nan = x.copy()
    nan[2, 0, 0, 0] = np.nan
    np.save(d / "nan.npy", nan)
    np.savez(d / "nokey.npz", pixels=x, labels=np.arange(N))
    np.savetxt(d / "wide.csv", np.hstack([x.reshape(N, -1), np.zeros((N, 1))]), delimiter=",")
    (d / "word.csv").write_text(",".join(["1"] * 64) + "\n" + ",".join(["4"] * 63 + ["x"]) + "\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / "color.png")
    (d / "trunc.png").write_bytes((d / "color.png").read_bytes()[:50])
    (d / "notes.txt").write_text("hi")
    (d / "empty").mkdir(exist_ok=True)
    (d / "not.onnx").write_text("hello")
    return {
        "shape": ([d / "flat.npy"], ["flat.npy: an array shaped [24, 64], but the model takes samples shaped [1, 8, 8] "
                                    "(float32, NCHW, raw values 0..16): pass [N, 1, 8, 8]"]),
        "dtype": ([d / "text.npy"], ["text.npy: holds <U1 values; the model takes numbers"]),
        "nan": ([d / "nan.npy"], ["nan.npy: NaN or infinite values in 1 samples (first: [2])"]),
        "npz key": ([d / "nokey.npz"], ["nokey.npz: no array named 'input' (the model's input) among ['labels', "
                                        "'pixels']; pass --key NAME"]),
        "--key": ([d / "nokey.npz", "--key", "images"], ["no array named 'images' (--key); the archive holds"]),
        "csv columns": ([d / "wide.csv"], ["wide.csv: 65 columns per row, but the model takes 64 values per sample",
                                           "drop the extra column"]),
        "csv text": ([d / "word.csv"], ["word.csv: line 2, column 64: 'x' is not a number"]),
        "channels": ([d / "color.png"], ["color.png: a color image where grayscale (1 channel) is expected; the model "
                                         "takes grayscale (1-channel) images"]),
        "truncated": ([d / "trunc.png"], ["trunc.png: truncated or damaged", "replace or delete"]),
        "suffix": ([d / "notes.txt"], ["notes.txt: a .txt file, which predict does not read; pass image files"]),
        "missing": ([d / "gone.npy"], ["gone.npy: no such file or folder"]),
        "empty folder": ([d / "empty"], ["empty: no image files (.png, .jpg, .jpeg, .bmp, .webp) in it or below it"]),
        "model missing": (["--model", d / "gone.onnx", d / "x.npy"], ["model file", "gone.onnx' not found"]),
        "model not onnx": (["--model", d / "not.onnx", d / "x.npy"], ["not.onnx is not a valid ONNX model that ONNX Runtime can load"]),
        "top-k": ([d / "x.npy", "--top-k", "0"], ["Invalid value for '--top-k'"]),
    }


@pytest.mark.parametrize("name", ["shape", "dtype", "nan", "npz key", "--key", "csv columns", "csv text", "channels",
                                  "truncated", "suffix", "missing", "empty folder", "model missing", "model not onnx",
                                  "top-k"])
def test_each_bad_input_gets_one_error_saying_what_the_model_expects(files, name):
    args, words = _bad_inputs(files.dir)[name]
    model = [] if "--model" in args else ["--model", files.model]
    r = invoke(*args, *model, code=2)
    text = " ".join(r.stderr.split())  # typer wraps its own usage errors
    for w in words:
        assert w in text, f"{name}: {w!r} not in {r.stderr!r}"
    assert "Traceback" not in r.stderr and r.stdout == ""


# ---------------------------------------------------------------- files the pipeline did not make

def _onnx(path: Path, nodes, inputs, outputs, props: dict, initializers=()) -> Path:
    import onnx
    from onnx import TensorProto, helper

    def info(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    graph = helper.make_graph(nodes, path.stem, [info(*i) for i in inputs], [info(*o) for o in outputs],
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    onnx.checker.check_model(model)
    onnx.save(model, path)
    assert TensorProto.FLOAT == 1
    return path


AS_IS = {"applied_in_graph": False, "steps": []}


def test_foreign_files_with_unknown_task_labels_and_preprocessing_work_on_numbers_only(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.array([[1, 0, 0], [0, 2, 0], [0, 0, 3], [1, 1, 1]], np.float32), "w")
    path = _onnx(tmp_path / "foreign.onnx", [helper.make_node("MatMul", ["x/in", "w"], ["scores"])],
                 [("x/in", TensorProto.FLOAT, ["n", 4])], [("scores", TensorProto.FLOAT, ["n", 3])],
                 {"preprocessing": AS_IS}, [weights])
    (tmp_path / "rows.csv").write_text("a,b,c,d\n1,0,0,0\n0,0,1,0\n")
    r = invoke(tmp_path / "rows.csv", "--model", path, "--json", "-k", "2")
    answer = json.loads(r.stdout)
    assert answer["task"] == "unknown" and top1(answer) == [0, 2]
    assert answer["predictions"][1]["top_k"] == [{"label": "2", "index": 2, "score": 3.0},
                                                 {"label": "0", "index": 0, "score": 0.0}]
    assert "does not say its task: the top 2 of its output 'scores' by raw value (not probabilities), classes by index" \
        in r.stderr
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "a.png")
    refused = invoke(tmp_path / "a.png", "--model", path, code=2)
    assert "a.png: an image, but foreign.onnx takes samples shaped [4] (float32) and its metadata does not say its " \
           "input is an image (input.layout is unknown)" in refused.stderr

    # an image model of any height and width (metadata says NCHW): each file at its own size, in order
    mean = _onnx(tmp_path / "mean.onnx", [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0, axes=[2, 3])],
                 [("image", TensorProto.FLOAT, ["n", 1, "h", "w"])], [("m", TensorProto.FLOAT, ["n", 1])],
                 {"preprocessing": AS_IS, "input.layout": "NCHW"})
    for name, side, value in (("p.png", 4, 10), ("q.png", 6, 20), ("r.png", 4, 30)):
        Image.fromarray(np.full((side, side), value, np.uint8)).save(tmp_path / name)
    r = invoke(*(tmp_path / n for n in ("p.png", "q.png", "r.png")), "--model", mean, "--json")
    assert [list(p["values"].values()) for p in json.loads(r.stdout)["predictions"]] == [[10.0], [20.0], [30.0]]
    assert "gives no raw value range: image pixels are fed as they are, 0..255, as float32" in r.stderr

    # several inputs: an .npz with one array per input name
    multi = _onnx(tmp_path / "multi.onnx", [helper.make_node("Add", ["a", "b"], ["sum"])],
                  [("a", TensorProto.FLOAT, ["n", 2]), ("b", TensorProto.FLOAT, ["n", 2])],
                  [("sum", TensorProto.FLOAT, ["n", 2])], {"preprocessing": AS_IS, "input.name": "a"})
    np.savez(tmp_path / "ab.npz", a=np.ones((3, 2), np.float32), b=np.arange(6, dtype=np.float32).reshape(3, 2))
    answer = json.loads(invoke(tmp_path / "ab.npz", "--model", multi, "--json", "-k", "1").stdout)
    assert [p["top_k"][0]["score"] for p in answer["predictions"]] == [2.0, 4.0, 6.0]
    np.save(tmp_path / "a.npy", np.ones((3, 2), np.float32))
    assert "multi.onnx takes 2 inputs ['a', 'b']; pass an .npz archive holding one array per input name" in \
        invoke(tmp_path / "a.npy", "--model", multi, code=2).stderr


def test_regression_values_and_vae_reconstructions_as_png(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    half = numpy_helper.from_array(np.array([[2, 0], [0, 1], [0, 0]], np.float32), "w")
    regression = _onnx(tmp_path / "reg.onnx", [helper.make_node("MatMul", ["input", "w"], ["prediction"])],
                       [("input", TensorProto.FLOAT, ["n", 3])], [("prediction", TensorProto.FLOAT, ["n", 2])],
                       {"preprocessing": AS_IS, "task": "regression", "target_names": ["price", "rent"]}, [half])
    (tmp_path / "r.csv").write_text("1,2,3\n")
    answer = json.loads(invoke(tmp_path / "r.csv", "--model", regression, "--json").stdout)
    assert answer["predictions"] == [{"input": f"{tmp_path / 'r.csv'}:1", "values": {"price": 2.0, "rent": 2.0}}]

    # A "VAE" whose reconstruction is its (normalized) input: the PNG must hold the input's pixels.
    pre = {"applied_in_graph": False, "mean": 8.0, "std": 4.0, "raw_value_range": [0, 16], "raw_dtype": "float32",
           "steps": ["x = (float32(input) - mean) / std"]}
    vae = _onnx(tmp_path / "vae.onnx",
                [helper.make_node("Identity", ["input"], ["reconstruction"]),
                 helper.make_node("ReduceMean", ["input"], ["mu"], keepdims=0, axes=[2, 3]),
                 helper.make_node("ReduceMean", ["input"], ["logvar"], keepdims=0, axes=[2, 3])],
                [("input", TensorProto.FLOAT, ["n", 1, 4, 4])],
                [("reconstruction", TensorProto.FLOAT, ["n", 1, 4, 4]), ("mu", TensorProto.FLOAT, ["n", 1]),
                 ("logvar", TensorProto.FLOAT, ["n", 1])],
                {"preprocessing": pre, "task": "vae", "input.layout": "NCHW"})
    x = np.random.default_rng(0).integers(0, 17, (2, 1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "v.npy", x)
    r = invoke(tmp_path / "v.npy", "--model", vae, "--json", "--output", tmp_path / "out")
    answer = json.loads(r.stdout)
    assert [p["mse"] for p in answer["predictions"]] == [0.0, 0.0]
    png = Path(answer["predictions"][1]["reconstruction"])
    assert png.parent == tmp_path / "out" / "reconstructions" and png.suffix == ".png"
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.round(x[1, 0] / 16 * 255).astype(np.uint8))
    assert "pass --output DIR to save the reconstructions" in invoke(tmp_path / "v.npy", "--model", vae).stderr


def test_predict_never_imports_torch(files):
    """The slim path (issue 13): a file model, from a directory that is not the repository."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", "predict", str(files.pngs),
                        str(files.dir / "x.npy"), "--model", str(files.model), "--json"],
                       capture_output=True, text=True, cwd="/", timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines() if line.startswith("import time")}
    assert {"numpy", "onnxruntime", "PIL"} <= loaded
    assert not loaded & {"torch", "sklearn", "mlflow", "scipy", "onnx", "pandas", "matplotlib"}, sorted(loaded)
    assert len(json.loads(p.stdout)["predictions"]) == 2 * N
