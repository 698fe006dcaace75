"""`pipeline tune`: hyperparameter search on Optuna over the recipe's ``tune.space``, for the validation
metric alone or for it and the measured speed (or size) of the model the server would run.

A study, step by step:

    plan      every check before a trial runs: the tune section (pipeline/config.py), the storage can be
              reached, each space key is read by a stage a trial runs, the objectives suit the task (the
              data is prepared once, into the study directory, to know it); the study is created or
              loaded, its parent MLflow run opened or reopened
    trials    each in a temporary run directory under the study directory: the trial's recipe (the base
              recipe with the sampled keys set) -> train through the orchestrator's runner, reporting its
              validation metric every epoch to the pruner through the Tracker's ``should_stop`` -> for a
              speed objective, export (-> quantize one variant) -> timing with stages/timing.py on the
              server's session settings (serve.runtime via stages/sessions.py) -> the objective values;
              one nested MLflow run per trial; the directory is removed afterwards
    summary   trial counts, the best trial (one objective) or the Pareto front and its chosen point (two),
              plots (optimization history, intermediate values, parameter importances, Pareto front),
              study.json and best.yaml (a recipe overlay) in the study directory and on the parent run

The validation split is all a study sees: objectives are validation metrics and timings on validation
samples; the test split is left for `pipeline run` on the tuned recipe. (A trial that builds a quantized
variant runs the quantize stage, whose accuracy budget reads the test split as in every pipeline run;
the tuner never reads those numbers.)

Storage and scale. The study lives in an Optuna RDB storage: by default ``optuna.db`` beside a sqlite
MLflow store (``sqlite:///mlruns/optuna.db``), or any SQLAlchemy URI (``--storage``, ``tune.storage``),
such as the team server's PostgreSQL ``postgresql+psycopg2://mlflow@HOST:5433/optuna``: every machine
that runs ``pipeline tune --study NAME`` against it joins the same study. ``--workers K`` runs K trial
processes here, the cores divided between them (torch threads). ``--trials N`` is the study's size:
trials run until the study holds N (complete, pruned or failed), counting earlier invocations, so a killed
`pipeline tune` started again continues the study. On one machine the count is exact (a lock file
hands out the slots); machines that share a study may overshoot by one trial each.

Dead workers. Each running trial beats a heartbeat into the storage (``tune.heartbeat_s``); a trial
silent for twice that is failed by the next worker that starts a trial (on any machine), its MLflow run
marked KILLED, and its parameters queued to run again (``tune.retry_stale`` times). A trial whose worker
ran on this machine under a process id that no longer exists is failed at once, without waiting for its
heartbeat to go stale (a `pipeline tune` killed and started again continues immediately). Ctrl-C and
SIGTERM fail the running trials at once (their runs end KILLED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from pipeline import tracking
from pipeline.config import SPEED_OBJECTIVES, ConfigError, Recipe, SearchParam, recipe_from_dict
from stages.common import StageError, write_json, write_text
from stages.contract import RunDir

log = logging.getLogger(__name__)

# The validation metrics the train stage logs per task (stages/train.py `_validate`), with their direction.
VALIDATION_METRICS: dict[str, dict[str, str]] = {
    "classification": {"val_accuracy": "maximize", "val_macro_f1": "maximize", "val_loss": "minimize"},
    "regression": {"val_r2": "maximize", "val_mse": "minimize", "val_mae": "minimize", "val_loss": "minimize"},
    "vae": {"val_reconstruction_mse": "minimize", "val_elbo": "maximize", "val_kl": "minimize", "val_loss": "minimize"},
}
STALE_GRACE = lambda heartbeat_s: 2 * heartbeat_s  # noqa: E731 - seconds of silence before a trial is failed (Optuna's default)
STATES = ("complete", "pruned", "failed", "running", "waiting")


def default_storage() -> str:
    """``optuna.db`` beside a sqlite MLflow store (sqlite:///mlruns/optuna.db by default); for any other
    store (a tracking server) the local ``mlruns/optuna.db``: pass --storage to share a study."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return "sqlite:///mlruns/optuna.db"


def default_workdir(study: str) -> Path:
    return Path("runs") / "tune" / study


# ---------------------------------------------------------------- the plan: every check before a trial

@dataclass(frozen=True)
class Plan:
    """What every worker of one `pipeline tune` needs (JSON, handed to worker processes)."""

    recipe: dict  # the base recipe, tune section included
    study: str
    storage: str
    objectives: tuple[str, ...]  # resolved: the validation metric first, e.g. (val_accuracy, latency_ms)
    directions: tuple[str, ...]  # maximize / minimize, per objective
    task: str
    workdir: str  # the study directory: the prepared data, plots, study.json, best.yaml, trials' run dirs
    trials: int  # the study's size
    track: bool
    parent_run_id: str | None
    deadline: float | None  # time.time() after which no trial starts
    threads: int = 0  # torch threads per worker; 0: torch's default
    seed_offset: int = 0  # trials in the study when this invocation began (the samplers' seeds move on)
    # This invocation's changes to the recipe file outside tune.* (``--recipe-overlay F``, ``--set K=V``), as
    # command-line words: each trial records them, and best.yaml names them, since it holds only the trial's keys.
    overrides: tuple[str, ...] = ()

    @property
    def config(self):
        return self.base.tune

    @functools.cached_property
    def base(self) -> Recipe:
        return recipe_from_dict(self.recipe)

    @property
    def speed_objective(self) -> str | None:
        return self.objectives[1] if len(self.objectives) > 1 else None

    @property
    def data_dir(self) -> RunDir:
        return RunDir(Path(self.workdir) / "data")


def plan_study(recipe: Recipe, *, trials: int | None = None, workers: int = 1, study: str | None = None,
               timeout_s: float | None = None, storage: str | None = None, track: bool = True,
               workdir: Path | None = None, overrides: Sequence[str] = ()) -> Plan:
    """Check everything before a trial runs, prepare the data once, create or load the study and open its
    parent MLflow run. Raises ConfigError / StageError (a usage error: exit 2) naming what to fix."""
    cfg = recipe.tune
    if not cfg.space:
        raise ConfigError("the recipe has no `tune.space`: add the keys to search, e.g. `tune: {space: {train.lr: "
                          "{low: 1e-4, high: 1e-2, log: true}}}` (README: Tuning)")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    trials = cfg.trials if trials is None else trials
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    timeout_s = cfg.timeout_s if timeout_s is None else timeout_s
    if timeout_s < 0:
        raise ConfigError(f"--timeout must be >= 0 seconds (0: no limit), got {timeout_s}")
    name = study or cfg.study or recipe.name
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--study must be a short name (letters, digits, - _ .), got {name!r}")
    speed = cfg.objectives[1] if cfg.multi_objective else None
    _check_space_is_read(recipe, speed)
    uri = storage or cfg.storage or default_storage()
    storage_obj = open_storage(uri, heartbeat_s=cfg.heartbeat_s)  # unreachable: one error, before any work
    if uri.startswith("sqlite") and not tracking.tracking_uri().startswith("sqlite"):
        log.info("the study is kept in %s, on this machine only: to share it with the team's machines pass --storage "
                 "postgresql+psycopg2://mlflow@HOST:5433/optuna (the tracking server's PostgreSQL)", uri)

    workdir = Path(workdir or default_workdir(name))
    data_dir = RunDir(workdir / "data")
    info = _prepare_once(recipe, data_dir)
    import models

    try:
        task = models.resolve_task(recipe.model.family, info.get("task", "classification"))
    except models.TaskError as e:
        raise ConfigError(str(e)) from None
    objectives = _resolve_objectives(cfg.objectives, task, info, cfg.variant)
    directions = tuple(_direction(o, task) for o in objectives)

    opened = _create_or_load(uri, storage_obj, name, objectives, directions, recipe, info)
    held = len(opened.trials)
    parent = _parent_run(opened, _recorder(track, recipe.name), name, uri, objectives, trials, cfg)
    cores = _cores()
    threads = max(1, cores // workers) if workers > 1 else 0
    if speed and workers > 1:
        log.warning("%d workers share %d cores: each trial's %s is measured while other trials train, so it reads "
                    "slower than on an idle machine; use --workers 1 for speed numbers you will quote", workers, cores,
                    speed)
    return Plan(recipe=recipe.to_dict(), study=name, storage=uri, objectives=objectives, directions=directions,
                task=task, workdir=str(workdir), trials=trials, track=track, parent_run_id=parent,
                deadline=time.time() + timeout_s if timeout_s else None, threads=threads, seed_offset=held,
                overrides=tuple(overrides))


def _parent_run(study, recorder, name: str, uri: str, objectives, trials: int, cfg) -> str | None:
    """The study's one parent MLflow run: the one its attributes name (reopened), or a new one. Processes that
    create one at the same moment (machines joining a new study) agree on the last claim; the others' are deleted."""
    def claimed() -> str | None:
        attrs = study.user_attrs if study.user_attrs.get("mlflow_store") == recorder.store else {}
        return attrs.get("mlflow_parent_run_id")

    existing = claimed()
    parent = recorder.open_parent(existing, study=name, tags={"tune.storage": tracking.redact(uri),
                                                              "tune.objectives": ",".join(objectives)},
                                  params={"study": name, "objectives": ",".join(objectives), "trials": trials,
                                          **{f"space.{p.key}": p.to_plain() for p in cfg.space}})
    if parent is None or parent == existing:
        return parent
    study.set_user_attr("mlflow_store", recorder.store)
    study.set_user_attr("mlflow_parent_run_id", parent)
    time.sleep(0.5)  # another process claiming at the same moment has written its claim by now
    winner = claimed()
    if winner and winner != parent:
        recorder.delete_run(parent)
        recorder.open_parent(winner, study=name, tags={}, params={})
        return winner
    return parent


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _trial_stages(speed: str | None, variant: str) -> list[str]:
    stages = ["prepare", "train"]
    if speed:
        stages.append("export")
        if variant != "fp32":
            stages.append("quantize")
    return stages


def _check_space_is_read(recipe: Recipe, speed: str | None) -> None:
    """Every space key must be read by a stage a trial runs (the orchestrator's IO table says which
    sections each reads): a key of register or benchmark would change nothing a trial measures."""
    from pipeline.orchestrate import IO

    cfg = recipe.tune
    stages = _trial_stages(speed, cfg.variant)
    sections = {s for stage in stages for s in IO[stage].sections}
    if speed:
        sections.add("serve.runtime")  # the sessions the timing builds
        if speed == "samples_per_s" and not cfg.batch_size:
            sections.add("serve.batching.max_batch_size")
    for p in cfg.space:
        if not any(p.key == s or p.key.startswith(s + ".") for s in sections):
            raise ConfigError(f"`tune.space.{p.key}`: no stage of a trial reads it (a trial runs {', '.join(stages)}"
                              f"{' and the timing' if speed else ''}, which read {', '.join(sorted(sections))}); "
                              "search keys of those sections")


def _prepare_once(recipe: Recipe, data_dir: RunDir) -> dict:
    """The study's split, prepared once (reused while the prepare section is unchanged); -> dataset.json."""
    from pipeline.orchestrate import PipelineFailed, run_pipeline

    try:
        run_pipeline(recipe, data_dir, stages=("prepare",), track=False)
    except PipelineFailed as failed:
        raise failed.error from None
    return json.loads(data_dir.dataset.read_text())


def _resolve_objectives(names: Sequence[str], task: str, info: Mapping, variant: str) -> tuple[str, ...]:
    from stages.metrics import PRIMARY

    primary = f"val_{PRIMARY[task][0]}"
    first = primary if names[0] == "auto" else names[0]
    valid = VALIDATION_METRICS[task]
    if first not in valid:
        raise ConfigError(f"`tune.objectives`: {first} is not a validation metric of this {task} task (dataset "
                          f"{info.get('name') or info.get('source', '?')}); choose auto or one of {', '.join(valid)}")
    if variant != "fp32" and len(names) > 1 and first != primary:
        raise ConfigError(f"`tune.objectives`: with tune.variant {variant} the first objective is scored on the "
                          f"quantized file, which gives the task's primary metric only; use auto or {primary}")
    return (first, *names[1:])


def _direction(objective: str, task: str) -> str:
    return SPEED_OBJECTIVES[objective][0] if objective in SPEED_OBJECTIVES else VALIDATION_METRICS[task][objective]


# ---------------------------------------------------------------- the storage and the study

def open_storage(uri: str, heartbeat_s: int, on_stale=None):
    """An Optuna RDB storage with heartbeats; ConfigError naming the fix when it cannot be reached."""
    import optuna

    kwargs: dict[str, Any] = {}
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"study storage {uri} cannot be created: {e}; pass --storage with a writable path") from None
        # Several worker processes write to one file: wait for a lock up to 60 s instead of failing at once.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    elif uri.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna's words
        try:
            for attempt in range(5):
                try:
                    storage = optuna.storages.RDBStorage(uri, heartbeat_interval=heartbeat_s,
                                                         grace_period=STALE_GRACE(heartbeat_s),
                                                         heartbeat_stale_trial_callback=on_stale, **kwargs)
                    break
                except Exception as e:
                    # Machines joining a fresh database at once race to create its tables: the loser retries.
                    if attempt == 4 or not any(w in str(e) for w in ("already exists", "duplicate key", "UNIQUE")):
                        raise
                    time.sleep(1 + attempt)
        except ImportError as e:
            raise ConfigError(f"study storage {tracking.redact(uri)} needs a database driver that is not installed "
                              f"({e}); for PostgreSQL install the team extra: pip install -e '.[team]'") from None
        except Exception as e:  # sqlalchemy's OperationalError, ArgumentError, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"study storage {tracking.redact(uri)} cannot be reached: {first}; start the team "
                              "tracking server's PostgreSQL (`make tracking-server`), fix the URI, or pass --storage "
                              "sqlite:///path/optuna.db") from None
    if uri.startswith("sqlite:///"):
        _wal(Path(uri[len("sqlite:///"):]).expanduser())
    return storage


def _wal(db: Path) -> None:
    """WAL journaling: readers (the heartbeat checks) no longer block the writer; set once, kept in the file."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
        con.execute("PRAGMA journal_mode=WAL")


def _create_or_load(uri: str, storage, name: str, objectives: tuple[str, ...], directions: tuple[str, ...],
                    recipe: Recipe, info: Mapping):
    """The study, created with its objectives, or loaded: then it must have the same objectives and data."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we log each trial ourselves
    study = optuna.create_study(study_name=name, storage=storage, directions=list(directions), load_if_exists=True)
    attrs = study.user_attrs
    if not attrs.get("objectives"):
        study.set_user_attr("objectives", list(objectives))
        study.set_user_attr("recipe", recipe.name)
        study.set_user_attr("dataset_sha256", info.get("sha256", ""))
        study.set_user_attr("space", {p.key: p.to_plain() for p in recipe.tune.space})
        study.set_user_attr("epochs", recipe.train.epochs)
        log.info("study %s created in %s: %s", name, tracking.redact(uri), " and ".join(
            f"{d} {o}" for o, d in zip(objectives, directions)))
        return study
    if list(attrs["objectives"]) != list(objectives) or [d.name.lower() for d in study.directions] != list(directions):
        raise ConfigError(f"study {name} in {tracking.redact(uri)} optimizes {', '.join(attrs['objectives'])}, this "
                          f"recipe {', '.join(objectives)}; pass another --study name, or the same tune.objectives")
    if attrs.get("dataset_sha256") and attrs["dataset_sha256"] != info.get("sha256"):
        raise ConfigError(f"study {name} in {tracking.redact(uri)} was tuned on dataset {attrs['dataset_sha256'][:12]}, "
                          f"this recipe prepares {str(info.get('sha256'))[:12]}: trials would not compare; use the "
                          "same prepare section, or another --study name")
    if attrs.get("space") != {p.key: p.to_plain() for p in recipe.tune.space}:
        log.warning("the search space of study %s changed since it began; Optuna samples the new one from here on", name)
    log.info("study %s in %s holds %d trials; it continues", name, tracking.redact(uri), len(study.trials))
    return study


def _recorder(track: bool, experiment: str):
    return tracking.StudyRecorder(experiment) if track else tracking.NullStudyRecorder()


def _sampler(plan: Plan, worker: int):
    """The sampler of one worker. Each worker and each later invocation gets its own seed, so parallel
    workers do not draw the same random start-up points; TPE's constant liar keeps them apart after."""
    import optuna

    cfg = plan.config
    seed = cfg.seed + worker + 1000 * plan.seed_offset
    kind = "tpe" if cfg.sampler == "auto" else cfg.sampler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate / constant_liar are "experimental" in Optuna's words
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, plan.trials // 3)))
        # Random start-up trials before TPE models the space: a third of the budget, 10 at most.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=min(10, max(2, plan.trials // 3)))


def pruner_kind(cfg) -> str:
    return ("none" if cfg.multi_objective else "median") if cfg.pruner == "auto" else cfg.pruner


def _pruner(plan: Plan):
    import optuna

    cfg = plan.config
    kind = pruner_kind(cfg)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.pruner_warmup_epochs)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, cfg.pruner_warmup_epochs), max_resource="auto")
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- one trial

class TrialTracker:
    """The Tracker a trial's stages report to: the trial's MLflow run (or nothing) keeps the record;
    ``should_stop`` reports each epoch's value of the first objective to Optuna and asks its pruner."""

    def __init__(self, inner, trial, metric: str, prune: bool):
        self.inner, self.trial, self.metric, self.prune = inner, trial, metric, prune
        self.run_id = inner.run_id
        self.pruned_at: int | None = None
        self.history: list[dict] = []

    def __getattr__(self, name: str):  # log_params, log_metrics, log_artifact, ...: the record's
        return getattr(self.inner, name)

    def should_stop(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        self.history.append({"epoch": epoch, **metrics})
        if not self.prune:
            return False
        self.trial.report(float(metrics[self.metric]), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            return True
        return False


def suggest(trial, p: SearchParam) -> Any:
    """The trial's value of one space key. Choices that are lists (model.channels) travel through Optuna as
    their YAML text, which it can store, and come back as lists."""
    if p.kind == "float":
        return trial.suggest_float(p.key, p.low, p.high, log=p.log, step=p.step)
    if p.kind == "int":
        return trial.suggest_int(p.key, p.low, p.high, log=p.log, step=p.step or 1)
    if all(c is None or isinstance(c, (bool, int, float, str)) for c in p.choices):
        return trial.suggest_categorical(p.key, list(p.choices))
    return yaml.safe_load(trial.suggest_categorical(p.key, [_text(c) for c in p.choices]))


def _text(value: Any) -> str:
    """A value as YAML flow text: what --set parses back to the same value."""
    plain = [_text_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
    return yaml.safe_dump(plain, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...").strip()


def _text_plain(value: Any) -> Any:
    return [_text_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def trial_values(params: Mapping[str, Any], space: Sequence[SearchParam]) -> dict[str, Any]:
    """A finished trial's params (Optuna's record) as recipe values (lists back from their text)."""
    kinds = {p.key: p for p in space}
    out = {}
    for key, value in params.items():
        p = kinds.get(key)
        if p is not None and p.kind == "categorical" and isinstance(value, str) and not any(
                isinstance(c, str) for c in p.choices):
            value = yaml.safe_load(value)
        out[key] = value
    return out


def trial_recipe(base: Mapping, values: Mapping[str, Any]) -> Recipe:
    """The base recipe with each searched key set (ConfigError when the combination is invalid)."""
    data = json.loads(json.dumps(base))  # a deep copy of plain data
    data.pop("tune", None)  # a trial is a plain recipe
    for key, value in values.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return recipe_from_dict(data)


def _link_data(src: RunDir, dst: RunDir) -> None:
    """The study's prepared split in the trial's run directory (hard links: no copy)."""
    for name in ("data", "dataset"):
        a, b = getattr(src, name), getattr(dst, name)
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)


def _objective(trial, plan: Plan, recorder, worker: int, slot: "_Slot") -> float | tuple[float, ...]:
    """Run one trial: its recipe, train (pruned per epoch), the speed objective; -> the objective values."""
    import optuna

    from pipeline.orchestrate import RUNNERS, Context

    slot.release()  # the trial is in the storage: other workers may take the next slot
    started = time.perf_counter()
    base = plan.base
    cfg = base.tune
    values = {p.key: suggest(trial, p) for p in cfg.space}
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}:{worker}")
    trial.set_user_attr("overrides", list(plan.overrides))
    speed = plan.speed_objective
    metric = plan.objectives[0]
    prune = pruner_kind(cfg) != "none" and not speed
    shown = {k: _text(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
    retry_of = _frozen(trial).system_attrs.get("failed_trial")
    tags = {"tune.state": "running", **({"tune.retry_of": str(retry_of)} if retry_of is not None else {})}
    rundir = RunDir(tempfile.mkdtemp(prefix=f"trial-{trial.number}-", dir=_mkdir(Path(plan.workdir) / "trials"))).ensure()
    pruned_at, out = None, []
    try:
        with recorder.trial(plan.parent_run_id, plan.study, trial.number, shown, tags) as ml:
            trial.set_user_attr("mlflow_run_id", ml.run_id)
            tracker = TrialTracker(ml, trial, metric, prune)
            try:
                recipe = trial_recipe(plan.recipe, values)
                if recipe.prepare == base.prepare:
                    _link_data(plan.data_dir, rundir)
                else:  # the space searches a prepare key: this trial's own split
                    RUNNERS["prepare"](Context(recipe, rundir), tracker)
                ctx = Context(recipe, rundir)
                result = RUNNERS["train"](ctx, tracker)
                best_row = next((r for r in tracker.history if r["epoch"] == result.best_epoch), {})
                value = result.value if metric == result.metric else float(best_row[metric])
                trial.set_user_attr("epochs_run", result.epochs_run)
                trial.set_user_attr("epochs", recipe.train.epochs)
                trial.set_user_attr("best_epoch", result.best_epoch)
                pruned_at = tracker.pruned_at
                if pruned_at is not None:
                    trial.set_user_attr("pruned_at_epoch", pruned_at)
                    ml.set_tags({"tune.state": "pruned", "tune.pruned_at_epoch": pruned_at})
                    ml.log_metrics({f"objective.{metric}": value})
                else:
                    out = [value]
                    if speed:
                        value, measured = _speed(recipe, rundir, ctx, tracker, metric, value, speed, plan)
                        out = [value, measured[speed]]
                        trial.set_user_attr("speed", measured)
                    ml.log_metrics({f"objective.{o}": v for o, v in zip(plan.objectives, out)})
                    ml.set_tags({"tune.state": "complete"})
            except BaseException as e:  # an error, or Ctrl-C / SIGTERM (the run ends KILLED, the trial failed)
                interrupted = isinstance(e, KeyboardInterrupt)
                message = "interrupted" if interrupted else str(e).splitlines()[0] if str(e) else type(e).__name__
                with contextlib.suppress(Exception):
                    trial.set_user_attr("error", message[:1000])
                    ml.set_tags({"tune.state": "failed", "tune.error": message[:500]})
                if not interrupted:
                    log.warning("trial %d failed: %s (%s)", trial.number, message, _params_text(shown))
                    log.debug("trial %d failed", trial.number, exc_info=True)
                raise
            finally:
                seconds = time.perf_counter() - started
                trial.set_user_attr("seconds", seconds)
                ml.log_metrics({"trial_seconds": seconds})
    finally:
        shutil.rmtree(rundir.root, ignore_errors=True)
    if pruned_at is not None:
        log.info("trial %d pruned at epoch %d (%s %.4f) in %.0f s: %s", trial.number, pruned_at, metric, value,
                 seconds, _params_text(shown))
        raise optuna.TrialPruned(f"pruned at epoch {pruned_at}")
    log.info("trial %d complete in %.0f s: %s (%s)", trial.number, seconds,
             ", ".join(f"{o} {v:.4g}" for o, v in zip(plan.objectives, out)), _params_text(shown))
    return out[0] if len(out) == 1 else tuple(out)


def _frozen(trial):
    """The running trial as Optuna stored it (a retry's system attributes say which trial it retries)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def _params_text(shown: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in shown.items())


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _speed(recipe: Recipe, rundir: RunDir, ctx, tracker, metric: str, value: float, speed: str,
           plan: Plan) -> tuple[float, dict]:
    """Export the trial's model (and quantize one variant), time or weigh it; -> (the first objective's value,
    measured numbers). A quantized variant's first objective is its own validation score."""
    from pipeline.orchestrate import RUNNERS, Context
    from stages import dataset

    cfg = plan.config
    RUNNERS["export"](ctx, tracker)
    path = rundir.onnx
    if cfg.variant != "fp32":
        quantized = dataclasses.replace(recipe, quantize=dataclasses.replace(recipe.quantize, variants=(cfg.variant,)))
        RUNNERS["quantize"](Context(quantized, rundir), tracker)
        report = json.loads(rundir.variants.read_text())["variants"].get(cfg.variant, {})
        if not report.get("ok"):
            raise StageError(f"variant {cfg.variant} did not build: {report.get('error', 'see the quantize log')}")
        path = rundir.root / report["file"] if report.get("file") else rundir.variant(cfg.variant)
    data = dataset.load(rundir.data, rundir.dataset)
    x_val, y_val = data.split("val", normalized=False)
    settings = recipe.serve.runtime.session_settings()  # the sessions the server builds
    measured: dict[str, Any] = {"file": path.name, "size_kb": path.stat().st_size / 1024}
    if cfg.variant != "fp32":
        from stages.onnx_model import OnnxModel

        value = float(OnnxModel.open(path, device="cpu").score(x_val, y_val)["value"])
        measured[f"{metric}.{cfg.variant}"] = value
    if speed in ("latency_ms", "samples_per_s"):
        batch = 1 if speed == "latency_ms" else (cfg.batch_size or recipe.serve.batching.max_batch_size)
        timed = measure_speed(path, x_val, batch, settings, cfg.timing_seconds)
        measured.update({"batch_size": batch, "median_ms": timed["median_ms"], "p90_ms": timed["p90_ms"],
                         "samples_per_s": timed["samples_per_s"], "provider": timed["provider"],
                         "latency_ms": timed["median_ms"], "runs": timed["runs"]})
    tracker.log_metrics({k: v for k, v in measured.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.set_tags({"tune.timed_file": path.name, **({"tune.provider": measured["provider"]} if "provider" in measured else {})})
    return value, measured


def measure_speed(path: Path, x_raw, batch: int, settings, seconds: float) -> dict:
    """Median latency and samples/s of ``path`` at ``batch`` with the harness of `pipeline benchmark`
    (stages/timing.py): a session from the one factory with ``settings`` (the server's), warm-up, then calls
    until both 20 runs and ``seconds`` are reached. A CUDA request that fell back to CPU is refused."""
    import numpy as np

    from stages import timing
    from stages.onnx_model import OnnxModel
    from stages.predictors import OrtPredictor

    predictor = OrtPredictor(path, settings=settings)
    if predictor.cuda_fell_back:
        raise StageError(f"serve.runtime.device asks for CUDA but ONNX Runtime runs {path.name} on {predictor.provider}: "
                         "a CPU timing must not stand for a CUDA one; fix the CUDA install or set serve.runtime.device=cpu")
    feeds = OnnxModel(predictor).meta.feed(np.resize(x_raw, (batch, *x_raw.shape[1:])))
    timing.measure(lambda: predictor.run(feeds), warmup=10, min_runs=0, max_seconds=0)
    times = timing.measure(lambda: predictor.run(feeds), min_runs=20, min_seconds=seconds, max_seconds=max(10.0, 4 * seconds))
    return {**timing.summarize(times, batch), "provider": predictor.provider}


# ---------------------------------------------------------------- workers and the trial budget

class _Slot:
    """The right to start one trial, held from the budget check until the trial is in the storage (the
    objective releases it first thing), so workers on this machine never start more than the budget."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def counts(trials) -> dict[str, int]:
    """Trials per state; a trial retried after its worker died counts once (the retry stands for it)."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    out = {s: 0 for s in STATES}
    for t in trials:
        if t.number in retried:
            continue
        out[t.state.name.lower().replace("fail", "failed")] += 1
    return out


def _room(study, target: int) -> bool:
    """May a worker start a trial? Yes while the study holds fewer than ``target`` (retried ones counted
    once), and always for a waiting one (a retry, or an enqueued trial)."""
    c = counts(study.get_trials(deepcopy=False))
    return c["waiting"] > 0 or c["complete"] + c["pruned"] + c["failed"] + c["running"] < target


def _stale_callback(plan: Plan, recorder):
    """A trial whose heartbeat stopped: its MLflow run KILLED, its parameters queued again."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        retry = RetryHeartbeatStaleTrialCallback(max_retry=plan.config.retry_stale)

    def on_stale(study, trial) -> None:
        log.warning("trial %d's worker (%s) stopped beating: marked failed%s", trial.number,
                    trial.user_attrs.get("worker", "?"), ", to run again" if plan.config.retry_stale else "")
        with contextlib.suppress(Exception):  # the record is a courtesy here; the study must go on
            recorder.trial_killed(trial.user_attrs.get("mlflow_run_id"),
                                  f"worker {trial.user_attrs.get('worker', '?')} died (no heartbeat)",
                                  parent_run_id=plan.parent_run_id, number=trial.number)
        if plan.config.retry_stale:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                retry(study, trial)

    return on_stale


def _fail_dead_here(study, on_stale) -> None:
    """Fail the running trials whose worker ran on this machine under a process that is gone (killed with
    SIGKILL, say): no need to wait for their heartbeats to go stale."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        where = str(t.user_attrs.get("worker", "")).split(":")
        if len(where) != 3 or where[0] != host or not where[1].isdigit() or _alive(int(where[1])):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except Exception:  # another worker failed it first
            continue
        on_stale(study, study.get_trials(deepcopy=True)[t.number])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def work(plan: Plan, worker: int = 0) -> int:
    """One worker: trials until the study holds ``plan.trials`` or the deadline passes. -> trials run."""
    import optuna

    if plan.threads:
        import torch

        torch.set_num_threads(plan.threads)
    recorder = _recorder(plan.track, plan.base.name)
    on_stale = _stale_callback(plan, recorder)
    storage = open_storage(plan.storage, plan.config.heartbeat_s, on_stale=on_stale)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # we log each trial's outcome ourselves, in one line
    study = optuna.load_study(study_name=plan.study, storage=storage, sampler=_sampler(plan, worker),
                              pruner=_pruner(plan))
    slot = _Slot(Path(plan.workdir) / ".slots.lock")
    ran = 0
    while plan.deadline is None or time.time() < plan.deadline:
        slot.acquire()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # before counting: a dead worker's trial is not held
            _fail_dead_here(study, on_stale)
            if not _room(study, plan.trials):
                break
            study.optimize(lambda t: _objective(t, plan, recorder, worker, slot), n_trials=1, catch=(Exception,))
            ran += 1
        finally:
            slot.release()
    return ran


def _die_with_parent() -> None:
    """Linux: this worker gets SIGTERM when the `pipeline tune` that started it dies, even by SIGKILL, so
    no worker trains on for a study nobody is watching (its trial ends failed, its run KILLED)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _worker_main(plan_path: str, worker: str) -> int:
    """`python -m pipeline.tune worker PLAN.json INDEX`: one of `pipeline tune --workers K`'s processes."""
    from pipeline.orchestrate import _signals_as_interrupts

    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [worker {worker}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("alembic", "matplotlib", "PIL", "onnxscript", "onnx_ir", "torch", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    plan = Plan(**json.loads(Path(plan_path).read_text()))
    try:
        with _signals_as_interrupts():
            work(plan, int(worker))
    except KeyboardInterrupt:
        return 143
    return 0


def run_study(plan: Plan, workers: int = 1) -> "Summary":
    """Run trials (in this process, or in ``workers`` processes), then summarize, plot and record the study."""
    from pipeline.orchestrate import _signals_as_interrupts

    import optuna

    started = time.perf_counter()
    on_stale = _stale_callback(plan, _recorder(plan.track, plan.base.name))
    study = optuna.load_study(study_name=plan.study, storage=open_storage(plan.storage, plan.config.heartbeat_s, on_stale))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of dead workers are not held: say what will run
    _fail_dead_here(study, on_stale)
    before = counts(study.get_trials(deepcopy=False))
    held = sum(before[s] for s in ("complete", "pruned", "failed", "running"))
    log.info("study %s: %d of %d trials held (%s); %s", plan.study, held, plan.trials,
             ", ".join(f"{n} {s}" for s, n in before.items() if n) or "none yet",
             f"running up to {max(plan.trials - held, before['waiting'])} more with {workers} worker(s)"
             if held < plan.trials or before["waiting"] else "nothing to run (raise --trials to run more)")
    status = "FINISHED"
    try:
        with _signals_as_interrupts():
            if workers == 1:
                work(plan, 0)
            else:
                _run_workers(plan, workers)
    except KeyboardInterrupt:
        status = "KILLED"
        _finish(plan, study, time.perf_counter() - started, status)
        raise
    return _finish(plan, study, time.perf_counter() - started, status)


def _finish(plan: Plan, study, seconds: float, status: str) -> "Summary":
    summary = summarize(plan, study, seconds=seconds)
    if status == "FINISHED" and summary.counts["failed"] and not summary.counts["complete"] + summary.counts["pruned"]:
        status = "FAILED"
    _record(plan, summary, status)
    return summary


def _run_workers(plan: Plan, workers: int) -> None:
    """``workers`` processes of `python -m pipeline.tune worker`, each with its share of the cores."""
    plan_file = Path(plan.workdir) / f".plan-{os.getpid()}.json"
    write_json(plan_file, dataclasses.asdict(plan))
    env = {**os.environ, "OMP_NUM_THREADS": str(plan.threads or 1), "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.tune", "worker", str(plan_file), str(i)], env=env)
             for i in range(workers)]
    log.info("started %d workers (pids %s), %d torch thread(s) each", workers, ", ".join(str(p.pid) for p in procs),
             plan.threads)
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too (same process group); SIGTERM does not
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        plan_file.unlink(missing_ok=True)
    failed = [p.returncode for p in procs if p.returncode not in (0,)]
    if failed:
        log.warning("%d worker(s) exited with %s", len(failed), failed)


# ---------------------------------------------------------------- the summary, the best trial, the record

@dataclass
class Summary:
    study: str
    storage: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    counts: dict[str, int]
    seconds: float
    trials: list[dict]  # one row per trial: number, state, values, params, epochs_run, seconds, worker, ...
    best: list[int]  # the best trial (one objective) or the Pareto front's trial numbers (two)
    chosen: int | None  # the trial best.yaml reproduces
    epochs: dict[str, int]  # trained, saved_by_pruning (epochs a pruned trial did not train)
    workdir: str
    parent_run_id: str | None
    overlay: str | None = None  # best.yaml
    set_list: list[str] = field(default_factory=list)  # the chosen trial as --set KEY=VALUE items
    plots: list[str] = field(default_factory=list)

    def row(self, number: int) -> dict:
        return next(r for r in self.trials if r["number"] == number)


def _rows(study, space: Sequence[SearchParam], epochs: int) -> list[dict]:
    retried = {n for t in study.trials for n in t.system_attrs.get("retry_history", [])}
    rows = []
    for t in study.trials:
        rows.append({"number": t.number, "state": t.state.name.lower().replace("fail", "failed"),
                     "values": list(t.values) if t.values else None,
                     "params": trial_values(t.params, space),
                     "epochs_run": t.user_attrs.get("epochs_run"), "epochs": t.user_attrs.get("epochs", epochs),
                     "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
                     "intermediate": {int(k): v for k, v in t.intermediate_values.items()},
                     "seconds": t.user_attrs.get("seconds"), "worker": t.user_attrs.get("worker"),
                     "speed": t.user_attrs.get("speed"), "error": t.user_attrs.get("error"),
                     "retry_of": t.system_attrs.get("failed_trial"), "retried": t.number in retried,
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "overrides": t.user_attrs.get("overrides", [])})
    return rows


def pareto_front(rows: Sequence[dict], directions: Sequence[str]) -> list[int]:
    """Numbers of the complete trials no other complete trial dominates (at least as good on every objective,
    better on one)."""
    done = [r for r in rows if r["state"] == "complete" and r["values"]]
    sign = [1 if d == "maximize" else -1 for d in directions]

    def dominates(a, b) -> bool:
        pa, pb = [s * v for s, v in zip(sign, a["values"])], [s * v for s, v in zip(sign, b["values"])]
        return all(x >= y for x, y in zip(pa, pb)) and any(x > y for x, y in zip(pa, pb))

    return [r["number"] for r in done if not any(dominates(o, r) for o in done if o is not r)]


def choose(rows: Sequence[dict], directions: Sequence[str], front: Sequence[int], within: float) -> int | None:
    """One objective: the best trial. Two: among the front's trials whose first objective is within
    ``within`` of the front's best, the best on the second."""
    if not front:
        return None
    sign = [1 if d == "maximize" else -1 for d in directions]
    cand = [r for r in rows if r["number"] in front]
    best_first = max(sign[0] * r["values"][0] for r in cand)
    if len(directions) == 1:
        return next(r["number"] for r in cand if sign[0] * r["values"][0] == best_first)
    near = [r for r in cand if sign[0] * r["values"][0] >= best_first - within]
    return max(near, key=lambda r: (sign[1] * r["values"][1], sign[0] * r["values"][0]))["number"]


def summarize(plan: Plan, study=None, *, seconds: float = 0.0, pick: int | None = None) -> Summary:
    """The study as it stands: counts, rows, the best trial or front, the chosen trial, best.yaml, plots."""
    import optuna

    if study is None:
        study = optuna.load_study(study_name=plan.study, storage=open_storage(plan.storage, plan.config.heartbeat_s))
    cfg = plan.config
    trials = study.get_trials(deepcopy=False)
    rows = _rows(study, cfg.space, plan.base.train.epochs)
    front = pareto_front(rows, plan.directions)
    chosen = choose(rows, plan.directions, front, cfg.pick_within)
    if pick is not None:
        row = next((r for r in rows if r["number"] == pick), None)
        if row is None or row["state"] != "complete":
            done = [r["number"] for r in rows if r["state"] == "complete"]
            raise ConfigError(f"--pick {pick}: study {plan.study} has no complete trial {pick}; complete trials: "
                              f"{', '.join(map(str, done)) or 'none'}")
        if pick not in front:
            log.warning("trial %d is not on the Pareto front (%s): another trial is at least as good on every "
                        "objective", pick, ", ".join(map(str, front)))
        chosen = pick
    counted = [r for r in rows if not r["retried"]]
    trained = sum(r["epochs_run"] or 0 for r in rows)
    saved = sum((r["epochs"] or 0) - (r["epochs_run"] or 0) for r in counted
                if r["state"] == "pruned" and r["epochs_run"] is not None)
    summary = Summary(study=plan.study, storage=tracking.redact(plan.storage), objectives=plan.objectives,
                      directions=plan.directions, counts=counts(trials), seconds=seconds, trials=rows,
                      best=front, chosen=chosen, epochs={"trained": trained, "saved_by_pruning": saved},
                      workdir=plan.workdir, parent_run_id=plan.parent_run_id)
    if chosen is not None:
        values = summary.row(chosen)["params"]
        summary.set_list = [f"{k}={_text(v)}" for k, v in values.items()]
        summary.overlay = str(write_overlay(Path(plan.workdir) / "best.yaml", values, summary, chosen))
    summary.plots = [str(p) for p in plot_study(summary, Path(plan.workdir) / "plots", study)]
    write_json(Path(plan.workdir) / "study.json", dataclasses.asdict(summary))
    return summary


def write_overlay(path: Path, values: Mapping[str, Any], summary: Summary, number: int) -> Path:
    """The chosen trial's keys as a partial recipe: `pipeline run --recipe R --recipe-overlay best.yaml`."""
    nested: dict = {}
    for key, value in values.items():
        node = nested
        *parts, last = key.split(".")
        for part in parts:
            node = node.setdefault(part, {})
        node[last] = list(value) if isinstance(value, tuple) else value
    row = summary.row(number)
    scores = ", ".join(f"{o} {v:.6g}" for o, v in zip(summary.objectives, row["values"] or []))
    also = " ".join(row.get("overrides") or ())
    header = (f"# Trial {number} of study {summary.study} ({summary.storage}): {scores}.\n"
              f"# Written by `pipeline tune --best`; reproduce it with\n"
              f"#   pipeline run --recipe RECIPE --recipe-overlay {path}{' ' + also if also else ''}\n")
    if also:
        header += ("# (the trial ran with those recipe changes too; this file holds only the searched keys: drop the\n"
                   "# ones that were for the study alone, such as a larger validation split)\n")
    return write_text(path, header + yaml.dump(nested, Dumper=_FlowLists, sort_keys=False, default_flow_style=False))


class _FlowLists(yaml.SafeDumper):
    """Sections as blocks, lists inline (``channels: [32, 64, 64]``), as recipes are written."""


_FlowLists.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                                 flow_style=True))


def _record(plan: Plan, summary: Summary, status: str) -> None:
    """The study's summary on its parent MLflow run: counts, the chosen trial, plots, study.json, best.yaml."""
    if plan.parent_run_id is None or not plan.track:
        return
    metrics = {f"trials_{s}": n for s, n in summary.counts.items()}
    metrics.update({"tune_seconds": summary.seconds, "epochs_trained": summary.epochs["trained"],
                    "epochs_saved_by_pruning": summary.epochs["saved_by_pruning"]})
    tags = {"tune.front": ",".join(map(str, summary.best)), "tune.status": status.lower()}
    if summary.chosen is not None:
        row = summary.row(summary.chosen)
        metrics.update({f"best.{o}": v for o, v in zip(summary.objectives, row["values"])})
        tags.update({"tune.chosen_trial": str(summary.chosen), "tune.chosen_run": row["mlflow_run_id"] or "",
                     "tune.set": " ".join(f"--set {shlex.quote(s)}" for s in summary.set_list)})
    artifacts = [*summary.plots, Path(summary.workdir) / "study.json", *([summary.overlay] if summary.overlay else [])]
    try:
        tracking.StudyRecorder(plan.base.name).finish_parent(plan.parent_run_id, status=status, metrics=metrics,
                                                             tags=tags, artifacts=[Path(a) for a in artifacts])
    except Exception as e:  # the study itself is safe in its storage; say what was not recorded
        log.warning("could not record the study's summary on MLflow run %s: %s", plan.parent_run_id, e)


def plot_study(summary: Summary, folder: Path, study=None) -> list[Path]:
    """The plots users expect of a study (matplotlib): optimization history, each trial's validation curve
    (pruned ones dashed), parameter importances, and with two objectives the Pareto front, chosen point marked."""
    from stages.metrics import _pyplot, _save

    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    rows = [r for r in summary.trials if r["state"] in ("complete", "pruned")]
    out: list[Path] = []
    if not rows:
        return out
    first, sign = summary.objectives[0], 1 if summary.directions[0] == "maximize" else -1

    # optimization history: every trial's first objective, and the best so far
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["intermediate"]]
    ax.scatter([r["number"] for r in done], [r["values"][0] for r in done], label="complete", zorder=3)
    if pruned:
        ax.scatter([r["number"] for r in pruned], [r["intermediate"][max(r["intermediate"])] for r in pruned],
                   marker="x", color="tab:red", label="pruned (last epoch reported)", zorder=3)
    best, xs, ys = None, [], []
    for r in sorted(done, key=lambda r: r["number"]):
        v = r["values"][0]
        best = v if best is None or sign * v > sign * best else best
        xs.append(r["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:green", label="best so far")
    if summary.chosen is not None:
        c = summary.row(summary.chosen)
        ax.scatter([c["number"]], [c["values"][0]], marker="*", s=220, color="gold", edgecolor="k", zorder=4,
                   label=f"chosen: trial {c['number']}")
    ax.set(xlabel="trial", ylabel=first, title=f"Optimization history: {summary.study}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, folder / "optimization_history.png"))

    # intermediate values: the first objective per epoch, per trial
    curves = [r for r in rows if r["intermediate"]]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
        for r in curves:
            steps = sorted(r["intermediate"])
            ax.plot(steps, [r["intermediate"][s] for s in steps], linestyle="--" if r["state"] == "pruned" else "-",
                    color="tab:red" if r["state"] == "pruned" else "tab:blue", alpha=0.6, linewidth=1)
        ax.set(xlabel="epoch", ylabel=first, title="Validation per epoch (pruned: red, dashed)")
        fig.tight_layout()
        out.append(_save(fig, folder / "intermediate_values.png"))

    importances = _importances(summary, study) if study is not None else {}
    if importances:
        fig, axes = plt.subplots(1, len(importances), figsize=(5.5 * len(importances), 0.5 + 0.45 * max(
            len(v) for v in importances.values()) + 1), dpi=110, squeeze=False)
        for ax, (objective, values) in zip(axes[0], importances.items()):
            names = list(values)[::-1]
            ax.barh(names, [values[n] for n in names])
            ax.set(xlabel="importance (PED-ANOVA, normalized)", title=f"Parameter importance: {objective}")
        fig.tight_layout()
        out.append(_save(fig, folder / "param_importances.png"))

    if len(summary.objectives) == 2 and done:
        fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
        front = [summary.row(n) for n in summary.best]
        ax.scatter([r["values"][1] for r in done], [r["values"][0] for r in done], color="lightgray", label="trial")
        front.sort(key=lambda r: r["values"][1])
        ax.plot([r["values"][1] for r in front], [r["values"][0] for r in front], marker="o", color="tab:blue",
                label="Pareto front")
        for r in front:
            ax.annotate(str(r["number"]), (r["values"][1], r["values"][0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        if summary.chosen is not None:
            c = summary.row(summary.chosen)
            ax.scatter([c["values"][1]], [c["values"][0]], marker="*", s=260, color="gold", edgecolor="k", zorder=4,
                       label=f"chosen: trial {c['number']}")
        ax.set(xlabel=summary.objectives[1], ylabel=first, title=f"Pareto front: {summary.study}")
        if summary.objectives[1] in ("latency_ms", "size_kb"):
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(_save(fig, folder / "pareto_front.png"))
    return out


def _importances(summary: Summary, study) -> dict[str, dict[str, float]]:
    """Per objective, each searched key's importance (Optuna's PED-ANOVA) over the complete trials."""
    import optuna

    if sum(r["state"] == "complete" for r in summary.trials) < 3:
        return {}
    out = {}
    try:
        for i, objective in enumerate(summary.objectives):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = optuna.importance.get_param_importances(study, target=lambda t, i=i: t.values[i])
            if values:
                out[objective] = values
    except Exception as e:  # too few trials, or a space that did not vary: no plot, not an error
        log.info("no parameter importances yet (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__)
    return out


def best(recipe: Recipe, *, study: str | None = None, storage: str | None = None, pick: int | None = None,
         workdir: Path | None = None, track: bool = True) -> Summary:
    """`pipeline tune --best`: the study's best trial (or the Pareto front and its chosen point), best.yaml
    written, nothing run. The plots are redrawn with the chosen point marked and, when tracking, logged again."""
    import optuna

    cfg = recipe.tune
    name = study or cfg.study or recipe.name
    uri = storage or cfg.storage or default_storage()
    try:
        st = optuna.load_study(study_name=name, storage=open_storage(uri, cfg.heartbeat_s))
    except KeyError:
        raise ConfigError(f"no study {name!r} in {tracking.redact(uri)}; run `pipeline tune --recipe ...` first, or pass "
                          "--study/--storage naming one") from None
    objectives = tuple(st.user_attrs.get("objectives") or ())
    directions = tuple(d.name.lower() for d in st.directions)
    plan = Plan(recipe=recipe.to_dict(), study=name, storage=uri, objectives=objectives, directions=directions,
                task="", workdir=str(workdir or default_workdir(name)), trials=len(st.trials), track=track,
                parent_run_id=st.user_attrs.get("mlflow_parent_run_id") if track else None, deadline=None)
    Path(plan.workdir).mkdir(parents=True, exist_ok=True)
    summary = summarize(plan, st, pick=pick)
    if summary.chosen is None:
        raise StageError(f"study {name} has no complete trial yet; run `pipeline tune` (it holds "
                         f"{', '.join(f'{n} {s}' for s, n in summary.counts.items() if n) or 'no trials'})")
    if track and plan.parent_run_id:  # the redrawn plots and best.yaml on the parent run, its status unchanged
        try:
            tracking.StudyRecorder(recipe.name).finish_parent(
                plan.parent_run_id, status=None, metrics={}, tags={"tune.chosen_trial": str(summary.chosen)},
                artifacts=[Path(p) for p in [*summary.plots, summary.overlay] if p])
        except Exception as e:
            log.warning("could not record the chosen trial on MLflow run %s: %s", plan.parent_run_id, e)
    return summary


def summary_text(summary: Summary, limit: int = 10) -> str:
    """What the CLI prints: counts and wall time, the best trials, the front, the chosen one as --set."""
    c = summary.counts
    lines = [f"study {summary.study} ({summary.storage}): {c['complete']} complete, {c['pruned']} pruned, "
             f"{c['failed']} failed" + (f", {c['running']} running" if c["running"] else "")
             + (f"; this run {summary.seconds:.0f} s" if summary.seconds else "")
             + (f"; pruning saved {summary.epochs['saved_by_pruning']} of "
                f"{summary.epochs['trained'] + summary.epochs['saved_by_pruning']} epochs"
                if summary.epochs["saved_by_pruning"] else "")]
    sign = [1 if d == "maximize" else -1 for d in summary.directions]
    done = sorted((r for r in summary.trials if r["state"] == "complete"), key=lambda r: -sign[0] * r["values"][0])
    if len(summary.objectives) == 2:
        lines.append(f"Pareto front ({' vs '.join(summary.objectives)}):")
        shown = sorted((summary.row(n) for n in summary.best), key=lambda r: r["values"][1] * sign[1], reverse=True)
    else:
        lines.append(f"best trials by {summary.objectives[0]}:")
        shown = done[:limit]
    for r in shown:
        mark = "*" if r["number"] == summary.chosen else " "
        values = "  ".join(f"{o} {v:.5g}" for o, v in zip(summary.objectives, r["values"]))
        params = _params_text({k: _text(v) if isinstance(v, (list, tuple)) else v for k, v in r["params"].items()})
        lines.append(f" {mark} trial {r['number']:>3}  {values}  ({params})")
    if summary.chosen is not None:
        lines.append(f"chosen: trial {summary.chosen} -> {summary.overlay}")
        lines.append("  " + " ".join(f"--set {shlex.quote(s)}" for s in summary.set_list))
    if summary.plots:
        lines.append(f"plots: {Path(summary.plots[0]).parent}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        sys.exit(_worker_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m pipeline.tune worker PLAN.json INDEX (started by `pipeline tune --workers K`)")
