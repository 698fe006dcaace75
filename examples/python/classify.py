"""Classify inputs with an onnx-pipeline bundle, using only onnxruntime and numpy.

    pip install onnxruntime numpy
    python classify.py BUNDLE_DIR [SAMPLES_JSON]

BUNDLE_DIR is what `pipeline package` wrote (model.onnx, model.json, samples.json). SAMPLES_JSON
(default: the bundle's samples.json) holds raw inputs in the same format. Everything about the model
(input name, dtype, preprocessing, labels, outputs) is read from model.json, nothing is assumed.
Prints one line per input: index, predicted label, confidence, true label; then a summary. Exits 1
when an output differs from the one the bundle recorded for that sample (the self-check).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

BATCH = 256


def preprocess(raw: np.ndarray, meta: dict) -> np.ndarray:
    """Raw values -> what the model takes, as model.json says."""
    pre, dtype = meta["preprocessing"], meta["input"]["dtype"]
    if pre.get("applied_in_graph") or "mean" not in pre:
        return np.ascontiguousarray(raw.astype(dtype))  # the graph normalizes (or nothing to do)
    mean, std = np.asarray(pre["mean"], np.float32), np.asarray(pre["std"], np.float32)
    if mean.ndim == 1:  # one value per channel / feature: along axis 1
        shape = [1] * raw.ndim
        shape[1] = -1
        mean, std = mean.reshape(shape), std.reshape(shape)
    return np.ascontiguousarray(((raw.astype(np.float32) - mean) / std).astype(dtype))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    bundle = Path(argv[0])
    meta = json.loads((bundle / "model.json").read_text())
    data = json.loads(Path(argv[1] if len(argv) > 1 else bundle / "samples.json").read_text())
    samples = data["samples"]
    session = ort.InferenceSession(str(bundle / meta["model"]["file"]), providers=["CPUExecutionProvider"])

    names = [o["name"] for o in meta["outputs"]]
    scores_name = next((n for n in ("logits", "probabilities") if n in names), names[0])
    raw = np.asarray([s["input"] for s in samples], dtype=data["input"]["dtype"])
    x = preprocess(raw, meta)
    chunks = [session.run(names, {meta["input"]["name"]: x[i:i + BATCH]}) for i in range(0, len(x), BATCH)]
    outputs = {n: np.concatenate([c[j] for c in chunks]) for j, n in enumerate(names)}

    scores = outputs[scores_name]
    probs = scores if scores_name == "probabilities" else softmax(scores.astype(np.float64))
    labels = meta["labels"]
    print(f"# {bundle.name}: {len(samples)} inputs, onnxruntime {ort.__version__} (python)")
    correct = agree = 0
    tol = data.get("tolerance", {"atol": 1e-4, "rtol": 1e-3})
    for i, s in enumerate(samples):
        k = int(np.argmax(scores[i]))
        truth = s.get("label", "-")
        correct += labels[k] == truth
        expected = s.get("expected", {}).get("outputs", {})
        agree += all(np.allclose(outputs[n][i], np.asarray(v), atol=tol["atol"], rtol=tol["rtol"])
                     for n, v in expected.items())
        print(f"{s.get('index', i)}\t{labels[k]}\t{probs[i, k]:.3f}\t{truth}")
    print(f"accuracy {correct / len(samples):.4f} ({correct}/{len(samples)}); "
          f"self-check: {agree}/{len(samples)} match the bundle's expected outputs")
    return 0 if agree == len(samples) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
