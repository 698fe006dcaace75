"""Foreign ONNX models through import and quantize: each variant's agreement with its fp32 file.

    .venv/bin/python benchmarks/foreign_models.py [--models shufflenet squeezenet resnet50] [--samples 160]
        [--workdir /tmp/foreign-models] [--variants int8-dynamic int8-static fp16 optimized] [--trained]
    .venv/bin/python benchmarks/foreign_models.py --example runs/onnx-example   # configs/onnx-squeezenet.yaml's files

The `onnx` package ships real architectures from the ONNX model zoo under
``onnx/backend/test/data/light/`` (ResNet-50, SqueezeNet, ShuffleNet, Inception, DenseNet, VGG-19, ...):
opset 9, IR 3 (initializers listed among the inputs), a fixed batch dimension of 1, names such as
``gpu_0/data_0``. They are "light": every large weight tensor is replaced by a ``ConstantOfShape(0.02)``
node, so their outputs are the same for every input and any two variants agree trivially. To measure
something, ``with_weights`` gives the graph real tensors: seeded He-normal weights with zero-mean filters,
batch-norm statistics measured on the data, layer after layer (as training would leave them), and the
classifier scaled to logits of standard deviation ``LOGIT_STD`` across classes. The architecture, names,
opset, IR version and fixed batch are the zoo file's own; the weights are a stand-in, so the numbers say
how each quantizer treats this architecture, not what it would do to the trained model.

The inputs are the bundled 8x8 digits, scaled up to 224x224 RGB uint8 and normalized with ImageNet's
statistics (stated in the recipe, as a user would for a zoo model). No labels: quantize judges each
variant by top-1 agreement with the fp32 file on the test split (and reports the relative error of the
output), the gate an imported file gets. Nothing is downloaded. Prints a markdown table.

Stand-in weights are not trained weights: deep random features vary little between inputs compared with
their size, so the classifier (centred and scaled to a spread of 3) turns small quantization errors into
different top-1 classes. ``--trained`` adds the reference that tells the quantizers from the stand-ins:
this project's digits CNN, trained here, exported, stripped of its metadata and fixed at batch 1, then
imported and quantized exactly like the zoo files.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
LOGIT_STD = 3.0  # classifier logits' spread across classes: a confident but not saturated softmax
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0..255 units, per RGB channel
IMAGENET_STD = (58.395, 57.12, 57.375)


def light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light(name: str) -> Path:
    """The zoo file ``light_<name>.onnx`` the onnx package ships (squeezenet, shufflenet, resnet50, ...)."""
    path = light_dir() / f"light_{name}.onnx"
    if not path.is_file():
        found = sorted(p.stem[len("light_"):] for p in light_dir().glob("light_*.onnx"))
        raise SystemExit(f"no {path.name} in {light_dir()}; the onnx package ships {found}")
    return path


def expected_output(name: str) -> np.ndarray:
    """The output the onnx package expects for ``reference_input`` (its backend test's data)."""
    import onnx
    from onnx import numpy_helper

    return numpy_helper.to_array(onnx.load_tensor(str(light_dir() / f"light_{name}_output_0.pb")))


def reference_input(shape) -> np.ndarray:
    """The input onnx's backend test feeds a light model: arange(n) / n in the input's shape (float32)."""
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def digit_images(n: int) -> np.ndarray:
    """The first ``n`` bundled 8x8 digits scaled up to 224x224, as RGB uint8 NCHW (N, 3, 224, 224)."""
    from sklearn.datasets import load_digits

    digits = np.round(load_digits().images[:n] * 255.0 / 16.0).astype(np.uint8)  # 0..16 -> 0..255
    big = np.repeat(np.repeat(digits, 28, axis=1), 28, axis=2)  # each pixel a 28x28 block
    return np.repeat(big[:, None], 3, axis=1)


def normalized(images: np.ndarray) -> np.ndarray:
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return ((images.astype(np.float32) - mean) / std).astype(np.float32)


def with_weights(src: Path, dst: Path, images: np.ndarray, seed: int = 0, passes: int = 0) -> Path:
    """``src`` (a light zoo file) with real weight tensors in place of its ConstantOfShape stand-ins,
    saved to ``dst`` in the zoo's own form (IR 3, initializers listed among the inputs, batch 1).
    ``images``: a few raw samples (N, 3, 224, 224) to measure batch-norm statistics and the logit scale on.
    ``passes``: batch-norm layers are calibrated in this many groups, each measured with the ones before it
    calibrated (0: one layer per pass, exact; fewer passes are faster and rougher)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers[name].append((node, i))
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    tensors: dict[str, np.ndarray] = {}
    kept = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape":
            kept.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        user, slot = consumers[node.output[0]][0]
        if user.op_type in ("Conv", "Gemm") and slot == 1:  # He-normal, zero-mean filters (fan-in over dims 1..)
            w = rng.normal(0.0, 1.0, shape)
            w -= w.reshape(shape[0], -1).mean(axis=1).reshape((shape[0],) + (1,) * (len(shape) - 1))
            tensors[node.output[0]] = w * np.sqrt(2.0 / (np.prod(shape[1:]) * (1 - 1 / np.pi)))
        elif user.op_type == "BatchNormalization":  # scale 1, bias 0; mean/var measured below
            tensors[node.output[0]] = np.ones(shape) if slot in (1, 4) else np.zeros(shape)
        else:  # biases
            tensors[node.output[0]] = np.zeros(shape)
    for t in model.graph.initializer:  # the small tensors the zoo kept (biases, BN statistics): neutral too
        users = consumers.get(t.name)
        if not users:
            continue
        user, slot = users[0]
        a = numpy_helper.to_array(t)
        if user.op_type == "BatchNormalization":
            tensors[t.name] = np.ones_like(a) if slot in (1, 4) else np.zeros_like(a)
        elif user.op_type in ("Conv", "Gemm") and slot == 2:
            tensors[t.name] = np.zeros_like(a)
        else:
            tensors[t.name] = a
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {name for node in kept for name in node.input}

    def rebuild():
        saved = {n: numpy_helper.from_array(np.asarray(a, np.float32) if np.asarray(a).dtype.kind == "f" else np.asarray(a), n)
                 for n, a in tensors.items() if n in used}
        del model.graph.initializer[:]
        model.graph.initializer.extend(saved.values())
        graph_inputs = [v for v in model.graph.input if v.name not in tensors and v.name not in shapes]
        del model.graph.input[:]
        model.graph.input.extend(graph_inputs)  # IR 3, as the zoo wrote it: weights are listed among the inputs
        model.graph.input.extend(helper.make_tensor_value_info(n, t.data_type, list(t.dims)) for n, t in saved.items())

    bns = [n for n in kept if n.op_type == "BatchNormalization"]
    gemms = [n for n in kept if n.op_type in ("Gemm", "Conv")]
    classifier = gemms[-1]
    x = normalized(images)
    in_name = next(v.name for v in model.graph.input if v.name not in tensors and v.name not in shapes)
    step = max(1, -(-len(bns) // passes)) if passes else 1  # BN layers calibrated per pass, in graph order
    for first in [*range(0, len(bns), step), len(bns)]:  # the last pass only scales the classifier
        rebuild()
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None) for n in bns)
        probe.graph.output.extend([helper.make_tensor_value_info(classifier.output[0], onnx.TensorProto.FLOAT, None)])
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        runs = [dict(zip(names, session.run(None, {in_name: x[i:i + 1]}))) for i in range(len(x))]
        # BN statistics as training leaves them, for the next `step` layers (those before are already right)
        for n in bns[first:first + step]:
            acts = np.concatenate([r[n.input[0]] for r in runs]).astype(np.float64)
            axes = tuple(i for i in range(acts.ndim) if i != 1)
            tensors[n.input[3]], tensors[n.input[4]] = acts.mean(axis=axes), acts.var(axis=axes) + 1e-3
        if first == len(bns):  # the classifier as training leaves it: centred per class, a set spread
            out = np.concatenate([r[classifier.output[0]] for r in runs]).astype(np.float64)
            logits = out.reshape(len(out), out.shape[1], -1).mean(axis=2)  # (N, classes), spatial dims pooled
            centre = logits.mean(axis=0)
            spread = float(np.mean((logits - centre).std(axis=1)))
            scale = LOGIT_STD / spread if spread > 0 else 1.0
            tensors[classifier.input[1]] = tensors[classifier.input[1]] * scale
            bias = classifier.input[2] if len(classifier.input) > 2 else ""
            if bias:
                tensors[bias] = (np.asarray(tensors[bias]) - centre.reshape(np.shape(tensors[bias]))) * scale
    rebuild()
    onnx.checker.check_model(model, full_check=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst


def agreement_rows(workdir: Path, name: str, samples: int, variants: list[str]) -> tuple[list[dict], dict]:
    """Import the re-weighted zoo file with unlabeled digit images and quantize it; -> variants.json rows."""
    from pipeline.config import recipe_from_dict
    from pipeline.orchestrate import run_pipeline
    from stages.contract import RunDir

    images = digit_images(samples)
    data = workdir / "images.npz"
    if not data.is_file():
        np.savez(data, x=images)
    model = with_weights(light(name), workdir / f"{name}.onnx", images[:8])
    recipe = recipe_from_dict({
        "name": f"foreign-{name}",
        "model": {"family": "onnx", "path": str(model), "task": "classification", "layout": "NCHW",
                  "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "raw_value_range": [0, 255]},
        "prepare": {"dataset": "npz", "path": str(data), "features": ["x"], "task": "unlabeled"},
        "quantize": {"variants": variants, "calibration_samples": 64, "sensitivity": False}})
    rundir = RunDir(workdir / name)
    run_pipeline(recipe, rundir, stages=("prepare", "import", "quantize"), track=False)
    report = json.loads(rundir.variants.read_text())
    imported = json.loads(rundir.import_report.read_text())
    return [{"model": name, "variant": v, **row} for v, row in report["variants"].items()], imported


def trained_rows(workdir: Path, variants: list[str]) -> tuple[list[dict], dict]:
    """The reference with trained weights: this project's digits CNN (trained and exported here, a few
    epochs), made foreign (metadata stripped, batch fixed at 1, IR and opset as exported), imported with
    the digits as unlabeled inputs and quantized the same way."""
    import onnx

    from pipeline.config import recipe_from_dict
    from pipeline.orchestrate import run_pipeline
    from stages.contract import RunDir

    source = RunDir(workdir / "digits-cnn-trained")
    trained = recipe_from_dict({"name": "digits-cnn-trained", "model": {"family": "cnn", "channels": [16, 32], "hidden": 64},
                                "train": {"epochs": 15, "device": "cpu"}})
    run_pipeline(trained, source, stages=("prepare", "train", "evaluate", "export"), track=False)
    proto = onnx.load(str(source.onnx))
    del proto.metadata_props[:]
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    foreign = workdir / "digits-cnn.onnx"
    onnx.save(proto, str(foreign))
    from sklearn.datasets import load_digits

    np.savez(workdir / "digits.npz", x=load_digits().images[:, None].astype(np.float32))
    recipe = recipe_from_dict({
        "name": "foreign-digits-cnn",
        "model": {"family": "onnx", "path": str(foreign), "task": "classification", "layout": "NCHW", "fed_as_is": True,
                  "dynamic_batch": False},
        "prepare": {"dataset": "npz", "path": str(workdir / "digits.npz"), "features": ["x"], "task": "unlabeled"},
        "quantize": {"variants": variants, "sensitivity": False}})
    rundir = RunDir(workdir / "digits-cnn")
    run_pipeline(recipe, rundir, stages=("prepare", "import", "quantize"), track=False)
    report = json.loads(rundir.variants.read_text())
    return ([{"model": "digits-cnn (trained)", "variant": v, **row} for v, row in report["variants"].items()],
            json.loads(rundir.import_report.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["shufflenet", "squeezenet", "resnet50"])
    ap.add_argument("--samples", type=int, default=160, help="digit images (split 0.65/0.15/0.2 by prepare)")
    ap.add_argument("--variants", nargs="+", default=["optimized", "int8-dynamic", "int8-static", "fp16"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/foreign-models"))
    ap.add_argument("--trained", action="store_true", help="also a reference with trained weights: this project's digits "
                    "CNN, exported, stripped of its metadata, batch fixed at 1, imported like a foreign file")
    ap.add_argument("--example", type=Path, metavar="DIR", help="only write DIR/squeezenet.onnx (zoo SqueezeNet with "
                    "stand-in weights) and DIR/images.npz (unlabeled digit images), the files configs/onnx-squeezenet.yaml reads")
    args = ap.parse_args()
    if args.example is not None:
        args.example.mkdir(parents=True, exist_ok=True)
        images = digit_images(args.samples)
        np.savez(args.example / "images.npz", x=images)
        with_weights(light("squeezenet"), args.example / "squeezenet.onnx", images[:8])
        print(f"wrote {args.example / 'squeezenet.onnx'} and {args.example / 'images.npz'} ({len(images)} images)")
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    lines = ["| model | file facts | variant | status | top-1 agreement with fp32 | relative error of the output | "
             "size KiB |", "|---|---|---|---|---:|---:|---:|"]
    for name in [*args.models, *(["digits-cnn"] if args.trained else [])]:
        started = time.perf_counter()
        rows, imported = (trained_rows(args.workdir, args.variants) if name == "digits-cnn" else
                          agreement_rows(args.workdir, name, args.samples, args.variants))
        b = imported["batch"]
        label = "digits-cnn (trained)" if name == "digits-cnn" else name
        facts = (f"opset {imported['opset']}, IR {imported['ir_version']}, input `{imported['inputs'][0]['name']}`, "
                 + ("batch made dynamic" if b.get("made_dynamic") else f"fixed batch {b.get('fixed')}"))
        for r in rows:
            metric = r.get("metric") or {}
            err = (metric.get("per_output") or {})
            lines.append(f"| {label} | {facts} | {r['variant']} | {r['status']} | "
                         f"{metric.get('value', float('nan')):.3f} | {max(err.values()) if err else float('nan'):.4f} | "
                         f"{r.get('size_bytes', 0) / 1024:,.0f} |" if r["status"] in ("ok", "over-budget") else
                         f"| {label} | {facts} | {r['variant']} | {r['status']} | | | |")
        lines.append(f"<!-- {name}: {time.perf_counter() - started:.0f} s -->")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
