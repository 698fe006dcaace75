"""`pipeline tune`: a study recorded in MLflow (a parent run, a nested run per trial), pruning through the train
stage's should_stop, a multi-objective front, workers sharing a study, a killed study resumed, the best trial
reproduced by `pipeline run --recipe-overlay`, and one error per bad tune key before any trial runs.

Tiny trials: 400 digits, a 4-8 channel CNN, 2-3 epochs, the legacy exporter (seconds, not the dynamo
exporter's ten); the study storage is the optuna.db beside the session's temporary MLflow store.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, recipe_from_dict
from tests.conftest import ROOT

TUNE = {
    "name": "tunetiny",
    "model": {"family": "cnn", "channels": [4, 8], "pool_after": 1, "hidden": 16},
    "prepare": {"max_samples": 400},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0, "device": "cpu", "checkpoint_every": 100},
    "export": {"exporter": "legacy"},
    "quantize": {"variants": ["int8-dynamic"], "calibration_samples": 32},
    "benchmark": {"batch_sizes": [1], "warmup_runs": 1, "min_runs": 3, "min_seconds": 0.01, "rounds": 1,
                  "include_torch": False},
    "register": {"model_name": "tunetiny", "target_batch_size": 1, "remeasure_rounds": 0},
    "tune": {"space": {"train.lr": {"low": 0.01, "high": 0.1, "log": True},
                       "model.channels": {"choices": [[4, 8], [8, 16]]}},
             "pruner": "none", "heartbeat_s": 2, "timing_seconds": 0.05},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Trials of a 662-parameter CNN gain nothing from threads, and on a loaded machine two spin-waiting
    threads made each step 10x slower; the suite's setting is restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def study_of(name: str):
    import optuna

    from pipeline.tune import default_storage

    return optuna.load_study(study_name=name, storage=default_storage())


def runs_of(experiment: str, filter_string: str = ""):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=500)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 4-trial study recorded in MLflow, its trials enqueued so it is deterministic: three that learn, and one
    that cannot (lr 1e-6), which the median pruner stops after epoch 2 of 3."""
    from pipeline import tune

    data = copy.deepcopy(TUNE)
    data["train"]["epochs"] = 3
    data["tune"].update({"pruner": "median", "pruner_startup_trials": 3, "pruner_warmup_epochs": 2})
    data["tune"]["space"]["train.lr"]["low"] = 1e-6
    plan = tune.plan_study(recipe_from_dict(data), trials=4, study="recorded", workdir=tmp_path_factory.mktemp("study"),
                           overrides=("--set", "train.epochs=3"))  # as `pipeline tune --set train.epochs=3` records it
    study = study_of("recorded")
    for lr, channels in ((0.05, [4, 8]), (0.03, [8, 16]), (0.08, [4, 8]), (1e-6, [4, 8])):
        study.enqueue_trial({"train.lr": lr, "model.channels": yaml.safe_dump(channels, default_flow_style=True).strip()})
    return plan, tune.run_study(plan), data


def test_a_study_records_a_parent_run_and_a_nested_run_per_trial(recorded):
    from mlflow.tracking import MlflowClient

    plan, summary, _ = recorded
    assert summary.counts["complete"] == 3 and summary.counts["pruned"] == 1
    assert sorted(r["number"] for r in summary.trials) == [0, 1, 2, 3]
    parents = runs_of("tunetiny", "tags.`pipeline.kind` = 'tune' and tags.`tune.study` = 'recorded'")
    assert [p.info.run_id for p in parents] == [plan.parent_run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 3
    children = runs_of("tunetiny", f"tags.`mlflow.parentRunId` = '{plan.parent_run_id}'")
    assert sorted(int(c.data.tags["tune.trial"]) for c in children) == [0, 1, 2, 3]
    client = MlflowClient()
    for child in children:
        row = summary.row(int(child.data.tags["tune.trial"]))
        assert child.data.tags["tune.state"] == row["state"] and child.info.status == "FINISHED"
        assert float(child.data.params["train.lr"]) == pytest.approx(row["params"]["train.lr"])
        curve = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in curve) == list(range(1, row["epochs_run"] + 1))  # every epoch, from train
        if row["state"] == "complete":
            assert child.data.metrics["objective.val_accuracy"] == pytest.approx(row["values"][0])
    logged = {a.path for a in client.list_artifacts(plan.parent_run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/intermediate_values.png", "tune/param_importances.png",
            "tune/study.json", "tune/best.yaml"} <= logged
    assert parent.data.tags["tune.chosen_trial"] == str(summary.chosen)
    best = max((r for r in summary.trials if r["state"] == "complete"), key=lambda r: r["values"][0])
    assert summary.row(summary.chosen)["values"][0] == best["values"][0]


def test_pruning_stops_a_trial_that_reports_a_bad_metric(recorded):
    """The lr-1e-6 trial reports chance accuracy: the median pruner stops it after epoch 2 of 3, through the
    Tracker's should_stop in the train loop; the others train all 3 epochs."""
    _, summary, _ = recorded
    bad = summary.row(3)
    assert bad["state"] == "pruned" and bad["pruned_at_epoch"] == 2 and bad["epochs_run"] == 2
    assert bad["intermediate"][2] < min(summary.row(n)["intermediate"][2] for n in (0, 1, 2))
    assert all(summary.row(n)["epochs_run"] == 3 for n in (0, 1, 2))
    assert summary.epochs == {"trained": 11, "saved_by_pruning": 1}


def test_the_best_overlay_reproduces_its_trial_through_pipeline_run(recorded, tmp_path):
    from typer.testing import CliRunner

    from pipeline import tune
    from pipeline.cli import app

    plan, summary, data = recorded
    best = tune.best(recipe_from_dict(data), study="recorded", workdir=Path(plan.workdir))
    trial = best.row(best.chosen)
    overlay = yaml.safe_load(Path(best.overlay).read_text())
    assert overlay["train"]["lr"] == trial["params"]["train.lr"] and "epochs" not in overlay["train"]
    # the study's own recipe change is not in the overlay, but its reproduce line names it
    assert f"#   pipeline run --recipe RECIPE --recipe-overlay {best.overlay} --set train.epochs=3\n" in Path(
        best.overlay).read_text()
    recipe_file = tmp_path / "tunetiny.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    rundir = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--recipe", str(recipe_file), "--recipe-overlay", best.overlay,
                                      "--workdir", str(rundir), "--json"])
    logging.getLogger().handlers.clear()  # the callback bound a handler to the runner's closed stream
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    ran = yaml.safe_load((rundir / "recipe.yaml").read_text())
    assert ran["train"]["lr"] == trial["params"]["train.lr"]
    assert ran["model"]["channels"] == trial["params"]["model.channels"]
    report = json.loads(result.stdout)
    assert report["registration"]["version"]  # through the normal stages into the registry
    # Same split, seed and keys: the pipeline's model scores on validation what the trial scored.
    assert json.loads((rundir / "results" / "train.json").read_text())["result"]["value"] == pytest.approx(
        trial["values"][0])
    from mlflow.tracking import MlflowClient

    parent = MlflowClient().get_run(report["pipeline_run_id"])
    assert float(parent.data.params["recipe.train.lr"]) == pytest.approx(trial["params"]["train.lr"])

    other = next(r["number"] for r in best.trials if r["state"] == "complete" and r["number"] != best.chosen)
    picked = tune.best(recipe_from_dict(data), study="recorded", workdir=Path(plan.workdir), pick=other, track=False)
    assert picked.chosen == other
    assert yaml.safe_load(Path(picked.overlay).read_text())["train"]["lr"] == picked.row(other)["params"]["train.lr"]
    with pytest.raises(ConfigError, match="--pick 3: study recorded has no complete trial 3"):
        tune.best(recipe_from_dict(data), study="recorded", workdir=Path(plan.workdir), pick=3, track=False)


def _dominates(a, b, directions):
    sign = [1 if d == "maximize" else -1 for d in directions]
    pa, pb = [s * v for s, v in zip(sign, a)], [s * v for s, v in zip(sign, b)]
    return all(x >= y for x, y in zip(pa, pb)) and any(x > y for x, y in zip(pa, pb))


def test_two_workers_share_a_multi_objective_study_that_resumes_after_a_kill(tmp_path):
    """`pipeline tune --workers 2` on accuracy and measured latency: both workers take trials of one study
    (distinct numbers); SIGKILL leaves their trials RUNNING; `pipeline tune` again fails them by heartbeat,
    runs them again and completes the study, whose front is mutually non-dominated."""
    from pipeline import tune

    data = copy.deepcopy(TUNE)
    data["tune"].update({"objectives": ["auto", "latency_ms"], "trials": 2})
    data["train"]["epochs"] = 4  # long enough to be killed mid-trial
    recipe_file = tmp_path / "multi.yaml"
    recipe_file.write_text(yaml.safe_dump(data))
    workdir = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tune", "--recipe", str(recipe_file), "--study",
                             "multi", "--workers", "2", "--workdir", str(workdir), "--set", "train.batch_size=32",
                             "--set", "tune.timing_seconds=0.05"], cwd=ROOT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                with_workers = [t for t in study_of("multi").trials if t.user_attrs.get("worker")]
            except KeyError:  # the study is not created yet
                with_workers = []
            if len({t.user_attrs["worker"] for t in with_workers}) == 2:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
        else:
            pytest.fail("the two workers did not both start a trial within 240 s")
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and both workers, mid-trial
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed = study_of("multi").trials
    assert len({t.number for t in killed}) == len(killed)  # no duplicate trial numbers
    assert len({t.user_attrs["worker"] for t in killed}) == 2
    # each worker process recorded the invocation's recipe changes, tune.* ones left out
    assert all(t.user_attrs["overrides"] == ["--set", "train.batch_size=32"] for t in killed)
    running = [t.number for t in killed if t.state.name == "RUNNING"]
    assert running, [t.state.name for t in killed]
    parent = study_of("multi").user_attrs["mlflow_parent_run_id"]

    time.sleep(2 * 2 + 1)  # the dead workers' heartbeats go stale (2 x tune.heartbeat_s): the heartbeat path
    cfg = recipe_from_dict(data)
    plan = tune.plan_study(cfg, study="multi", workdir=workdir)
    assert plan.parent_run_id == parent  # the same parent MLflow run, reopened
    summary = tune.run_study(plan)
    final = study_of("multi").trials
    assert not [t for t in final if t.state.name in ("RUNNING", "WAITING")]
    assert len({t.number for t in final}) == len(final)
    retried = {t.system_attrs.get("failed_trial") for t in final} - {None}
    assert set(running) <= retried  # each killed trial ran again
    assert summary.counts["complete"] + summary.counts["pruned"] + summary.counts["failed"] == 2
    for t in runs_of("tunetiny", f"tags.`mlflow.parentRunId` = '{parent}'"):
        if int(t.data.tags["tune.trial"]) in running:
            assert t.info.status == "KILLED"  # the killed trial's run does not stay RUNNING

    # The front: complete trials, none dominating another, every other complete trial dominated by one of it.
    rows = {r["number"]: r for r in summary.trials if r["state"] == "complete"}
    front = summary.best
    assert front and set(front) <= set(rows)
    for a in front:
        for b in front:
            assert not _dominates(rows[a]["values"], rows[b]["values"], summary.directions)
    for n, r in rows.items():
        if n not in front:
            assert any(_dominates(rows[f]["values"], r["values"], summary.directions) for f in front)
    assert set(front) == {t.number for t in study_of("multi").best_trials}  # Optuna's own front agrees
    speed = rows[front[0]]["speed"]
    assert speed["provider"] == "CPUExecutionProvider" and speed["latency_ms"] > 0 and speed["batch_size"] == 1
    assert (workdir / "plots" / "pareto_front.png").is_file() and summary.chosen in front


@pytest.mark.parametrize("change, fragment", [
    ({"space": {"train.lrr": {"low": 0.01, "high": 0.1}}}, "`train.lrr` is not a recipe key"),
    ({"trails": 3}, "unknown key `tune.trails`"),
    ({"space": {"train.lr": {"low": 0.01, "high": 0.01}}}, "is an empty range"),
    ({"space": {"train.lr": {"low": 0.1, "high": 0.01}}}, "is inverted (low 0.1 > high 0.01)"),
    ({"space": {"train.optimizer": {"choices": ["adam"]}}}, "must hold at least two different values"),
    ({"space": {"train.optimizer": {"low": 1, "high": 2}}}, "takes `choices: [...]`, not a range"),
    ({"space": {"train.lr": {"low": 0, "high": 0.1, "log": True}}}, "a log-scale range must have low > 0"),
    ({"space": {"train.epochs": {"low": 1.5, "high": 3}}}, "must be an integer"),
    ({"space": {"model.channels": {"choices": [[4], [0]]}}}, "choice [0] makes an invalid recipe"),
    ({"objectives": ["val_accuracy", "speed"]}, "'speed' is not a second objective"),
    ({"objectives": ["auto", "latency_ms"], "pruner": "median"}, "needs a single objective"),
])
def test_each_bad_tune_key_gets_its_one_error(change, fragment):
    data = copy.deepcopy(TUNE)
    data["tune"].update(change)
    with pytest.raises(ConfigError) as e:
        recipe_from_dict(data)
    assert fragment in str(e.value)


def test_errors_found_before_any_trial_exit_2(tmp_path):
    """A key no trial's stage reads, an objective the task cannot have, a storage that cannot be reached: each
    one line, exit 2, and no study created."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    def run(data, *args):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(app, ["tune", "--recipe", str(path), "--workdir", str(tmp_path / "w"), *args])
        logging.getLogger().handlers.clear()
        assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr
        assert not (tmp_path / "w" / "trials").exists()  # no trial ran
        return errors[0]

    unread = copy.deepcopy(TUNE)
    unread["tune"]["space"] = {"register.remeasure_rounds": {"choices": [0, 6]}}
    assert "no stage of a trial reads it" in run(unread)
    assert "cannot be reached" in run(TUNE, "--storage", "postgresql+psycopg2://nobody@127.0.0.1:1/optuna")
    regression = {"name": "tuneregr", "model": {"family": "linear"}, "prepare": {"dataset": "diabetes"},
                  "tune": {"objectives": ["val_accuracy"], "space": {"train.lr": {"low": 0.001, "high": 0.1}}}}
    assert "val_accuracy is not a validation metric of this regression task" in run(regression, "--no-track")


def test_an_overlay_is_validated_like_the_recipe(tmp_path):
    from pipeline.config import load_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump(TUNE))
    overlay = tmp_path / "best.yaml"
    overlay.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"recipe overlay .*best.yaml: unknown key `train.lrr`"):
        load_recipe(recipe_file, [], [overlay])
    overlay.write_text("train:\n  lr: 0.02\nmodel:\n  channels: [8, 16]\n")
    r = load_recipe(recipe_file, ["train.lr=0.03"], [overlay])  # --set wins over the overlay
    assert r.train.lr == 0.03 and r.model.config.channels == (8, 16) and r.train.epochs == 2
    with pytest.raises(ConfigError, match="recipe overlay .* not found"):
        load_recipe(recipe_file, [], [tmp_path / "nope.yaml"])


def test_a_trial_killed_before_its_run_id_was_recorded_is_found_by_its_number():
    """A worker can die between creating its trial's MLflow run and recording the run's id in the study:
    the stale-trial handler finds that RUNNING run by the trial's number under the parent and marks it
    KILLED, leaving the other trials' runs alone."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    client, recorder = MlflowClient(), tracking.StudyRecorder("tune-killed-early")
    exp = tracking.experiment_id("tune-killed-early")
    parent = client.create_run(exp).info.run_id
    child, other = (client.create_run(exp, tags={"mlflow.parentRunId": parent, "tune.trial": n}).info.run_id
                    for n in ("7", "8"))
    recorder.trial_killed(None, "worker w died (no heartbeat)", parent_run_id=parent, number=7)
    killed = client.get_run(child)
    assert killed.info.status == "KILLED" and killed.data.tags["tune.state"] == "failed"
    assert killed.data.tags["pipeline.killed_reason"] == "worker w died (no heartbeat)"
    assert client.get_run(other).info.status == "RUNNING"
