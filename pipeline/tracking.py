"""The one room that speaks MLflow: the Tracker stages report to, the parent/nested run layout,
environment tags and registry helpers.

Stages receive a ``Tracker`` (``MlflowTracker`` for real runs, ``NullTracker`` when tracking is
off) and never import MLflow themselves. The default store is ``sqlite:///mlruns/mlflow.db`` with
artifacts under ``mlruns/artifacts/``; ``MLFLOW_TRACKING_URI`` overrides it (tests point it at a
temporary directory).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from stages.common import git_state, library_versions
from stages.contract import NullTracker, Tracker  # noqa: F401 - the conductor hands these to stages

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow rejects longer parameter values
MAX_TAG_LENGTH = 8000  # and longer tag values
SQLITE_BUSY_TIMEOUT_S = 60  # concurrent pipelines on one sqlite store wait for each other's writes this long


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------- the store

def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_dir(uri: str) -> Path | None:
    """Directory of a sqlite store's database file; artifacts go beside it."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser().resolve().parent


def configure() -> str:
    """Point MLflow at the store, creating the folder of a sqlite store. Returns the URI."""
    import mlflow

    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.models.model"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # "no GPU" is not news on a CPU box
    uri = tracking_uri()
    db_dir = _sqlite_dir(uri)
    if db_dir is not None:
        db_dir.mkdir(parents=True, exist_ok=True)
        _prepare_sqlite(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


_PREPARED: set[str] = set()


def _prepare_sqlite(uri: str) -> None:
    """Make a sqlite store safe for concurrent pipelines.

    Two processes creating a fresh store at once race through MLflow's schema migrations ("table
    already exists"), so the first creation is serialized with a file lock. The database is switched
    to WAL journaling (readers no longer block the writer; the setting lives in the file) and each
    connection waits up to SQLITE_BUSY_TIMEOUT_S for a write lock instead of failing at once.
    """
    import fcntl
    import sqlite3

    if uri in _PREPARED:
        return
    db = Path(uri[len("sqlite:///"):]).expanduser().resolve()
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")  # no pooled connections held between calls
    with open(db.parent / f".{db.name}.init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(uri, str(db.parent / "artifacts"))  # creates and migrates the schema once
        with contextlib.closing(sqlite3.connect(db, timeout=SQLITE_BUSY_TIMEOUT_S)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    _patch_sqlite_timeout()
    _PREPARED.add(uri)


def _patch_sqlite_timeout() -> None:
    """Give MLflow's sqlite connections a busy timeout (SQLAlchemy's default is 5 s)."""
    import sqlalchemy
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if getattr(_patch_sqlite_timeout, "done", False):
        return

    @event.listens_for(Engine, "connect")
    def _busy_timeout(dbapi_connection, connection_record):  # noqa: ARG001 - SQLAlchemy's signature
        if type(dbapi_connection).__module__.startswith("sqlite3"):
            dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")

    _patch_sqlite_timeout.done = True  # type: ignore[attr-defined]
    del sqlalchemy


def experiment_id(name: str) -> str:
    """Get or create the experiment; in a sqlite store its artifacts live under <store dir>/artifacts/."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    db_dir = _sqlite_dir(tracking_uri())
    location = (db_dir / "artifacts" / name).as_uri() if db_dir is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@functools.lru_cache(maxsize=1)
def _environment_tags() -> tuple:
    return tuple(_collect_environment_tags().items())


def environment_tags() -> dict[str, str]:
    """Where and with what a run ran: git commit (and dirty), host, library versions, device. Collected
    once per process (git and torch are asked once, not per stage run)."""
    return dict(_environment_tags())


def _collect_environment_tags() -> dict[str, str]:
    tags = {"host": socket.gethostname(), "python": platform.python_version(), "platform": platform.platform()}
    tags.update({f"version.{dist}": v for dist, v in library_versions().items()})
    tags.update(git_state())
    try:
        import torch

        tags["device.cuda_available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            tags["device.gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover - torch always installed
        pass
    return tags


# ---------------------------------------------------------------- runs

@dataclass
class MlflowTracker:
    """A Tracker bound to one MLflow run (the fluent active run while the stage runs)."""

    run_id: str
    _logged_params: set[str] = field(default_factory=set)
    final_metrics: dict[str, float] = field(default_factory=dict)  # logged without a step: one value per run

    def log_params(self, params):
        import mlflow

        flat = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items() if k not in self._logged_params}
        if flat:
            mlflow.log_params(flat)
            self._logged_params.update(flat)

    def log_metrics(self, metrics, step=None):
        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step)
            if step is None:
                self.final_metrics.update(clean)

    def log_artifact(self, path, artifact_path=None):
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags):
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dataset(self, *, name, digest, source, features, targets, context):
        import mlflow
        import mlflow.data

        dataset = mlflow.data.from_numpy(features, targets=targets, source=source, name=name, digest=digest[:36])
        mlflow.log_input(dataset, context=context)

    def register_onnx(self, *, onnx_path, registered_name, input_example, output_example, providers, description, tags):
        import mlflow
        import mlflow.onnx
        import onnx
        from mlflow.models import infer_signature
        from mlflow.tracking import MlflowClient

        model = onnx.load(str(onnx_path))
        signature = infer_signature(input_example, output_example)
        info = mlflow.onnx.log_model(
            onnx_model=model,
            name="model",
            signature=signature,
            input_example=input_example,
            registered_model_name=registered_name,
            onnx_execution_providers=providers,
            save_as_external_data=False,  # one self-contained .onnx file, like the run directory's
            metadata=dict(tags),
        )
        version = str(info.registered_model_version)
        client = MlflowClient()
        client.update_model_version(registered_name, version, description=description)
        for k, v in tags.items():
            client.set_model_version_tag(registered_name, version, k, str(v))
        # The version's LoggedModel carries its quality metrics, so the registry shows them beside it.
        metrics = {}
        for k, v in tags.items():
            with contextlib.suppress(TypeError, ValueError):
                if "accuracy" in k or k.startswith("metric"):
                    metrics[k] = float(v)
        if metrics and getattr(info, "model_id", None):
            mlflow.log_metrics(metrics, model_id=info.model_id)
            client.set_model_version_tag(registered_name, version, "logged_model_id", info.model_id)
        return {"name": registered_name, "version": version, "model_uri": info.model_uri,
                "registered_uri": f"models:/{registered_name}/{version}"}

    def set_alias(self, registered_name, alias, version):
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(registered_name, alias, version)


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None,
              system_metrics: bool = False) -> Iterator[MlflowTracker]:
    """An MLflow run that ends FINISHED on success, FAILED on error and KILLED on Ctrl-C or SIGTERM
    (both arrive as KeyboardInterrupt). Each run ends itself, innermost first, so a nested run's
    status never lands on its parent. ``system_metrics``: sample CPU, memory (and GPU) every second."""
    import mlflow

    if not nested:
        configure()
    exp_id = experiment_id(experiment)
    if system_metrics and not _has_psutil():
        log.warning("psutil is not installed: no system metrics for %s (pip install psutil)", run_name)
        system_metrics = False
    if system_metrics:
        mlflow.set_system_metrics_sampling_interval(1)  # seconds; a tiny training run lasts a few
        mlflow.set_system_metrics_samples_before_logging(1)
    run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested, tags=dict(tags or {}),
                           log_system_metrics=system_metrics or None)
    status = "FINISHED"
    try:
        yield MlflowTracker(run.info.run_id)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run.info.run_id:
            mlflow.end_run(status=status)
        else:  # not the active run any more (should not happen): end it by id
            MlflowClient_().set_terminated(run.info.run_id, status)


def _has_psutil() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def MlflowClient_():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def set_run_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    client = MlflowClient_()
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


# ---------------------------------------------------------------- reuse, stale runs, logged models

def find_stage_runs(experiment: str, stage: str, digest: str) -> list[tuple[str, dict, str]]:
    """FINISHED runs of ``stage`` with fingerprint ``digest``, newest first: (run id, outputs, summary)."""
    client = MlflowClient_()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=20,
                              filter_string=f"tags.`pipeline.fingerprint` = '{digest}' and "
                                            f"tags.`pipeline.stage` = '{stage}' and attributes.status = 'FINISHED'")
    found = []
    for r in runs:
        if "pipeline.reused_from" in r.data.tags:
            continue
        try:
            outputs = json.loads(r.data.tags.get("pipeline.outputs", "{}"))
        except json.JSONDecodeError:
            continue
        found.append((r.info.run_id, outputs, r.data.tags.get("pipeline.summary", "")))
    return found


def record_reused(experiment: str, stage: str, parent_run_id: str, source_run_id: str, digest: str,
                  summary: str) -> str:
    """A FINISHED nested run that says this stage was reused, and from which run (no work, no artifacts)."""
    client = MlflowClient_()
    run = client.create_run(experiment_id(experiment), run_name=stage, tags={
        "mlflow.parentRunId": parent_run_id, "pipeline.stage": stage, "pipeline.parent_run_id": parent_run_id,
        "pipeline.reused_from": source_run_id or "untracked", "pipeline.fingerprint": digest,
        "pipeline.summary": summary[:500], **environment_tags()})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def mark_killed(run_ids: list[str], reason: str) -> list[str]:
    """Mark the RUNNING ones among ``run_ids`` KILLED. Returns those marked."""
    from mlflow.exceptions import MlflowException

    client, marked = MlflowClient_(), []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        if run.info.status == "RUNNING":
            client.set_tag(run_id, "pipeline.killed_reason", reason)
            client.set_terminated(run_id, "KILLED")
            marked.append(run_id)
    if marked:
        log.warning("marked %d stale RUNNING run(s) KILLED: %s", len(marked), ", ".join(marked))
    return marked


def mark_killed_by_rundir(rundir: str, host: str, reason: str) -> list[str]:
    """Mark KILLED every RUNNING run that used ``rundir`` on ``host``: call only while holding its lock,
    when no live process can be using it."""
    client = MlflowClient_()
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return []
    quoted = rundir.replace("'", "\\'")
    runs = client.search_runs(exp_ids, filter_string=f"attributes.status = 'RUNNING' and "
                                                     f"tags.`pipeline.rundir` = '{quoted}' and tags.host = '{host}'")
    return mark_killed([r.info.run_id for r in runs], reason)


def registration_missing(result: Mapping[str, Any]) -> str | None:
    """None when the registered version a register stamp names still exists in this store."""
    from mlflow.exceptions import MlflowException

    name, version = result.get("name"), result.get("version")
    if not name or not version:
        return "the earlier register run registered nothing in this store"
    try:
        MlflowClient_().get_model_version(name, str(version))
    except MlflowException:
        return f"registered version {name} v{version} is not in this store"
    return None


def log_dataset_input(rundir, context: str) -> None:
    """The run directory's dataset as an MLflow dataset input of the active run (digest, source, schema)."""
    import mlflow
    import numpy as np

    info = json.loads(Path(rundir.dataset).read_text())
    with np.load(rundir.data, allow_pickle=False) as f:
        x, y = f["x_train"], f["y_train"]
    dataset = mlflow.data.from_numpy(x, targets=y, source=info.get("source", "unknown"), name=info.get("name", "dataset"),
                                     digest=str(info.get("sha256", ""))[:36])
    mlflow.log_input(dataset, context=context)


def log_stage_models(rundir, stage: str, writes: tuple[str, ...], evaluates: tuple[str, ...],
                     upstream_models: Mapping[str, str], final_metrics: Mapping[str, float]) -> dict[str, str]:
    """Log the model files a stage wrote as MLflow LoggedModels of the active run, and link the stage's
    one-value metrics to the models they describe: a metric naming a model's tag as a dot-separated part
    (``accuracy.int8-static``) goes to that model; the others go to the stage's only model, if it has
    one. Returns file -> model id."""
    import mlflow

    def paths(names):
        out = []
        for name in names:
            value = getattr(rundir, name)
            out.extend(value if isinstance(value, (list, tuple)) else [value])
        return [Path(p) for p in out if Path(p).is_file()]

    run = mlflow.active_run()
    written = paths(writes)
    read = [p for p in paths(evaluates) if p.name in upstream_models]
    models: dict[str, str] = {}
    for path in written:
        tag = rundir.model_tag(path)
        from stages.common import sha256_file

        model = mlflow.initialize_logged_model(
            name=tag, source_run_id=run.info.run_id if run else None,
            model_type="onnx" if path.suffix == ".onnx" else "pytorch-checkpoint",
            tags={"file": path.name, "sha256": sha256_file(path), "stage": stage})
        try:
            MlflowClient_().log_model_artifact(model.model_id, str(path))
            if path == Path(rundir.checkpoint) and Path(rundir.checkpoint_json).is_file():
                MlflowClient_().log_model_artifact(model.model_id, str(rundir.checkpoint_json))
        except Exception:
            mlflow.finalize_logged_model(model.model_id, "FAILED")
            raise
        mlflow.finalize_logged_model(model.model_id, "READY")
        models[path.name] = model.model_id
    targets = {p.name: models.get(p.name) or upstream_models[p.name] for p in [*written, *read]}
    untagged = dict(final_metrics)
    for name, model_id in targets.items():
        tag = rundir.model_tag(rundir.root / name)
        mine = {k: v for k, v in final_metrics.items() if tag in k.split(".")}
        for k in mine:
            untagged.pop(k, None)
        if mine:
            mlflow.log_metrics(mine, model_id=model_id)
    if untagged and len(targets) == 1:
        mlflow.log_metrics(untagged, model_id=next(iter(targets.values())))
    if models:
        from mlflow.entities import LoggedModelOutput

        mlflow.log_outputs([LoggedModelOutput(model_id=m, step=0) for m in models.values()])
    return models


# ---------------------------------------------------------------- checkpoints of earlier runs

def looks_like_run_id(ref: str) -> bool:
    """MLflow run ids are 32 lowercase hex digits."""
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def download_checkpoint(run_id: str, dest: Path) -> Path:
    """The checkpoint.pt a training run logged, downloaded under ``dest``. A pipeline's parent run is
    followed to its nested train run. Raises ValueError naming the fix."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure()
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(f"no MLflow run {run_id} in the store {tracking_uri()}; pass a checkpoint path "
                         "or the id of a train run (see `make ui`)") from None
    candidates = [run_id]
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`pipeline.stage` = 'train'")
    candidates += [c.info.run_id for c in children]
    for candidate in candidates:
        if any(a.path == "checkpoint.pt" for a in client.list_artifacts(candidate)):
            local = mlflow.artifacts.download_artifacts(run_id=candidate, artifact_path="checkpoint.pt",
                                                        dst_path=str(dest))
            log.info("checkpoint of run %s downloaded to %s", candidate, local)
            return Path(local)
    raise ValueError(f"MLflow run {run_id} ({run.info.run_name}) logged no checkpoint.pt; pass the id of a "
                     "train run or of a whole pipeline run")


# ---------------------------------------------------------------- the registry

@dataclass(frozen=True)
class RegisteredOnnx:
    """A registered ONNX model fetched to local disk, with what the registry says about it."""

    path: Path
    name: str
    version: str
    tags: dict[str, str]
    run_id: str | None


def fetch_registered_onnx(uri: str, dest: Path | None = None) -> RegisteredOnnx:
    """Resolve ``models:/NAME@alias`` or ``models:/NAME/VERSION`` and download its .onnx file."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure()
    body = uri[len("models:/"):] if uri.startswith("models:/") else ""
    if not body:
        raise ValueError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient()
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = body.partition("/")
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise ValueError(f"cannot resolve {uri!r} in the store {tracking_uri()}: {e.message}; "
                         "run `make all` (or `pipeline run`) to register a model, or pass --model PATH.onnx") from None
    dest = Path(dest or tempfile.mkdtemp(prefix="onnx-pipeline-serve-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dest)))
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local]
    if not found:
        raise ValueError(f"{uri!r} (version {mv.version}) holds no .onnx file")
    return RegisteredOnnx(path=found[0], name=mv.name, version=str(mv.version), tags=dict(mv.tags), run_id=mv.run_id)
