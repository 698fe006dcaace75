"""The `pipeline` command: one thin command per stage, `run` for all of them, and `serve`.

Heavy libraries (torch, onnxruntime, mlflow) are imported inside the commands so `--help` is instant.
User errors (a bad recipe, a missing input) print one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="From a PyTorch model to a fast, quantized, served ONNX model, every step in MLflow.")
log = logging.getLogger("pipeline")

DEFAULT_RECIPE = Path("configs/digits-cnn.yaml")
RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="Recipe YAML file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                     help="Override a recipe value, e.g. --set train.epochs=3 (repeatable).")]
WorkdirOpt = Annotated[Optional[Path], typer.Option("--workdir", "-w", help="Run directory [default: runs/<recipe name>].")]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="Do not record anything in MLflow.")]
InitFromOpt = Annotated[Optional[str], typer.Option(
    "--init-from", metavar="RUN_ID|CHECKPOINT",
    help="Start from another run's weights (an MLflow run id or a checkpoint.pt path); a head of a "
         "different label count is replaced.")]


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "onnxscript", "onnx_ir", "torch", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The torch.export-based exporter warns about every torchvision op it cannot register; we use none.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@contextlib.contextmanager
def _user_errors():
    """Turn errors a user can fix into one line and an exit code: 2 for the recipe, 1 otherwise."""
    from pipeline.config import ConfigError
    from stages.common import StageError

    try:
        yield
    except ConfigError as e:
        raise _fail(str(e), 2) from None
    except StageError as e:
        raise _fail(str(e), 1) from None


def _load(recipe: Path, overrides: Optional[list[str]]):
    from pipeline.config import load_recipe

    return load_recipe(recipe, overrides or [])


def _rundir(workdir: Optional[Path]):
    from stages.contract import RunDir

    return RunDir(workdir) if workdir else None


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


def _print_benchmark(rundir) -> None:
    """The benchmark's rows as a table: every variant x provider x batch size."""
    import json

    from rich.console import Console
    from rich.table import Table

    if not rundir.benchmark_json.is_file():
        return
    rows = json.loads(rundir.benchmark_json.read_text())["rows"]
    table = Table(title=f"benchmark ({rundir.benchmark_md})")
    for col in ("variant", "engine", "provider", "batch", "median ms", "p90 ms", "p99 ms", "samples/s", "cold start ms"):
        table.add_column(col, justify="left" if col in ("variant", "engine", "provider") else "right")
    for r in rows:
        table.add_row(r["variant"], r.get("engine", ""), r["provider"], str(r["batch_size"]), f"{r['median_ms']:.3f}",
                      f"{r.get('p90_ms', 0):.3f}", f"{r['p99_ms']:.3f}", f"{r['samples_per_s']:,.0f}",
                      f"{r.get('cold_start_ms', 0):.1f}")
    Console().print(table)


def _stage_command(stage: str, recipe: Path, overrides, workdir, no_track: bool, device: str | None = None,
                   **train_options) -> None:
    _setup_logging()
    with _user_errors():
        from pipeline.orchestrate import default_rundir, run_stage

        cfg = _load(recipe, overrides)
        rundir = _rundir(workdir) or default_rundir(cfg)
        outcome = run_stage(stage, cfg, rundir, track=not no_track, device=device, **train_options)
    if stage == "benchmark":
        _print_benchmark(rundir)
    _print_outcomes([outcome])


@app.command()
def prepare(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False):
    """Split the bundled dataset (seeded, stratified) into data.npz + dataset.json."""
    _stage_command("prepare", recipe, set_, workdir, no_track)


@app.command()
def train(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False,
          device: Annotated[Optional[Device], typer.Option(help="Training device [default: the recipe's train.device].")] = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from the run directory's "
                                               "train_state.pt (same recipe); logs into a new MLflow run tagged "
                                               "with the one it resumes.")] = False,
          init_from: InitFromOpt = None):
    """Train the recipe's model; keep the best-on-validation checkpoint.

    Under torchrun (`torchrun --nproc_per_node 2 -m pipeline.cli train ...`) it trains data-parallel:
    rank 0 alone records in MLflow and writes files.
    """
    _stage_command("train", recipe, set_, workdir, no_track, device.value if device else None, resume=resume,
                   init_from=init_from)


@app.command()
def evaluate(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False):
    """Test accuracy, per-class precision/recall/F1 and a confusion matrix of the trained model."""
    _stage_command("evaluate", recipe, set_, workdir, no_track)


@app.command()
def export(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False):
    """Export the checkpoint to one self-describing ONNX file, verified against PyTorch."""
    _stage_command("export", recipe, set_, workdir, no_track)


@app.command()
def quantize(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False):
    """Make the quantized variants and evaluate each against the accuracy budget."""
    _stage_command("quantize", recipe, set_, workdir, no_track)


@app.command()
def benchmark(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False):
    """Time PyTorch eager and every ONNX variant per execution provider and batch size."""
    _stage_command("benchmark", recipe, set_, workdir, no_track)


@app.command()
def register(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None):
    """Register the fastest variant within budget in MLflow (alias candidate; champion if it passes the gate)."""
    _stage_command("register", recipe, set_, workdir, False)


def _print_plan(decisions) -> None:
    width = max(len(d.stage) for d in decisions)
    for d in decisions:
        verb = "RUN  " if d.run else "reuse"
        typer.echo(f"{d.stage:<{width}}  {verb}  {d.reasons[0]}")
        for more in d.reasons[1:]:
            typer.echo(f"{'':<{width}}         {more}")


@app.command()
def run(recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None, no_track: NoTrackOpt = False,
        device: Annotated[Optional[Device], typer.Option(help="Training device [default: the recipe's train.device].")] = None,
        init_from: InitFromOpt = None,
        stages: Annotated[Optional[list[str]], typer.Argument(metavar="[STAGE]...", show_default=False,
                                                              help="With --force: the stages to rerun [default: all].")] = None,
        force: Annotated[bool, typer.Option("--force", help="Rerun the named stages (all if none) even if unchanged.")] = False,
        explain: Annotated[bool, typer.Option("--explain", help="Say per stage whether it would run and why; run nothing.")] = False,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the last failed or killed pipeline run in the run "
                                                              "directory, with its recorded recipe.")] = False):
    """Run every stage in order: prepare, train, evaluate, export, quantize, benchmark, register.

    A stage whose inputs (recipe section, upstream files, code, library versions) did not change since its
    last run in this run directory is reused, not rerun; the log says which run it reuses.
    """
    _setup_logging()
    if stages and not force:
        raise _fail(f"stage names ({' '.join(stages)}) are only taken with --force, e.g. pipeline run --force train", 2)
    if resume and (set_ or force or explain):
        raise _fail("--resume continues the recorded recipe and stages; drop --set/--force/--explain", 2)
    with _user_errors():
        from pipeline.orchestrate import ALL, PipelineFailed, default_rundir, plan, read_state, run_pipeline
        from pipeline.orchestrate import resume as resume_pipeline
        from stages.contract import RunDir

        force_set = tuple(stages or (ALL,)) if force else ()
        try:
            if resume:
                if workdir:
                    rundir = RunDir(workdir)
                else:
                    rundir = default_rundir(_load(recipe, None))
                outcomes = resume_pipeline(rundir, track=False if no_track else None)
                if outcomes is None:
                    state = read_state(rundir) or {}
                    typer.echo(f"nothing to resume: the last pipeline run in {rundir.root} finished "
                               f"({state.get('parent_run_id') or 'untracked'}, {state.get('ended', '?')})")
                    return
            else:
                cfg = _load(recipe, set_)
                rundir = _rundir(workdir) or default_rundir(cfg)
                if explain:
                    _print_plan(plan(cfg, rundir, track=not no_track, device=device.value if device else None,
                                     force=force_set, init_from=init_from))
                    return
                outcomes = run_pipeline(cfg, rundir, track=not no_track, device=device.value if device else None,
                                        force=force_set, init_from=init_from)
        except PipelineFailed as failed:
            _print_outcomes(failed.outcomes)
            from stages.common import StageError

            if isinstance(failed.error, StageError):
                raise _fail(f"stage {failed.outcomes[-1].stage} failed: {failed.error}; fix it, then "
                            "`pipeline run --resume` continues from there") from None
            raise failed.error
        except KeyboardInterrupt as e:
            from pipeline.orchestrate import Terminated

            raise _fail(f"interrupted ({e or 'Ctrl-C'}); the MLflow runs are marked KILLED; "
                        "`pipeline run --resume` continues from the unfinished stage",
                        143 if isinstance(e, Terminated) else 130) from None
    _print_benchmark(rundir)
    _print_outcomes(outcomes)


@app.command()
def promote(name: Annotated[str, typer.Argument(help="Registered model name, e.g. digits-cnn.")],
            force: Annotated[bool, typer.Option("--force", help="Promote even if the candidate is worse.")] = False):
    """Make the `candidate` version the `champion` if it is at least as good on the candidate's test data.

    Both ONNX files run with ONNX Runtime on the candidate's test split; a worse candidate is refused
    (exit code 1), saying by how much, unless --force.
    """
    _setup_logging()
    with _user_errors():
        from pipeline.lineage import promote as promote_model

        verdict = promote_model(name, force=force)
    typer.echo(verdict.message)
    if not verdict.promoted and verdict.champion != verdict.candidate:
        raise typer.Exit(1)


@app.command()
def lineage(model: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")]):
    """Print where a registered model came from: version, pipeline run, stage runs, checkpoint, dataset, recipe."""
    _setup_logging()
    with _user_errors():
        from pipeline.lineage import lineage as lineage_of

        text = lineage_of(model)
    typer.echo(text)


@app.command()
def compare(run_a: Annotated[str, typer.Argument(help="MLflow run id (a pipeline run or a stage run).")],
            run_b: Annotated[str, typer.Argument(help="MLflow run id to compare with.")],
            all_: Annotated[bool, typer.Option("--all", help="Show equal values too.")] = False):
    """Show the params and metrics that differ between two runs (like `dvc params diff`)."""
    _setup_logging()
    with _user_errors():
        from pipeline.lineage import compare as compare_runs

        text = compare_runs(run_a, run_b, show_all=all_)
    typer.echo(text)


@app.command()
def serve(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="A .onnx path or models:/NAME@ALIAS "
                                                       "(repeatable) [default: models:/<recipe name>@champion unless "
                                                       "--model-repository is given].")] = None,
    model_repository: Annotated[Optional[Path], typer.Option(
        "--model-repository", help="A Triton-layout directory: <repo>/<model>/<version>/model.onnx (+ config.pbtxt).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name in the v2 API, with a single --model "
                                                "[default: registered name or file stem].")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address [default: the recipe's serve.transport.host, 127.0.0.1].")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port [default: the recipe's serve.transport.port, 8000].")] = None,
    device: Annotated[Optional[Device], typer.Option(help="ONNX Runtime device [default: the recipe's serve.runtime.device].")] = None,
    require_gpu: Annotated[bool, typer.Option("--require-gpu", help="Refuse to start unless ONNX Runtime really "
                                              "runs on CUDA (it falls back to CPU silently otherwise).")] = False,
    recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None,
):
    """Serve models over the KServe v2 / Open Inference Protocol with ONNX Runtime and dynamic batching."""
    _setup_logging()
    overrides = list(set_ or [])
    overrides += [f"serve.{k}={v}" for k, v in (("transport.host", host), ("transport.port", port),
                                                 ("runtime.device", device.value if device else None)) if v is not None]
    if require_gpu:
        overrides.append("serve.runtime.require_gpu=true")
    with _user_errors():
        cfg = _load(recipe, overrides)
    if name and len(model or []) != 1:
        raise _fail("--name renames a single --model; with a repository or several models, names come from them")
    from stages.common import StageError
    from stages.serve import runtime as serve_runtime
    from stages.serve.repository import RepositoryError, load_sources, scan_repository

    try:
        serve_runtime.check_gpu_required(cfg.serve.runtime)
        sources = []
        if model_repository is not None:
            sources += scan_repository(model_repository)
        uris = list(model or ([] if model_repository else [f"models:/{cfg.register.model_name or cfg.name}@champion"]))
        sources += [_model_source(uri, name) for uri in uris]
        runtimes, batching = load_sources(sources, cfg.serve)
    except (ValueError, RepositoryError, StageError) as e:
        raise _fail(str(e)) from None
    from stages.serve.app import serve as run_server

    try:
        run_server(runtimes, cfg.serve, batching)
    except ValueError as e:  # two sources with the same name and version
        raise _fail(str(e)) from None


def _model_source(uri: str, name: Optional[str]):
    """A --model value (a .onnx path or a models:/ URI) -> what to load, with its lineage."""
    from stages.serve.repository import ModelSource

    if uri.startswith(("models:/", "runs:/")):
        from pipeline import tracking

        download = Path(tempfile.mkdtemp(prefix="onnx-pipeline-serve-"))
        atexit.register(shutil.rmtree, download, ignore_errors=True)
        fetched = tracking.fetch_model(uri, download)
        lineage = {"model_uri": uri, "registered_name": fetched.name, "registered_version": fetched.version,
                   "run_id": fetched.run_id or "", **fetched.tags}
        return ModelSource(path=fetched.path, name=name or fetched.name, version=fetched.version or "1", lineage=lineage)
    path = Path(uri)
    if not path.is_file():
        raise ValueError(f"model file {uri!r} not found; pass a .onnx path or models:/NAME@ALIAS")
    return ModelSource(path=path, name=name or path.stem.split(".")[0], version="1",
                       lineage={"model_path": str(path.resolve())})


class PackageFormat(str, enum.Enum):
    bundle = "bundle"
    triton = "triton"
    kserve = "kserve"


@app.command()
def package(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="A .onnx path or models:/NAME@ALIAS [default: the "
                                                 "--workdir's registered variant, else models:/<recipe name>@champion].")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Directory to write [default: dist/<name> "
                                                   "(bundle), dist/model-repository (triton), dist/<name>-kserve].")] = None,
    format_: Annotated[PackageFormat, typer.Option("--format", "-f", help="bundle: for apps; triton: a Triton model "
                                                   "repository; kserve: an InferenceService manifest.")] = PackageFormat.bundle,
    name: Annotated[Optional[str], typer.Option(help="Model name [default: registered name, else the recipe's].")] = None,
    version: Annotated[int, typer.Option(help="Triton version directory.")] = 1,
    storage_uri: Annotated[Optional[str], typer.Option("--storage-uri", help="kserve: where model.onnx will be "
                                                       "uploaded, e.g. s3://bucket/models/digits-cnn.")] = None,
    samples: Annotated[str, typer.Option(help="Test samples to carry in samples.json: a count, or 'all'.")] = "16",
    force: Annotated[bool, typer.Option("--force", help="Replace the output directory if it is not empty.")] = False,
    allow_contrib_ops: Annotated[bool, typer.Option("--allow-contrib-ops", help="Package a model that needs ONNX "
                                                    "Runtime's contrib operators (the README says so).")] = False,
    recipe: RecipeOpt = DEFAULT_RECIPE, set_: SetOpt = None, workdir: WorkdirOpt = None,
):
    """Package a model for other apps (bundle) or serving engines (Triton repository, KServe manifest)."""
    _setup_logging()
    with _user_errors():
        from pipeline.orchestrate import default_rundir
        from stages import package as pkg
        from stages.common import StageError

        cfg = _load(recipe, set_)
        if samples != "all" and not samples.isdigit():
            raise StageError(f"--samples must be a count >= 0 or 'all', got {samples!r}")
        try:
            config = pkg.Config(format=format_.value, name=name or "", version=version, force=force,
                                samples=-1 if samples == "all" else int(samples), storage_uri=storage_uri or "",
                                allow_contrib_ops=allow_contrib_ops, batching=cfg.serve.batching)
        except ValueError as e:
            raise StageError(str(e).replace("`", "")) from None
        rundir = _rundir(workdir) or default_rundir(cfg)
        with tempfile.TemporaryDirectory(prefix="onnx-pipeline-package-") as download:
            source = _package_source(model, workdir, rundir, cfg, Path(download))
            split = _package_split(rundir) if config.format == "bundle" and config.samples else None
            out = output or Path("dist") / {"bundle": "{n}", "triton": "model-repository", "kserve": "{n}-kserve"}[
                config.format].format(n=config.name or pkg.default_name(source, pkg.inspect(source.path)))
            result = pkg.run(config, source, out, split)
    typer.echo(result.summary())
    for f in result.files:
        typer.echo(f"  {Path(result.output) / f}")


def _package_source(model: Optional[str], workdir: Optional[Path], rundir, cfg, download: Path):
    """The model to package: --model (a path or a registry URI), else the --workdir's registered (or fp32)
    variant, else the recipe's champion in the registry."""
    import json

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
    uri = model or f"models:/{cfg.register.model_name or cfg.name}@champion"
    if uri.startswith(("models:/", "runs:/")):
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

    if not rundir.data.is_file():
        raise StageError(f"no test split for the bundle's samples: {rundir.data} not found; pass --workdir RUN_DIR "
                         f"(the run the model came from), or --samples 0")
    data = dataset.load(rundir.data, rundir.dataset)
    x, y = data.split("test", normalized=False)
    return TestSplit(x=x, y=y, dataset_sha256=data.info.get("sha256", ""), value_range=data.info.get("value_range"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
