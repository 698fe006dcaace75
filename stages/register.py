"""register: choose a variant by measurement, register it in MLflow, alias it `candidate`, and promote
it to `champion` when it passes the accuracy gate.

The choice: among variants that built and stayed within the accuracy budget (a variant over budget is
never registered, not even when forced), the one with the most samples/s (median latency) at the
recipe's target batch size on the provider the server will use; p90 latency breaks a tie. Timings on a
shared machine are noisy, so when the runner-up is within ``remeasure_margin`` of the leader the two
are measured again here, interleaved round by round, with the sessions the server would build (the
recipe's ``serve.runtime``: threads, spinning, provider options), and the pooled median decides.
Every candidate's numbers and the reason are written to registration.json and the version's tags.
fp32 is always eligible, so a quantized variant wins only when it is measurably faster.

An imported file (``stages.import_onnx``) is registered like an export: its lineage is the import report
(source file, its sha256) instead of a training run, and variants judged by agreement with fp32 (no
labels) carry that agreement in their tags. A graph with a fixed batch dimension is chosen and
registered at that batch size whatever ``target_batch_size`` says (registration.json has both).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from stages import dataset, timing
from stages.common import StageError, read_json, write_json
from stages.onnx_model import IMPORTED_FAMILY, ModelMeta, OnnxModel
from stages.predictors import OrtPredictor
from stages.sessions import CPU_EP, CUDA_EP, SessionSettings, cuda_available
from stages.contract import RunDir, Tracker


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    model_name: str = ""  # registered model name; empty: the recipe's name
    variant: str = "auto"  # auto: fastest within budget; or a variant name to force
    target_batch_size: int = 256  # the batch size the choice is made at (must be among benchmark.batch_sizes)
    promote: bool = True  # set `champion` when the gate passes
    remeasure_margin: float = 0.10  # re-measure the top two when their samples/s differ by less than this fraction
    remeasure_rounds: int = 6  # interleaved rounds of the re-measure (0: never re-measure)
    remeasure_seconds: float = 0.5  # per variant per round

    def __post_init__(self) -> None:
        if self.target_batch_size < 1:
            raise ValueError(f"`target_batch_size` must be >= 1, got {self.target_batch_size}")
        if not 0 <= self.remeasure_margin < 1:
            raise ValueError(f"`remeasure_margin` must be in [0, 1), got {self.remeasure_margin}")
        if self.remeasure_rounds < 0 or self.remeasure_seconds <= 0:
            raise ValueError(f"`remeasure_rounds` must be >= 0 and `remeasure_seconds` > 0, got "
                             f"{self.remeasure_rounds}, {self.remeasure_seconds}")


@dataclass(frozen=True)
class Result:
    variant: str
    reason: str
    accuracy: float | None
    name: str
    version: str | None
    aliases: list[str]
    candidates: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        where = f"{self.name} v{self.version} @{','.join(self.aliases)}" if self.version else "not registered (no tracking)"
        return f"{self.variant} -> {where}"


def eligible(variants: dict) -> set[str]:
    """Variants that built and stayed within the accuracy budget (and that quantize calls eligible, where it says)."""
    return {n for n, v in variants.items() if v.get("ok") and v.get("within_budget") and v.get("eligible", True)}


def serving_provider(rows: list[dict], device: str = "auto") -> str:
    """The provider the server will run on: CPU when its device is cpu, else CUDA where it is usable and benchmarked."""
    if device == "cpu":
        return CPU_EP
    return CUDA_EP if cuda_available() and any(r["provider"] == CUDA_EP for r in rows) else CPU_EP


def candidates(variants: dict, rows: list[dict], config: Config, provider: str) -> list[dict]:
    """Every variant's numbers at the target batch on ``provider``, best first (eligible ones before the
    rest; samples/s descending, p90 ascending on a tie)."""
    ok = eligible(variants)
    timed = {r["variant"]: r for r in rows if r["engine"] == "onnxruntime" and r["provider"] == provider
             and r["batch_size"] == config.target_batch_size}
    table = []
    for name, v in variants.items():
        r = timed.get(name)
        table.append({"variant": name, "eligible": name in ok, "within_budget": bool(v.get("within_budget")),
                      "ok": bool(v.get("ok")), "accuracy": v.get("accuracy"), "delta_points": v.get("delta_points"),
                      "median_ms": r and r["median_ms"], "p90_ms": r and r.get("p90_ms"),
                      "samples_per_s": r and r.get("samples_per_s", r["batch_size"] / (r["median_ms"] / 1e3))})
    return sorted(table, key=lambda c: (not c["eligible"], c["samples_per_s"] is None,
                                        -(c["samples_per_s"] or 0), c["p90_ms"] or 0))


def choose(variants: dict, rows: list[dict], config: Config, device: str = "auto") -> tuple[str, str]:
    """-> (variant name, why) from the benchmark rows alone. Raises StageError when nothing is eligible."""
    ok = eligible(variants)
    if config.variant != "auto":
        if config.variant not in ok:
            raise StageError(f"register.variant={config.variant!r} is not an eligible variant (a variant must build and "
                             f"stay within the accuracy budget); eligible: {sorted(ok)}")
        return config.variant, f"forced by register.variant={config.variant}"
    provider = serving_provider(rows, device)
    table = candidates(variants, rows, config, provider)
    ranked = [c for c in table if c["eligible"] and c["samples_per_s"] is not None]
    if not ranked:
        raise StageError(f"no benchmark row at batch size {config.target_batch_size} on {provider} for eligible variants "
                         f"{sorted(ok)}; add {config.target_batch_size} to benchmark.batch_sizes")
    return ranked[0]["variant"], why_text(table, provider, config.target_batch_size)


def why_text(table: list[dict], provider: str, batch: int, remeasured: dict | None = None) -> str:
    ranked = [c for c in table if c["eligible"] and c["samples_per_s"] is not None]
    fmt = lambda c: f"{c['variant']} {c['samples_per_s']:,.0f} samples/s ({c['median_ms']:.3f} ms, p90 {c['p90_ms'] or 0:.3f})"
    if remeasured:
        results = remeasured["results"]
        winner = min(results, key=lambda n: (results[n]["median_ms"], results[n]["p90_ms"]))
        text = (f"most samples/s within the accuracy budget at batch {batch} on {provider}, re-measured: the top two were "
                f"within the re-measure margin, so they ran again in {remeasured['rounds']} interleaved rounds with the "
                f"server's session settings ({_settings_text(remeasured['session'])}): "
                + ", ".join(f"{n} {r['samples_per_s']:,.0f} samples/s ({r['median_ms']:.3f} ms)" for n, r in results.items())
                + f"; {winner} wins. Benchmark: " + ", ".join(fmt(c) for c in ranked))
    else:
        text = (f"most samples/s within the accuracy budget at batch {batch} on {provider}: {fmt(ranked[0])}"
                + (f"; then {', '.join(fmt(c) for c in ranked[1:])}" if ranked[1:] else ""))
    excluded = [c for c in table if not c["eligible"]]
    if excluded:
        text += "; not eligible: " + ", ".join(
            f"{c['variant']} ({'failed to build' if not c['ok'] else 'over the accuracy budget'})" for c in excluded)
    return text


def _settings_text(session: dict) -> str:
    return f"intra-op threads {session['intra_op_threads']}, spinning {'on' if session['allow_spinning'] else 'off'}"


def remeasure(names: list[str], paths: dict, x_raw: np.ndarray, config: Config, settings: SessionSettings) -> dict:
    """The top two again, interleaved round by round on fresh sessions built with ``settings`` (the
    server's); -> per-variant summary."""
    xb = np.resize(x_raw, (config.target_batch_size, *x_raw.shape[1:]))
    calls = {}
    for name in names:
        predictor = OrtPredictor(paths[name], settings=settings)
        meta = OnnxModel(predictor).meta
        x = meta.feed(xb)[meta.input.name]  # what the file takes (raw when its graph normalizes)
        timing.measure(lambda p=predictor, x=x: p.predict(x), warmup=10, min_runs=0, max_seconds=0)
        calls[name] = lambda p=predictor, x=x: p.predict(x)
    times = timing.interleaved(calls, rounds=config.remeasure_rounds, min_runs=10 * config.remeasure_rounds,
                               min_seconds=config.remeasure_seconds * config.remeasure_rounds,
                               max_seconds=4 * config.remeasure_seconds * config.remeasure_rounds)
    return {"rounds": config.remeasure_rounds, "session": settings.describe(),
            "results": {n: timing.summarize(t, config.target_batch_size) for n, t in times.items()}}


def goal_check(name: str, rows: list[dict], provider: str, batch: int) -> dict:
    """The chosen variant against ONNX Runtime fp32 at the target batch and against PyTorch eager at batch 1."""
    def sps(variant, engine, bs, prov):
        return next((r["samples_per_s"] for r in rows if r["variant"] == variant and r["engine"] == engine
                     and r["batch_size"] == bs and r["provider"] == prov), None)

    torch_provider = "torch-cuda" if provider == CUDA_EP else "torch-cpu"
    out = {}
    chosen_t, fp32_t = sps(name, "onnxruntime", batch, provider), sps("fp32", "onnxruntime", batch, provider)
    if chosen_t and fp32_t:
        out[f"speedup_vs_onnxruntime_fp32_at_batch_{batch}"] = chosen_t / fp32_t
    chosen_1, torch_1 = sps(name, "onnxruntime", 1, provider), sps("torch", "torch-eager", 1, torch_provider)
    if chosen_1 and torch_1:
        out["speedup_vs_torch_eager_at_batch_1"] = chosen_1 / torch_1
    return out


def run(config: Config, rundir: "RunDir", tracker: "Tracker", *, recipe_name: str, pipeline_run_id: str | None = None,
        serving: SessionSettings = SessionSettings()) -> Result:
    """``serving``: the sessions the server will build (the recipe's ``serve.runtime``); the provider is
    chosen by ``serving.device`` and the benchmark rows, re-measures and the registered example use them."""
    tracker.log_params(config.__dict__)
    report = read_json(rundir.variants, "quantize")
    rows = read_json(rundir.benchmark_json, "benchmark")["rows"]
    variants = report["variants"]
    paths = {n: rundir.root / v["file"] if v.get("file") else rundir.variant(n) for n, v in variants.items()}
    fp32_meta = ModelMeta.read(paths.get("fp32", rundir.onnx))
    requested_batch = config.target_batch_size
    if fp32_meta.fixed_batch is not None and config.target_batch_size != fp32_meta.fixed_batch:
        log.warning("register.target_batch_size %d does not apply: the model takes batches of exactly %d; choosing "
                    "at batch %d", config.target_batch_size, fp32_meta.fixed_batch, fp32_meta.fixed_batch)
        config = dataclasses.replace(config, target_batch_size=fp32_meta.fixed_batch)
    data = dataset.load(rundir.data, rundir.dataset)
    x_raw, _ = data.split("test", normalized=False)
    provider = serving_provider(rows, serving.device)
    # The server's sessions on the chosen provider (its device may say auto; the provider is decided).
    serving = dataclasses.replace(serving, device="cuda" if provider == CUDA_EP else "cpu")
    name, why = choose(variants, rows, config, serving.device)
    table = candidates(variants, rows, config, provider)
    remeasured = None
    ranked = [c for c in table if c["eligible"] and c["samples_per_s"] is not None]
    if config.variant == "auto" and len(ranked) >= 2 and config.remeasure_rounds > 0 \
            and ranked[1]["samples_per_s"] >= ranked[0]["samples_per_s"] * (1 - config.remeasure_margin):
        top = [ranked[0]["variant"], ranked[1]["variant"]]
        log.info("%s and %s are within %.0f%% at batch %d: measuring both again, interleaved", *top,
                 config.remeasure_margin * 100, config.target_batch_size)
        remeasured = remeasure(top, paths, x_raw, config, serving)
        name = min(top, key=lambda n: (remeasured["results"][n]["median_ms"], remeasured["results"][n]["p90_ms"]))
        why = why_text(table, provider, config.target_batch_size, remeasured)
    chosen = variants[name]
    goal = goal_check(name, rows, provider, config.target_batch_size)
    log.info("chose %s: %s", name, why)

    path = paths[name]
    predictor = OrtPredictor(path, settings=serving)
    meta = OnnxModel(predictor).meta
    feeds = meta.feed(x_raw[:meta.fixed_batch or 2])  # what the file takes (raw when its graph normalizes)
    outputs = predictor.run(feeds)
    x_example = feeds if len(feeds) > 1 else feeds[meta.input.name]
    y_example = outputs if len(outputs) > 1 else next(iter(outputs.values()))
    imported = fp32_meta.family == IMPORTED_FAMILY
    if imported:  # lineage: the imported file, not a training run and an export
        origin = read_json(rundir.import_report, "import")
        checkpoint_meta, export_report = {}, {"exporter": f"imported ({origin.get('producer') or 'unknown producer'})"}
    else:
        checkpoint_meta = read_json(rundir.checkpoint_json, "train")
        export_report = read_json(rundir.export_report, "export")
    fp32_acc, budget = report.get("fp32_accuracy"), report.get("accuracy_budget_points")
    accuracy = chosen.get("accuracy")
    gate = bool(chosen.get("within_budget"))  # eligibility already required it; the gate restates it for promotion
    registered_name = config.model_name or recipe_name
    labels = data.info.get("label_names") or data.info.get("target_names") or []
    tags = {
        "variant": name,
        "test_accuracy": f"{accuracy:.6f}" if accuracy is not None else "",
        "fp32_test_accuracy": f"{fp32_acc:.6f}" if fp32_acc is not None else "",
        "accuracy_budget_points": str(budget),
        "choice": why[:5000],
        "onnx_sha256": chosen.get("sha256", ""),
        "exporter": export_report["exporter"],
        "input.dtype": meta.input.dtype or "",
        "preprocessing_in_graph": str(meta.preprocessing.applied_in_graph),
        "training_run_id": str(checkpoint_meta.get("run_id") or ""),
        "pipeline_run_id": str(pipeline_run_id or ""),
        "dataset_sha256": data.info["sha256"],
        "dataset_source": data.info["source"],
        "labels": json.dumps(labels),
        **{k: f"{v:.3f}" for k, v in goal.items()},
    }
    if imported:
        labels = list(meta.labels)
        tags.update({"labels": json.dumps(labels), "source": "imported", "import.source": origin.get("source", ""),
                     "import.sha256": origin.get("sha256", ""), "import.batch": json.dumps(origin.get("batch", {})),
                     "task": meta.task})
    if report.get("judged_by"):
        tags["judged_by"] = report["judged_by"]
    if report.get("judged_by") == "agreement with fp32":  # no labels: the gate is agreement with the fp32 file
        tags.update({f"metric.{report['metric']}": f"{chosen['metric']['value']:.6f}",
                     "agreement_budget": f"{report['budget']} {report['budget_unit']}"})
    if fp32_meta.fixed_batch is not None:
        tags["fixed_batch"] = str(fp32_meta.fixed_batch)
    description = (f"{name} variant of the {recipe_name} recipe's model; test accuracy "
                   f"{accuracy if accuracy is not None else 'n/a'} (fp32 {fp32_acc}, budget {budget} points). Chosen as {why}.")
    if report.get("judged_by") == "agreement with fp32":
        description = (f"{name} variant of the {recipe_name} recipe's {'imported ' if imported else ''}model; "
                       f"{report['metric']} with fp32 {chosen['metric']['value']:.4f} on the test split (budget "
                       f"{report['budget']} {report['budget_unit']}, no labels). Chosen as {why}.")
    registered = tracker.register_onnx(onnx_path=path, registered_name=registered_name, input_example=x_example,
                                       output_example=y_example, providers=predictor.requested_providers,
                                       description=description, tags=tags)
    aliases = []
    if registered:
        tracker.set_alias(registered_name, "candidate", registered["version"])
        aliases.append("candidate")
        if config.promote and gate:
            tracker.set_alias(registered_name, "champion", registered["version"])
            aliases.append("champion")
        elif config.promote:
            log.warning("not promoted to champion: %s is outside the accuracy budget (%s)", name, budget)
    result = Result(variant=name, reason=why, accuracy=accuracy, name=registered_name,
                    version=registered["version"] if registered else None, aliases=aliases, candidates=table)
    write_json(rundir.registration, {**result.__dict__, "provider": provider, "target_batch_size": config.target_batch_size,
                                     "target_batch_size_requested": requested_batch, "fixed_batch": fp32_meta.fixed_batch,
                                     "remeasured": remeasured, "session": serving.describe(), "goal": goal, "gate_passed": gate,
                                     "registered": registered, "tags": tags})
    tracker.set_tags({"providers.requested": ",".join(predictor.requested_providers),
                      "providers.active": ",".join(predictor.providers),
                      "registered.name": registered_name, "registered.version": str(result.version),
                      "registered.variant": name, "registered.aliases": ",".join(aliases)})
    tracker.log_metrics({**({"registered_accuracy": accuracy} if accuracy is not None else {}), **goal,
                         **{f"candidate_samples_per_s.{c['variant']}": c["samples_per_s"] for c in table
                            if c["samples_per_s"] is not None}})
    tracker.log_artifact(rundir.registration)
    return result
