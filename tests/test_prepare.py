"""prepare's sources: bundled sets give the documented splits and shapes; IDX, CSV and NPZ readers
accept good files (written here, with real IDX headers) and refuse each kind of bad file with one
StageError naming the file, the problem and the fix."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from stages.contract import RunDir
from stages.contract import NullTracker
from stages import dataset, prepare, sources
from stages.common import StageError


def prepared(tmp_path, **config) -> tuple[dict, dataset.Data]:
    rd = RunDir(tmp_path / "run").ensure()
    prepare.run(prepare.Config(**config), rd, NullTracker())
    return json.loads(rd.dataset.read_text()), dataset.load(rd.data, rd.dataset)


# ---------------------------------------------------------------- bundled

@pytest.fixture(scope="session")
def mnist1d_prepared(tmp_path_factory):
    rd = RunDir(tmp_path_factory.mktemp("mnist1d")).ensure()
    prepare.run(prepare.Config(dataset="mnist1d", val_fraction=0.1), rd, NullTracker())
    return json.loads(rd.dataset.read_text()), dataset.load(rd.data, rd.dataset)


def test_mnist1d_keeps_its_standard_split_and_is_ncl(mnist1d_prepared):
    info, data = mnist1d_prepared
    assert info["splits"] == {"train": 3600, "val": 400, "test": 1000}  # 4,000 train (val carved from it), 1,000 test
    assert info["task"] == "classification" and info["input_layout"] == "NCL" and info["input_shape"] == [1, 40]
    assert info["test_split"] == "source" and info["num_classes"] == 10
    x_test, y_test = data.split("test", normalized=False)
    reference = sources._mnist1d_generated()  # make_dataset()'s own arrays (cached: generating takes seconds)
    np.testing.assert_array_equal(x_test[:, 0], reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(y_test, reference["y_test"])
    train_pool = np.concatenate([data.split(s, normalized=False)[0] for s in ("train", "val")])
    assert sorted(map(bytes, train_pool[:, 0])) == sorted(map(bytes, reference["x"].astype(np.float32)))
    assert data.split("train")[0].dtype == np.float32 and data.split("train")[1].dtype == np.int64


def test_diabetes_is_regression_with_per_feature_normalization(tmp_path):
    info, data = prepared(tmp_path, dataset="diabetes")
    assert info["task"] == "regression" and info["input_layout"] == "NF" and info["input_shape"] == [10]
    assert sum(info["splits"].values()) == 442 and info["target_names"] == ["disease_progression"]
    assert "label_names" not in info and info["normalization"]["per"] == "feature"
    x, y = data.split("train")
    assert y.dtype == np.float32 and y.shape == (info["splits"]["train"], 1)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)  # each feature standardized on train
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-4)
    assert data.labels == ["disease_progression"] and data.num_outputs == 1


def test_normalize_broadcasts_list_statistics_along_axis_1():
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    out = dataset.normalize(x, [0.0, 1.0, 2.0], [1.0, 2.0, 4.0])
    np.testing.assert_allclose(out[:, 1], (x[:, 1] - 1) / 2)
    np.testing.assert_allclose(dataset.normalize(x, 1.0, 2.0), (x - 1) / 2)


# ---------------------------------------------------------------- IDX

def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1" if type_code == 0x08 else ">f4").tobytes()


def write_idx_dir(root, n_train=120, n_test=40, gz=False, test=True):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    files = {"train": n_train, "t10k": n_test} if test else {"train": n_train}
    for split, n in files.items():
        images = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
        labels = (np.arange(n) % 4).astype(np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            raw = idx_bytes(array)
            name = root / f"{split}-{kind}{'.gz' if gz else ''}"
            name.write_bytes(gzip.compress(raw) if gz else raw)
    return root


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_directory_with_its_test_split(tmp_path, gz):
    root = write_idx_dir(tmp_path / "idx", gz=gz)
    info, data = prepared(tmp_path, dataset="idx", path=str(root), val_fraction=0.25)
    assert info["splits"] == {"train": 90, "val": 30, "test": 40}
    assert info["input_shape"] == [1, 6, 5] and info["input_layout"] == "NCHW" and info["raw_dtype"] == "uint8"
    assert info["value_range"] == [0.0, 255.0] and info["label_names"] == ["0", "1", "2", "3"]
    x_raw, _ = data.split("test", normalized=False)
    assert x_raw.dtype == np.uint8
    expected = np.frombuffer(gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes()) if gz
                             else (root / "t10k-images-idx3-ubyte").read_bytes(), np.uint8, offset=16)
    np.testing.assert_array_equal(x_raw.reshape(-1), expected)  # the t10k split, kept as is


def test_idx_directory_without_t10k_carves_a_test_split(tmp_path):
    root = write_idx_dir(tmp_path / "idx", n_train=200, test=False)
    info, _ = prepared(tmp_path, dataset="idx", path=str(root))
    assert info["test_split"] == "carved" and sum(info["splits"].values()) == 200


def damage(root, name, content: bytes):
    (root / name).write_bytes(content)


BAD_IDX = {
    "missing directory": (lambda root: root / "nope", "no such directory"),
    "wrong magic number": (lambda root: damage(root, "train-images-idx3-ubyte", b"\x00\x00\x08\x01" + bytes(100)),
                           "wrong magic number 0x00000801, expected 0x00000803"),
    "not idx at all": (lambda root: damage(root, "train-labels-idx1-ubyte", b"PK\x03\x04 a zip file"),
                       "wrong magic number 0x504b0304"),
    "truncated data": (lambda root: damage(root, "train-images-idx3-ubyte",
                                           (root / "train-images-idx3-ubyte").read_bytes()[:-7]),
                       "truncated: the header promises 120x6x5 values"),
    "truncated header": (lambda root: damage(root, "train-images-idx3-ubyte", b"\x00\x00\x08\x03\x00"),
                         "truncated inside its header"),
    "truncated gzip": (lambda root: damage(root, "t10k-labels-idx1-ubyte",
                                           gzip.compress(idx_bytes(np.zeros(40, np.uint8)))[:-10]),
                       "gzip stream is truncated or corrupt"),
    "extra bytes": (lambda root: damage(root, "train-labels-idx1-ubyte",
                                        (root / "train-labels-idx1-ubyte").read_bytes() + b"\x00\x00"),
                    "2 bytes past"),
    "label count != image count": (lambda root: damage(root, "train-labels-idx1-ubyte",
                                                       idx_bytes(np.zeros(119, np.uint8))),
                                   "119 labels for the 120 images"),
    "lone images file": (lambda root: (root / "t10k-labels-idx1-ubyte").unlink(),
                         "found t10k-images-idx3-ubyte but no t10k-labels"),
    "no train files": (lambda root: [p.unlink() for p in root.glob("train-*")], "no train-images-idx3-ubyte"),
}


@pytest.mark.parametrize("case", sorted(BAD_IDX))
def test_bad_idx_files_are_one_clear_error(tmp_path, case):
    root = write_idx_dir(tmp_path / "idx")
    spoil, message = BAD_IDX[case]
    target = spoil(root)
    path = target if case == "missing directory" else root
    with pytest.raises(StageError, match=message) as err:
        sources.idx(str(path))
    assert str(path) in str(err.value)  # names the file or directory


# ---------------------------------------------------------------- CSV

def write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def test_csv_classification_with_text_labels(tmp_path):
    rows = [(i * 0.1, (i * 7) % 5, ["cat", "dog", "emu"][i % 3]) for i in range(150)]
    path = write_csv(tmp_path / "t.csv", ["a", "b", "kind"], rows)
    info, data = prepared(tmp_path, dataset="csv", path=str(path), label="kind")
    assert info["task"] == "classification" and info["label_names"] == ["cat", "dog", "emu"]
    assert info["input_layout"] == "NF" and info["input_shape"] == [2] and info["feature_names"] == ["a", "b"]
    assert len(info["normalization"]["mean"]) == 2


def test_csv_regression_is_inferred_from_fractional_labels(tmp_path):
    rows = [(i, i % 7, 0.5 * i + 0.25) for i in range(120)]
    path = write_csv(tmp_path / "r.csv", ["x1", "x2", "y"], rows)
    info, data = prepared(tmp_path, dataset="csv", path=str(path), label="y", features=("x1",))
    assert info["task"] == "regression" and info["target_names"] == ["y"] and info["input_shape"] == [1]
    assert data.split("test")[1].shape == (info["splits"]["test"], 1)


BAD_CSV = {
    "missing file": ("x,y\n1,2\n", "nope.csv", {}, "no such file"),
    "unknown column": ("a,y\n1,0\n2,1\n", None, {"features": ("b",)}, "no column named 'b'; the header has"),
    "unknown label": ("a,y\n1,0\n2,1\n", None, {"label": "target"}, "no column named 'target'"),
    "empty cell (NaN)": ("a,y\n1,0\n,1\n3,0\n", None, {}, r"has NaN or infinite values in 1 rows \(first: \[1\]\)"),
    "nan text": ("a,y\n1,0\nnan,1\n", None, {}, "NaN or infinite"),
    "text feature": ("a,y\n1,0\nabc,1\n", None, {}, "line 3, column 'a': 'abc' is not a number"),
    "ragged row": ("a,y\n1,0\n2\n", None, {}, "line 3 has 1 fields, the header 2"),
    "header only": ("a,y\n", None, {}, "needs a header row and at least one data row"),
    "text label for regression": ("a,y\n1,x\n2,y\n", None, {"task": "regression"}, "not a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_bad_csv_files_are_one_clear_error(tmp_path, case):
    text, name, extra, message = BAD_CSV[case]
    path = tmp_path / "data.csv"
    path.write_text(text)
    target = tmp_path / name if name else path
    kwargs = {"features": (), "label": "y", "task": "auto", **extra}
    with pytest.raises(StageError, match=message) as err:
        sources.csv_table(str(target), **kwargs)
    assert str(target) in str(err.value)


# ---------------------------------------------------------------- NPZ

def test_npz_images_and_columns(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", images=rng.integers(0, 256, (120, 6, 6), dtype=np.uint8), y=np.arange(120) % 3)
    info, data = prepared(tmp_path / "a", dataset="npz", path=str(tmp_path / "img.npz"), features=("images",),
                          label="y", layout="NCHW")
    assert info["input_layout"] == "NCHW" and info["input_shape"] == [1, 6, 6] and info["raw_dtype"] == "uint8"
    assert info["task"] == "classification" and info["num_classes"] == 3

    np.savez(tmp_path / "cols.npz", h=rng.normal(size=120), w=rng.normal(size=(120, 2)), price=rng.normal(size=120))
    info, data = prepared(tmp_path / "b", dataset="npz", path=str(tmp_path / "cols.npz"), features=("h", "w"),
                          label="price", task="regression")
    assert info["input_layout"] == "NF" and info["input_shape"] == [3] and info["task"] == "regression"

    np.savez(tmp_path / "sig.npz", x=rng.normal(size=(120, 2, 16)).astype(np.float32), y=np.arange(120) % 2)
    info, _ = prepared(tmp_path / "c", dataset="npz", path=str(tmp_path / "sig.npz"), features=("x",), label="y")
    assert info["input_layout"] == "NCL" and info["normalization"]["per"] == "channel"
    assert len(info["normalization"]["mean"]) == 2


def make_npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


BAD_NPZ = {
    "missing file": (lambda p: p / "nope.npz", {}, "no such file"),
    "corrupt archive": (lambda p: (p / "d.npz").write_bytes(b"PK\x03\x04garbage") and p / "d.npz", {},
                        "not a readable .npz archive"),
    "unknown key": (lambda p: make_npz(p, x=np.zeros((3, 2)), y=np.zeros(3)), {"features": ("pixels",)},
                    r"no array named 'pixels'; the archive holds \['x', 'y'\]"),
    "label count": (lambda p: make_npz(p, x=np.zeros((3, 2)), y=np.zeros(4)), {}, "4 labels in 'y' for 3 samples"),
    "nan features": (lambda p: make_npz(p, x=np.array([[1.0, np.nan], [0, 0]]), y=np.zeros(2)), {},
                     "NaN or infinite values in 1 rows"),
    "inf label": (lambda p: make_npz(p, x=np.zeros((2, 2)), y=np.array([1.0, np.inf])), {"task": "regression"},
                  "label 'y' has NaN or infinite"),
    "2-D label": (lambda p: make_npz(p, x=np.zeros((2, 2)), y=np.zeros((2, 2))), {}, "it must be 1-D"),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_files_are_one_clear_error(tmp_path, case):
    make, extra, message = BAD_NPZ[case]
    path = make(tmp_path)
    kwargs = {"features": ("x",), "label": "y", "task": "auto", "layout": "auto", **extra}
    with pytest.raises(StageError, match=message) as err:
        sources.npz(str(path), **kwargs)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "idx"}, "`path` is required for dataset idx"),
    ({"dataset": "digits", "path": "x"}, "`path` applies to the idx, npz, csv and images datasets only"),
    ({"dataset": "csv", "path": "a.csv"}, "`label` is required for dataset csv"),
    ({"dataset": "npz", "path": "a.npz", "label": "y"}, "`features` is required for dataset npz"),
    ({"dataset": "mnist1d", "task": "regression"}, "`task` applies to the npz and csv datasets only"),
    ({"dataset": "csv", "path": "a.csv", "label": "y", "layout": "NF"}, "`layout` applies to the npz dataset only"),
    ({"dataset": "csv", "path": "a.csv", "label": "y", "features": ("y",)}, "also listed in `features`"),
])
def test_prepare_config_names_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare.Config(**kwargs)


def test_a_bad_dataset_key_in_a_recipe_is_a_config_error():
    from pipeline.config import ConfigError, recipe_from_dict

    with pytest.raises(ConfigError, match="`prepare.dataset` must be one of digits, mnist1d"):
        recipe_from_dict({"name": "x", "model": {"family": "mlp"}, "prepare": {"dataset": "cifar"}})
    with pytest.raises(ConfigError, match="`prepare.path` is required for dataset idx"):
        recipe_from_dict({"name": "x", "model": {"family": "mlp"}, "prepare": {"dataset": "idx"}})
