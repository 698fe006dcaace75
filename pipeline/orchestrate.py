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
from stages import benchmark, evaluate, export, prepare, quantize, register, train
from stages.common import write_json, write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    recipe: Recipe
    rundir: RunDir
    device: str | None = None  # train --device override
    pipeline_run_id: str | None = None


RUNNERS: dict[str, Callable[[Context, Any], Any]] = {
    "prepare": lambda c, t: prepare.run(c.recipe.prepare, c.rundir, t),
    "train": lambda c, t: train.run(c.recipe.train, c.rundir, t, family=c.recipe.model.family,
                                    model_config=c.recipe.model.config, recipe=c.recipe.to_dict(), device=c.device),
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
    write_json(ctx.rundir.result(stage), {"stage": stage, "run_id": tracker.run_id, "seconds": seconds,
                                          "result": result.__dict__})
    outcome = Outcome(stage, "done", seconds, result.summary(), tracker.run_id)
    log.info("✔ %s (%.1f s): %s", stage, seconds, outcome.summary)
    return outcome


def run_pipeline(recipe: Recipe, rundir: RunDir | None = None, stages: tuple[str, ...] = STAGES,
                 track: bool = True, device: str | None = None) -> list[Outcome]:
    """Run ``stages`` in order; with tracking, one parent MLflow run and a nested run per stage."""
    rundir = (rundir or default_rundir(recipe)).ensure()
    recipe_file = _write_recipe(recipe, rundir)
    outcomes: list[Outcome] = []
    if not track:
        ctx = Context(recipe, rundir, device)
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
        ctx = Context(recipe, rundir, device, pipeline_run_id=parent.run_id)
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
              device: str | None = None) -> Outcome:
    """One stage in a run of its own (a `pipeline <stage>` command)."""
    rundir = (rundir or default_rundir(recipe)).ensure()
    if not track:
        return _execute(stage, Context(recipe, rundir, device), tracking.NullTracker())
    with tracking.start_run(recipe.name, stage, tags={**tracking.environment_tags(), "pipeline.stage": stage}) as t:
        return _execute(stage, Context(recipe, rundir, device, pipeline_run_id=None), t)
