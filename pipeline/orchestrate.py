"""Stage order (in one place), the parent MLflow run, and one nested run per stage.

``run_pipeline`` runs the stages in ``STAGES`` order inside one parent run; ``run_stage`` runs a single
stage in a run of its own (what `pipeline train`, `pipeline export`, ... do). Either way a stage gets
its own config section, the run directory and a Tracker, and returns a Result with a one-line summary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline import tracking
from pipeline.config import Recipe
from pipeline.rundir import RunDir
from stages import benchmark, distributed, evaluate, export, prepare, quantize, register, train
from stages.common import StageError, write_json, write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    recipe: Recipe
    rundir: RunDir
    device: str | None = None  # train --device override
    pipeline_run_id: str | None = None
    resume: bool = False  # train --resume: continue from the run directory's train_state.pt
    init_from: str | None = None  # train --init-from: a checkpoint path or an MLflow run id


def resolve_checkpoint(ref: str, option: str, *, recipe_names: bool = False) -> Path:
    """A checkpoint reference as a local file: a path, an MLflow run id (downloaded from the store),
    or (``recipe_names``) a recipe name whose run directory holds it (runs/<name>/checkpoint.pt)."""
    import tempfile

    path = Path(ref)
    if path.is_file():
        return path
    if tracking.looks_like_run_id(ref):
        try:
            return tracking.download_checkpoint(ref, Path(tempfile.mkdtemp(prefix="onnx-pipeline-ckpt-")))
        except ValueError as e:
            raise StageError(f"{option}: {e}") from None
    if recipe_names and "/" not in ref and not ref.endswith(".pt"):
        made = Path("runs") / ref / "checkpoint.pt"
        if made.is_file():
            return made
        raise StageError(f"{option} `{ref}` has no checkpoint at {made}: train it first with "
                         f"`pipeline run --recipe configs/{ref}.yaml` (`make all` trains digits-cnn), "
                         "or give a checkpoint path or an MLflow run id")
    raise StageError(f"{option} `{ref}` is neither a checkpoint file nor an MLflow run id (32 hex digits)"
                     f"{' nor a recipe name with runs/<name>/checkpoint.pt' if recipe_names else ''}")


def _train(c: Context, t) -> train.Result:
    teacher = c.recipe.train.distill.teacher
    return train.run(c.recipe.train, c.rundir, t, family=c.recipe.model.family, model_config=c.recipe.model.config,
                     recipe=c.recipe.to_dict(), device=c.device, resume=c.resume,
                     init_from=resolve_checkpoint(c.init_from, "--init-from") if c.init_from else None,
                     teacher=resolve_checkpoint(teacher, "train.distill.teacher", recipe_names=True) if teacher else None)


RUNNERS: dict[str, Callable[[Context, Any], Any]] = {
    "prepare": lambda c, t: prepare.run(c.recipe.prepare, c.rundir, t),
    "train": _train,
    "evaluate": lambda c, t: evaluate.run(c.recipe.evaluate, c.rundir, t),
    "export": lambda c, t: export.run(c.recipe.export, c.rundir, t),
    "quantize": lambda c, t: quantize.run(c.recipe.quantize, c.rundir, t),
    "benchmark": lambda c, t: benchmark.run(c.recipe.benchmark, c.rundir, t),
    "register": lambda c, t: register.run(c.recipe.register, c.rundir, t, recipe_name=c.recipe.name,
                                          pipeline_run_id=c.pipeline_run_id),
}
STAGES: tuple[str, ...] = tuple(RUNNERS)


@dataclass
class Outcome:
    stage: str
    status: str  # done | failed | skipped
    seconds: float = 0.0
    summary: str = ""
    run_id: str | None = None


class PipelineFailed(RuntimeError):
    def __init__(self, outcomes: list[Outcome], error: BaseException):
        super().__init__(str(error))
        self.outcomes, self.error = outcomes, error


def default_rundir(recipe: Recipe) -> RunDir:
    return RunDir(Path("runs") / recipe.name)


def _write_recipe(recipe: Recipe, rundir: RunDir) -> Path:
    return write_text(rundir.root / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _execute(stage: str, ctx: Context, tracker) -> Outcome:
    log.info("▶ %s", stage)
    t0 = time.perf_counter()
    result = RUNNERS[stage](ctx, tracker)
    seconds = time.perf_counter() - t0
    if not distributed.is_main():  # under torchrun only rank 0 writes files
        return Outcome(stage, "done", seconds, result.summary(), None)
    write_json(ctx.rundir.result(stage), {"stage": stage, "run_id": tracker.run_id, "seconds": seconds,
                                          "result": result.__dict__})
    outcome = Outcome(stage, "done", seconds, result.summary(), tracker.run_id)
    log.info("✔ %s (%.1f s): %s", stage, seconds, outcome.summary)
    return outcome


def run_pipeline(recipe: Recipe, rundir: RunDir | None = None, stages: tuple[str, ...] = STAGES,
                 track: bool = True, device: str | None = None, init_from: str | None = None) -> list[Outcome]:
    """Run ``stages`` in order; with tracking, one parent MLflow run and a nested run per stage."""
    if distributed.world_from_env().distributed:
        raise StageError("`pipeline run` runs one process; under torchrun run the train stage alone: "
                         "`pipeline prepare`, then `torchrun --nproc_per_node N -m pipeline.cli train`, then "
                         "`pipeline evaluate` and the later stages")
    rundir = (rundir or default_rundir(recipe)).ensure()
    recipe_file = _write_recipe(recipe, rundir)
    outcomes: list[Outcome] = []
    if not track:
        ctx = Context(recipe, rundir, device, init_from=init_from)
        for stage in stages:
            try:
                outcomes.append(_execute(stage, ctx, tracking.NullTracker()))
            except Exception as e:
                outcomes.append(Outcome(stage, "failed", summary=str(e).splitlines()[0]))
                raise PipelineFailed(outcomes, e) from e
        return outcomes

    env = tracking.environment_tags()
    with tracking.start_run(recipe.name, "pipeline", tags={**env, "pipeline.kind": "pipeline",
                                                           "pipeline.stages": ",".join(stages)}) as parent:
        parent.log_params({f"recipe.{k}": v for k, v in tracking.flatten(recipe.to_dict()).items()})
        parent.log_artifact(recipe_file)
        ctx = Context(recipe, rundir, device, pipeline_run_id=parent.run_id, init_from=init_from)
        log.info("MLflow: pipeline run %s in %s", parent.run_id, tracking.tracking_uri())
        for stage in stages:
            try:
                with tracking.start_run(recipe.name, stage, nested=True,
                                        tags={"pipeline.stage": stage, "pipeline.parent_run_id": parent.run_id}) as t:
                    outcomes.append(_execute(stage, ctx, t))
            except Exception as e:
                outcomes.append(Outcome(stage, "failed", summary=str(e).splitlines()[0]))
                parent.set_tags({"pipeline.failed_stage": stage})
                raise PipelineFailed(outcomes, e) from e
            parent.log_metrics({f"{stage}_seconds": outcomes[-1].seconds})
        parent.set_tags({"pipeline.status": "done"})
    return outcomes


def run_stage(stage: str, recipe: Recipe, rundir: RunDir | None = None, track: bool = True,
              device: str | None = None, resume: bool = False, init_from: str | None = None) -> Outcome:
    """One stage in a run of its own (a `pipeline <stage>` command). Under torchrun only rank 0
    records in MLflow; the other ranks get a NullTracker."""
    rundir = (rundir or default_rundir(recipe)).ensure()
    ctx = Context(recipe, rundir, device, pipeline_run_id=None, resume=resume, init_from=init_from)
    if not track or not distributed.is_main():
        return _execute(stage, ctx, tracking.NullTracker())
    with tracking.start_run(recipe.name, stage, tags={**tracking.environment_tags(), "pipeline.stage": stage}) as t:
        return _execute(stage, ctx, t)
