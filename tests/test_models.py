"""Model families, driven by the Family table: every family x task x input layout builds, gives the
contract's output shapes, learns (its loss falls over a few optimizer steps with compute_loss), rebuilds
from its checkpoint description, and exports to ONNX with ONNX Runtime reproducing PyTorch."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import models
from stages.losses import compute_loss

# One small per-sample shape per input layout (no batch axis).
SHAPES = {"NCHW": (1, 8, 8), "NCL": (2, 16), "NF": (6,)}
OUTPUTS = 3  # classes (classification) or targets (regression)
# Small widths keep the suite fast; families not named here use their default config.
TINY = {
    "mlp": models.mlp.Config(hidden=(32,)),
    "cnn": models.cnn.Config(channels=(8, 16), hidden=16),
    "cnn1d": models.cnn1d.Config(channels=(8, 16), hidden=16),
    "rnn": models.rnn.Config(hidden=16, step_size=2),
    "transformer": models.transformer.Config(patch_size=4, dim=16, depth=1, heads=2),
    "vae": models.vae.Config(hidden=(32,), latent_dim=4),
}

# Every builtin family x every task it supports (on its first layout), and x every other layout it reads.
# (custom, torchvision and timm build code from elsewhere: tests/test_custom_model.py covers them.)
BUILTIN = {name: fam for name, fam in models.FAMILIES.items() if fam.builtin}
LEARN_CASES = [(name, task, fam.layouts[0]) for name, fam in BUILTIN.items() for task in fam.tasks]
SHAPE_CASES = [(name, fam.tasks[0], layout) for name, fam in BUILTIN.items() for layout in fam.layouts]


def make(name: str, shape, config=None):
    torch.manual_seed(0)
    cfg = config or TINY.get(name) or models.family(name).config_class()
    return models.build(name, cfg, shape, OUTPUTS), cfg


def targets(task: str, x: torch.Tensor, n: int):
    g = torch.Generator().manual_seed(1)
    if task == "classification":
        return torch.randint(0, OUTPUTS, (n,), generator=g)
    if task == "regression":
        return torch.randn(n, OUTPUTS, generator=g)
    return x  # a VAE reconstructs its input


@pytest.mark.parametrize("name, task, layout", SHAPE_CASES, ids=["-".join(c) for c in SHAPE_CASES])
def test_family_output_shapes(name, task, layout):
    shape = SHAPES[layout]
    model, cfg = make(name, shape)
    model.eval()
    x = torch.randn(5, *shape)
    out = model(x)
    if task == "vae":
        rec, mu, logvar = out
        assert rec.shape == x.shape and mu.shape == logvar.shape == (5, cfg.latent_dim)
        assert torch.equal(model(x)[0], rec), "a VAE in eval mode is deterministic (z = mu)"
        assert model.encoder(x)[0].shape == mu.shape and model.decoder(mu).shape == x.shape
    else:
        assert out.shape == (5, OUTPUTS)


@pytest.mark.parametrize("name, task, layout", LEARN_CASES, ids=["-".join(c) for c in LEARN_CASES])
def test_family_learns_and_rebuilds(name, task, layout):
    shape = SHAPES[layout]
    model, cfg = make(name, shape)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    y = targets(task, x, 16)

    def eval_loss():  # deterministic: no dropout, the VAE decodes mu
        model.eval()
        with torch.no_grad():
            return compute_loss(task, model(x), y)[0].item()

    before = eval_loss()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        loss, parts = compute_loss(task, model(x), y)
        assert parts and all(np.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, f"{name}/{task} loss did not fall: {before:.4f} -> {after:.4f}"

    clone = models.rebuild(models.describe(name, cfg, shape, OUTPUTS))
    clone.load_state_dict(model.state_dict())
    first = lambda o: o[0] if isinstance(o, tuple) else o
    assert torch.equal(first(clone.eval()(x)), first(model.eval()(x)))


def export(module, example, path, input_name, output_names, exporter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                              input_names=[input_name], output_names=list(output_names), opset_version=18,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
        else:
            torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[input_name],
                              output_names=list(output_names), opset_version=18,
                              dynamic_axes={n: {0: "batch"} for n in [input_name, *output_names]})


def assert_ort_matches(module, path, input_name, output_names, shape):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(output_names)
    for batch in (1, 5):  # 1 and 5 were never seen at export time (batch 2): the batch axis is dynamic
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = module(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(list(output_names), {input_name: x.numpy()})
        for name, e, a in zip(output_names, expected, got):
            np.testing.assert_allclose(a, e.numpy(), atol=1e-4, rtol=1e-3, err_msg=f"output {name}, batch {batch}")


# The legacy exporter runs for every family. torch.export (dynamo) costs 5-40 s per model on this
# 2-core machine, so by default it runs for the families with non-trivial ops (GRU, attention, the
# VAE's three outputs and its parts); linear/conv stacks are exported with it by the export stage's
# own tests. ONNX_PIPELINE_EXPORT_MATRIX=1 runs the whole family x exporter matrix (all pass).
FULL_MATRIX = os.environ.get("ONNX_PIPELINE_EXPORT_MATRIX") == "1"
DYNAMO_BY_DEFAULT = ("rnn", "transformer", "vae")
EXPORT_CASES = [
    pytest.param(name, fam.tasks[0], fam.layouts[0], exporter, id=f"{name}-{exporter}",
                 marks=[] if exporter == "legacy" or name in DYNAMO_BY_DEFAULT or FULL_MATRIX else
                 [pytest.mark.skip(reason="slow dynamo export of a plain stack; ONNX_PIPELINE_EXPORT_MATRIX=1 runs it")])
    for name, fam in BUILTIN.items() for exporter in ("dynamo", "legacy")]


@pytest.mark.parametrize("name, task, layout, exporter", EXPORT_CASES)
def test_family_exports_to_onnx_and_onnxruntime_matches_torch(name, task, layout, exporter, tmp_path):
    shape = SHAPES[layout]
    model, _ = make(name, shape)
    model.eval()
    spec = models.export_spec(name, task)
    example = torch.randn(2, *shape)
    export(model, example, tmp_path / "model.onnx", spec.input_name, spec.output_names, exporter)
    assert_ort_matches(model, tmp_path / "model.onnx", spec.input_name, spec.output_names, shape)
    for part in spec.parts:  # the VAE's encoder and decoder, each a file of its own
        sub = getattr(model, part.attribute)
        part_shape = part.input_shape_fn(model, shape)
        export(sub, torch.randn(2, *part_shape), tmp_path / f"{part.name}.onnx", part.input_name,
               part.output_names, exporter)
        assert_ort_matches(sub, tmp_path / f"{part.name}.onnx", part.input_name, part.output_names, part_shape)


@pytest.mark.parametrize("cell, bidirectional", [("lstm", True), ("gru", True)])
def test_rnn_variants_export_with_the_legacy_exporter(cell, bidirectional, tmp_path):
    cfg = models.rnn.Config(cell=cell, hidden=8, layers=2, bidirectional=bidirectional)
    model, _ = make("rnn", SHAPES["NCL"], cfg)
    model.eval()
    export(model, torch.randn(2, *SHAPES["NCL"]), tmp_path / "m.onnx", "input", ("logits",), "legacy")
    assert_ort_matches(model, tmp_path / "m.onnx", "input", ("logits",), SHAPES["NCL"])


def test_conv_vae_on_images_exports_both_parts(tmp_path):
    cfg = models.vae.Config(architecture="conv", channels=(4, 8), latent_dim=3)
    model, _ = make("vae", SHAPES["NCHW"], cfg)
    model.eval()
    assert model(torch.randn(4, 1, 8, 8))[0].shape == (4, 1, 8, 8)
    for part in models.family("vae").export.parts:
        sub = getattr(model, part.attribute)
        shape = part.input_shape_fn(model, SHAPES["NCHW"])
        export(sub, torch.randn(2, *shape), tmp_path / f"{part.name}.onnx", part.input_name, part.output_names, "legacy")
        assert_ort_matches(sub, tmp_path / f"{part.name}.onnx", part.input_name, part.output_names, shape)


def test_a_vae_samples_in_training_mode():
    model, _ = make("vae", (6,))
    x = torch.randn(4, 6)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])


def test_resolve_task():
    assert models.resolve_task("vae", "classification") == "vae"
    assert models.resolve_task("mlp", "regression") == "regression"
    assert models.resolve_task("cnn", "classification") == "classification"
    with pytest.raises(models.TaskError, match="'cnn1d'.*regression.*choose one of \\['custom', 'linear', 'mlp'\\]"):
        models.resolve_task("cnn1d", "regression")
    with pytest.raises(models.TaskError, match="NCHW.*cnn1d"):
        models.check_layout("cnn", "NCL")
    assert models.export_spec("mlp", "regression").output_names == ("prediction",)
    assert models.export_spec("vae", "vae").output_names == ("reconstruction", "mu", "logvar")


def test_old_checkpoint_descriptions_still_rebuild():
    cfg = models.cnn.Config(channels=(4, 8), hidden=16)
    desc = models.describe("cnn", cfg, (1, 8, 8), 10)
    del desc["num_outputs"]  # what a checkpoint from before the task split stored
    assert models.rebuild(desc)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_unknown_family_names_the_choices():
    with pytest.raises(KeyError, match="cnn"):
        models.family("resnet")


@pytest.mark.parametrize("make_config, key", [
    (lambda: models.cnn.Config(dropout=1.5), "dropout"),
    (lambda: models.mlp.Config(hidden=(0,)), "hidden"),
    (lambda: models.linear.Config(dropout=-0.1), "dropout"),
    (lambda: models.cnn1d.Config(kernel_size=4), "kernel_size"),
    (lambda: models.rnn.Config(cell="rnn"), "cell"),
    (lambda: models.rnn.Config(step_size=0), "step_size"),
    (lambda: models.transformer.Config(dim=30, heads=4), "dim"),
    (lambda: models.vae.Config(latent_dim=0), "latent_dim"),
])
def test_config_validation_names_the_key(make_config, key):
    with pytest.raises(ValueError, match=f"`{key}`"):
        make_config()


def test_shapes_a_family_cannot_read_are_refused():
    with pytest.raises(ValueError, match="not a multiple of `patch_size`"):
        models.build("transformer", models.transformer.Config(patch_size=3), (1, 16), 2)
    with pytest.raises(ValueError, match="not a multiple of `step_size`"):
        models.build("rnn", models.rnn.Config(step_size=3), (1, 16), 2)
    with pytest.raises(ValueError, match="use architecture: mlp"):
        models.build("vae", models.vae.Config(architecture="conv"), (1, 16), 0)
