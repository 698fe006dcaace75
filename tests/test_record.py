"""MLflow as the system of record: stage reuse (hit and miss per kind of change), --explain, --force,
resume after SIGKILL, lineage, compare, promotion, concurrent runs. Real pipelines on a small recipe,
against temporary stores. (The PostgreSQL-backed team server: tests/test_tracking_server.py.)"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, TINY

STAGES = ["prepare", "train", "evaluate", "export", "quantize", "benchmark", "register"]
# The conftest's tiny recipe made cheaper still: one quantized variant, one batch size, a short benchmark.
SMALL = {**TINY, "name": "small", "train": {**TINY["train"], "epochs": 3},
         "quantize": {"variants": ["int8-dynamic"], "calibration_samples": 32},
         "benchmark": {"batch_sizes": [1], "warmup_runs": 1, "min_runs": 3, "min_seconds": 0.01, "include_torch": False},
         "register": {"model_name": "small", "target_batch_size": 1}}


def pipeline(*args: str, store: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "MLFLOW_TRACKING_URI": store}, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def statuses(stdout: str) -> dict[str, str]:
    """stage -> done | reused | failed, from the summary table."""
    found = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) >= 2 and cells[0] in STAGES and cells[1] in ("done", "reused", "failed", "killed"):
            found[cells[0]] = cells[1]
    return found


def cli(monkeypatch, store: str, *args: str, code: int = 0) -> str:
    """A read-only command in-process (no interpreter start-up): lineage, compare, promote."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def cli_json(monkeypatch, store: str, *args: str) -> str:
    """A read-only command with --json, in-process: its stdout alone (logs go to stderr)."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def client_for(store: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store, store)


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('record-store')}/mlflow.db"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("record-run")


@pytest.fixture(scope="module")
def first(small_yaml, store, workdir):
    p = pipeline("run", "-r", str(small_yaml), "-w", str(workdir), store=store)
    # what the uninterrupted run produced, before later tests retrain in the same directory
    p.results = {name: json.loads((workdir / name).read_text()) for name in ("metrics.json", "checkpoint.json")}
    return p


@pytest.fixture(scope="module")
def second(first, small_yaml, store, workdir):
    t0 = time.perf_counter()
    p = pipeline("run", "-r", str(small_yaml), "-w", str(workdir), store=store)
    return p, time.perf_counter() - t0


@pytest.fixture(scope="module")
def explained(second, small_yaml, store, workdir):
    return pipeline("run", "-r", str(small_yaml), "-w", str(workdir), "--explain", "--set", "train.epochs=1", store=store)


@pytest.fixture(scope="module")
def retrained(explained, small_yaml, store, workdir):
    """The recipe changed in train only: a worse model (one epoch, tiny learning rate), not auto-promoted."""
    return pipeline("run", "-r", str(small_yaml), "-w", str(workdir), "--set", "train.epochs=1",
                    "--set", "train.lr=0.0003", "--set", "register.promote=false", store=store)


def parent_runs(client, name: str = "small"):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.kind` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])
    return list(runs)


def children(client, parent_id: str) -> dict:
    exp_id = client.get_run(parent_id).info.experiment_id
    return {r.data.tags["pipeline.stage"]: r for r in
            client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}


# ---------------------------------------------------------------- what a run records

def test_a_run_records_fingerprints_models_datasets_and_system_metrics(first, store, workdir):
    client = client_for(store)
    parent = parent_runs(client)[0]
    runs = children(client, parent.info.run_id)
    assert set(runs) == set(STAGES) and all(r.info.status == "FINISHED" for r in runs.values())
    for stage, run in runs.items():
        stamp = json.loads((workdir / "results" / f"{stage}.json").read_text())
        # the fingerprint lives in both places, and the outputs' hashes with it
        assert run.data.tags["pipeline.fingerprint"] == stamp["fingerprint"]
        assert json.loads(run.data.tags["pipeline.outputs"]) == stamp["outputs"]
        assert run.data.tags["git.commit"] and run.data.tags["host"] and run.data.tags["version.torch"]
    assert "checkpoint.pt" in json.loads(runs["train"].data.tags["pipeline.outputs"])
    # datasets as inputs (with digest and schema) of the stages that consume them
    digest = json.loads((workdir / "dataset.json").read_text())["sha256"]
    for stage in ("prepare", "train", "evaluate", "quantize"):
        inputs = client.get_run(runs[stage].info.run_id).inputs.dataset_inputs
        assert inputs and inputs[0].dataset.digest == digest[:36] and inputs[0].dataset.schema, stage
    # LoggedModels: the checkpoint and each ONNX variant, with metrics linked
    models = {m.name: m for m in client.search_logged_models(experiment_ids=[parent.info.experiment_id])}
    assert {"checkpoint", "fp32", "int8-dynamic"} <= set(models)
    assert {m.key for m in models["checkpoint"].metrics} >= {"best_val_accuracy", "test_accuracy"}
    assert "accuracy.int8-dynamic" in {m.key for m in models["int8-dynamic"].metrics}
    assert models["fp32"].source_run_id == runs["export"].info.run_id
    # system metrics on the training run
    assert any(k.startswith("system/") for k in runs["train"].data.metrics), sorted(runs["train"].data.metrics)
    # the registry version: description, variant, metrics, pipeline run id
    mv = client.get_model_version_by_alias("small", "candidate")
    assert mv.description and mv.tags["variant"] and mv.tags["pipeline_run_id"] == parent.info.run_id
    assert float(mv.tags["test_accuracy"]) > 0.5


# ---------------------------------------------------------------- reuse

def test_an_unchanged_second_run_reuses_every_stage(first, second, store):
    p, seconds = second
    assert statuses(p.stdout) == {s: "reused" for s in STAGES}, p.stdout
    client = client_for(store)
    first_parent, second_parent = parent_runs(client)[:2]
    firsts = children(client, first_parent.info.run_id)
    for stage, run in children(client, second_parent.info.run_id).items():
        assert run.data.tags["pipeline.reused_from"] == firsts[stage].info.run_id
        assert f"↺ {stage} reused from run {firsts[stage].info.run_id}" in p.stderr
    assert second_parent.data.tags["pipeline.reused"] == ",".join(STAGES)
    print(f"second unchanged run: {seconds:.1f} s")


def test_explain_names_the_changed_recipe_key_and_what_follows(explained):
    lines = {line.split()[0]: line for line in explained.stdout.splitlines() if line.split() and line.split()[0] in STAGES}
    assert lines["prepare"].split()[1] == "reuse"
    assert lines["train"].split()[1] == "RUN" and "recipe key train.epochs: 3 -> 1" in lines["train"]
    for stage in ("evaluate", "export", "benchmark"):
        assert lines[stage].split()[1] == "RUN" and "upstream stage" in lines[stage]


def test_changing_a_training_key_reruns_train_and_downstream_not_prepare(retrained):
    found = statuses(retrained.stdout)
    assert found["prepare"] == "reused"
    assert all(found[s] == "done" for s in STAGES[1:]), found
    assert "▶ train (recipe key train.epochs: 3 -> 1; recipe key train.lr: 0.01 -> 0.0003)" in retrained.stderr
    # an upstream artifact changed: evaluate says which file
    assert "▶ evaluate (upstream file checkpoint.pt changed" in retrained.stderr


def test_force_reruns_the_stage_and_downstream_only_if_its_outputs_changed(retrained, small_yaml, store, workdir):
    p = pipeline("run", "-r", str(small_yaml), "-w", str(workdir), "--set", "train.epochs=1", "--set", "train.lr=0.0003",
                 "--set", "register.promote=false", "--force", "evaluate", store=store)
    found = statuses(p.stdout)
    assert found["evaluate"] == "done" and "▶ evaluate (forced by --force)" in p.stderr
    # evaluate rewrote byte-identical files, so nothing after it needed to run
    assert {s: found[s] for s in STAGES if s != "evaluate"} == {s: "reused" for s in STAGES if s != "evaluate"}


def test_a_changed_code_library_or_output_file_is_a_miss(retrained, workdir, tmp_path, monkeypatch, store):
    """Edit the fingerprint inputs recorded in a copy of the run directory: the code and a library as
    they were when the stage last ran, and an output file since."""
    from pipeline.config import load_recipe
    from pipeline.orchestrate import plan
    from stages.contract import RunDir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(workdir, copy.root)
    recipe = load_recipe(copy.recipe)
    assert not any(d.run for d in plan(recipe, copy))

    stamp = json.loads(copy.result("export").read_text())
    stamp["components"]["code:stages/export.py"] = "0" * 64
    stamp["components"]["lib:torch"] = "2.0.0"
    stamp["fingerprint"] = "edited"
    copy.result("export").write_text(json.dumps(stamp))
    with open(copy.metrics, "a") as f:  # evaluate's output, changed behind its back
        f.write(" ")
    decisions = {d.stage: d for d in plan(recipe, copy)}
    assert not decisions["prepare"].run and not decisions["train"].run
    assert decisions["evaluate"].run and decisions["evaluate"].reasons == ["output metrics.json changed since it was written"]
    assert decisions["export"].run and "upstream stage evaluate reruns" in decisions["export"].reasons
    stamp_reasons = plan(recipe, copy, stages=("export",))[0].reasons
    assert "code of stages/export.py changed" in stamp_reasons
    assert any(r.startswith("library torch: 2.0.0 -> ") for r in stamp_reasons)
    assert "upstream file metrics.json changed" in " ".join(stamp_reasons)


# ---------------------------------------------------------------- the record, read back

def test_lineage_reaches_the_dataset_digest_and_the_recipe(first, store, workdir, monkeypatch):
    out = cli(monkeypatch, store, "lineage", "models:/small@champion")
    digest = json.loads((workdir / "dataset.json").read_text())["sha256"]
    client = client_for(store)
    parent = parent_runs(client)[0]
    assert "registered model small version 1" in out and f"pipeline run {parent.info.run_id}" in out
    for stage in STAGES:
        assert f"├─ {stage}" in out
    assert "checkpoint from training run" in out and "checkpoint.pt sha256" in out
    assert f"digest {digest[:36]}" in out and f"dataset sha256 {digest}" in out
    assert "sklearn.datasets.load_digits" in out and "recipe (recipe.yaml" in out and "epochs: 3" in out
    record = json.loads(cli_json(monkeypatch, store, "lineage", "models:/small@champion"))
    assert record["registered_model"]["version"] == "1" and record["pipeline_run"]["run_id"] == parent.info.run_id
    assert [s["stage"] for s in record["pipeline_run"]["stages"]] == STAGES
    assert record["dataset"]["sha256"] == digest and record["recipe"]["train"]["epochs"] == 3


def test_compare_shows_what_differs(retrained, store, monkeypatch):
    client = client_for(store)
    parents = parent_runs(client)
    a, b = parents[0].info.run_id, parents[-1].info.run_id
    out = cli(monkeypatch, store, "compare", a, b)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    assert rows["recipe.train.epochs"][1:3] == ["3", "1"]
    assert "recipe.prepare.seed" not in rows  # equal params stay out
    assert "evaluate.test_accuracy" in rows and rows["evaluate.test_accuracy"][3].startswith("-")
    record = json.loads(cli_json(monkeypatch, store, "compare", a, b))
    params = {p["key"]: (p["a"], p["b"]) for p in record["params"]}
    metrics = {m["key"]: m for m in record["metrics"]}
    assert params["recipe.train.epochs"] == ("3", "1") and "recipe.prepare.seed" not in params
    assert metrics["evaluate.test_accuracy"]["change"] == metrics["evaluate.test_accuracy"]["b"] - metrics["evaluate.test_accuracy"]["a"]


def test_promote_refuses_a_worse_candidate_unless_forced(retrained, store, monkeypatch):
    client = client_for(store)
    version = lambda alias: str(client.get_model_version_by_alias("small", alias).version)
    assert (version("candidate"), version("champion")) == ("2", "1")
    out = cli(monkeypatch, store, "promote", "small", code=1)
    assert "refused: candidate v2 accuracy" in out and "worse by" in out and "points" in out
    assert version("champion") == "1"
    out = cli(monkeypatch, store, "promote", "small", "--allow-worse")
    assert "promoted" in out and "(forced)" in out
    assert version("champion") == "2"
    assert "already the champion" in cli(monkeypatch, store, "promote", "small")


# ---------------------------------------------------------------- the one resolver of model URIs

def _stage_run(client, stage: str) -> str:
    """The first pipeline's own (not reused) run of ``stage``."""
    return children(client, parent_runs(client)[0].info.run_id)[stage].info.run_id


@pytest.mark.parametrize("uri, why, fix", [
    ("model:/small@champion", "not a model URI", "use models:/NAME@ALIAS"),
    ("models:/small@", "malformed model URI", "use models:/NAME@ALIAS"),
    ("models:/small/1/2", "malformed model URI", "use models:/NAME@ALIAS"),
    ("runs:/0123456789abcdef0123456789abcdef", "a run URI names a run and a path in it", "runs:/RUN_ID/PATH"),
    ("models:/nobody@champion", "no registered model 'nobody' (registered: small", "run `make all`"),
    ("models:/small@no-such-alias", "registered model 'small' has no alias 'no-such-alias' (it has @candidate = v",
     "run `make all`"),
    ("models:/small/99", "registered model 'small' has no version 99 (it has @", "run `make all`"),
    ("models:/small/first", "version 'first' is not a number", "use models:/NAME@ALIAS"),
    ("models:/small", "a registered model URI names a version", "e.g. models:/small@champion or models:/small/latest"),
    ("runs:/0123456789abcdef0123456789abcdef/model.onnx", "no MLflow run 0123456789abcdef0123456789abcdef",
     "pass the id of a run in this store"),
    ("runs:/{export}/nope.onnx", "run {export} logged no 'nope.onnx' (it logged: ", "name a file the run logged"),
])
def test_an_unresolvable_uri_names_itself_the_store_and_the_fix(first, store, monkeypatch, uri, why, fix):
    from pipeline import tracking
    from stages.common import StageError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    export = _stage_run(client_for(store), "export")
    uri, why = uri.format(export=export), why.format(export=export)
    with pytest.raises(StageError) as raised:
        tracking.resolve_model(uri)
    message = str(raised.value)
    assert message.startswith(f"cannot resolve {uri!r} in the store {store}: {why}"), message
    assert fix in message.split(why, 1)[1], message
    with pytest.raises(StageError, match="cannot resolve"):  # the download resolves with the same resolver
        tracking.fetch_model(uri)


def test_a_password_in_the_store_uri_is_never_shown(monkeypatch):
    from pipeline import tracking
    from stages.common import StageError

    assert tracking.redact("postgresql://ci:s3:cr@t@db:5432/mlflow") == "postgresql://ci:***@db:5432/mlflow"
    assert tracking.redact("http://ci@server:5000") == "http://ci@server:5000"  # no password, nothing to hide
    assert tracking.redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://ci:s3cret@db.example:5432/mlflow")
    with pytest.raises(StageError) as raised:  # refused by its shape, before any connection
        tracking.resolve_model("models:/small@")
    assert "in the store postgresql://ci:***@db.example:5432/mlflow:" in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_fetch_model_downloads_the_registered_bytes(first, store, monkeypatch, tmp_path):
    import mlflow

    from pipeline import tracking
    from stages.common import sha256_file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = client_for(store)
    mv = client.get_model_version_by_alias("small", "candidate")
    fetched = tracking.fetch_model("models:/small@candidate", tmp_path / "alias")
    assert (fetched.name, fetched.version, fetched.run_id, fetched.tags) == ("small", str(mv.version), mv.run_id, mv.tags)
    assert sha256_file(fetched.path) == mv.tags["onnx_sha256"]  # the very file the register stage chose
    direct = Path(mlflow.artifacts.download_artifacts(f"models:/small/{mv.version}", dst_path=str(tmp_path / "mlflow")))
    assert fetched.path.read_bytes() == next(direct.rglob("*.onnx")).read_bytes()
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'small'"))
    assert tracking.resolve_model("models:/small/latest").version == str(versions[-1])
    assert tracking.fetch_model(f"models:/small/{mv.version}", tmp_path / "number").path.read_bytes() == \
        fetched.path.read_bytes()
    # a file a run logged: the export run's model.onnx, as its outputs tag recorded it
    export = _stage_run(client, "export")
    by_run = tracking.fetch_model(f"runs:/{export}/model.onnx", tmp_path / "run")
    outputs = json.loads(client.get_run(export).data.tags["pipeline.outputs"])
    assert sha256_file(by_run.path) == outputs["model.onnx"] and (by_run.version, by_run.run_id) == ("", export)


def test_a_checkpoint_run_id_not_in_the_store_is_one_error_naming_the_option(first, store, monkeypatch):
    from pipeline.orchestrate import resolve_checkpoint
    from stages.common import StageError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with pytest.raises(StageError, match=rf"^--init-from: no MLflow run {'0' * 32} in the store {re.escape(store)}; pass a "
                                         "checkpoint path or the id of a train run"):
        resolve_checkpoint("0" * 32, "--init-from")


# ---------------------------------------------------------------- resume, concurrency

def test_resume_after_sigkill_completes_with_the_same_result(first, small_yaml, store, workdir, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["run", "-r", str(small_yaml), "-w", str(run_dir), "--set", "register.model_name=small-resumed"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": store})
    state_file = run_dir / "pipeline.json"
    killed_stage = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("current_stage") in ("train", "evaluate", "export") and state["current_stage"] in state["stage_runs"]:
            proc.send_signal(signal.SIGSTOP)  # freeze it where it is, then kill it without a chance to clean up
            killed_stage = json.loads(state_file.read_text())["current_stage"]
            proc.kill()
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert killed_stage, "the pipeline finished before it could be killed"
    client = client_for(store)
    state = json.loads(state_file.read_text())
    assert state["status"] == "running"  # it had no chance to say otherwise
    stale = [state["parent_run_id"], state["stage_runs"][killed_stage]]
    assert {client.get_run(r).info.status for r in stale} == {"RUNNING"}
    assert not (run_dir / "results" / f"{killed_stage}.json").exists()

    p = pipeline("run", "--resume", "-w", str(run_dir), store=store)
    assert {client.get_run(r).info.status for r in stale} == {"KILLED"}
    found = statuses(p.stdout)
    assert found["prepare"] == "reused" and found[killed_stage] == "done" and found["register"] == "done"
    resumed = json.loads(state_file.read_text())
    assert resumed["status"] == "done" and resumed["resumes"] == state["parent_run_id"]
    assert client.get_run(resumed["parent_run_id"]).data.tags["pipeline.resumes"] == state["parent_run_id"]
    # the same result as the uninterrupted run of the same recipe
    for name in ("metrics.json", "checkpoint.json"):
        a, b = first.results[name], json.loads((run_dir / name).read_text())
        for key in ("accuracy", "macro_f1", "epoch", "val_accuracy"):
            assert a.get(key) == b.get(key), (name, key)
    assert pipeline("run", "--resume", "-w", str(run_dir), store=store).stdout.startswith("nothing to resume")


def test_concurrent_runs_share_a_store_but_not_a_run_directory(small_yaml, tmp_path):
    store = f"sqlite:///{tmp_path}/store/mlflow.db"  # fresh: both processes race to create it
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    cheap = ["--set", "train.epochs=1", "--set", "register.model_name=concurrent"]
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-r", str(small_yaml), "-w",
                               str(tmp_path / name), *cheap], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    # a third run on a directory in use is refused at once, saying why
    deadline = time.time() + 120
    while not (tmp_path / "a" / "pipeline.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    refused = pipeline("run", "-r", str(small_yaml), "-w", str(tmp_path / "a"), *cheap, store=store, check=False)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert refused.returncode == 1 and "is in use by another pipeline (pid" in refused.stderr
    assert "Traceback" not in refused.stderr
    client = client_for(store)
    parents = parent_runs(client, "small")
    assert len(parents) == 2 and {r.info.status for r in parents} == {"FINISHED"}
    assert sorted(str(mv.version) for mv in client.search_model_versions("name = 'concurrent'")) == ["1", "2"]
    for name in ("a", "b"):  # each run directory holds its own, intact artifacts
        stamps = [json.loads((tmp_path / name / "results" / f"{s}.json").read_text()) for s in STAGES]
        from stages.common import sha256_file

        assert all(sha256_file(tmp_path / name / f) == h for st in stamps for f, h in st["outputs"].items())
