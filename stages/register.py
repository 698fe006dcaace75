"""register: choose a variant by measurement, register it in MLflow, alias it `candidate`, and promote
it to `champion` when it passes the accuracy gate.

The choice: among variants that built and stayed within the accuracy budget (a variant over budget is
never registered, not even when forced), the best by the recipe's ``register.objective`` on the
provider the server will use; p90 latency breaks a tie. Objectives:

- ``serving`` (default): the load the server will really see. Its batcher forms batches of 1 row (a
  lone client) up to ``serve.batching.max_batch_size`` (a crowd), never more, so the score is the
  geometric mean of samples/s over the benchmarked batch sizes within that range (batch 1's is
  1 / its latency): a variant that wins only at batch 256, which the server never runs, does not win.
- ``batch-1-latency``: the lowest median latency at batch 1 (one request at a time).
- ``throughput@N``: the most samples/s at batch N (offline scoring; N must be benchmarked).
  (``target_batch_size: N``, the old spelling, means ``throughput@N``.)

Timings on a shared machine are noisy, so when the runner-up is within ``remeasure_margin`` of the
leader the two are measured again here at the objective's batch sizes, interleaved round by round,
with the sessions the server would build (the recipe's ``serve.runtime``: threads, spinning,
provider options), and the pooled medians decide.
Every candidate's numbers and the reason are written to registration.json and the version's tags.
fp32 is always eligible, so a quantized variant wins only when it is measurably faster.

An imported file (``stages.import_onnx``) is registered like an export: its lineage is the import report
(source file, its sha256) instead of a training run, and variants judged by agreement with fp32 (no
labels) carry that agreement in their tags. A graph with a fixed batch dimension is chosen and
registered at that batch size whatever ``objective`` says (registration.json has both).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np

from stages import dataset, timing
from stages.common import BadFile, StageError, read_json, sha256_file, write_json
from stages.onnx_model import IMPORTED_FAMILY, ModelMeta, OnnxModel
from stages.predictors import OrtPredictor
from stages.sessions import CPU_EP, CUDA_EP, SessionSettings, cuda_available
from stages.contract import RunDir, Tracker


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    model_name: str = ""  # registered model name; empty: the recipe's name
    variant: str = "auto"  # auto: best by the objective within budget; or a variant name to force
    objective: str = "serving"  # serving | batch-1-latency | throughput@N (see the module docstring)
    target_batch_size: int = 0  # deprecated: N > 0 means objective throughput@N
    promote: bool = True  # set `champion` when the gate passes
    remeasure_margin: float = 0.10  # re-measure the top two when their samples/s differ by less than this fraction
    remeasure_rounds: int = 6  # interleaved rounds of the re-measure (0: never re-measure)
    remeasure_seconds: float = 0.5  # per variant per round

    def __post_init__(self) -> None:
        if isinstance(self.target_batch_size, bool) or not isinstance(self.target_batch_size, int) \
                or self.target_batch_size < 0:
            raise ValueError(f"`target_batch_size` must be an integer >= 1 (or 0: unset), got {self.target_batch_size}")
        if self.target_batch_size:
            if self.objective not in ("serving", f"throughput@{self.target_batch_size}"):
                raise ValueError(f"`target_batch_size` ({self.target_batch_size}) and `objective` "
                                 f"({self.objective}) disagree; keep only objective")
            object.__setattr__(self, "objective", f"throughput@{self.target_batch_size}")
        parse_objective(self.objective)
        if not 0 <= self.remeasure_margin < 1:
            raise ValueError(f"`remeasure_margin` must be in [0, 1), got {self.remeasure_margin}")
        if self.remeasure_rounds < 0 or self.remeasure_seconds <= 0:
            raise ValueError(f"`remeasure_rounds` must be >= 0 and `remeasure_seconds` > 0, got "
                             f"{self.remeasure_rounds}, {self.remeasure_seconds}")


OBJECTIVES = "serving, batch-1-latency or throughput@N (N a benchmarked batch size)"


def parse_objective(objective: str) -> tuple[str, int | None]:
    """-> (kind, N): ("serving", None), ("latency", 1) or ("throughput", N). ValueError naming the choices."""
    if objective == "serving":
        return "serving", None
    if objective == "batch-1-latency":
        return "latency", 1
    m = re.fullmatch(r"throughput@([1-9][0-9]*)", str(objective))
    if m:
        return "throughput", int(m.group(1))
    raise ValueError(f"`objective` must be {OBJECTIVES}, got {objective!r}")


def objective_batches(config: "Config", rows: list[dict], max_batch_size: int) -> list[int]:
    """The batch sizes the objective scores: [N] for throughput@N, [1] for batch-1-latency, and for
    serving every benchmarked batch size from 1 up to the server's max_batch_size."""
    kind, n = parse_objective(config.objective)
    if kind != "serving":
        return [n]
    sizes = sorted({r["batch_size"] for r in rows if r["engine"] == "onnxruntime" and r["batch_size"] <= max_batch_size})
    if not sizes:
        raise StageError(f"register.objective serving scores the batch sizes the server forms (1 to "
                         f"serve.batching.max_batch_size = {max_batch_size}), but benchmark.batch_sizes has none of "
                         "them; add 1 and a size up to it (e.g. [1, 8, 64])")
    return sizes


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


def candidates(variants: dict, rows: list[dict], config: Config, provider: str, batches: list[int]) -> list[dict]:
    """Every variant's numbers on ``provider`` at the objective's ``batches``, best first (eligible ones
    before the rest; score descending, p90 ascending on a tie). ``samples_per_s`` is the score: the
    samples/s at the one batch, or for several the geometric mean of their samples/s; ``median_ms`` and
    ``p90_ms`` are at the first (smallest) batch."""
    ok = eligible(variants)
    timed = {(r["variant"], r["batch_size"]): r for r in rows if r["engine"] == "onnxruntime"
             and r["provider"] == provider and r["batch_size"] in batches}
    table = []
    for name, v in variants.items():
        per_batch = {b: _sps(timed[(name, b)]) for b in batches if (name, b) in timed}
        first = timed.get((name, batches[0]))
        score = _geomean(list(per_batch.values())) if len(per_batch) == len(batches) else None
        table.append({"variant": name, "eligible": name in ok, "within_budget": bool(v.get("within_budget")),
                      "ok": bool(v.get("ok")), "accuracy": v.get("accuracy"), "delta_points": v.get("delta_points"),
                      "median_ms": first and first["median_ms"], "p90_ms": first and first.get("p90_ms"),
                      "samples_per_s": score, "samples_per_s_by_batch": per_batch})
    return sorted(table, key=lambda c: (not c["eligible"], c["samples_per_s"] is None,
                                        -(c["samples_per_s"] or 0), c["p90_ms"] or 0))


def _sps(row: dict) -> float:
    return row.get("samples_per_s", row["batch_size"] / (row["median_ms"] / 1e3))


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def choose(variants: dict, rows: list[dict], config: Config, device: str = "auto",
           max_batch_size: int = 64) -> tuple[str, str]:
    """-> (variant name, why) from the benchmark rows alone (``max_batch_size``: the server's
    serve.batching.max_batch_size, for the serving objective). Raises StageError when nothing is eligible."""
    ok = eligible(variants)
    if config.variant != "auto":
        if config.variant not in ok:
            raise StageError(f"register.variant={config.variant!r} is not an eligible variant (a variant must build and "
                             f"stay within the accuracy budget); eligible: {sorted(ok)}")
        return config.variant, f"forced by register.variant={config.variant}"
    provider = serving_provider(rows, device)
    batches = objective_batches(config, rows, max_batch_size)
    table = candidates(variants, rows, config, provider, batches)
    ranked = [c for c in table if c["eligible"] and c["samples_per_s"] is not None]
    if not ranked:
        sizes = ", ".join(map(str, batches))
        raise StageError(f"no benchmark rows at batch size(s) {sizes} on {provider} for eligible variants "
                         f"{sorted(ok)} (register.objective {config.objective}); add {sizes} to benchmark.batch_sizes")
    return ranked[0]["variant"], why_text(table, provider, config.objective, batches)


def _objective_text(objective: str, batches: list[int]) -> str:
    if len(batches) == 1:
        return f"at batch {batches[0]}" + (" (batch-1 latency)" if objective == "batch-1-latency" else "")
    return (f"for serving (geometric mean of samples/s over batches {', '.join(map(str, batches))}, the sizes the "
            "server's batcher forms)")


def why_text(table: list[dict], provider: str, objective: str, batches: list[int], remeasured: dict | None = None) -> str:
    ranked = [c for c in table if c["eligible"] and c["samples_per_s"] is not None]
    fmt = lambda c: f"{c['variant']} {c['samples_per_s']:,.0f} samples/s ({c['median_ms']:.3f} ms, p90 {c['p90_ms'] or 0:.3f})"
    goal = _objective_text(objective, batches)
    if remeasured:
        results = remeasured["results"]
        winner = max(results, key=lambda n: (results[n]["samples_per_s"], -results[n]["p90_ms"]))
        text = (f"most samples/s within the accuracy budget {goal} on {provider}, re-measured: the top two were "
                f"within the re-measure margin, so they ran again in {remeasured['rounds']} interleaved rounds with the "
                f"server's session settings ({_settings_text(remeasured['session'])}): "
                + ", ".join(f"{n} {r['samples_per_s']:,.0f} samples/s ({r['median_ms']:.3f} ms)" for n, r in results.items())
                + f"; {winner} wins. Benchmark: " + ", ".join(fmt(c) for c in ranked))
    else:
        text = (f"most samples/s within the accuracy budget {goal} on {provider}: {fmt(ranked[0])}"
                + (f"; then {', '.join(fmt(c) for c in ranked[1:])}" if ranked[1:] else ""))
    excluded = [c for c in table if not c["eligible"]]
    if excluded:
        text += "; not eligible: " + ", ".join(
            f"{c['variant']} ({'failed to build' if not c['ok'] else 'over the accuracy budget'})" for c in excluded)
    return text


def _settings_text(session: dict) -> str:
    return f"intra-op threads {session['intra_op_threads']}, spinning {'on' if session['allow_spinning'] else 'off'}"


def remeasure(names: list[str], paths: dict, x_raw: np.ndarray, config: Config, settings: SessionSettings,
              batches: list[int]) -> dict:
    """The top two again at each of ``batches``, interleaved round by round on fresh sessions built with
    ``settings`` (the server's); -> per-variant summary (samples/s: geometric mean over the batches;
    latencies at the first batch)."""
    predictors = {name: OrtPredictor(paths[name], settings=settings) for name in names}
    per_batch: dict[str, dict[int, dict]] = {name: {} for name in names}
    for batch in batches:
        xb = np.resize(x_raw, (batch, *x_raw.shape[1:]))
        calls = {}
        for name, predictor in predictors.items():
            meta = OnnxModel(predictor).meta
            x = meta.feed(xb)[meta.input.name]  # what the file takes (raw when its graph normalizes)
            timing.measure(lambda p=predictor, x=x: p.predict(x), warmup=10, min_runs=0, max_seconds=0)
            calls[name] = lambda p=predictor, x=x: p.predict(x)
        seconds = config.remeasure_seconds * config.remeasure_rounds / len(batches)
        times = timing.interleaved(calls, rounds=config.remeasure_rounds, min_runs=10 * config.remeasure_rounds,
                                   min_seconds=seconds, max_seconds=4 * seconds)
        for name, t in times.items():
            per_batch[name][batch] = timing.summarize(t, batch)
    results = {}
    for name, by_batch in per_batch.items():
        first = by_batch[batches[0]]
        results[name] = {**first, "samples_per_s": _geomean([r["samples_per_s"] for r in by_batch.values()]),
                         "by_batch": by_batch}
    return {"rounds": config.remeasure_rounds, "batches": batches, "session": settings.describe(), "results": results}


def _check_unchanged(path, variant: dict) -> None:
    """The file to register must be the one quantize checked and measured (its sha256 in variants.json):
    a file changed since (truncated, corrupted, replaced) is never registered."""
    recorded = variant.get("sha256")
    if not recorded:
        return
    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        raise StageError(f"{path} not found; rerun `pipeline quantize` (or `pipeline run`)") from None
    if actual != recorded:
        raise BadFile(path, f"changed since quantize checked and measured it (sha256 {actual[:12]}, variants.json says "
                      f"{recorded[:12]}), so it is not registered", "rerun `pipeline quantize` (or `pipeline run`)")


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
        serving: SessionSettings = SessionSettings(), max_batch_size: int = 64) -> Result:
    """``serving``: the sessions the server will build (the recipe's ``serve.runtime``); the provider is
    chosen by ``serving.device`` and the benchmark rows, re-measures and the registered example use them.
    ``max_batch_size``: the largest batch the server's batcher forms (``serve.batching.max_batch_size``),
    which bounds the batch sizes the serving objective scores."""
    tracker.log_params(config.__dict__)
    report = read_json(rundir.variants, "quantize")
    rows = read_json(rundir.benchmark_json, "benchmark")["rows"]
    variants = report["variants"]
    paths = {n: rundir.root / v["file"] if v.get("file") else rundir.variant(n) for n, v in variants.items()}
    checked: set[str] = set()

    def check_unchanged(name: str) -> None:  # each file hashed once, however many steps read it
        if name not in checked:
            _check_unchanged(paths[name], variants[name])
            checked.add(name)

    if "fp32" in variants:  # its metadata decides the batch; a file changed since quantize is refused first
        check_unchanged("fp32")
    fp32_meta = ModelMeta.read(paths.get("fp32", rundir.onnx))
    requested_objective = config.objective
    fixed = fp32_meta.fixed_batch
    if fixed is not None and config.objective != f"throughput@{fixed}":
        log.warning("register.objective %s does not apply: the model takes batches of exactly %d; choosing by "
                    "throughput@%d", config.objective, fixed, fixed)
        config = dataclasses.replace(config, objective=f"throughput@{fixed}", target_batch_size=0)
    data = dataset.load(rundir.data, rundir.dataset)
    x_raw, _ = data.split("test", normalized=False)
    provider = serving_provider(rows, serving.device)
    # The server's sessions on the chosen provider (its device may say auto; the provider is decided).
    serving = dataclasses.replace(serving, device="cuda" if provider == CUDA_EP else "cpu")
    name, why = choose(variants, rows, config, serving.device, max_batch_size)
    batches = objective_batches(config, rows, max_batch_size)
    table = candidates(variants, rows, config, provider, batches)
    remeasured = None
    ranked = [c for c in table if c["eligible"] and c["samples_per_s"] is not None]
    if config.variant == "auto" and len(ranked) >= 2 and config.remeasure_rounds > 0 \
            and ranked[1]["samples_per_s"] >= ranked[0]["samples_per_s"] * (1 - config.remeasure_margin):
        top = [ranked[0]["variant"], ranked[1]["variant"]]
        for n in top:
            check_unchanged(n)
        log.info("%s and %s are within %.0f%% (%s): measuring both again, interleaved", *top,
                 config.remeasure_margin * 100, config.objective)
        remeasured = remeasure(top, paths, x_raw, config, serving, batches)
        results = remeasured["results"]
        name = max(top, key=lambda n: (results[n]["samples_per_s"], -results[n]["p90_ms"]))
        why = why_text(table, provider, config.objective, batches, remeasured)
    chosen = variants[name]
    goal = goal_check(name, rows, provider, max(batches))
    log.info("chose %s: %s", name, why)

    path = paths[name]
    check_unchanged(name)
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
    aliases = ["candidate", *(["champion"] if config.promote and gate else [])]
    # One call: the version is created with its tags and aliases and marked complete, or not at all.
    registered = tracker.register_onnx(onnx_path=path, registered_name=registered_name, input_example=x_example,
                                       output_example=y_example, providers=predictor.requested_providers,
                                       description=description, tags=tags, aliases=aliases)
    if not registered:
        aliases = []
    elif config.promote and not gate:
        log.warning("not promoted to champion: %s is outside the accuracy budget (%s)", name, budget)
    result = Result(variant=name, reason=why, accuracy=accuracy, name=registered_name,
                    version=registered["version"] if registered else None, aliases=aliases, candidates=table)
    write_json(rundir.registration, {**result.__dict__, "provider": provider, "objective": config.objective,
                                     "objective_requested": requested_objective, "fixed_batch": fixed,
                                     "objective_batch_sizes": batches, "target_batch_size": max(batches),
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
