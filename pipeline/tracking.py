"""The one room that speaks MLflow: the Tracker stages report to, the parent/nested run layout,
environment tags and registry helpers.

Stages receive a ``Tracker`` (``MlflowTracker`` for real runs, ``NullTracker`` when tracking is
off) and never import MLflow themselves. The default store is ``sqlite:///mlruns/mlflow.db`` with
artifacts under ``mlruns/artifacts/``; ``MLFLOW_TRACKING_URI`` overrides it (tests point it at a
temporary directory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

from stages.common import git_state, library_versions

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow rejects longer parameter values


class Tracker(Protocol):
    """What a stage may record. Every method is safe to call on a NullTracker."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_dataset(self, *, name: str, digest: str, source: str, features: Any, targets: Any, context: str) -> None: ...
    def register_onnx(self, *, onnx_path: Path, registered_name: str, input_example: Any, output_example: Any,
                      providers: list[str], description: str, tags: Mapping[str, str]) -> dict | None: ...
    def set_alias(self, registered_name: str, alias: str, version: str) -> None: ...


class NullTracker:
    """Records nothing: for tests of a single stage and for `--no-track`."""

    run_id: str | None = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def log_dataset(self, **kwargs):
        pass

    def register_onnx(self, **kwargs):
        return None

    def set_alias(self, registered_name, alias, version):
        pass


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
    uri = tracking_uri()
    db_dir = _sqlite_dir(uri)
    if db_dir is not None:
        db_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


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


def environment_tags() -> dict[str, str]:
    """Where and with what a run ran: git commit, host, library versions, device."""
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
        return {"name": registered_name, "version": version, "model_uri": info.model_uri,
                "registered_uri": f"models:/{registered_name}/{version}"}

    def set_alias(self, registered_name, alias, version):
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(registered_name, alias, version)


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None
              ) -> Iterator[MlflowTracker]:
    """An MLflow run that ends FINISHED on success, FAILED on error and KILLED on Ctrl-C."""
    import mlflow

    if not nested:
        configure()
    exp_id = experiment_id(experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested, tags=dict(tags or {})) as run:
        try:
            yield MlflowTracker(run.info.run_id)
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise


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
