"""`dataset: images`: a folder of image files (written here: the bundled digits as PNGs, nothing downloads)
becomes data.npz pixel for pixel; separate train/ val/ test/ folders are kept; a pool of processes decodes
what this process decodes; each kind of bad folder gets one error naming the file and the fix; and the
images recipe runs end to end (recorded in MLflow), its champion then answering `pipeline predict` on the
PNG files with the top-1 OnnxModel gives on data.npz's raw arrays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.digit_folder import digit_images, write_digit_folder
from stages import dataset, images, prepare
from stages.common import StageError
from stages.contract import NullTracker, RunDir
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """The 1,797 bundled digits as 28x28 grayscale PNGs, root/<digit>/NNNNN.png."""
    root = tmp_path_factory.mktemp("digit-images")
    write_digit_folder(root, 28)
    return root


def prepared(tmp_path, path, **images_config) -> tuple[dict, dataset.Data]:
    rd = RunDir(tmp_path / "run").ensure()
    config = prepare.Config(dataset="images", path=str(path), images=prepare.ImagesConfig(**images_config))
    prepare.run(config, rd, NullTracker())
    return json.loads(rd.dataset.read_text()), dataset.load(rd.data, rd.dataset)


def rows(x: np.ndarray, y: np.ndarray) -> list:
    """Samples as sortable (bytes, label) pairs: splits shuffle, the multiset must not change."""
    return sorted(zip(map(bytes, x), y.tolist()))


def test_prepare_stores_the_folders_pixels_exactly(digit_folder, tmp_path):
    info, data = prepared(tmp_path, digit_folder, size=[28, 28], channels=1)
    x = np.concatenate([data.arrays[f"x_{s}"] for s in prepare.SPLITS])
    y = np.concatenate([data.arrays[f"y_{s}"] for s in prepare.SPLITS])
    assert x.dtype == np.uint8 and x.shape == (1797, 1, 28, 28)
    assert rows(x, y) == rows(*digit_images(28))  # every file, pixel for pixel, under its folder's label
    assert info["value_range"] == [0.0, 255.0] and info["raw_dtype"] == "uint8" and info["input_layout"] == "NCHW"
    assert info["input_shape"] == [1, 28, 28] and info["label_names"] == [str(d) for d in range(10)]
    assert info["test_split"] == "carved" and "val_split" not in info and sum(info["splits"].values()) == 1797
    train = data.arrays["x_train"].astype(np.float64)
    assert info["normalization"]["mean"] == pytest.approx(train.mean()) and info["normalization"]["per"] == "all"
    assert info["normalization"]["std"] == pytest.approx(train.std())


def test_split_folders_are_kept_and_rgb_is_resized(tmp_path):
    files = write_digit_folder(tmp_path / "splits", 28, splits=True, rgb=True, count=400)
    info, data = prepared(tmp_path, tmp_path / "splits", size=[12, 16], channels=3)
    counts = {s: sum(f.parts[-3] == s for f in files) for s in prepare.SPLITS}
    assert info["splits"] == counts == {"train": 240, "val": 40, "test": 120}
    assert info["test_split"] == "source" and info["val_split"] == "source"
    x_val, y_val = data.split("val", normalized=False)
    assert x_val.shape == (40, 3, 12, 16) and x_val.dtype == np.uint8
    expected = [np.asarray(Image.open(f).convert("RGB").resize((16, 12), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
                for f in files if f.parts[-3] == "val"]
    labels = [int(f.parts[-2]) for f in files if f.parts[-3] == "val"]
    assert rows(x_val, y_val) == rows(np.stack(expected), np.array(labels))
    norm = info["normalization"]
    assert norm["per"] == "channel" and len(norm["mean"]) == 3 and norm["mean"][0] == pytest.approx(norm["mean"][2])


def test_a_pool_of_processes_decodes_what_this_process_does_and_reports_every_bad_file(digit_folder, tmp_path):
    paths, _ = images.list_images(digit_folder)
    bad = [tmp_path / "a.png", tmp_path / "b.png"]
    bad[0].write_bytes(paths[0].read_bytes()[:60])  # truncated inside its data
    bad[1].write_text("not an image")
    mixed = paths[:300] + bad + paths[300:600]  # three chunks of 256, the bad files in the second
    pooled = images.decode_each(mixed, (20, 20), 1, workers=2)  # one pool start (~0.5 s or more here)
    serial = images.decode_each(mixed, (20, 20), 1, workers=1)
    assert [r for r in pooled if isinstance(r, tuple)] == [r for r in serial if isinstance(r, tuple)] == [
        (str(bad[0]), "unreadable", pooled[300][2]), (str(bad[1]), "unreadable", pooled[301][2])]
    np.testing.assert_array_equal(np.stack([r for r in pooled if not isinstance(r, tuple)]),
                                  np.stack([r for r in serial if not isinstance(r, tuple)]))
    with pytest.raises(StageError) as e:
        images.decode_many(mixed, (20, 20), 1, workers=1)
    message = str(e.value)
    assert message.startswith("2 of 602 image files cannot be used") and "a.png: truncated" in message
    assert "b.png: not an image" in message and message.endswith("Fix: replace or delete the file(s)")


# ---------------------------------------------------------------- bad folders: one error each

def _png(path: Path, mode: str = "L", size=(8, 8), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)
    return path


def _good(root: Path, classes=("cat", "dog"), n: int = 4) -> Path:
    for c in classes:
        for i in range(n):
            _png(root / c / f"{i}.png")
    return root


def _bad_folders(root: Path) -> dict:
    """name -> (folder, recipe images settings, words the one error must hold)."""
    cases = {}

    def case(name, fn, words, **settings):
        folder = root / name
        fn(folder)
        cases[name] = (folder, {"channels": 1, **settings}, words)

    case("missing", lambda f: None, ["missing: no such directory", "prepare.path"])
    case("no images", lambda f: (f / "cat").mkdir(parents=True) or (f / "cat" / "notes.txt").write_text("x"),
         ["cat: a class folder with no images", "notes.txt", "add png/jpg/jpeg/bmp/webp images"])
    case("nothing", lambda f: f.mkdir(), ["no class folders with images", "<class name>/*.png"])
    case("empty class", lambda f: _good(f) and (f / "bird").mkdir(), ["bird: a class folder with no images"])
    case("one class", lambda f: _good(f, classes=("cat",)), ["a single class folder (cat/)", "at least two"])
    case("loose", lambda f: _good(f) and _png(f / "stray.png"), ["outside any class folder", "stray.png"])
    case("truncated", lambda f: _good(f) and (f / "dog" / "bad.png").write_bytes((f / "dog" / "0.png").read_bytes()[:70]),
         ["dog/bad.png: truncated", "replace or delete"])
    case("not an image", lambda f: _good(f) and (f / "cat" / "fake.jpg").write_text("hello"),
         ["cat/fake.jpg: not an image", "replace or delete"])
    case("color", lambda f: _good(f) and _png(f / "cat" / "rgb.png", "RGB"),
         ["cat/rgb.png: a color image where grayscale", "prepare.images.channels: 3"])
    case("16-bit", lambda f: _good(f) and Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(f / "cat" / "deep.png"),
         ["cat/deep.png: 16-bit pixels", "8 bits per channel"])
    case("sizes", lambda f: _good(f) and _png(f / "dog" / "big.png", size=(9, 8)),
         ["dog/big.png: 8x9 (height x width) where the other images are 8x8", "prepare.images.size"], size=[])
    case("unknown split class", lambda f: _good(f / "train") and _good(f / "test", classes=("cat", "eel")),
         ["class folder(s) ['eel'] are not in", "train/"])
    case("empty split", lambda f: _good(f / "train") and (f / "val").mkdir(),
         ["val: no class folders with images", "or remove val/"])
    case("too few", lambda f: _good(f) and _good(f, classes=("eel",), n=2),
         ["['eel'] hold fewer than 3 images", "separate train/ val/ test/ folders"])
    return cases


@pytest.fixture(scope="module")
def bad_folders(tmp_path_factory) -> dict:
    return _bad_folders(tmp_path_factory.mktemp("bad-folders"))


@pytest.mark.parametrize("name", ["missing", "no images", "nothing", "empty class", "one class", "loose", "truncated",
                                  "not an image", "color", "16-bit", "sizes", "unknown split class", "empty split",
                                  "too few"])
def test_each_bad_folder_gets_one_error_naming_the_file_and_the_fix(bad_folders, name, tmp_path):
    folder, settings, words = bad_folders[name]
    with pytest.raises(StageError) as e:
        prepared(tmp_path, folder, **settings)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, f"{name}: {w!r} not in {message!r}"


def test_recipe_keys_are_validated():
    from pipeline.config import ConfigError, recipe_from_dict

    base = {"name": "x", "model": {"family": "cnn"}, "prepare": {"dataset": "images", "path": "imgs"}}
    for images_section, words in [({"size": [28]}, "`prepare.images.size` must be [height, width]"),
                                  ({"channels": 2}, "`prepare.images.channels` must be one of 1, 3"),
                                  ({"colour": 1}, "unknown key `prepare.images.colour`")]:
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            recipe_from_dict({**base, "prepare": {**base["prepare"], "images": images_section}})
    with pytest.raises(ConfigError, match="`prepare.images` applies to the images dataset only"):
        recipe_from_dict({**base, "prepare": {"dataset": "digits", "images": {"channels": 1}}})
    with pytest.raises(ConfigError, match="`prepare.path` is required for dataset images"):
        recipe_from_dict({**base, "prepare": {"dataset": "images"}})
    assert recipe_from_dict({**base, "prepare": {**base["prepare"], "images": {"size": [32, 24], "channels": 3}}}) \
        .prepare.images.size == (32, 24)


# ---------------------------------------------------------------- the recipe end to end, then predict

QUICK = {"train.epochs": 3, "train.lr": 0.01, "train.warmup_epochs": 0, "model.channels": "[8,16]",
         "model.hidden": 32, "prepare.images.size": "[8,8]",  # decoding resizes 28x28 -> 8x8: cheap to train here
         "quantize.variants": "[int8-dynamic]", "quantize.calibration_samples": 32, "benchmark.batch_sizes": "[1]",
         "benchmark.warmup_runs": 1, "benchmark.min_runs": 3, "benchmark.min_seconds": 0.01, "benchmark.rounds": 1,
         "benchmark.include_torch": "false", "register.target_batch_size": 1, "register.remeasure_rounds": 0}


@pytest.fixture(scope="module")
def images_run(digit_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images-run")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--recipe", str(ROOT / "configs/images-digits.yaml"),
                        "--set", f"prepare.path={digit_folder}", "--workdir", str(tmp / "run"),
                        *[a for k, v in QUICK.items() for a in ("--set", f"{k}={v}")]],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return RunDir(tmp / "run"), env


def test_the_images_recipe_runs_end_to_end_and_is_recorded(images_run):
    from mlflow.tracking import MlflowClient

    rundir, env = images_run
    store = env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(store, store)
    runs = client.search_runs([client.get_experiment_by_name("images-digits").experiment_id])
    prep = next(r for r in runs if r.info.run_name == "prepare")
    assert prep.data.params["images.size"] == "(8, 8)" and prep.data.params["dataset"] == "images"
    assert prep.inputs.dataset_inputs[0].dataset.name.startswith("digit-images")
    version = client.get_model_version_by_alias("images-digits", "champion")
    assert version.tags  # registered like the built-in path
    from stages.onnx_model import ModelMeta

    meta = ModelMeta.read(rundir.onnx)
    assert meta.input.dtype == "uint8" and meta.input.shape[1:] == (1, 8, 8) and meta.preprocessing.kind == "in-graph"


def test_predict_from_the_registry_matches_onnx_model_on_the_raw_arrays(images_run, digit_folder):
    from stages.onnx_model import OnnxModel

    rundir, env = images_run
    folder = digit_folder / "3"
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", "predict", str(folder),
                        str(digit_folder / "7" / "00007.png"), "--model", "models:/images-digits@champion", "--json",
                        "-k", "2"], capture_output=True, text=True, cwd="/", env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    heavy = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines() if line.startswith("import time")}
    assert "torch" not in heavy and "sklearn" not in heavy  # mlflow is there: a models:/ URI needs it
    answer = json.loads(p.stdout)
    assert answer["task"] == "classification" and answer["model"] == "models:/images-digits@champion"
    data = dataset.load(rundir.data, rundir.dataset)
    x = np.concatenate([data.arrays[f"x_{s}"] for s in prepare.SPLITS])
    top1 = OnnxModel.open(rundir.variant("fp32")).predict(x)["logits"].argmax(axis=1)
    registered = json.loads(rundir.registration.read_text())["variant"]
    by_pixels = {bytes(a): int(t) for a, t in zip(x, OnnxModel.open(rundir.variant(registered)).predict(x)["logits"]
                                                  .argmax(axis=1))}
    files = sorted(folder.glob("*.png")) + [digit_folder / "7" / "00007.png"]
    assert [r["input"] for r in answer["predictions"]] == [str(f) for f in files]
    decoded = images.decode_many(files, (8, 8), 1)  # as prepare decoded them
    assert [int(r["top_k"][0]["label"]) for r in answer["predictions"]] == [by_pixels[bytes(a)] for a in decoded]
    assert (top1 == np.concatenate([data.arrays[f"y_{s}"] for s in prepare.SPLITS])).mean() > 0.5
