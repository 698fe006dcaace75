"""Issue 14, as a clumsy operator would meet it: corrupt model files in the run directory, a store that
is not there or not usable, a dataset that is not what its source says, a checkpoint torch refuses, an
evaluation after a killed training. Each is one error line (or one warning) naming what is wrong and
the fix, never a traceback. (Kills, orphans and temporaries: tests/test_chaos.py; the team server and
passwords in the store URI: tests/test_tracking_server.py.)"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app


def invoke(*args: str, env: dict[str, str] | None = None, monkeypatch=None):
    """`pipeline ...` in-process; returns (exit code, stdout, stderr)."""
    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    result = CliRunner().invoke(app, list(args))
    logging.getLogger().handlers.clear()  # the callback bound a handler to the runner's closed stream
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        raise AssertionError("".join(traceback.format_exception(result.exception)))
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    """The command's error: exactly one `error:` line, no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture
def restore_mlflow_uri():
    """In-process commands point MLflow's globals at the store they were given: point them back after."""
    yield
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())


# ---------------------------------------------------------------- 2. corrupt .onnx files in the run directory

def _truncate(path: Path, keep: int = 3000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_fp32_file_given_to_quantize_is_one_line_naming_it_and_the_stage_that_rewrites_it(
        benchmarked, copy_of, tiny_yaml, restore_mlflow_uri):
    rd = copy_of(benchmarked)
    _truncate(rd.onnx)
    code, _, err = invoke("quantize", "-r", str(tiny_yaml), "-w", str(rd.root), "--no-track")
    line = one_error_line(err)
    assert code == 2, err
    assert f"{rd.onnx} is not a valid ONNX model" in line and "truncated, corrupt or not ONNX" in line
    assert line.endswith("rerun `pipeline export` to rewrite it (`pipeline run` does, seeing the file is not the one "
                         "export recorded)"), line


def test_a_corrupt_variant_given_to_benchmark_is_one_line(benchmarked, copy_of, tiny_yaml, restore_mlflow_uri):
    rd = copy_of(benchmarked)
    variants = json.loads(rd.variants.read_text())["variants"]
    name = next(n for n, v in variants.items() if n != "fp32" and v.get("ok"))
    bad = rd.root / variants[name]["file"]
    _truncate(bad, len(bad.read_bytes()) // 2)
    code, _, err = invoke("benchmark", "-r", str(tiny_yaml), "-w", str(rd.root), "--no-track", "--set",
                          "benchmark.include_torch=false", "--set", "benchmark.batch_sizes=[1]")
    line = one_error_line(err)
    assert code == 2 and f"{bad} is not a valid ONNX model" in line and "rerun `pipeline quantize`" in line, err


def test_register_refuses_a_file_that_changed_since_quantize_measured_it(benchmarked, copy_of, tiny_yaml,
                                                                          restore_mlflow_uri):
    """Whichever variant register chooses, its file no longer has the sha256 quantize recorded: never
    registered, one line."""
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    rd = copy_of(benchmarked)
    for name, v in json.loads(rd.variants.read_text())["variants"].items():
        if v.get("ok"):
            _truncate(rd.root / v["file"])
    client = MlflowClient(tracking.tracking_uri(), tracking.tracking_uri())
    before = len(client.search_model_versions("name = 'tiny'"))
    code, _, err = invoke("register", "-r", str(tiny_yaml), "-w", str(rd.root))
    line = one_error_line(err)
    assert code == 2 and "changed since quantize checked and measured it" in line and "so it is not registered" in line
    assert "rerun `pipeline export`" in line  # model.onnx (fp32) is checked first; export is the stage that rewrites it
    assert len(client.search_model_versions("name = 'tiny'")) == before


def test_the_session_factory_answers_a_bad_file_in_one_exception(tmp_path):
    from stages.common import BadFile
    from stages.sessions import create_session

    for name, data in (("empty.onnx", b""), ("text.onnx", b"a,b\n1,2\n"), ("junk.onnx", bytes(range(256)) * 8)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadFile) as raised:
            create_session(tmp_path / name)
        assert raised.value.path == tmp_path / name and "\n" not in str(raised.value)
        assert isinstance(raised.value, ValueError)  # what serving takes as a bad model file


# ---------------------------------------------------------------- 6. a store that cannot be reached or used

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize("uri, what, fix", [
    ("postgresql+psycopg2://mlflow:S3cretPw@127.0.0.1:{port}/mlflow", "cannot be connected to (connection to server at "
     '"127.0.0.1", port {port} failed: Connection refused', "start it (`make tracking-server` runs the team server)"),
    ("http://ci:S3cretPw@127.0.0.1:{port}", "cannot be reached (connection refused: nothing listens on that port)",
     "start it (`make tracking-server` runs the team server)"),
    ("postgresql://mlflow:S3cretPw@127.0.0.1:{port}/mlflow", "needs the Python module `psycopg`",
     "write the URI as postgresql+psycopg2://"),
])
def test_an_unreachable_or_misconfigured_store_is_one_line_before_any_stage(uri, what, fix, tiny_yaml, tmp_path,
                                                                            monkeypatch, restore_mlflow_uri):
    port = _closed_port()
    uri, what = uri.format(port=port), what.format(port=port)
    t0 = time.perf_counter()
    code, out, err = invoke("run", "-r", str(tiny_yaml), "-w", str(tmp_path / "run"), env={"MLFLOW_TRACKING_URI": uri},
                            monkeypatch=monkeypatch)
    seconds = time.perf_counter() - t0
    line = one_error_line(err)
    shown = uri.replace("S3cretPw", "***")
    assert code == 2 and line.startswith(f"error: the MLflow store {shown} {what}"), line
    assert fix in line and "S3cretPw" not in out + err
    assert seconds < 15, f"{seconds:.1f} s: no retrying an unreachable store"
    assert not (tmp_path / "run" / "data.npz").exists()  # no stage ran


def test_a_missing_database_driver_names_the_install(tiny_yaml, tmp_path, monkeypatch, restore_mlflow_uri):
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # as if psycopg2 were not installed: importing it fails
    code, _, err = invoke("train", "-r", str(tiny_yaml), "-w", str(tmp_path / "run"),
                          env={"MLFLOW_TRACKING_URI": "postgresql+psycopg2://mlflow:S3cretPw@127.0.0.1:5433/mlflow"},
                          monkeypatch=monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "needs the Python module `psycopg2` (its database driver), which is not installed" in line
    assert "pip install -e '.[team]'" in line and "S3cretPw" not in err


def test_a_server_that_never_answers_times_out_in_one_line(monkeypatch, restore_mlflow_uri):
    """A port that accepts connections but never answers (a hung server): the probe gives up after its timeout."""
    from pipeline import tracking

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():  # take connections and say nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(tracking, "STORE_PROBE_TIMEOUT_S", 1)
        code, _, err = invoke("lineage", "models:/tiny@champion",
                              env={"MLFLOW_TRACKING_URI": f"http://ci:S3cretPw@127.0.0.1:{listener.getsockname()[1]}"},
                              monkeypatch=monkeypatch)
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    line = one_error_line(err)
    assert code == 2 and "did not answer within 1 s" in line and "S3cretPw" not in err, err


def test_redaction_covers_free_text_and_query_passwords(monkeypatch):
    from pipeline.tracking import redact, redact_text

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://ci:p%40ss-w0rd@server:5000")
    assert redact("postgresql://h/db?user=a&password=S3cretPw&sslmode=require") == \
        "postgresql://h/db?user=a&password=***&sslmode=require"
    text = "API request to http://ci:p%40ss-w0rd@server:5000/api/2.0/mlflow/runs/get failed; password p@ss-w0rd"
    assert redact_text(text) == "API request to http://ci:***@server:5000/api/2.0/mlflow/runs/get failed; password ***"


# ---------------------------------------------------------------- also noticed

def test_an_npz_source_that_is_a_csv_says_it_is_not_an_npz_archive(tmp_path):
    from stages.common import BadFile
    from stages.sources import npz

    csv = tmp_path / "table.npz"
    csv.write_text("x0,x1,label\n1,2,0\n3,4,1\n")
    with pytest.raises(BadFile) as raised:
        npz(str(csv), ("x",), "label", "auto", "auto")
    message = str(raised.value)
    assert message.startswith(f"{csv} is not an .npz archive") and "prepare.dataset: csv" in message
    assert "pickled" not in message
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(BadFile, match="is a single .npy array, not an .npz archive"):
        npz(str(tmp_path / "one.npz"), ("x",), "y", "auto", "auto")


def test_a_checkpoint_torch_refuses_keeps_its_whole_message_on_one_line(tmp_path):
    import torch

    from stages import checkpoint
    from stages.common import BadFile

    path = tmp_path / "checkpoint.pt"
    torch.save({"format": checkpoint.FORMAT, "x": np.arange(3)}, path)  # a numpy array: pickled, not a tensor
    with pytest.raises(BadFile) as raised:
        checkpoint.read(path)
    message = str(raised.value)
    assert "\n" not in message and "\x1b" not in message
    # torch's advice about weights_only=False and its reason are kept (the old message stopped before them)
    assert "Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it can result in " \
           "arbitrary code execution" in message
    assert "WeightsUnpickler error: Unsupported global" in message and "numpy" in message
    assert "weights_only=True only" in message and message.endswith("rerun `pipeline train`")


def test_evaluate_after_an_interrupted_training_says_it_scores_the_best_so_far(tiny_recipe, prepared, copy_of, caplog):
    """A training stopped after its second of four epochs (Ctrl-C there) leaves the best-so-far
    checkpoint; evaluate scores it and says so, in the log, metrics.json and the result."""
    from stages import evaluate, train
    from stages.contract import NullTracker

    class StopAtEpoch3(NullTracker):
        def log_metrics(self, metrics, step=None):
            if step == 3:
                raise KeyboardInterrupt

    rd = copy_of(prepared)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_recipe.train, rd, StopAtEpoch3(), family=tiny_recipe.model.family,
                  model_config=tiny_recipe.model.config, recipe=tiny_recipe.to_dict())
    with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
        result = evaluate.run(tiny_recipe.evaluate, rd, NullTracker())
    epochs = tiny_recipe.train.epochs
    metrics = json.loads(rd.metrics.read_text())
    best = metrics["unfinished_training"]["best_epoch"]
    assert metrics["unfinished_training"] == {"best_epoch": best, "epochs_run": 2, "epochs": epochs} and best in (1, 2)
    assert f"training stopped after epoch 2 of {epochs}" in result.summary()
    assert any("best-so-far checkpoint of an unfinished training" in r.getMessage() and "--resume" in r.getMessage()
               for r in caplog.records)
