"""Questions asked of the record: where did a registered model come from (``lineage``), what differs
between two runs (``compare``), and is the candidate better than the champion (``promote``).

All three read the MLflow store through pipeline/tracking.py (its configuration, and its one resolver
of model URIs and one download). ``lineage_record`` and ``compare_record`` return plain JSON-able values
(what `--json` prints), ``format_lineage`` / ``format_compare`` the text the CLI prints; ``promote``
returns a Verdict.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import tracking
from stages.common import StageError
from stages.onnx_model import OnnxModel

log = logging.getLogger(__name__)


def _client():
    from mlflow.tracking import MlflowClient

    tracking.configure()
    return MlflowClient()


def _run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _origin(client, run):
    """A reused stage run stands for the run it reused: follow ``pipeline.reused_from``."""
    seen = 0
    while run is not None and run.data.tags.get("pipeline.reused_from") not in (None, "", "untracked") and seen < 10:
        nxt = _run(client, run.data.tags["pipeline.reused_from"])
        if nxt is None:
            break
        run, seen = nxt, seen + 1
    return run


def stage_runs(client, parent_run_id: str) -> list:
    run = _run(client, parent_run_id)
    if run is None:
        return []
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"], max_results=200)
    return list(children)


def _download_text(client, run_id: str, path: str) -> str | None:
    import mlflow

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)
            return Path(local).read_text()
    except Exception:
        return None


def _when(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if ms else "?"


# ---------------------------------------------------------------- lineage

def lineage_record(uri: str) -> dict[str, Any]:
    """The chain from a registered version back to its data, as plain JSON-able values: version ->
    pipeline run -> stage runs -> checkpoint -> dataset digest and source, and the recipe. A link that
    is not in this store is None (its id is still given)."""
    import yaml

    mv = tracking.resolve_model(uri)
    if not mv.version:
        raise StageError(f"lineage follows a registered version, and {uri!r} names a run's file; pass "
                         "models:/NAME@ALIAS or models:/NAME/VERSION")
    client = _client()
    tags = dict(mv.tags)
    record: dict[str, Any] = {
        "uri": uri,
        "registered_model": {"name": mv.name, "version": str(mv.version), "aliases": list(mv.aliases),
                             "variant": tags.get("variant"), "test_accuracy": tags.get("test_accuracy"),
                             "onnx_sha256": tags.get("onnx_sha256"), "description": mv.description or "",
                             "source": mv.source,
                             "logged_model_id": tags.get("logged_model_id", mv.model_id or None),
                             "tags": tags},
        "pipeline_run_id": tags.get("pipeline_run_id") or None, "pipeline_run": None,
        "training_run_id": tags.get("training_run_id") or None, "training_run": None,
        "dataset": {"sha256": tags.get("dataset_sha256"), "source": tags.get("dataset_source")},
        "recipe": None,
    }
    parent = _run(client, record["pipeline_run_id"]) if record["pipeline_run_id"] else None
    if parent is not None:
        t = parent.data.tags
        stages = []
        for child in stage_runs(client, parent.info.run_id):
            origin = _origin(client, child)
            reused = origin is not None and origin.info.run_id != child.info.run_id
            stages.append({"stage": child.data.tags.get("pipeline.stage", child.info.run_name), "run_id": child.info.run_id,
                           "status": child.info.status, "reused_from": origin.info.run_id if reused else None,
                           "summary": child.data.tags.get("pipeline.summary", "")})
        record["pipeline_run"] = {"run_id": parent.info.run_id, "status": parent.info.status,
                                  "started": _when(parent.info.start_time), "git_commit": t.get("git.commit"),
                                  "git_dirty": t.get("git.dirty"), "host": t.get("host"),
                                  "resumes": t.get("pipeline.resumes") or None, "run_dir": t.get("pipeline.rundir"),
                                  "stages": stages}
        recipe = _download_text(client, parent.info.run_id, "recipe.yaml")
        record["recipe"] = yaml.safe_load(recipe) if recipe else None
    train = _run(client, record["training_run_id"]) if record["training_run_id"] else None
    if train is not None:
        meta = json.loads(_download_text(client, train.info.run_id, "checkpoint.json") or "{}")
        outputs = json.loads(train.data.tags.get("pipeline.outputs", "{}") or "{}")
        record["training_run"] = {
            "run_id": train.info.run_id, "status": train.info.status, "epoch": meta.get("epoch"),
            "val_accuracy": meta.get("val_accuracy"), "device": meta.get("train_device"),
            "model_family": meta.get("model", {}).get("family"), "checkpoint_sha256": outputs.get("checkpoint.pt"),
            "dataset_inputs": [{"name": di.dataset.name, "digest": di.dataset.digest, "source": _source(di.dataset.source),
                                "context": [t.value for t in di.tags]}
                               for di in (getattr(train.inputs, "dataset_inputs", None) or [])]}
        if meta.get("dataset_sha256"):
            record["dataset"] = {"sha256": meta["dataset_sha256"], "source": meta.get("dataset_source")}
    return record


def format_lineage(record: dict[str, Any]) -> str:
    """``lineage_record`` as the tree `pipeline lineage` prints."""
    import yaml

    mv = record["registered_model"]
    lines = [record["uri"],
             f"registered model {mv['name']} version {mv['version']} (aliases: {', '.join(mv['aliases']) or 'none'}; "
             f"variant {mv['variant'] or '?'}; test accuracy {mv['test_accuracy'] or '?'}; "
             f"onnx sha256 {(mv['onnx_sha256'] or '?')[:12]})",
             f"  description: {mv['description'] or '(none)'}",
             f"  source: {mv['source']}  logged model {mv['logged_model_id'] or '?'}"]
    parent = record["pipeline_run"]
    if parent is None:
        lines.append(f"  pipeline run: {record['pipeline_run_id'] or '(not recorded)'} not found in this store")
    else:
        lines.append(f"  └─ pipeline run {parent['run_id']} ({parent['status']}, started {parent['started']}, "
                     f"git {(parent['git_commit'] or '?')[:12]} dirty={parent['git_dirty'] or '?'}, host {parent['host'] or '?'})")
        if parent["resumes"]:
            lines.append(f"     resumes pipeline run {parent['resumes']}")
        lines.append(f"     run directory {parent['run_dir'] or '?'}")
        for s in parent["stages"]:
            how = f"reused run {s['reused_from']}" if s["reused_from"] else "ran"
            lines.append(f"     ├─ {s['stage']:<10} {s['run_id']} {s['status']:<8} {how}: {s['summary']}")
    train = record["training_run"]
    tags = record["registered_model"].get("tags") or {}
    if train is None and tags.get("source") == "imported":  # an existing ONNX file: no training run behind it
        lines.append(f"  └─ imported from {tags.get('import.source') or '?'} (sha256 {tags.get('import.sha256') or '?'}), "
                     "not trained here")
    elif train is None:
        lines.append(f"  checkpoint: training run {record['training_run_id'] or '(not recorded)'} not found in this store")
    else:
        q = lambda v: "?" if v is None else v  # noqa: E731
        lines.append(f"  └─ checkpoint from training run {train['run_id']} ({train['status']}): epoch {q(train['epoch'])}, "
                     f"val accuracy {q(train['val_accuracy'])}, device {q(train['device'])}, model {q(train['model_family'])}")
        if train["checkpoint_sha256"]:
            lines.append(f"     checkpoint.pt sha256 {train['checkpoint_sha256']}")
        for ds in train["dataset_inputs"]:
            lines.append(f"     └─ dataset {ds['name']} digest {ds['digest']} source {ds['source']} "
                         f"(MLflow dataset input, {', '.join(ds['context']) or 'no context'})")
    dataset = record["dataset"]
    if dataset["sha256"]:
        indent = "        " if train is not None else "  "
        lines.append(f"{indent}dataset sha256 {dataset['sha256']} source {dataset['source'] or '?'}")
    if record["recipe"]:
        lines.append("  recipe (recipe.yaml of the pipeline run):")
        lines += [f"    {line}" for line in yaml.safe_dump(record["recipe"], sort_keys=False).rstrip().splitlines()]
    return "\n".join(lines)


def _source(source: str) -> str:
    try:
        return json.loads(source).get("uri", source)
    except (json.JSONDecodeError, AttributeError):
        return source


# ---------------------------------------------------------------- compare

def _values(client, run) -> tuple[dict[str, str], dict[str, float]]:
    """A run's params and metrics; a pipeline run adds each stage run's, prefixed with the stage."""
    params = dict(run.data.params)
    metrics = dict(run.data.metrics)
    if run.data.tags.get("pipeline.kind") == "pipeline":
        for child in stage_runs(client, run.info.run_id):
            origin = _origin(client, child) or child
            stage = child.data.tags.get("pipeline.stage", child.info.run_name)
            params.update({f"{stage}.{k}": v for k, v in origin.data.params.items()})
            metrics.update({f"{stage}.{k}": v for k, v in origin.data.metrics.items() if not k.startswith("system/")})
    return params, metrics


def compare_record(run_a: str, run_b: str, show_all: bool = False) -> dict[str, Any]:
    """Params and metrics that differ between two runs (all of them with ``show_all``), like
    `dvc params diff` / `dvc metrics diff`: {"run_a", "run_b", "params": [{key, a, b}], "metrics":
    [{key, a, b, change}]}; a value one run lacks is None, ``change`` is b - a, "new" or "gone"."""
    client = _client()
    runs = []
    for rid in (run_a, run_b):
        run = _run(client, rid)
        if run is None:
            raise StageError(f"run {rid!r} is not in the store {tracking.shown_uri()}; pass MLflow run ids "
                             "(the parent `pipeline` run or a stage run)")
        runs.append(run)
    (pa, ma), (pb, mb) = _values(client, runs[0]), _values(client, runs[1])
    params = [{"key": k, "a": pa.get(k), "b": pb.get(k)} for k in sorted(set(pa) | set(pb))
              if show_all or pa.get(k) != pb.get(k)]
    metrics = []
    for key in sorted(set(ma) | set(mb)):
        a, b = ma.get(key), mb.get(key)
        same = a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
        if not same or show_all:
            change = b - a if a is not None and b is not None else "new" if a is None else "gone"
            metrics.append({"key": key, "a": a, "b": b, "change": change})
    return {"run_a": {"run_id": run_a, "run_name": runs[0].info.run_name},
            "run_b": {"run_id": run_b, "run_name": runs[1].info.run_name}, "params": params, "metrics": metrics}


def format_compare(record: dict[str, Any]) -> str:
    """``compare_record`` as the aligned table `pipeline compare` prints."""
    run_a, run_b = record["run_a"]["run_id"], record["run_b"]["run_id"]
    rows = [("Param", "RUN_A " + run_a[:8], "RUN_B " + run_b[:8], "")]
    rows += [(p["key"], "-" if p["a"] is None else p["a"], "-" if p["b"] is None else p["b"], "") for p in record["params"]]
    rows.append(("Metric", "", "", "change"))
    rows += [(m["key"], _fmt(m["a"]), _fmt(m["b"]), m["change"] if isinstance(m["change"], str) else f"{m['change']:+.6g}")
             for m in record["metrics"]]
    width = [max(len(str(r[i])) for r in rows) for i in range(4)]
    out = [f"{record['run_a']['run_name']} {run_a}  vs  {record['run_b']['run_name']} {run_b}"]
    for r in rows:
        if r[0] in ("Param", "Metric"):
            out.append("")
        out.append("  ".join(str(c).ljust(width[i]) for i, c in enumerate(r)).rstrip())
    if not record["params"]:
        out.insert(out.index(next(o for o in out if o.startswith("Metric"))) - 1, "(no params differ)")
    if not record["metrics"]:
        out.append("(no metrics differ)")
    return "\n".join(out)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.6g}"


# ---------------------------------------------------------------- promote

@dataclass(frozen=True)
class Verdict:
    candidate: str
    champion: str | None
    metric: str
    higher_is_better: bool
    candidate_value: float
    champion_value: float | None
    samples: int
    promoted: bool
    message: str


def _test_split(client, mv, dest: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """The candidate's raw test split: from its run directory when the content hash still matches,
    else from the data.npz its prepare run logged."""
    from stages import prepare

    tags = dict(mv.tags)
    want = tags.get("dataset_sha256", "")
    candidates: list[Path] = []
    parent = _run(client, tags.get("pipeline_run_id", "")) if tags.get("pipeline_run_id") else None
    if parent is not None and parent.data.tags.get("pipeline.rundir"):
        candidates.append(Path(parent.data.tags["pipeline.rundir"]) / "data.npz")
    if parent is not None:
        import mlflow

        for child in stage_runs(client, parent.info.run_id):
            if child.data.tags.get("pipeline.stage") == "prepare":
                origin = _origin(client, child) or child
                try:
                    candidates.append(Path(mlflow.artifacts.download_artifacts(
                        run_id=origin.info.run_id, artifact_path="data.npz", dst_path=str(dest))))
                except Exception:
                    pass
    for path in candidates:
        if not path.is_file():
            continue
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        if not want or prepare.content_hash(arrays) == want:
            return arrays["x_test"], arrays["y_test"], str(path)
    raise StageError(f"cannot find the test split of {mv.name} v{mv.version} (dataset sha256 {want[:12]}): its run "
                     "directory is gone and its prepare run logged no data.npz; rerun the pipeline")


def _aliases(name: str) -> dict[str, str]:
    """The aliases of a registered model (alias -> version); resolve_model has said it exists."""
    return dict(_client().get_registered_model(name).aliases or {})


def promote(name: str, force: bool = False) -> Verdict:
    """Make ``candidate`` the ``champion`` if it is at least as good on the candidate's test split."""
    cand = tracking.resolve_model(f"models:/{name}@candidate")
    champ = tracking.resolve_model(f"models:/{name}@champion") if "champion" in _aliases(name) else None
    client = _client()
    if champ is not None and champ.version == cand.version:
        return Verdict(cand.version, champ.version, "", True, math.nan, None, 0, False,
                       f"{name} v{cand.version} is already the champion")
    with tempfile.TemporaryDirectory() as tmp:
        x, y, where = _test_split(client, cand, Path(tmp))
        results = {}
        for label, mv in (("candidate", cand), ("champion", champ)):
            if mv is None:
                continue
            onnx_file = tracking.fetch_model(f"models:/{name}/{mv.version}", Path(tmp) / label).path
            # fed, run and scored as the file's own metadata says; one without it is refused
            results[label] = OnnxModel.open(onnx_file).score(x, y)
    primary = results["candidate"]
    metric, cv, higher = primary["name"], primary["value"], primary["higher_is_better"]
    if champ is None:
        verdict = Verdict(cand.version, None, metric, higher, cv, None, len(y), True,
                          f"no champion yet: {name} v{cand.version} ({metric} {cv:.4f} on {len(y)} test samples) "
                          "becomes the champion")
    else:
        hv = results["champion"]["value"]
        delta = cv - hv if higher else hv - cv  # > 0: the candidate is better
        points = f"{abs(delta) * 100:.2f} points" if metric == "accuracy" else f"{abs(delta):.4g}"
        comparison = (f"candidate v{cand.version} {metric} {cv:.4f} vs champion v{champ.version} {hv:.4f} "
                      f"on the candidate's test split ({len(y)} samples, {where})")
        if delta < 0 and not force:
            return Verdict(cand.version, champ.version, metric, higher, cv, hv, len(y), False,
                           f"refused: {comparison}: the candidate is worse by {points}; pass --allow-worse to promote it anyway")
        word = "better by" if delta > 0 else "equal" if delta == 0 else "worse by"
        verdict = Verdict(cand.version, champ.version, metric, higher, cv, hv, len(y), True,
                          f"promoted: {comparison}: {word}{' ' + points if delta else ''}"
                          + (" (forced)" if delta < 0 else ""))
    client.set_registered_model_alias(name, "champion", cand.version)
    client.set_model_version_tag(name, cand.version, "promotion", verdict.message[:5000])
    if champ is not None:
        client.set_model_version_tag(name, cand.version, "promoted_over_version", champ.version)
    return verdict
