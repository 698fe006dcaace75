"""The one room that speaks MLflow: the Tracker stages report to, the Recorder the orchestrator keeps
its books with, environment tags, and the one resolver of model URIs.

Stages receive a ``Tracker`` (``MlflowTracker`` for real runs, ``NullTracker`` when tracking is
off) and never import MLflow themselves. The orchestrator records through a ``Recorder``
(``MlflowRecorder``: one parent run per pipeline, one run per stage; ``NullRecorder`` for
``--no-track``). ``resolve_model`` / ``fetch_model`` turn ``models:/`` and ``runs:/`` URIs into a
registered version and its .onnx file for lineage, promote, serve and package; what cannot be
resolved is a StageError naming the URI, the store (password redacted) and the fix.

The store is checked before anything uses it (``check_store``: a short probe, no retries), so one
that cannot be reached or used is one StoreUnavailable line, not minutes of retries. A password in
its URI is redacted wherever it could show (``redact``/``redact_text``, and a filter on the log
handlers). A registered version is created with every tag at once and tagged ``registration:
complete`` once its aliases are set; one a killed register left without that tag is deleted by the
next pipeline in its run directory (``MlflowRecorder.recover_registrations``).

The default store is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts/``;
``MLFLOW_TRACKING_URI`` overrides it (tests point it at a temporary directory).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator, Mapping, Protocol, Sequence

from stages.common import InputError, StageError, git_state, kill_point, library_versions, one_line
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


# user:password@ in a URI (the password may hold ':' and '@': the host part is what follows the last '@'
# before the path), and password=... in its query string (libpq's form).
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)(?P<secret>[^\s/]*)@(?=[^\s@/]*(?:[/?#\s'\"]|$))")
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|token|secret|access_token)=)(?P<secret>[^&\s#'\"]+)",
                           re.IGNORECASE)
REDACTED = "***"


def redact(uri: str) -> str:
    """``uri`` with the password of a ``user:password@`` part (and a ``password=`` query value)
    replaced by ``***``: safe to print and record."""
    return redact_text(uri)


def redact_text(text: str) -> str:
    """Free text (a log line, a library's error message) with every URI password in it replaced by
    ``***``, and the configured store's password wherever else it appears."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{REDACTED}@", str(text))
    text = _QUERY_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)
    for secret in _store_secrets():
        text = text.replace(secret, REDACTED)
    return text


def _store_secrets() -> list[str]:
    """The passwords in MLFLOW_TRACKING_URI (as written and URL-decoded) and MLflow's password variables,
    longest first. Short ones are left alone outside URIs: replacing a password such as "mlflow" in every
    path and word would leave the logs unreadable and say which word it is."""
    from urllib.parse import unquote, urlsplit

    uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    found = {m["secret"] for m in _USERINFO.finditer(uri)} | {m["secret"] for m in _QUERY_SECRET.finditer(uri)}
    with contextlib.suppress(ValueError):
        found.add(urlsplit(uri).password or "")
    found |= {unquote(f) for f in found}
    found |= {os.environ.get(v, "") for v in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")}
    return sorted((f for f in found if len(f) >= 8), key=len, reverse=True)


def shown_uri() -> str:
    """The store's URI as messages, logs and records show it: its password redacted."""
    return redact(tracking_uri())


class _RedactingFilter(logging.Filter):
    """Every log record's text with the store's passwords redacted (MLflow's and urllib3's messages
    name URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_logs() -> None:
    """Install the redacting filter on every handler of the root logger and of MLflow's own (which does
    not propagate), once per handler."""
    for logger in (logging.getLogger(), logging.getLogger("mlflow")):
        for handler in logger.handlers:
            if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
                handler.addFilter(_RedactingFilter())


def _sqlite_dir(uri: str) -> Path | None:
    """Directory of a sqlite store's database file; artifacts go beside it."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):]).expanduser().resolve().parent


def configure() -> str:
    """Point MLflow at the store, creating the folder of a sqlite store. Returns the URI.

    The store is checked first (``check_store``): one that cannot be reached or used is a
    StoreUnavailable in one line, before any stage runs."""
    import mlflow

    for noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.models.model"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # "no GPU" is not news on a CPU box
    # MLflow prints each run's link, store URI and its password included, on stdout (where --json goes);
    # the MlflowRecorder logs the pipeline run's link itself, redacted.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    redact_logs()
    uri = tracking_uri()
    check_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


# ---------------------------------------------------------------- is the store there?

STORE_PROBE_TIMEOUT_S = 5  # seconds the store has to answer at start (MLflow's own retries take 107 s)
_CHECKED: set[str] = set()
START_SERVER = ("start it (`make tracking-server` runs the team server) or point MLFLOW_TRACKING_URI at a store "
                "that runs (unset, it is sqlite:///mlruns/mlflow.db)")


class StoreUnavailable(InputError):
    """The MLflow store cannot be reached or used: one line naming it (password redacted), what failed
    and what to do. The CLI answers exit 2: MLFLOW_TRACKING_URI, the server or the driver must change."""


def _unavailable(shown: str, what: str, fix: str) -> StoreUnavailable:
    return StoreUnavailable(redact_text(f"the MLflow store {shown} {what}; {fix}"))


def check_store(uri: str | None = None) -> None:
    """Fail fast when the store cannot be used, before any work: an http(s) server that does not answer
    within STORE_PROBE_TIMEOUT_S, refuses the credentials or is not MLflow; a database whose driver is
    not installed, that refuses the connection or the password; a sqlite file that cannot be created.
    Once per store and process; raises StoreUnavailable."""
    uri = uri or tracking_uri()
    shown = redact(uri)
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if scheme == "sqlite":  # every time: its folder may have gone since (it is made again, as MLflow would not)
        _probe_sqlite(uri, shown)
        return
    if uri in _CHECKED:
        return
    if scheme in ("http", "https"):
        _probe_http(uri, shown)
    elif scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        _probe_database(uri, shown)
    _CHECKED.add(uri)


def _probe_sqlite(uri: str, shown: str) -> None:
    db_dir = _sqlite_dir(uri)
    try:
        db_dir.mkdir(parents=True, exist_ok=True)
        _prepare_sqlite(uri)
    except Exception as e:  # OSError, sqlite3 / SQLAlchemy / MLflow errors opening or migrating the file
        raise _unavailable(shown, f"cannot be opened or created ({type(e).__name__}: {one_line(e, 300)})",
                           f"check that {db_dir} is a writable folder, or set MLFLOW_TRACKING_URI") from None


def _probe_http(uri: str, shown: str) -> None:
    """One plain request, no retries, to MLflow's REST API with the credentials MLflow would send."""
    import requests

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or \
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    try:
        r = requests.get(url, params={"max_results": 1}, headers=headers, auth=auth, verify=verify,
                         timeout=STORE_PROBE_TIMEOUT_S)
    except requests.exceptions.Timeout:
        raise _unavailable(shown, f"did not answer within {STORE_PROBE_TIMEOUT_S} s",
                           "check that the server is up and not overloaded, and that the address is right") from None
    except requests.exceptions.SSLError as e:
        raise _unavailable(shown, f"failed the TLS handshake ({_root_cause(e)})",
                           "check its certificate (MLFLOW_TRACKING_SERVER_CERT_PATH names a CA bundle)") from None
    except requests.exceptions.RequestException as e:
        raise _unavailable(shown, f"cannot be reached ({_root_cause(e)})", START_SERVER) from None
    if r.status_code in (401, 403):
        raise _unavailable(shown, f"refused the credentials (HTTP {r.status_code})",
                           "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to an "
                           "account of that server")
    if r.status_code == 404:
        raise _unavailable(shown, "answered HTTP 404 on MLflow's REST API: it is not an MLflow tracking server, or the "
                           "URI lacks the server's path prefix", "check the address and port")
    if r.status_code >= 400:
        raise _unavailable(shown, f"answered HTTP {r.status_code} ({one_line(r.text, 200)})",
                           "the server is up but failing: see its log (a team server's database may be down)")


def _root_cause(e: BaseException) -> str:
    """What a connection failure comes down to, in words (requests nests urllib3's reason deep inside)."""
    text = str(e)
    for needle, words in (("Connection refused", "connection refused: nothing listens on that port"),
                          ("Name or service not known", "the host name does not resolve"),
                          ("nodename nor servname", "the host name does not resolve"),
                          ("Temporary failure in name resolution", "the host name does not resolve"),
                          ("No route to host", "no route to the host"),
                          ("Network is unreachable", "the network is unreachable"),
                          ("Connection reset", "the connection was reset"),
                          ("RemoteDisconnected", "the server closed the connection without answering")):
        if needle in text:
            return words
    return one_line(text, 200)


# PostgreSQL's SQLAlchemy dialects -> the module each needs; the team extra installs psycopg2.
TEAM_EXTRA = "pip install -e '.[team]'"


def _probe_database(uri: str, shown: str) -> None:
    """A database store: its driver importable, then one connection (timeout STORE_PROBE_TIMEOUT_S)."""
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    try:
        url = make_url(uri)
        dialect = url.get_dialect()
    except Exception as e:  # ArgumentError (malformed), NoSuchModuleError (unknown dialect or driver name)
        raise _unavailable(shown, f"is not a database URI SQLAlchemy can read ({one_line(e, 200)})",
                           "write it as postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DATABASE") from None
    backend = url.get_backend_name()
    try:
        dialect.import_dbapi()
    except ImportError as e:
        module = e.name or url.get_driver_name()
        if backend == "postgresql":
            import importlib.util

            if url.get_driver_name() != "psycopg2" and importlib.util.find_spec("psycopg2") is not None:
                fix = (f"write the URI as postgresql+psycopg2://... (psycopg2, the team extra's driver, is installed; "
                       f"SQLAlchemy reads {url.drivername}:// with {module})")
            else:
                fix = (f"{TEAM_EXTRA} installs psycopg2, MLflow's PostgreSQL driver; then write the URI as "
                       "postgresql+psycopg2://...")
        else:
            fix = f"install the database driver that provides the Python module `{module}`"
        raise _unavailable(shown, f"needs the Python module `{module}` (its database driver), which is not installed",
                           fix) from None
    connect_args = {"connect_timeout": STORE_PROBE_TIMEOUT_S} if backend in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect():
            pass
    except Exception as e:  # OperationalError: refused, timed out, bad password, no such database
        why = one_line(getattr(e, "orig", None) or e, 300)
        if "password authentication failed" in why or "Access denied" in why or "no password supplied" in why:
            fix = "check the user and password in the URI"
        elif "does not exist" in why:
            fix = "create the database, or fix its name in the URI"
        else:
            fix = START_SERVER
        raise _unavailable(shown, f"cannot be connected to ({why})", fix) from None
    finally:
        engine.dispose()


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

# A registered version gets this tag last, once its aliases are set: a version without it was left by
# a register that was interrupted, and recover_registrations deletes it.
COMPLETE_TAG, COMPLETE = "registration", "complete"
def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


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

        dataset = mlflow.data.from_numpy(features, targets=targets, source=dataset_source(source), name=name,
                                         digest=digest[:36])
        mlflow.log_input(dataset, context=context)

    def register_onnx(self, *, onnx_path, registered_name, input_example, output_example, providers, description, tags,
                      aliases=()):
        """Log the model, then create its registered version with every tag and the description at once,
        point ``aliases`` at it and tag it ``registration: complete`` last. A version never exists without
        its tags; one whose registering was interrupted before the completion tag is deleted here (an
        exception, Ctrl-C, SIGTERM) or, after a SIGKILL, by the next pipeline in the run directory
        (``recover_registrations``)."""
        import mlflow
        import mlflow.onnx
        import onnx
        from mlflow.models import infer_signature

        model = onnx.load(str(onnx_path))
        signature = infer_signature(input_example, output_example)
        # Logged without registered_model_name: MLflow would create the version first and leave the tags
        # to later calls, which a kill in between skips (a READY version with no tags).
        info = mlflow.onnx.log_model(
            onnx_model=model,
            name="model",
            signature=signature,
            input_example=input_example,
            onnx_execution_providers=providers,
            save_as_external_data=False,  # one self-contained .onnx file, like the run directory's
            metadata=dict(tags),
            # What an ONNX model needs, said outright: left to infer them, MLflow runs a Python subprocess that
            # imports the model (12 of register's 14 s on a busy 2-core machine; a kill orphans that process).
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        )
        # The version's LoggedModel carries its quality metrics, so the registry shows them beside it.
        metrics = {}
        for k, v in tags.items():
            with contextlib.suppress(TypeError, ValueError):
                if "accuracy" in k or k.startswith("metric"):
                    metrics[k] = float(v)
        if metrics and getattr(info, "model_id", None):
            mlflow.log_metrics(metrics, model_id=info.model_id)
        kill_point("register.logged")
        client = _client()
        _ensure_registered_model(client, registered_name)
        version_tags = {**{k: str(v) for k, v in tags.items()},
                        **({"logged_model_id": info.model_id} if getattr(info, "model_id", None) else {})}
        mv = client.create_model_version(registered_name, source=info.model_uri, run_id=self.run_id, tags=version_tags,
                                         description=description, model_id=getattr(info, "model_id", None))
        version = str(mv.version)
        try:
            kill_point("register.created")
            for alias in aliases:
                client.set_registered_model_alias(registered_name, alias, version)
            kill_point("register.aliased")
            client.set_model_version_tag(registered_name, version, COMPLETE_TAG, COMPLETE)
        except BaseException:  # half-registered: no version stays without its completion
            with contextlib.suppress(Exception):
                client.delete_model_version(registered_name, version)
                log.warning("deleted %s v%s: its registering was interrupted", registered_name, version)
            raise
        log.info("registered %s v%s%s", registered_name, version, f" @{','.join(aliases)}" if aliases else "")
        return {"name": registered_name, "version": version, "model_uri": info.model_uri,
                "registered_uri": f"models:/{registered_name}/{version}"}

    def set_alias(self, registered_name, alias, version):
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(registered_name, alias, version)

    def should_stop(self, epoch, metrics):
        return False  # a stage run is never cut short from here (pipeline tune's trial tracker prunes)


def dataset_source(source: str) -> str:
    """dataset.json's ``source`` as MLflow can resolve it: a user file's ``npz:/path`` (``csv:``, ``idx:``)
    is the path itself; MLflow has no resolver for those schemes and would refuse to log the dataset."""
    kind, sep, rest = source.partition(":")
    return rest if sep and kind in ("npz", "csv", "idx") and rest.startswith("/") else source


@contextlib.contextmanager
def start_run(experiment: str, run_name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None,
              system_metrics: bool = False, parent_run_id: str | None = None) -> Iterator[MlflowTracker]:
    """An MLflow run that ends FINISHED on success, FAILED on error and KILLED on Ctrl-C or SIGTERM
    (both arrive as KeyboardInterrupt). Each run ends itself, innermost first, so a nested run's
    status never lands on its parent. ``system_metrics``: sample CPU, memory (and GPU) every second.
    ``parent_run_id``: nest it under a run of another process (a tuning study's trials)."""
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
                           log_system_metrics=system_metrics or None, parent_run_id=parent_run_id)
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
            _client().set_terminated(run.info.run_id, status)


def _has_psutil() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


# ---------------------------------------------------------------- the bookkeeping of a pipeline run

class Recorder(Protocol):
    """What the orchestrator records about a run, in its own words: decide (reuse or run) -> run -> stamp.

    ``MlflowRecorder`` keeps one parent run per pipeline and one run per stage in the store;
    ``NullRecorder`` (``--no-track``, and torchrun's secondary ranks) records nothing and finds nothing.
    """

    store: str | None  # the tracking URI runs go to (password redacted); None: nothing is recorded

    def recover(self, stale: Mapping[str, Any] | None) -> list[str]:
        """Mark KILLED the runs a dead pipeline left RUNNING (``stale``: its pipeline.json, if it said
        "running"), and any other RUNNING run of this run directory on this host. Returns the run ids."""

    def pipeline(self, recipe: Mapping[str, Any], stages: Sequence[str], recipe_file: Path,
                 resumes: str | None) -> ContextManager[str | None]:
        """The parent run of a pipeline, open while its stages run; yields its run id."""

    def earlier_runs(self, stage: str, digest: str) -> list[tuple[str, dict, str]]:
        """FINISHED runs of ``stage`` with fingerprint ``digest``, newest first: (run id, outputs, summary)."""

    def registration_missing(self, result: Mapping[str, Any]) -> str | None:
        """Why a register stamp's registered version cannot be reused here, or None."""

    def reused(self, stage: str, source_run_id: str | None, digest: str, summary: str) -> str | None:
        """Record that ``stage`` was reused from ``source_run_id``. Returns the new run's id."""

    def stage(self, stage: str, reasons: Sequence[str], *, system_metrics: bool = False) -> ContextManager[Tracker]:
        """The run of a stage that runs (nested in the pipeline's, if one is open); yields its Tracker.
        It ends FINISHED, FAILED or KILLED as the body does."""

    def finished(self, stage: str, tracker: Tracker, io: Any, stamp: Mapping[str, Any],
                 upstream_models: Mapping[str, str]) -> dict[str, str]:
        """Stamp a finished stage's run: its dataset input, LoggedModels and the fingerprint and output tags
        (``io``: the stage's orchestrate.StageIO). Returns file -> LoggedModel id for its stamp."""

    def failed(self, stage: str) -> None:
        """``stage`` raised: the pipeline's run says where it stopped."""

    def killed(self, stage: str) -> None:
        """``stage`` was interrupted (Ctrl-C, SIGTERM)."""


class NullRecorder:
    """Records nothing: ``--no-track``, and every rank but 0 under torchrun."""

    store = None

    def recover(self, stale):
        return []

    @contextlib.contextmanager
    def pipeline(self, recipe, stages, recipe_file, resumes):
        yield None

    def earlier_runs(self, stage, digest):
        return []

    def registration_missing(self, result):
        return None

    def reused(self, stage, source_run_id, digest, summary):
        return None

    @contextlib.contextmanager
    def stage(self, stage, reasons, *, system_metrics=False):
        yield NullTracker()

    def finished(self, stage, tracker, io, stamp, upstream_models):
        return {}

    def failed(self, stage):
        pass

    def killed(self, stage):
        pass


class MlflowRecorder:
    """A Recorder on the MLflow store: the run layout, tags and statuses of ``pipeline run`` and of a
    single ``pipeline <stage>``.

    Every run carries the environment tags and ``pipeline.rundir``; a pipeline's parent run adds
    ``pipeline.kind``/``stages``/``resumes`` and, when it ends, ``pipeline.status``/``reused``/``ran``;
    a stage run adds ``pipeline.stage`` and, nested in a pipeline, ``pipeline.parent_run_id`` and
    ``pipeline.reason``; a reused stage's run is FINISHED at once with ``pipeline.reused_from``.
    """

    def __init__(self, rundir, experiment: str | None = None):
        self.store = redact(configure())
        self.rundir = rundir
        self.experiment = experiment  # the recipe's name; None only to recover()
        self._parent: MlflowTracker | None = None
        self._status = "done"
        self._reused: list[str] = []
        self._ran: dict[str, float] = {}  # stage -> seconds

    @contextlib.contextmanager
    def _run(self, run_name: str, tags: Mapping[str, str], *, system_metrics: bool = False) -> Iterator[MlflowTracker]:
        """The one place a run starts: nested in the pipeline's run when one is open."""
        tags = {**environment_tags(), "pipeline.rundir": str(self.rundir.root.resolve()), **tags}
        with start_run(self.experiment, run_name, nested=self._parent is not None, tags=tags,
                       system_metrics=system_metrics) as tracker:
            yield tracker

    # -- before: stale runs, the parent run, reuse

    def recover(self, stale):
        marked: list[str] = []
        if stale is not None and stale.get("tracking_uri") == self.store:
            ids = [stale.get("parent_run_id"), *stale.get("stage_runs", {}).values()]
            marked += _mark_killed([i for i in ids if i], f"pid {stale.get('pid')} died (found by pid {os.getpid()})")
        marked += self._mark_killed_by_rundir(reason=f"lock of {self.rundir.root} free while the run said RUNNING")
        self.recover_registrations()
        return marked

    def recover_registrations(self) -> list[str]:
        """Delete the registered versions that a register run of this run directory (on this host) left
        without their completion tag when it was killed or failed: a SIGKILL between creating a version
        and finishing it (aliases, then the ``registration: complete`` tag). Call only while holding the
        directory's lock, after stale runs are marked KILLED. Returns "name vN" of each version deleted."""
        from mlflow.exceptions import MlflowException

        client = _client()
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        if not exp_ids:
            return []
        quoted = str(self.rundir.root.resolve()).replace("'", "\\'")
        runs = client.search_runs(exp_ids, max_results=1000, filter_string=(
            f"tags.`pipeline.stage` = 'register' and tags.`pipeline.rundir` = '{quoted}' and "
            f"tags.host = '{socket.gethostname()}' and attributes.status != 'FINISHED'"))
        runs = [r for r in runs if r.info.status in ("KILLED", "FAILED")]  # not RUNNING: marked KILLED first if stale
        deleted = []
        for i in range(0, len(runs), 50):  # a filter with a bounded IN list
            ids = ", ".join(f"'{r.info.run_id}'" for r in runs[i:i + 50])
            for mv in client.search_model_versions(f"run_id IN ({ids})"):
                if mv.tags.get(COMPLETE_TAG) == COMPLETE:
                    continue
                try:
                    client.delete_model_version(mv.name, mv.version)
                except MlflowException as e:
                    log.warning("could not delete the half-registered %s v%s: %s", mv.name, mv.version, e.message)
                    continue
                deleted.append(f"{mv.name} v{mv.version}")
                log.warning("deleted %s v%s: registered by run %s of %s, which was %s before it finished registering",
                            mv.name, mv.version, mv.run_id, self.rundir.root,
                            next(r.info.status for r in runs if r.info.run_id == mv.run_id).lower())
        return deleted

    def _mark_killed_by_rundir(self, reason: str) -> list[str]:
        """Mark KILLED every RUNNING run that used this run directory on this host: call only while
        holding its lock, when no live process can be using it."""
        client = _client()
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        if not exp_ids:
            return []
        quoted = str(self.rundir.root.resolve()).replace("'", "\\'")
        runs = client.search_runs(exp_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`pipeline.rundir` = "
                                                         f"'{quoted}' and tags.host = '{socket.gethostname()}'")
        return _mark_killed([r.info.run_id for r in runs], reason)

    @contextlib.contextmanager
    def pipeline(self, recipe, stages, recipe_file, resumes):
        tags = {"pipeline.kind": "pipeline", "pipeline.stages": ",".join(stages)}
        if resumes:
            tags["pipeline.resumes"] = resumes
        with self._run("pipeline", tags) as parent:
            if resumes:
                self._tag_resumed(resumes, parent.run_id)
            parent.log_params({f"recipe.{k}": v for k, v in flatten(recipe).items()})
            parent.log_artifact(recipe_file)
            log.info("MLflow: pipeline run %s in %s", parent.run_id, self.store)
            self._parent, self._status, self._reused, self._ran = parent, "done", [], {}
            try:
                yield parent.run_id
            finally:
                self._parent = None
                parent.set_tags({"pipeline.status": self._status, "pipeline.reused": ",".join(self._reused),
                                 "pipeline.ran": ",".join(self._ran)})

    def _tag_resumed(self, resumed: str, by: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            _client().set_tag(resumed, "pipeline.resumed_by", by)
        except MlflowException:
            log.warning("the pipeline run %s being resumed is not in %s (it was tracked in another store)",
                        resumed, self.store)

    def earlier_runs(self, stage, digest):
        try:
            exp = _client().get_experiment_by_name(self.experiment)
            if exp is None:
                return []
            runs = _client().search_runs(
                [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=20,
                filter_string=f"tags.`pipeline.fingerprint` = '{digest}' and tags.`pipeline.stage` = '{stage}' "
                              "and attributes.status = 'FINISHED'")
        except Exception as e:  # the store is a convenience here, never a reason to fail
            log.debug("store lookup failed: %s", e)
            return []
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

    def registration_missing(self, result):
        from mlflow.exceptions import MlflowException

        name, version = result.get("name"), result.get("version")
        if not name or not version:
            return "the earlier register run registered nothing in this store"
        client = _client()
        try:
            client.get_model_version(name, str(version))
        except MlflowException:
            return f"registered version {name} v{version} is not in this store"
        # An alias it set that nobody holds any more: the version that last took it was deleted (a
        # registration killed half-way, cleaned up on resume, takes its aliases with it). Another
        # version holding it (a later run, `pipeline promote`) is the registry's business, not a reason.
        held = set(client.get_registered_model(name).aliases or {})
        gone = [a for a in result.get("aliases", ()) if a not in held]
        if gone:
            return f"alias {', '.join(gone)} of {name} (set by the earlier register run) no longer exists"
        return None

    def reused(self, stage, source_run_id, digest, summary):
        tags = {"pipeline.stage": stage, "pipeline.reused_from": source_run_id or "untracked",
                "pipeline.fingerprint": digest, "pipeline.summary": summary[:500]}
        if self._parent is not None:
            tags["pipeline.parent_run_id"] = self._parent.run_id
        self._reused.append(stage)
        with self._run(stage, tags) as tracker:  # no work, no artifacts: FINISHED at once
            return tracker.run_id

    # -- during and after: a stage's run

    @contextlib.contextmanager
    def stage(self, stage, reasons, *, system_metrics=False):
        tags = {"pipeline.stage": stage}
        if self._parent is not None:
            tags.update({"pipeline.parent_run_id": self._parent.run_id, "pipeline.reason": "; ".join(reasons)[:5000]})
        with self._run(stage, tags, system_metrics=system_metrics) as tracker:
            yield tracker
        # on the parent, once the stage's run has ended (metrics go to the active run)
        if self._parent is not None and stage in self._ran:
            self._parent.log_metrics({f"{stage}_seconds": self._ran[stage]})

    def finished(self, stage, tracker, io, stamp, upstream_models):
        if io.dataset_context and self.rundir.dataset.is_file() and self.rundir.data.is_file():
            self._log_dataset_input(io.dataset_context)
        if "data" in io.writes:  # the split itself, so `pipeline promote` finds test data without the run directory
            tracker.log_artifact(self.rundir.data)
        models = self._log_models(stage, io.models, io.evaluates, upstream_models, getattr(tracker, "final_metrics", {}))
        tracker.set_tags({"pipeline.fingerprint": stamp.get("fingerprint", ""),
                          "pipeline.outputs": json.dumps(stamp["outputs"], sort_keys=True)[:MAX_TAG_LENGTH],
                          "pipeline.summary": stamp["summary"][:500]})
        self._ran[stage] = stamp["seconds"]
        return models

    def failed(self, stage):
        self._stopped(stage, "failed")

    def killed(self, stage):
        self._stopped(stage, "killed")

    def _stopped(self, stage: str, status: str) -> None:
        self._status = status
        if self._parent is not None:
            self._parent.set_tags({"pipeline.failed_stage": stage, "pipeline.status": status})

    def _log_dataset_input(self, context: str) -> None:
        """The run directory's dataset as an MLflow dataset input of the active run (digest, source, schema)."""
        import mlflow
        import numpy as np

        info = json.loads(Path(self.rundir.dataset).read_text())
        with np.load(self.rundir.data, allow_pickle=False) as f:
            x, y = f["x_train"], f["y_train"]
        dataset = mlflow.data.from_numpy(x, targets=y, source=dataset_source(info.get("source", "unknown")),
                                         name=info.get("name", "dataset"), digest=str(info.get("sha256", ""))[:36])
        mlflow.log_input(dataset, context=context)

    def _log_models(self, stage: str, writes: tuple[str, ...], evaluates: tuple[str, ...],
                    upstream_models: Mapping[str, str], final_metrics: Mapping[str, float]) -> dict[str, str]:
        """Log the model files a stage wrote as MLflow LoggedModels of the active run, and link the stage's
        one-value metrics to the models they describe: a metric naming a model's tag as a dot-separated part
        (``accuracy.int8-static``) goes to that model; the others go to the stage's only model, if it has
        one. Returns file -> model id."""
        import mlflow

        from stages.common import sha256_file

        rundir = self.rundir

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
            model = mlflow.initialize_logged_model(
                name=rundir.model_tag(path), source_run_id=run.info.run_id if run else None,
                model_type="onnx" if path.suffix == ".onnx" else "pytorch-checkpoint",
                tags={"file": path.name, "sha256": sha256_file(path), "stage": stage})
            try:
                _client().log_model_artifact(model.model_id, str(path))
                if path == Path(rundir.checkpoint) and Path(rundir.checkpoint_json).is_file():
                    _client().log_model_artifact(model.model_id, str(rundir.checkpoint_json))
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


def _mark_killed(run_ids: list[str], reason: str) -> list[str]:
    """Mark the RUNNING ones among ``run_ids`` KILLED. Returns those marked."""
    from mlflow.exceptions import MlflowException

    client, marked = _client(), []
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


# ---------------------------------------------------------------- the bookkeeping of a tuning study

class StudyRecorder:
    """`pipeline tune`'s record: one parent MLflow run per study, one nested run per trial.

    The parent run's id is kept in the study (pipeline/tune.py stores it as a study attribute), so every
    worker process, every machine that joins the study and every resumed `pipeline tune` logs its trials
    under the same parent. A trial's run names its parent by id (``start_run(parent_run_id=...)``), not by
    the fluent nesting of one process: its worker is another process, perhaps on another machine. Runs
    carry ``pipeline.kind`` (tune / trial), ``tune.study`` and ``tune.trial``; a trial's ``tune.state``
    says complete, pruned or failed.
    """

    def __init__(self, experiment: str):
        self.store: str | None = redact(configure())
        self.experiment = experiment

    def open_parent(self, run_id: str | None, *, study: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
        """The study's parent run: ``run_id`` reopened (RUNNING again: a resumed or joined study), or a new
        one when it is None or not in this store. Returns its id."""
        from mlflow.exceptions import MlflowException

        client = _client()
        if run_id:
            try:
                if client.get_run(run_id).info.lifecycle_stage != "deleted":
                    client.update_run(run_id, status="RUNNING")
                    return run_id
                log.warning("the study's MLflow run %s was deleted; starting a new parent run", run_id)
            except MlflowException:
                log.warning("the study's MLflow run %s is not in %s (it was tracked in another store); "
                            "starting a new parent run", run_id, self.store)
        run = client.create_run(experiment_id(self.experiment), run_name=f"tune-{study}",
                                tags={**environment_tags(), "pipeline.kind": "tune", "tune.study": study, **tags})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flatten(params).items()]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            _client().log_batch(run_id, params=flat[i:i + 100])

    @contextlib.contextmanager
    def trial(self, parent_run_id: str, study: str, number: int, params: Mapping[str, Any],
              tags: Mapping[str, str]) -> Iterator[MlflowTracker]:
        """A trial's run under the study's parent, the active run of this process while the trial trains
        (the stages log into it). It ends FINISHED, FAILED or KILLED as the block does."""
        tags = {**environment_tags(), "pipeline.kind": "trial", "tune.study": study, "tune.trial": str(number), **tags}
        with start_run(self.experiment, f"trial-{number}", tags=tags, parent_run_id=parent_run_id) as tracker:
            tracker.log_params(params)
            yield tracker

    def trial_killed(self, run_id: str | None, reason: str, *, parent_run_id: str | None = None,
                     number: int | None = None) -> None:
        """A trial whose worker died (its heartbeat stopped): its run, left RUNNING, is marked KILLED. Without
        ``run_id`` (the worker died after creating the run but before the study recorded its id), the
        RUNNING run tagged with the trial's ``number`` under ``parent_run_id`` is found and marked."""
        if run_id:
            run_ids = [run_id]
        elif parent_run_id and number is not None:
            run_ids = [r.info.run_id for r in _client().search_runs(
                [experiment_id(self.experiment)],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`tune.trial` = '{number}' "
                              "and attributes.status = 'RUNNING'")]
        else:
            return
        for marked in _mark_killed(run_ids, reason):
            _client().set_tag(marked, "tune.state", "failed")

    def delete_run(self, run_id: str) -> None:
        """A parent run that lost the race to be the study's (machines joining at once)."""
        _client().delete_run(run_id)

    def finish_parent(self, run_id: str, *, status: str | None, metrics: Mapping[str, float], tags: Mapping[str, str],
                      artifacts: Sequence[Path]) -> None:
        """The study's summary on its parent run, which ends with ``status`` (FINISHED, FAILED or KILLED;
        None: its status stays as it is)."""
        import time

        from mlflow.entities import Metric, RunTag

        client, now = _client(), int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None],
                         tags=[RunTag(k, str(v)[:MAX_TAG_LENGTH]) for k, v in tags.items()])
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path="tune")
        if status is not None:
            client.set_terminated(run_id, status)


class NullStudyRecorder:
    """Records nothing (`pipeline tune --no-track`): trials report to a NullTracker."""

    store = None

    def open_parent(self, run_id, *, study, tags, params):
        return None

    @contextlib.contextmanager
    def trial(self, parent_run_id, study, number, params, tags):
        yield NullTracker()

    def trial_killed(self, run_id, reason, *, parent_run_id=None, number=None):
        pass

    def delete_run(self, run_id):
        pass

    def finish_parent(self, run_id, *, status, metrics, tags, artifacts):
        pass


# ---------------------------------------------------------------- the registry: one resolver, one download

URI_FORMS = "models:/NAME@ALIAS, models:/NAME/VERSION, models:/NAME/latest or runs:/RUN_ID/PATH"
REGISTER_FIX = ("run `make all` (or `pipeline run`) to register a model, or point MLFLOW_TRACKING_URI at the "
                "store that holds it")


@dataclass(frozen=True)
class ResolvedModel:
    """What a model URI names in the store, before anything is downloaded."""

    uri: str  # as given
    name: str  # the registered model's name; for runs:/, the file's stem
    version: str  # the registered version; "" for runs:/
    run_id: str | None  # the run that logged it
    tags: dict[str, str]  # the registered version's tags; none for runs:/
    artifact_uri: str  # what fetch_model downloads
    aliases: tuple[str, ...] = ()
    description: str = ""
    source: str = ""  # where the registry says its files are
    model_id: str = ""  # its MLflow LoggedModel, when it has one


def resolve_model(uri: str) -> ResolvedModel:
    """The one resolver of model URIs. ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` and
    ``models:/NAME/latest`` (the highest version, as in MLflow) name a registered version;
    ``runs:/RUN_ID/PATH`` a file a run logged (or a model it logged under that name).

    ``models:/NAME`` alone is refused, as MLflow refuses it: which version to use (the champion? the
    newest, perhaps not yet gated?) is the caller's decision, and the message lists the choices.
    Anything unresolvable is a StageError naming the URI, the store (password redacted) and the fix.
    """
    store = shown_uri()

    def fail(why: str, fix: str = REGISTER_FIX) -> StageError:
        return StageError(f"cannot resolve {uri!r} in the store {store}: {why}; {fix}")

    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        if not run_id or not path.strip("/"):
            raise fail("a run URI names a run and a path in it", f"use {URI_FORMS}")
        return _resolve_run_file(uri, run_id, path.strip("/"), fail)
    if not uri.startswith("models:/"):
        raise fail("not a model URI", f"use {URI_FORMS}, or pass a .onnx path")
    body = uri[len("models:/"):]
    name, at, alias = body.partition("@")
    if not at:
        name, _, version = body.partition("/")
    if not name or (at and (not alias or "/" in alias)) or (not at and version and "/" in version):
        raise fail("malformed model URI", f"use {URI_FORMS}")
    configure()
    client = _client()
    model = _registered_model(client, name, fail)
    if at:
        aliases = dict(model.aliases or {})
        if alias not in aliases:
            raise fail(f"registered model {name!r} has no alias {alias!r} ({_choices(client, model)})")
        version = str(aliases[alias])
    elif not version:
        raise fail(f"a registered model URI names a version ({_choices(client, model)})",
                   f"say which, e.g. models:/{name}@champion or models:/{name}/latest")
    elif version.lower() == "latest":
        version = _latest_version(client, name)
        if version is None:
            raise fail(f"registered model {name!r} has no versions")
    elif not version.isdigit():
        raise fail(f"version {version!r} is not a number", f"use {URI_FORMS}")
    mv = _model_version(client, name, version, model, fail)
    return ResolvedModel(uri=uri, name=mv.name, version=str(mv.version), run_id=mv.run_id, tags=dict(mv.tags),
                         artifact_uri=f"models:/{mv.name}/{mv.version}", aliases=tuple(mv.aliases or ()),
                         description=mv.description or "", source=mv.source or "", model_id=mv.model_id or "")


def _registered_model(client, name: str, fail):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise fail(e.message.splitlines()[0]) from None
    known = sorted(m.name for m in client.search_registered_models(max_results=50))
    raise fail(f"no registered model {name!r} (registered: {', '.join(known) or 'none'})")


def _model_version(client, name: str, version: str, model, fail):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise fail(e.message.splitlines()[0]) from None
    raise fail(f"registered model {name!r} has no version {version} ({_choices(client, model)})")


def _latest_version(client, name: str) -> str | None:
    quoted = name.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{quoted}'", max_results=1, order_by=["version_number DESC"])
    return str(found[0].version) if found else None


def _choices(client, model) -> str:
    """What a registered model offers: its aliases and its latest version."""
    aliases = ", ".join(f"@{a} = v{v}" for a, v in sorted(dict(model.aliases or {}).items())) or "no aliases"
    latest = _latest_version(client, model.name)
    return f"it has {aliases}; latest version {latest or 'none'}"


def _resolve_run_file(uri: str, run_id: str, path: str, fail) -> ResolvedModel:
    """``runs:/RUN_ID/PATH``: a file (or folder) the run logged, or a LoggedModel it logged named PATH."""
    from mlflow.exceptions import MlflowException

    configure()
    client = _client()
    run = _get_run(client, run_id, fail)
    parent = path.rpartition("/")[0]
    logged = {a.path for a in client.list_artifacts(run_id, parent or None)}
    model_id = ""
    if path not in logged:
        try:
            models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                 filter_string=f"source_run_id = '{run_id}'")
        except MlflowException:
            models = []
        model_id = next((m.model_id for m in models if m.name == path), "")
        if not model_id:
            what = ", ".join(sorted(logged) + [f"model {m.name}" for m in models]) or "nothing"
            raise fail(f"run {run_id} logged no {path!r} (it logged: {what})",
                       "name a file the run logged, as `make ui` lists its artifacts")
    return ResolvedModel(uri=uri, name=Path(path).name.split(".")[0], version="", run_id=run_id, tags={},
                         artifact_uri=uri, model_id=model_id)


def _get_run(client, run_id: str, fail):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        raise fail(f"no MLflow run {run_id}", "pass the id of a run in this store (`make ui` lists them)") from None


@dataclass(frozen=True)
class RegisteredOnnx:
    """A model's .onnx file fetched to local disk, with what the registry says about it."""

    path: Path
    name: str
    version: str  # "" when it came from a runs:/ URI
    tags: dict[str, str]
    run_id: str | None


def fetch_model(uri: str, dest: Path | None = None) -> RegisteredOnnx:
    """The one download: resolve ``uri`` (see resolve_model) and fetch its .onnx file under ``dest``
    (a new temporary directory if None; the caller removes it)."""
    import mlflow

    ref = resolve_model(uri)
    dest = Path(dest or tempfile.mkdtemp(prefix="onnx-pipeline-model-"))
    store = shown_uri()
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.artifact_uri, dst_path=str(dest)))
    except Exception as e:  # the store said it exists; its artifact store could not deliver it
        raise StageError(f"cannot download {uri!r} from the store {store}: {str(e).splitlines()[0]}; check that "
                         "its artifact location is reachable from here") from None
    found = sorted(local.rglob("*.onnx")) if local.is_dir() else [local] if local.suffix == ".onnx" else []
    if not found:
        what = f"version {ref.version}" if ref.version else "the run's file"
        raise StageError(f"{uri!r} ({what} in the store {store}) holds no .onnx file; pass a URI of an ONNX model")
    return RegisteredOnnx(path=found[0], name=ref.name, version=ref.version, tags=dict(ref.tags), run_id=ref.run_id)


# ---------------------------------------------------------------- checkpoints of earlier runs

def looks_like_run_id(ref: str) -> bool:
    """MLflow run ids are 32 lowercase hex digits."""
    return len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)


def download_checkpoint(run_id: str, dest: Path) -> Path:
    """The checkpoint.pt a training run logged, downloaded under ``dest``. A pipeline's parent run is
    followed to its nested train run. Raises StageError naming the fix."""
    import mlflow

    configure()
    store = shown_uri()
    client = _client()
    run = _get_run(client, run_id, lambda why, fix: StageError(
        f"{why} in the store {store}; pass a checkpoint path or the id of a train run (see `make ui`)"))
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
    raise StageError(f"MLflow run {run_id} ({run.info.run_name}) in the store {store} logged no checkpoint.pt; pass "
                     "the id of a train run or of a whole pipeline run")
