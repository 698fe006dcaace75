"""export, benchmark and register beyond the happy path: a broken export refuses and writes nothing,
preprocessing in the graph on raw (float or uint8, per-channel) input, the softmax output, a batch axis
that is really dynamic, VAE parts, the benchmark's columns, and a choice that never takes a variant
over its budget. Tiny models; the shared session fixtures supply data, checkpoint and files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import models
from stages.contract import NullTracker
from stages import checkpoint, conversion, dataset, export, register
from stages.onnx_model import OnnxModel, Preprocessing
from stages.predictors import OrtPredictor, TorchPredictor
from stages.sessions import SessionSettings


def _props(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _fresh(rundir):
    """A copy's export outputs removed, so 'nothing written' can be checked."""
    for p in list(rundir.root.glob("*.onnx")) + [rundir.export_report]:
        p.unlink(missing_ok=True)
    return rundir


def _save_checkpoint(rundir, model: nn.Module, family: str, config, task: str | None = None) -> None:
    """Replace the run's checkpoint with ``model`` (registered as ``family``), keeping its lineage."""
    _, meta = checkpoint.load(rundir.checkpoint)
    meta = {**meta, "model": models.describe(family, config, tuple(meta["model"]["input_shape"]), 10)}
    if task:
        meta["task"] = task
    checkpoint.save(rundir.checkpoint, model, meta)


# ---------------------------------------------------------------- a deliberately broken export

@torch.library.custom_op("onnxpipeline_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


def _wrong_symbolic(g, x):
    # Exports as x * 3 while PyTorch computes x * 2: an exporter mapping that is wrong.
    return g.op("Mul", x, g.op("Constant", value_t=torch.tensor(3.0)))


torch.onnx.register_custom_op_symbolic("onnxpipeline_test::double", _wrong_symbolic, 9)


class _Broken(nn.Module):
    def __init__(self, config, input_shape, num_outputs):
        super().__init__()
        self.inner = models.cnn.build(config, input_shape, num_outputs)

    def forward(self, x):
        return torch.ops.onnxpipeline_test.double(self.inner(x))


def test_a_broken_export_fails_naming_the_output_and_writes_nothing(trained, copy_of, monkeypatch):
    rd = _fresh(copy_of(trained))
    cfg = models.cnn.Config(channels=(4,), pool_after=0, hidden=8)
    monkeypatch.setitem(models.FAMILIES, "broken", dataclasses.replace(models.FAMILIES["cnn"], name="broken",
                                                                        builder=_Broken))
    torch.manual_seed(0)
    _save_checkpoint(rd, _Broken(cfg, (1, 8, 8), 10).eval(), "broken", cfg)
    with pytest.raises(export.ValidationError) as e:
        export.run(export.Config(), rd, NullTracker())
    msg = str(e.value)
    assert "[dynamo] export failed" in msg  # no ONNX translation for the custom op
    for bs in (1, 2, 37):  # the legacy file runs, but its logits are 1.5x PyTorch's: every batch reported
        assert f"[legacy] batch {bs}: output 'logits' max |diff|" in msg
    assert "no ONNX file was written" in msg
    assert not list(rd.root.glob("*.onnx")) and not rd.export_report.exists()
    assert not [p for p in rd.root.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- preprocessing, softmax, batch axis

def test_the_default_image_export_takes_raw_pixels_and_says_so(exported):
    props = _props(exported.onnx)
    pre = json.loads(props["preprocessing"])
    assert pre["applied_in_graph"] is True and pre["formula"] == "x = (float32(input) - mean) / std"
    assert props["input.dtype"] == "float32" and json.loads(props["input.value_range"]) == [0.0, 16.0]
    assert props["task"] == "classification" and json.loads(props["output.names"]) == ["logits"]
    assert "logits" in json.loads(props["output.meaning"])
    report = json.loads(exported.export_report.read_text())
    assert props["export.exporter"] == report["exporter"] == "dynamo"
    assert "not tried" in json.loads(props["export.rejected"])["legacy"]

    data = dataset.load(exported.data, exported.dataset)
    raw, _ = data.split("test", normalized=False)
    model, _ = checkpoint.load(exported.checkpoint)
    fp32 = OnnxModel.open(exported.onnx)
    got = fp32.predict(raw)["logits"]
    np.testing.assert_allclose(got, TorchPredictor(model).predict(data.normalize(raw)), atol=1e-4)
    assert np.array_equal(fp32.feed(raw)["input"], raw)


def test_uint8_input_with_per_channel_normalization_in_the_graph(tmp_path):
    torch.manual_seed(0)
    model = models.cnn.build(models.cnn.Config(channels=(4,), pool_after=0, hidden=8), (3, 8, 8), 5).eval()
    info = {"normalization": {"mean": [10.0, 120.0, 200.0], "std": [5.0, 60.0, 30.0]}, "raw_dtype": "uint8",
            "value_range": [0, 255], "input_layout": "NCHW"}
    pre = Preprocessing.from_dataset(info, in_graph=True)
    raw = np.random.default_rng(0).integers(0, 256, (40, 3, 8, 8)).astype(np.uint8)
    x = pre.apply(raw)
    assert x.dtype == np.uint8
    path = tmp_path / "u8.onnx"
    outcome = conversion.export_checked(conversion.InGraph(model, pre), x, path, models.ExportSpec())
    assert outcome["exporter"] == "dynamo"
    session = OrtPredictor(path)
    assert session.inputs[0].type == "tensor(uint8)"
    expected = TorchPredictor(model).predict(dataset.normalize(raw, pre.mean, pre.std))
    np.testing.assert_allclose(session.predict(raw), expected, atol=1e-4)
    # outside the graph the same helper normalizes per channel, as Data.normalize does
    off = Preprocessing.from_dataset(info, in_graph=False).apply(raw)
    assert off.dtype == np.float32 and off[:, 1].mean() == pytest.approx(((raw[:, 1] - 120.0) / 60.0).mean(), rel=1e-5)


def test_softmax_output_sums_to_one_and_preprocessing_can_stay_outside(exported, copy_of):
    rd = _fresh(copy_of(exported))
    result = export.run(export.Config(softmax_output=True, preprocessing_in_graph=False), rd, NullTracker())
    props = _props(rd.onnx)
    assert json.loads(props["output.names"]) == ["logits", "probabilities"]
    pre = json.loads(props["preprocessing"])
    assert pre["applied_in_graph"] is False and not result.preprocessing_in_graph
    lo, hi = json.loads(props["input.value_range"])
    assert lo < 0 < hi  # the normalized range of raw 0..16
    data = dataset.load(rd.data, rd.dataset)
    raw, _ = data.split("test", normalized=False)
    x = OnnxModel.open(rd.onnx).feed(raw)["input"]
    np.testing.assert_array_equal(x, data.normalize(raw))
    out = OrtPredictor(rd.onnx).run({"input": x})
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert (out["probabilities"].argmax(1) == out["logits"].argmax(1)).all()


def test_a_fixed_batch_axis_is_caught(tmp_path):
    torch.manual_seed(0)
    model = models.mlp.build(models.mlp.Config(hidden=(8,)), (1, 8, 8), 10).eval()
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "fixed.onnx"
    fixed = models.ExportSpec(dynamic_batch=False)
    conversion.export_onnx(model, conversion.torch_example(x), path, fixed, 18, "legacy")
    problems, _ = conversion.validate(path, model, x, models.ExportSpec(), (1, 2, 37))
    text = "\n".join(problems)
    assert "input 'input': batch axis is fixed to 2" in text
    assert "batch 37: ONNX Runtime failed" in text and "batch 1: ONNX Runtime failed" in text
    # the dynamic file passes at sizes the exporter never saw
    conversion.export_onnx(model, conversion.torch_example(x), path, models.ExportSpec(), 18, "legacy")
    assert conversion.validate(path, model, x, models.ExportSpec(), (1, 37))[0] == []
    with pytest.raises(ValueError, match="other than 2"):
        export.Config(check_batch_sizes=(2,))


# ---------------------------------------------------------------- a VAE: model.onnx plus its parts

@dataclasses.dataclass(frozen=True)
class _Part:  # the contract's models.ExportPart, field for field
    name: str
    attribute: str
    input_name: str
    output_names: tuple[str, ...]
    input_shape_fn: object


@dataclasses.dataclass(frozen=True)
class _VAESpec:  # the contract's models.ExportSpec of the vae family
    input_name: str = "input"
    output_names: tuple[str, ...] = ("reconstruction", "mu", "logvar")
    dynamic_batch: bool = True
    parts: tuple = (_Part("encoder", "encoder", "input", ("mu", "logvar"), lambda m, s: tuple(s)),
                    _Part("decoder", "decoder", "latent", ("reconstruction",), lambda m, s: (m.latent_dim,)))


class _Encoder(nn.Module):
    def __init__(self, width, latent):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(width, 16), nn.ReLU())
        self.mu, self.logvar = nn.Linear(16, latent), nn.Linear(16, latent)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


class _TinyVAE(nn.Module):
    """Follows the contract: forward -> (reconstruction, mu, logvar), z = mu at eval; encoder, decoder."""

    def __init__(self, config, input_shape, num_outputs=0):
        super().__init__()
        width, self.latent_dim = int(np.prod(input_shape)), 3
        self.encoder = _Encoder(width, self.latent_dim)
        self.decoder = nn.Sequential(nn.Linear(self.latent_dim, width), nn.Unflatten(1, tuple(input_shape)))

    def forward(self, x):
        mu, logvar = self.encoder(x)
        return self.decoder(mu), mu, logvar


def test_a_vae_exports_the_autoencoder_and_its_parts(trained, copy_of, monkeypatch):
    if "vae" in models.FAMILIES:
        family, cfg = "vae", models.FAMILIES["vae"].config_class(latent_dim=3)
        model = models.build("vae", cfg, (1, 8, 8), 0)
    else:  # before the vae family lands: a test-local one that follows the contract
        family, cfg = "testvae", models.mlp.Config()
        monkeypatch.setitem(models.FAMILIES, family, dataclasses.replace(
            models.FAMILIES["mlp"], name=family, builder=_TinyVAE, export=_VAESpec()))
        torch.manual_seed(0)
        model = _TinyVAE(cfg, (1, 8, 8))
    rd = _fresh(copy_of(trained))
    _save_checkpoint(rd, model.eval(), family, cfg, task="vae")
    result = export.run(export.Config(), rd, NullTracker())
    assert set(result.parts) == {"encoder", "decoder"}
    report = json.loads(rd.export_report.read_text())
    assert set(report["files"]) == {"model", "encoder", "decoder"}
    assert all(f["exporter"] in ("dynamo", "legacy") for f in report["files"].values())

    data = dataset.load(rd.data, rd.dataset)
    raw, _ = data.split("test", normalized=False)
    x = torch.from_numpy(data.normalize(raw[:9]))
    with torch.inference_mode():
        rec, mu, logvar = model(x)
        dec = model.decoder(mu)
    whole = OrtPredictor(rd.onnx).run({"input": raw[:9]})
    np.testing.assert_allclose(whole["reconstruction"], rec.numpy(), atol=1e-4)
    enc = OrtPredictor(rd.onnx_part("encoder")).run({"input": raw[:9]})
    np.testing.assert_allclose(enc["mu"], mu.numpy(), atol=1e-4)
    np.testing.assert_allclose(enc["logvar"], logvar.numpy(), atol=1e-4)
    decoded = OrtPredictor(rd.onnx_part("decoder")).run({"latent": mu.numpy()})
    np.testing.assert_allclose(decoded["reconstruction"], dec.numpy(), atol=1e-4)

    props = {n: _props(rd.onnx_part(n)) for n in ("encoder", "decoder")}
    assert props["encoder"]["export.part"] == "encoder" and props["encoder"]["task"] == "vae"
    assert json.loads(props["encoder"]["preprocessing"])["applied_in_graph"] is True
    assert props["decoder"]["input.name"] == "latent" and json.loads(props["decoder"]["input.shape"]) == [-1, 3]
    assert "normalized space" in json.loads(_props(rd.onnx)["output.meaning"])["reconstruction"]


# ---------------------------------------------------------------- benchmark and register

def test_benchmark_rows_carry_p90_cold_start_memory_and_the_input_fed(benchmarked):
    data = json.loads(benchmarked.benchmark_json.read_text())
    for r in data["rows"]:
        assert r["median_ms"] <= r["p90_ms"] * 1.0001 <= r["p99_ms"] * 1.0002
        assert r["cold_start_ms"] > 0 and r["runs"] >= 5
        assert r["peak_rss_mib"] is None or r["peak_rss_mib"] >= 0
        assert r["input_dtype"] == "float32"
    assert "VmHWM" in data["environment"]["memory_method"]
    md = benchmarked.benchmark_md.read_text()
    assert "| p90 ms |" in md and "cold start ms" in md and "peak RSS MiB" in md
    assert benchmarked.benchmark_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_register_never_picks_the_fastest_variant_when_it_is_over_budget(benchmarked, copy_of):
    rd = copy_of(benchmarked)
    rows = json.loads(rd.benchmark_json.read_text())["rows"]
    at_1 = [r for r in rows if r["engine"] == "onnxruntime" and r["batch_size"] == 1]
    fastest = max(at_1, key=lambda r: r["samples_per_s"])["variant"]
    report = json.loads(rd.variants.read_text())
    for name, v in report["variants"].items():  # every variant within budget except the fastest
        v["within_budget"] = name != fastest
    if fastest == "fp32":  # fp32 is the reference; make a quantized variant the over-budget fastest instead
        other = next(n for n in report["variants"] if n != "fp32")
        report["variants"]["fp32"]["within_budget"] = True
        report["variants"][other]["within_budget"] = False
        for r in rows:
            if r["variant"] == other and r["batch_size"] == 1:
                r["samples_per_s"], r["median_ms"] = 1e9, 1e-6
        rd.benchmark_json.write_text(json.dumps({"rows": rows}))
        fastest = other
    rd.variants.write_text(json.dumps(report))
    # a wide margin forces the re-measure of the top two (kept short)
    cfg = register.Config(target_batch_size=1, remeasure_margin=0.99, remeasure_rounds=2, remeasure_seconds=0.02)
    serving = SessionSettings(device="auto", intra_op_threads=1, allow_spinning=False)  # the server's sessions
    result = register.run(cfg, rd, NullTracker(), recipe_name="tiny", serving=serving)
    assert result.variant != fastest
    saved = json.loads(rd.registration.read_text())
    cand = {c["variant"]: c for c in saved["candidates"]}
    assert cand[fastest]["eligible"] is False and f"{fastest} (over the accuracy budget)" in saved["reason"]
    assert saved["remeasured"] and set(saved["remeasured"]["results"]) <= {n for n in cand if cand[n]["eligible"]}
    assert saved["remeasured"]["session"] == saved["session"] == {"device": "cpu", "intra_op_threads": 1,
                                                                  "inter_op_threads": 1, "allow_spinning": False}
    assert "with the server's session settings (intra-op threads 1, spinning off)" in saved["reason"]
    with pytest.raises(Exception, match="not an eligible variant"):
        register.run(dataclasses.replace(cfg, variant=fastest), rd, NullTracker(), recipe_name="tiny")
