"""The `pipeline` command: one thin command per stage, `run` for all of them, `serve`, `package`, `predict`,
and the questions asked of the record (`lineage`, `compare`, `promote`).

Heavy libraries (torch, onnxruntime, mlflow) are imported inside the commands so `--help` is instant.
Exit codes (one table, also in `pipeline --help` and the README):

    0    done
    1    the work failed: a stage failed, a promotion was refused, the run directory is busy,
         --require-gpu found no usable GPU
    2    the command or its input must change: an unknown option or stage name, a bad recipe key or value,
         a model, file or registry URI that does not exist or cannot be read (a truncated or corrupt .onnx,
         checkpoint or dataset, also in the run directory), a model that serve or package refuses, a model
         factory or weights file that does not fit, an output directory in the way, predict's inputs that do
         not fit the model, an MLflow store that cannot be reached or used (MLFLOW_TRACKING_URI)
    130  interrupted by Ctrl-C (SIGINT); 143: stopped by SIGTERM. MLflow runs end KILLED.

Errors are one line on stderr (`error: ...`), never a traceback. Results go to stdout (tables, or JSON
with --json), logs to stderr.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

OK, FAILED, USAGE, INTERRUPTED, TERMINATED = 0, 1, 2, 130, 143
EXIT_CODES = (f"Exit codes: {OK} done; {FAILED} the work failed (a stage, a refused promotion, a busy run "
              f"directory); {USAGE} the command, recipe or input must change; {INTERRUPTED} Ctrl-C, "
              f"{TERMINATED} SIGTERM.")

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown", epilog=EXIT_CODES)
log = logging.getLogger("pipeline")

DEFAULT_RECIPE = Path("configs/digits-cnn.yaml")
RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file.")]
# serve and package need a recipe only for defaults: the default file when it is there, else built-in ones.
OptionalRecipeOpt = Annotated[Optional[Path], typer.Option(
    "--recipe", "-r", show_default=f"{DEFAULT_RECIPE} if it exists here, else built-in serve defaults",
    help="Recipe YAML file, for its `serve` settings and its registered model name.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                     help="Override a recipe value, e.g. `--set train.epochs=3` (repeatable).")]
OverlayOpt = Annotated[Optional[list[Path]], typer.Option(
    "--recipe-overlay", metavar="FILE", help="A partial recipe merged over --recipe before any --set, validated like "
                                             "it (repeatable), e.g. the best.yaml `pipeline tune --best` writes.")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", "-w", show_default="runs/<recipe name>",
                                                    help="Run directory.")]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="Record nothing in MLflow (the run directory still "
                                                             "stamps each stage for reuse).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table "
                                                      "(logs stay on stderr).")]
InitFromOpt = Annotated[Optional[str], typer.Option(
    "--init-from", metavar="RUN_ID|CHECKPOINT",
    help="Start from other weights (an MLflow run id, a checkpoint.pt, a .pt/.pth state dict or a .safetensors "
         "file; train.finetune sets strictness and the schedule); the head is replaced when the label set differs.")]


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


TrainDeviceOpt = Annotated[Optional[Device], typer.Option(show_default="the recipe's train.device",
                                                          help="Training device.")]


# ---------------------------------------------------------------- global options, logging, errors

def _setup_logging(level: int = logging.INFO) -> None:
    """Logs go to stderr: INFO by default, DEBUG for this project's modules with -v, WARNING with -q."""
    logging.basicConfig(level=max(level, logging.INFO), format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for ours in ("pipeline", "stages", "models"):
        logging.getLogger(ours).setLevel(level)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "onnxscript", "onnx_ir", "torch", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # The torch.export-based exporter warns about every torchvision op it cannot register; we use none.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"onnx-pipeline {version('onnx-pipeline')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("onnx-pipeline (not installed)")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages too.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """From a PyTorch model to a fast, quantized, served ONNX model, every step in MLflow.

    Run it from the repository root (recipes are `configs/*.yaml`, runs go to `runs/`, the MLflow store is
    `mlruns/` unless `MLFLOW_TRACKING_URI` says otherwise). `pipeline COMMAND --help` lists a command's options.
    """
    if verbose and quiet:
        raise _usage("-v/--verbose and -q/--quiet contradict each other; pass one")
    _setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def _error(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _usage(message: str) -> typer.Exit:
    """The command, recipe or input must change (exit 2)."""
    return _error(message, USAGE)


def _failed(message: str) -> typer.Exit:
    """The work was attempted and failed (exit 1)."""
    return _error(message, FAILED)


def _warn(message: str) -> None:
    typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)


@contextlib.contextmanager
def _errors(stage_error: int) -> Iterator[None]:
    """One line and an exit code instead of a traceback. A recipe problem is always a usage error (2), and
    so is an InputError (a file that cannot be used, a store that cannot be reached, a model factory or
    weights file that does not fit); another StageError is ``stage_error``: 2 while the command's inputs
    are resolved, 1 once the work runs. The MLflow store failing mid-way is one line too (1).
    Ctrl-C / SIGTERM end with 130 / 143 (the orchestrator has marked the MLflow runs KILLED)."""
    from pipeline.recipe_file import ConfigError  # not pipeline.config: serve must not import torch
    from stages.common import InputError, StageError

    try:
        yield
    except ConfigError as e:
        raise _usage(str(e)) from None
    except InputError as e:  # a file that cannot be used, a store that cannot be reached: always the user's to fix
        raise _usage(str(e)) from None
    except StageError as e:
        raise _error(str(e), stage_error) from None
    except KeyboardInterrupt as e:
        raise _interrupted(e) from None
    except Exception as e:
        store_failure = _store_failure(e)
        if store_failure is None:
            raise
        raise _failed(store_failure) from None


def _store_failure(error: BaseException) -> str | None:
    """An error of the MLflow store in mid-run (it went away, or refused a write), in one line with its
    password redacted; None for any other error."""
    mlflow_exceptions = sys.modules.get("mlflow.exceptions")
    if mlflow_exceptions is None or not isinstance(error, mlflow_exceptions.MlflowException):
        return None
    from pipeline import tracking
    from stages.common import one_line

    return tracking.redact_text(f"the MLflow store {tracking.shown_uri()} failed ({one_line(error.message, 400)})")


def _interrupted(e: KeyboardInterrupt) -> typer.Exit:
    orchestrate = sys.modules.get("pipeline.orchestrate")  # loaded if a stage was running
    terminated = orchestrate is not None and isinstance(e, orchestrate.Terminated)
    return _error(f"interrupted ({str(e) or 'Ctrl-C'}); any MLflow runs are marked KILLED; `pipeline run --resume` "
                  "continues from the unfinished stage", TERMINATED if terminated else INTERRUPTED)


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------- recipes and run directories

def _load(recipe: Path, overrides: Optional[list[str]], overlays: Optional[list[Path]] = None):
    from pipeline.config import load_recipe

    return load_recipe(recipe, overrides or [], overlays or [])


def _rundir(workdir: Optional[Path]):
    from stages.contract import RunDir

    return RunDir(workdir) if workdir else None


def _optional_recipe(recipe: Optional[Path], overrides: list[str]):
    """(serve settings, recipe or None) for commands that need a recipe only for defaults: the given
    recipe, else the default one when it is here, else the serve section's built-in defaults (then only
    `serve.*` keys may be --set)."""
    import typing

    from pipeline.config import ConfigError, Recipe, apply_override, build_config

    if recipe is None and DEFAULT_RECIPE.is_file():
        recipe = DEFAULT_RECIPE
    if recipe is not None:
        cfg = _load(recipe, overrides)
        return cfg.serve, cfg
    data: dict = {}
    for item in overrides:
        if not item.startswith("serve."):
            raise ConfigError(f"--set {item}: without a recipe only serve.* keys can be set; pass --recipe FILE")
        apply_override(data, item)
    return build_config(typing.get_type_hints(Recipe)["serve"], data.get("serve") or {}, "serve"), None


def _champion_uri(cfg) -> str:
    return f"models:/{cfg.register.model_name or cfg.name}@champion"


def _require_store(uri: str) -> None:
    """A models:/ URI read from the default local store, run outside the repository, would create an empty
    store in the current directory and then fail to find the model: refuse with the fix instead."""
    from pipeline import tracking

    store = tracking.tracking_uri()
    if store == tracking.DEFAULT_TRACKING_URI and not Path(store[len("sqlite:///"):]).is_file():
        raise _usage(f"{uri}: no MLflow store at {store} (run from the repository root, where `pipeline run` "
                     "registered it, or set MLFLOW_TRACKING_URI)")


# ---------------------------------------------------------------- printing results

def _print_outcomes(outcomes) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="onnx-pipeline")
    for col in ("stage", "status", "seconds", "key metric"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for o in outcomes:
        color = {"done": "green", "failed": "red"}.get(o.status, "yellow")
        table.add_row(o.stage, f"[{color}]{o.status}[/{color}]", f"{o.seconds:.1f}", o.summary)
    Console().print(table)


def _benchmark_rows(rundir) -> list[dict] | None:
    if not rundir.benchmark_json.is_file():
        return None
    return json.loads(rundir.benchmark_json.read_text())["rows"]


def _print_benchmark(rundir) -> None:
    """The benchmark's rows as a table: every variant x provider x batch size."""
    from rich.console import Console
    from rich.table import Table

    rows = _benchmark_rows(rundir)
    if rows is None:
        return
    table = Table(title=f"benchmark ({rundir.benchmark_md})")
    for col in ("variant", "engine", "provider", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "cold start ms"):
        table.add_column(col, justify="left" if col in ("variant", "engine", "provider") else "right")
    for r in rows:
        table.add_row(r["variant"], r.get("engine", ""), r["provider"], str(r["batch_size"]), f"{r['median_ms']:.3f}",
                      f"{r.get('p90_ms', 0):.3f}", f"{r['p99_ms']:.3f}", f"{r['samples_per_s']:,.0f}",
                      f"{r.get('cold_start_ms', 0):.1f}")
    Console().print(table)


def _report(rundir, outcomes, as_json: bool, status: str, benchmark: bool = True) -> None:
    """What a run did: the benchmark table and the stage summary, or one JSON document with both."""
    if not as_json:
        if benchmark:
            _print_benchmark(rundir)
        _print_outcomes(outcomes)
        return
    import dataclasses

    from pipeline.orchestrate import read_state

    state = read_state(rundir) or {}
    registration = json.loads(rundir.registration.read_text()) if rundir.registration.is_file() else None
    _emit_json({"status": status, "run_dir": str(rundir.root), "pipeline_run_id": state.get("parent_run_id"),
                "stages": [dataclasses.asdict(o) for o in outcomes], "benchmark": _benchmark_rows(rundir) if benchmark else None,
                "registration": registration})


# ---------------------------------------------------------------- the stages, one command each

def _stage_command(stage: str, recipe: Path, overrides, workdir, no_track: bool, as_json: bool,
                   device: str | None = None, overlays=None, **train_options) -> None:
    with _errors(USAGE):
        cfg = _load(recipe, overrides, overlays)
    with _errors(USAGE if stage == "import" else FAILED):  # import refusing a file: the file must change
        from pipeline.orchestrate import default_rundir, run_stage

        rundir = _rundir(workdir) or default_rundir(cfg)
        outcome = run_stage(stage, cfg, rundir, track=not no_track, device=device, **train_options)
    _report(rundir, [outcome], as_json, "done", benchmark=stage == "benchmark")


@app.command()
def prepare(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
            no_track: NoTrackOpt = False, json_: JsonOpt = False):
    """Split the recipe's dataset (seeded, stratified for classes) into data.npz + dataset.json."""
    _stage_command("prepare", recipe, set_, workdir, no_track, json_, overlays=overlay)


@app.command()
def train(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
          no_track: NoTrackOpt = False, json_: JsonOpt = False, device: TrainDeviceOpt = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from the run directory's "
                                               "train_state.pt (same recipe); logs into a new MLflow run tagged "
                                               "with the one it resumes.")] = False,
          init_from: InitFromOpt = None):
    """Train the recipe's model; keep the best-on-validation checkpoint.

    Under torchrun (`torchrun --nproc_per_node 2 -m pipeline.cli train ...`) it trains data-parallel:
    rank 0 alone records in MLflow and writes files.
    """
    _stage_command("train", recipe, set_, workdir, no_track, json_, device.value if device else None, resume=resume,
                   init_from=init_from, overlays=overlay)


@app.command()
def evaluate(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
             no_track: NoTrackOpt = False, json_: JsonOpt = False):
    """The task's test metrics of the trained model (accuracy, per-class precision/recall/F1, confusion matrix)."""
    _stage_command("evaluate", recipe, set_, workdir, no_track, json_, overlays=overlay)


@app.command()
def export(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
           no_track: NoTrackOpt = False, json_: JsonOpt = False):
    """Export the checkpoint to one self-describing ONNX file, verified against PyTorch."""
    _stage_command("export", recipe, set_, workdir, no_track, json_, overlays=overlay)


@app.command()
def quantize(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
             no_track: NoTrackOpt = False, json_: JsonOpt = False):
    """Make the quantized variants and evaluate each against the accuracy budget."""
    _stage_command("quantize", recipe, set_, workdir, no_track, json_, overlays=overlay)


@app.command()
def benchmark(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
              no_track: NoTrackOpt = False, json_: JsonOpt = False):
    """Time PyTorch eager and every ONNX variant per execution provider and batch size."""
    _stage_command("benchmark", recipe, set_, workdir, no_track, json_, overlays=overlay)


@app.command()
def register(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
             json_: JsonOpt = False):
    """Register the fastest variant within budget in MLflow (alias candidate; champion if it passes the gate).

    It has no `--no-track`: registering is writing to the MLflow model registry.
    """
    _stage_command("register", recipe, set_, workdir, False, json_, overlays=overlay)


@app.command("import")
def import_(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None,
            no_track: NoTrackOpt = False, json_: JsonOpt = False):
    """Check and describe the recipe's existing ONNX file (model.family onnx) and copy it into the run directory.

    The file is never modified: onnx.checker, opset (9 and newer) and an ONNX Runtime session check it; the
    copy (model.onnx) carries the metadata our own exports carry, with what is not known marked unknown.
    """
    _stage_command("import", recipe, set_, workdir, no_track, json_)


@app.command("import-onnx")
def import_onnx(
    file: Annotated[Path, typer.Argument(metavar="FILE.onnx", help="The ONNX file to import (read only).")],
    data: Annotated[Optional[Path], typer.Option(
        "--data", "-d", show_default="none: import only",
        help="Calibration and evaluation inputs: a .npz (its only array, or --features), a .csv, or an IDX "
             "directory. Without labels (--label) variants are judged by agreement with the fp32 file.")] = None,
    features: Annotated[Optional[list[str]], typer.Option(help="npz: the array key(s) of the inputs; csv: the "
                                                               "feature columns (default: all but --label).")] = None,
    label: Annotated[Optional[str], typer.Option(show_default="none: inputs only",
                                                 help="npz/csv: the labels' key or column.")] = None,
    name: Annotated[Optional[str], typer.Option(show_default="the file's stem",
                                                help="Recipe and registered model name.")] = None,
    set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False, json_: JsonOpt = False,
    write_recipe: Annotated[Optional[Path], typer.Option(
        "--write-recipe", help="Also save the recipe this command runs, to edit and rerun with `pipeline run`.")] = None,
):
    """Import an existing ONNX file and, given --data, quantize, benchmark and register it: `pipeline run` on
    a recipe with `model: {family: onnx, path: FILE}`, written for you.

    State what the file cannot say with --set, e.g. `--set model.task=classification --set
    model.labels_file=labels.txt --set model.mean=[0.485,0.456,0.406] --set model.std=[0.229,0.224,0.225]
    --set model.layout=NCHW`. Same stages, gates, MLflow records and reuse as `pipeline run`.
    """
    import re

    import yaml

    stem = name or re.sub(r"[^A-Za-z0-9_-]+", "-", file.stem).strip("-") or "imported"
    recipe: dict[str, Any] = {"name": stem, "model": {"family": "onnx", "path": str(file)}}
    if data is not None:
        kind = "idx" if data.is_dir() else data.suffix.lower().lstrip(".")
        if kind not in ("npz", "csv", "idx"):
            raise _usage(f"--data {data}: give a .npz or .csv file or an IDX directory")
        prepare_section: dict[str, Any] = {"dataset": kind, "path": str(data)}
        if kind in ("npz", "csv"):
            prepare_section.update({"label": label} if label else {"task": "unlabeled"})
            if features:
                prepare_section["features"] = list(features)
            elif kind == "npz":
                prepare_section["features"] = [_only_array(data)]
        recipe["prepare"] = prepare_section
    elif label or features:
        raise _usage("--label and --features describe --data; pass --data too")
    with _errors(USAGE):
        from pipeline.config import apply_override, recipe_from_dict

        for item in set_ or []:
            apply_override(recipe, item)
        cfg = recipe_from_dict(recipe)
    if write_recipe is not None:
        write_recipe.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log.info("wrote the recipe to %s (`pipeline run --recipe %s` reruns it)", write_recipe, write_recipe)
    with _errors(FAILED):
        from pipeline.orchestrate import PipelineFailed, default_rundir, run_pipeline

        rundir = _rundir(workdir) or default_rundir(cfg)
        try:
            outcomes = run_pipeline(cfg, rundir, track=not no_track)
        except PipelineFailed as failed:
            _report(rundir, failed.outcomes, json_, "failed", benchmark=False)
            from stages.common import StageError

            if isinstance(failed.error, StageError):
                # The file or its data is what must change: a usage error (2), as `pipeline import` says.
                raise _error(f"stage {failed.outcomes[-1].stage} failed: {failed.error}",
                             USAGE if failed.outcomes[-1].stage in ("import", "prepare") else FAILED) from None
            raise failed.error
    _report(rundir, outcomes, json_, "done")


def _only_array(path: Path) -> str:
    """The array key of a .npz holding exactly one array (the inputs), else a usage error naming them."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.files)
    except Exception as e:
        raise _usage(f"--data {path}: not a readable .npz archive ({e})") from None
    if len(keys) != 1:
        raise _usage(f"--data {path} holds arrays {keys}; name the inputs with --features (and labels with --label)")
    return keys[0]


# ---------------------------------------------------------------- run

def _check_stage_names(names: Optional[list[str]]) -> Optional[list[str]]:
    """Stage names given on the command line: each must be one, or the command is refused (exit 2)."""
    if not names:
        return names
    from pipeline.orchestrate import BUILT_IN_STAGES, STAGES

    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise typer.BadParameter(f"unknown stage {', '.join(map(repr, unknown))}; the stages are "
                                 f"{', '.join(BUILT_IN_STAGES)} (and import, for model.family onnx)")
    return names


def _complete_stage(incomplete: str) -> list[str]:
    from pipeline.orchestrate import STAGES

    return [s for s in STAGES if s.startswith(incomplete)]


def _print_plan(decisions) -> None:
    width = max(len(d.stage) for d in decisions)
    for d in decisions:
        verb = "RUN  " if d.run else "reuse"
        typer.echo(f"{d.stage:<{width}}  {verb}  {d.reasons[0]}")
        for more in d.reasons[1:]:
            typer.echo(f"{'':<{width}}         {more}")


@app.command()
def run(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None, workdir: WorkdirOpt = None,
        no_track: NoTrackOpt = False, json_: JsonOpt = False, device: TrainDeviceOpt = None,
        init_from: InitFromOpt = None,
        stages: Annotated[Optional[list[str]], typer.Argument(
            metavar="[STAGE]...", show_default="every stage", callback=_check_stage_names,
            autocompletion=_complete_stage, help="With --force: the stages to rerun.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Rerun the named stages (every stage if none are "
                                                           "named) even if unchanged.")] = False,
        explain: Annotated[bool, typer.Option("--explain", help="Say per stage whether it would run and why; "
                                                               "run nothing.")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the last failed or killed pipeline run in "
                                                             "the run directory, with its recorded recipe.")] = False):
    """Run every stage in order: prepare, train, evaluate, export, quantize, benchmark, register.

    A recipe with `model.family: onnx` (an existing ONNX file) runs prepare, import, quantize, benchmark,
    register instead (import alone without a `prepare` section).

    A stage whose inputs (recipe section, upstream files, code, library versions) did not change since its
    last run in this run directory is reused, not rerun; the log says which run it reuses.
    """
    if stages and not force:
        raise _usage(f"stage names ({' '.join(stages)}) are only taken with --force, e.g. pipeline run --force train")
    if resume and (set_ or overlay or force or explain):
        raise _usage("--resume continues the recorded recipe and stages; drop --set/--recipe-overlay/--force/--explain")
    with _errors(USAGE):
        from pipeline.orchestrate import ALL, PipelineFailed, default_rundir, plan, read_state, run_pipeline
        from pipeline.orchestrate import resume as resume_pipeline

        cfg = None if resume and workdir else _load(recipe, None if resume else set_, None if resume else overlay)
        rundir = _rundir(workdir) or default_rundir(cfg)
    if resume and read_state(rundir) is None:
        raise _usage(f"nothing to resume in {rundir.root}: no pipeline run there yet; start one with `pipeline run`")
    track, device_name = not no_track, device.value if device else None
    force_set = tuple(stages or (ALL,)) if force else ()
    if explain:
        with _errors(USAGE):
            decisions = plan(cfg, rundir, track=track, device=device_name, force=force_set, init_from=init_from)
        if json_:
            _emit_json({"run_dir": str(rundir.root), "plan": [
                {"stage": d.stage, "run": d.run, "reasons": d.reasons, "reuse_run_id": d.reuse_run_id} for d in decisions]})
        else:
            _print_plan(decisions)
        return
    with _errors(FAILED):
        try:
            if resume:
                outcomes = resume_pipeline(rundir, track=False if no_track else None)
                if outcomes is None:
                    state = read_state(rundir) or {}
                    message = (f"nothing to resume: the last pipeline run in {rundir.root} finished "
                               f"({state.get('parent_run_id') or 'untracked'}, {state.get('ended', '?')})")
                    if json_:
                        _emit_json({"status": "finished", "run_dir": str(rundir.root), "message": message,
                                    "pipeline_run_id": state.get("parent_run_id"), "stages": []})
                    else:
                        typer.echo(message)
                    return
            else:
                outcomes = run_pipeline(cfg, rundir, track=track, device=device_name, force=force_set,
                                        init_from=init_from)
        except PipelineFailed as failed:
            _report(rundir, failed.outcomes, json_, "failed", benchmark=False)
            from stages.common import InputError, StageError

            if isinstance(failed.error, StageError):
                # import refusing a file, a model factory or weights that do not fit: the input must change (2)
                usage = isinstance(failed.error, InputError) or failed.outcomes[-1].stage == "import"
                raise _error(f"stage {failed.outcomes[-1].stage} failed: {failed.error}; fix it, then "
                             "`pipeline run --resume` continues from there", USAGE if usage else FAILED) from None
            store_failure = _store_failure(failed.error)
            if store_failure:
                raise _failed(f"stage {failed.outcomes[-1].stage} failed: {store_failure}; once the store works, "
                              "`pipeline run --resume` continues from there") from None
            raise failed.error
    _report(rundir, outcomes, json_, "done")


# ---------------------------------------------------------------- tune

@app.command()
def tune(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, overlay: OverlayOpt = None,
         trials: Annotated[Optional[int], typer.Option(
             show_default="the recipe's tune.trials", help="The study's size: run trials until it holds this many "
                                                           "(counting earlier runs of the same --study).")] = None,
         workers: Annotated[int, typer.Option(help="Trial processes on this machine; the cores are divided "
                                                   "between them.")] = 1,
         study: Annotated[Optional[str], typer.Option(show_default="the recipe's tune.study, else its name",
                                                      help="Study name: the same name continues (or, on a shared "
                                                           "--storage, joins) that study.")] = None,
         timeout: Annotated[Optional[float], typer.Option(metavar="SECONDS", show_default="the recipe's tune.timeout_s",
                                                          help="Start no trial after this many seconds (0: no "
                                                               "limit).")] = None,
         storage: Annotated[Optional[str], typer.Option(
             metavar="URI", show_default="the recipe's tune.storage, else optuna.db beside the MLflow store",
             help="Optuna storage, e.g. postgresql+psycopg2://mlflow@HOST:5433/optuna (the team server's).")] = None,
         best: Annotated[bool, typer.Option("--best", help="Run nothing: print the study's best trial (or its "
                                                         "Pareto front) and write it as best.yaml.")] = False,
         pick: Annotated[Optional[int], typer.Option(metavar="TRIAL", help="With --best: this trial (e.g. another "
                                                                          "point of the Pareto front).")] = None,
         workdir: Annotated[Optional[Path], typer.Option("--workdir", "-w", show_default="runs/tune/<study>",
                                                         help="Study directory: data, plots, best.yaml.")] = None,
         no_track: NoTrackOpt = False, json_: JsonOpt = False):
    """Search the recipe's `tune.space` with Optuna, for the validation metric alone or for it and the
    measured latency, throughput or size of the exported model (a Pareto front); hopeless trials are pruned.

    One parent MLflow run per study, a nested run per trial. `--best` writes the chosen trial as a recipe
    overlay: `pipeline run --recipe R --recipe-overlay runs/tune/<study>/best.yaml` reproduces it.
    """
    if pick is not None and not best:
        raise _usage("--pick chooses the trial --best writes; pass --best too")
    with _errors(USAGE):
        from pipeline import tune as tuning

        cfg = _load(recipe, set_, overlay)
        if best:
            summary = tuning.best(cfg, study=study, storage=storage, pick=pick, workdir=workdir, track=not no_track)
        else:
            import shlex

            changes = [w for f in overlay or [] for w in ("--recipe-overlay", shlex.quote(str(f)))] + [
                w for item in set_ or [] if not item.strip().startswith("tune.") for w in ("--set", shlex.quote(item))]
            plan = tuning.plan_study(cfg, trials=trials, workers=workers, study=study, timeout_s=timeout,
                                     storage=storage, track=not no_track, workdir=workdir, overrides=changes)
    if not best:
        with _errors(FAILED):
            try:
                summary = tuning.run_study(plan, workers)
            except KeyboardInterrupt as e:
                from pipeline.orchestrate import Terminated

                code = TERMINATED if isinstance(e, Terminated) else INTERRUPTED
                raise _error(f"interrupted ({e or 'Ctrl-C'}); the running trials are marked failed and their MLflow "
                             f"runs KILLED; the same `pipeline tune` (same --study) continues the study", code) from None
    if json_:
        import dataclasses

        _emit_json(dataclasses.asdict(summary))
    else:
        typer.echo(tuning.summary_text(summary))
    c = summary.counts
    if not best and c["failed"] and not c["complete"] + c["pruned"]:
        first = next((r["error"] for r in summary.trials if r.get("error")), "see the log")
        raise _failed(f"every trial failed; the first: {first}")


# ---------------------------------------------------------------- the record: promote, lineage, compare

@app.command()
def promote(name: Annotated[str, typer.Argument(metavar="NAME", help="Registered model name, e.g. digits-cnn.")],
            allow_worse: Annotated[bool, typer.Option("--allow-worse", help="Promote even if the candidate is "
                                                                            "worse than the champion.")] = False,
            force: Annotated[bool, typer.Option("--force", hidden=True, help="Deprecated: --allow-worse.")] = False,
            json_: JsonOpt = False):
    """Make the `candidate` version the `champion` if it is at least as good on the candidate's test data.

    Both ONNX files run with ONNX Runtime on the candidate's test split; a worse candidate is refused
    (exit code 1), saying by how much, unless --allow-worse.
    """
    if force:
        _warn("`promote --force` is deprecated and will be removed in the next release; use --allow-worse")
    _require_store(f"models:/{name}@candidate")
    with _errors(FAILED):
        from pipeline.lineage import promote as promote_model

        verdict = promote_model(name, force=allow_worse or force)
    if json_:
        import dataclasses

        _emit_json(dataclasses.asdict(verdict))
    else:
        typer.echo(verdict.message)
    if not verdict.promoted and verdict.champion != verdict.candidate:
        raise typer.Exit(FAILED)


@app.command()
def lineage(model: Annotated[str, typer.Argument(metavar="MODEL_URI", help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
            json_: JsonOpt = False):
    """Print where a registered model came from: version, pipeline run, stage runs, checkpoint, dataset, recipe."""
    _require_store(model)
    with _errors(USAGE):
        from pipeline.lineage import format_lineage, lineage_record

        record = lineage_record(model)
    if json_:
        _emit_json(record)
    else:
        typer.echo(format_lineage(record))


@app.command()
def compare(run_a: Annotated[str, typer.Argument(metavar="RUN_A", help="MLflow run id (a pipeline run or a stage run).")],
            run_b: Annotated[str, typer.Argument(metavar="RUN_B", help="MLflow run id to compare with.")],
            all_: Annotated[bool, typer.Option("--all", help="Show equal values too.")] = False,
            json_: JsonOpt = False):
    """Show the params and metrics that differ between two runs (like `dvc params diff`)."""
    _require_store(run_a)
    with _errors(USAGE):
        from pipeline.lineage import compare_record, format_compare

        record = compare_record(run_a, run_b, show_all=all_)
    if json_:
        _emit_json(record)
    else:
        typer.echo(format_compare(record))


# ---------------------------------------------------------------- predict

class PredictDevice(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


@contextlib.contextmanager
def _slim_errors(stage_error: int) -> Iterator[None]:
    """``_errors`` for commands that read no recipe: pipeline.config imports every model family, and
    with them torch (1.8 s), which predict must never load."""
    from stages.common import StageError

    try:
        yield
    except StageError as e:
        raise _error(str(e), stage_error) from None
    except KeyboardInterrupt as e:
        raise _interrupted(e) from None


@app.command()
def predict(
    sources: Annotated[list[str], typer.Argument(
        metavar="SOURCE", help="Image files (png, jpg, jpeg, bmp, webp), folders of them, .npy, .npz or .csv files.")],
    model: Annotated[str, typer.Option("--model", "-m", help="A .onnx path, models:/NAME@ALIAS or "
                                                             "runs:/RUN_ID/PATH.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes per sample (classification).")] = 3,
    key: Annotated[Optional[str], typer.Option(
        "--key", show_default="the model's input name, or the archive's only array",
        help="The .npz array to read.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Directory for predictions.csv, and a VAE's reconstructions as PNG.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per ONNX Runtime call.")] = 64,
    device: Annotated[PredictDevice, typer.Option(help="ONNX Runtime device.")] = PredictDevice.cpu,
    json_: JsonOpt = False,
):
    """Run a model on files: top-k labels with probabilities, regression values, or VAE reconstructions.

    Everything about the input (shape, channels, dtype, value range, normalization, labels) comes from the
    ONNX file's own metadata, so it works from any directory without a recipe. Image files are decoded
    and resized exactly as `prepare` decodes a folder of images. Never imports torch.
    """
    with contextlib.ExitStack() as stack:
        with _slim_errors(USAGE):
            from stages import predict as predict_stage

            path, shown = Path(model), model
            if model.startswith(("models:/", "runs:/")):
                from pipeline import tracking

                _require_store(model)
                download = stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx-pipeline-predict-"))
                path = tracking.fetch_model(model, Path(download)).path
            onnx_model = predict_stage.open_model(path, device.value)
            inputs = predict_stage.read(sources, onnx_model.meta, key=key)
        with _slim_errors(FAILED):
            result = predict_stage.run(onnx_model, inputs, top_k=top_k, output_dir=output, batch_size=batch_size)
        result.model = shown
    for note in result.notes:
        typer.secho(f"note: {note}", err=True)
    if json_:
        _emit_json(result.to_json())
    else:
        _print_predictions(result)
    for f in result.files:
        typer.echo(f"wrote {f}", err=True)


def _print_predictions(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.model} ({result.task}, output {result.output})")
    table.add_column("input", overflow="fold")
    if result.kind == "top-k":
        what = "probability" if result.task == "classification" else "score"
        k = max(len(r["top_k"]) for r in result.rows)
        table.add_column("label")
        table.add_column(what, justify="right")
        if k > 1:
            table.add_column(f"next {k - 1}")
        for r in result.rows:
            best, rest = r["top_k"][0], r["top_k"][1:]
            cells = [r["input"], best["label"], f"{best[what]:.4f}"]
            if k > 1:
                cells.append(", ".join(f"{t['label']} {t[what]:.4f}" for t in rest))
            table.add_row(*cells)
    elif result.kind == "values":
        shown = result.labels[:8]
        for name in shown:
            table.add_column(name, justify="right")
        if len(result.labels) > len(shown):
            table.add_column(f"+{len(result.labels) - len(shown)} more (--json)")
        for r in result.rows:
            values = list(r["values"].values())
            table.add_row(r["input"], *(f"{v:.6g}" for v in values[:len(shown)]),
                          *(["…"] if len(values) > len(shown) else []))
    else:
        table.add_column("mse (normalized)", justify="right")
        table.add_column("reconstruction", overflow="fold")
        for r in result.rows:
            table.add_row(r["input"], f"{r['mse']:.5f}", r.get("reconstruction", ""))
    Console().print(table)


# ---------------------------------------------------------------- serve

@app.command()
def serve(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", show_default="models:/<recipe's model name>@champion, unless --model-repository",
        help="A .onnx path, a bundle directory (pipeline package) or models:/NAME@ALIAS (repeatable).")] = None,
    model_repository: Annotated[Optional[Path], typer.Option(
        "--model-repository", help="A Triton-layout directory: `<repo>/<model>/<version>/model.onnx` (+ config.pbtxt).")] = None,
    name: Annotated[Optional[str], typer.Option(show_default="registered name or file stem",
                                                help="Model name in the v2 API, with a single --model.")] = None,
    host: Annotated[Optional[str], typer.Option(show_default="the recipe's serve.transport.host, else 127.0.0.1",
                                                help="Bind address.")] = None,
    port: Annotated[Optional[int], typer.Option(show_default="the recipe's serve.transport.port, else 8000", help="Port.")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(
        "--grpc-port", show_default="the recipe's serve.transport.grpc_port, else 8001",
        help="KServe v2 gRPC port (Triton's API); 0: HTTP only.")] = None,
    device: Annotated[Optional[Device], typer.Option(show_default="the recipe's serve.runtime.device, else auto",
                                                     help="ONNX Runtime device.")] = None,
    require_gpu: Annotated[bool, typer.Option("--require-gpu", help="Refuse to start (exit 1) unless ONNX Runtime "
                                              "really runs on CUDA (it falls back to CPU silently otherwise).")] = False,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=0, show_default="the recipe's serve.transport.workers, else 0: one per core, at most 8",
        help="Server processes sharing the port, each with its own ONNX Runtime session(s); threads are divided "
             "among them.")] = None,
    recipe: OptionalRecipeOpt = None, set_: SetOpt = None,
):
    """Serve models over the KServe v2 / Open Inference Protocol with ONNX Runtime and dynamic batching.

    Works from any directory given `--model PATH.onnx` (or a models:/ URI with MLFLOW_TRACKING_URI set); the
    recipe is read only for its `serve` settings and its model name. Ctrl-C or SIGTERM stops it gracefully.
    """
    overrides = list(set_ or [])
    overrides += [f"serve.{k}={v}" for k, v in (("transport.host", host), ("transport.port", port),
                                                 ("transport.grpc_port", grpc_port),
                                                 ("transport.workers", workers),
                                                 ("runtime.device", device.value if device else None)) if v is not None]
    if require_gpu:
        overrides.append("serve.runtime.require_gpu=true")
    with _errors(USAGE):
        # The serve section alone (pipeline.recipe_file): the serving path never imports torch.
        from pipeline.recipe_file import load_serve_recipe

        if recipe is None and DEFAULT_RECIPE.is_file():
            recipe = DEFAULT_RECIPE
        settings, cfg = load_serve_recipe(recipe, overrides)
    if name and len(model or []) != 1:
        raise _usage("--name renames a single --model; with a repository or several models, names come from them")
    if not model and model_repository is None and cfg is None:
        raise _usage(f"nothing to serve: no recipe here ({DEFAULT_RECIPE} not found) to name a registered model; "
                     "pass --model PATH.onnx, --model models:/NAME@ALIAS or --model-repository DIR")
    from stages.common import StageError
    from stages.serve import runtime as serve_runtime
    from stages.serve import workers as serve_workers
    from stages.serve.repository import check_unique, load_sources, scan_repository

    try:
        serve_runtime.check_gpu_required(settings.runtime)
    except serve_runtime.GpuRequired as e:
        raise _failed(str(e)) from None
    try:
        sources = []
        if model_repository is not None:
            sources += scan_repository(model_repository)
        uris = list(model or ([] if model_repository else [cfg.champion_uri]))
        sources += [_model_source(uri, name) for uri in uris]
        check_unique(sources)
        n_workers = serve_workers.resolve_workers(settings)
        if n_workers > 1:
            serve_workers.worker_config(settings, n_workers)  # threads divisible: checked before anything starts
        else:
            runtimes, batching = load_sources(sources, settings)
    except serve_runtime.GpuRequired as e:
        raise _failed(str(e)) from None
    except (ValueError, StageError) as e:  # a bad path, URI, model file or repository (RepositoryError)
        raise _usage(str(e)) from None
    if n_workers > 1:
        # Several processes on the port (stages/serve/workers.py): this one supervises, the workers load.
        try:
            code = serve_workers.serve_workers(sources, settings, n_workers)
        except serve_workers.WorkerStartError as e:
            raise _error(str(e), e.code) from None
        except KeyboardInterrupt:  # Ctrl-C while the workers were starting
            code = INTERRUPTED
        finally:
            _remove_downloads()
        raise typer.Exit(code)
    from stages.serve.app import StartupError
    from stages.serve.app import serve as run_server

    try:
        with _stop_signals_exit():
            run_server(runtimes, settings, batching)
    except StartupError as e:  # a port taken
        raise _failed(str(e)) from None
    finally:
        _remove_downloads()


# models:/ and runs:/ files fetched for serve: removed when it stops, however it stops (SIGTERM included).
_DOWNLOADS: list[Path] = []


def _remove_downloads() -> None:
    while _DOWNLOADS:
        shutil.rmtree(_DOWNLOADS.pop(), ignore_errors=True)


@contextlib.contextmanager
def _stop_signals_exit():
    """SIGTERM / SIGINT end the command with 143 / 130 through the normal exit path (finally blocks,
    atexit). uvicorn shuts down gracefully on them, then restores these handlers and raises the signal
    again; with the default SIGTERM handler the process would die on the spot, leaving the download."""
    def stop(signum, frame):
        raise SystemExit(TERMINATED if signum == signal.SIGTERM else INTERRUPTED)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _model_source(uri: str, name: Optional[str]):
    """A --model value (a .onnx path or a models:/ URI) -> what to load, with its lineage."""
    from stages.serve.repository import ModelSource

    if uri.startswith(("models:/", "runs:/")):
        from pipeline import tracking

        _require_store(uri)
        download = Path(tempfile.mkdtemp(prefix="onnx-pipeline-serve-"))
        _DOWNLOADS.append(download)
        atexit.register(_remove_downloads)  # if serve fails before it starts
        fetched = tracking.fetch_model(uri, download)
        lineage = {"model_uri": uri, "registered_name": fetched.name, "registered_version": fetched.version,
                   "run_id": fetched.run_id or "", **fetched.tags}
        return ModelSource(path=fetched.path, name=name or fetched.name, version=fetched.version or "1", lineage=lineage)
    path = Path(uri)
    if path.is_dir() and (path / "model.onnx").is_file():  # a bundle (`pipeline package`): its model.onnx
        return ModelSource(path=path / "model.onnx", name=name or path.name, version="1",
                           lineage={"model_file": f"{path.name}/model.onnx"})
    if not path.is_file():
        raise ValueError(f"model file {uri!r} not found; pass a .onnx path, a bundle directory or models:/NAME@ALIAS")
    # The file's name, not its absolute path: model metadata must not map the server's disk.
    return ModelSource(path=path, name=name or path.stem.split(".")[0], version="1",
                       lineage={"model_file": path.name})


# ---------------------------------------------------------------- package

class PackageFormat(str, enum.Enum):
    bundle = "bundle"
    triton = "triton"
    kserve = "kserve"


@app.command()
def package(
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", show_default="the --workdir's registered variant, else models:/<recipe's model name>@champion",
        help="A .onnx path or models:/NAME@ALIAS.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", show_default="dist/NAME (bundle), dist/model-repository (triton), dist/NAME-kserve",
        help="Directory to write.")] = None,
    format_: Annotated[PackageFormat, typer.Option("--format", "-f", help="bundle: for apps; triton: a Triton model "
                                                   "repository; kserve: an InferenceService manifest.")] = PackageFormat.bundle,
    name: Annotated[Optional[str], typer.Option(show_default="the registered name, else the recipe's",
                                                help="Model name.")] = None,
    version: Annotated[int, typer.Option(help="Triton version directory.")] = 1,
    storage_uri: Annotated[Optional[str], typer.Option("--storage-uri", help="kserve: where model.onnx will be "
                                                       "uploaded, e.g. s3://bucket/models/digits-cnn.")] = None,
    image: Annotated[Optional[str], typer.Option("--image", help="kserve: serve with this project's slim server "
                                                 "image (built from the Dockerfile) instead of KServe's ONNX runtime.")] = None,
    samples: Annotated[str, typer.Option(help="Test samples to carry in samples.json (bundle): a count, or 'all'; "
                                              "they come from the run directory's test split.")] = "16",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it is not "
                                                                "empty.")] = False,
    force: Annotated[bool, typer.Option("--force", hidden=True, help="Deprecated: --overwrite.")] = False,
    allow_contrib_ops: Annotated[bool, typer.Option("--allow-contrib-ops", help="Package a model that needs ONNX "
                                                    "Runtime's contrib operators (the README says so).")] = False,
    recipe: OptionalRecipeOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
):
    """Package a model for other apps (bundle) or serving engines (Triton repository, KServe manifest).

    Works from any directory given `--model PATH.onnx` (add `--workdir RUN_DIR` for the bundle's test samples,
    or `--samples 0`); the recipe is read only for defaults.
    """
    if force:
        _warn("`package --force` is deprecated and will be removed in the next release; use --overwrite")
        overwrite = True
    if samples != "all" and not samples.isdigit():
        raise _usage(f"--samples must be a count >= 0 or 'all', got {samples!r}")
    with _errors(USAGE):
        from stages import package as pkg

        settings, cfg = _optional_recipe(recipe, list(set_ or []))
        if model is None and workdir is None and cfg is None:
            raise _usage(f"nothing to package: no recipe here ({DEFAULT_RECIPE} not found) to name a registered model; "
                         "pass --model PATH.onnx, --model models:/NAME@ALIAS or --workdir RUN_DIR")
        try:
            config = pkg.Config(format=format_.value, name=name or "", version=version, overwrite=overwrite,
                                samples=-1 if samples == "all" else int(samples), storage_uri=storage_uri or "",
                                image=image or "", allow_contrib_ops=allow_contrib_ops, batching=settings.batching)
        except ValueError as e:
            raise _usage(str(e).replace("`", "")) from None
        if workdir is not None:
            rundir = _rundir(workdir)
        else:
            from pipeline.orchestrate import default_rundir

            rundir = default_rundir(cfg) if cfg is not None else None
    # Every refusal of package is the user's to fix (a model that does not say how to feed it, contrib
    # operators without --allow-contrib-ops, a test split of other data, an output in the way): exit 2.
    with tempfile.TemporaryDirectory(prefix="onnx-pipeline-package-") as download, _errors(USAGE):
        source = _package_source(model, workdir, rundir, cfg, Path(download))
        split = _package_split(rundir) if config.format == "bundle" and config.samples else None
        out = output or Path("dist") / {"bundle": "{n}", "triton": "model-repository", "kserve": "{n}-kserve"}[
            config.format].format(n=config.name or pkg.default_name(source, pkg.inspect(source.path)))
        _check_output(out, overwrite)
        result = pkg.run(config, source, out, split)
    typer.echo(result.summary())
    for f in result.files:
        typer.echo(f"  {Path(result.output) / f}")


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output in the way before any work (the package stage checks again, for library callers)."""
    if out.exists() and not out.is_dir():
        raise _usage(f"output {out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise _usage(f"output directory {out} exists and is not empty; choose another --output, or pass --overwrite")


def _package_source(model: Optional[str], workdir: Optional[Path], rundir, cfg, download: Path):
    """The model to package: --model (a path or a registry URI), else the --workdir's registered (or fp32)
    variant, else the recipe's champion in the registry."""
    from pipeline import tracking
    from stages.common import StageError
    from stages.package import Source

    if model is None and workdir is not None:
        variant = "fp32"
        if rundir.registration.is_file():
            variant = json.loads(rundir.registration.read_text()).get("variant", "fp32")
        path = rundir.variant(variant)
        if not path.is_file():
            raise StageError(f"{path} not found; run `pipeline export --workdir {workdir}` (or `pipeline run`) first, "
                             "or pass --model")
        return Source(path=path, uri=str(path))
    uri = model or _champion_uri(cfg)
    if uri.startswith(("models:/", "runs:/")):
        _require_store(uri)
        fetched = tracking.fetch_model(uri, download)
        return Source(path=fetched.path, uri=uri, name=fetched.name, version=fetched.version, tags=fetched.tags)
    path = Path(uri)
    if not path.is_file():
        raise StageError(f"model file {uri!r} not found; pass a .onnx path, models:/NAME@ALIAS or --workdir RUN_DIR")
    return Source(path=path, uri=str(path))


def _package_split(rundir):
    """The run directory's raw test split, for the bundle's samples and its verification."""
    from stages import dataset
    from stages.common import StageError
    from stages.package import TestSplit

    if rundir is None or not rundir.data.is_file():
        where = f"{rundir.data} not found" if rundir is not None else "no run directory"
        raise StageError(f"no test split for the bundle's samples ({where}); pass --workdir RUN_DIR (the run the "
                         "model came from), or --samples 0")
    data = dataset.load(rundir.data, rundir.dataset)
    x, y = data.split("test", normalized=False)
    return TestSplit(x=x, y=y, dataset_sha256=data.info.get("sha256", ""), value_range=data.info.get("value_range"))


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if e.code in (INTERRUPTED, TERMINATED):
            # Exit with the code we promise. A Ctrl-C that lands while C code runs Python (during an
            # import, say) leaves CPython's "unhandled KeyboardInterrupt" flag set even though we handled
            # it, and the interpreter would then end itself by SIGINT (-2) on the way out: measured in
            # 2 of 3 clean-clone test runs. The exit functions still run; then the process ends here.
            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code)
        raise


if __name__ == "__main__":
    main()
