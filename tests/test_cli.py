"""The `pipeline` command as a user meets it: help that shows every default and stays instant, stage
names checked, the exit-code table (0 / 1 / 2 / 130 / 143), --version, -v/-q, --json on stdout with logs
on stderr, the renamed flags (and their deprecated spellings), and serve / package / lineage run from a
directory that is not the repository."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from tests.conftest import ROOT, TINY

STAGES = ["prepare", "train", "evaluate", "export", "quantize", "benchmark", "register"]
HEAVY = ("torch", "onnxruntime", "mlflow", "onnx", "sklearn")


def invoke(*args: str, code: int | None = 0):
    """`pipeline ...` in-process; stdout and stderr apart."""
    result = CliRunner().invoke(app, list(args))
    logging.getLogger().handlers.clear()  # the callback bound a handler to the runner's closed stream
    if code is not None:
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def subprocess_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout)


# ---------------------------------------------------------------- help

HELP_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from typer.main import get_command
from pipeline.cli import app
names = sorted(get_command(app).commands)
helps = {name: CliRunner().invoke(app, [name, "--help"]).output for name in names}
helps[""] = CliRunner().invoke(app, ["--help"]).output
print(json.dumps({"helps": helps, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (HEAVY,)


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Every command's --help as rendered in a wide terminal, from a fresh interpreter."""
    p = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "TERMINAL_WIDTH": "400", "COLUMNS": "400"})
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["heavy"] == [], f"--help imported {out['heavy']}: import heavy libraries inside the commands"
    return out["helps"]


def _options():
    """(command, click parameter) for every visible option and argument of every command."""
    group = typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        for param in command.params:
            if not getattr(param, "hidden", False) and param.name != "help":
                yield name, param


def _help_line(text: str, param) -> str:
    """The row of ``param`` in a help screen, with its continuation lines (those blank in the name column)."""
    name = next((o for o in param.opts if o.startswith("--")), None) or param.display_name_raw
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if "│" in line and name in line.replace("│", " ").split()]
    assert starts, f"{name} not in the help:\n{text}"
    row = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("│") or line[1:12].strip():
            break
        row.append(line)
    return " ".join(" ".join(line.strip("│ ").split()) for line in row)


def test_every_option_with_a_default_shows_it_in_help(helps):
    """Hand-written "[default: x]" in help text is eaten as markup ("Run directory ."): defaults come from
    `show_default`, and every option with one shows it, the string itself where it is computed."""
    checked = 0
    for command, param in _options():
        line = _help_line(helps[command], param)
        assert "[default" not in (param.help or ""), f"{command} {param.name}: use show_default, not help text"
        is_flag = getattr(param, "is_flag", False)
        has_default = isinstance(param.show_default, str) or (param.default is not None and not is_flag)
        if has_default:
            checked += 1
            shown = param.show_default if isinstance(param.show_default, str) else param.default
            shown = getattr(shown, "value", shown)
            assert f"[default: {'(' + shown + ')' if isinstance(param.show_default, str) else shown}]" in line, \
                f"pipeline {command} --help: {param.name} does not show its default {shown!r}:\n{line}"
        else:
            assert "[default" not in line, line
    assert checked >= 30  # --recipe and --workdir of every stage command, serve's and package's options, ...


def test_help_names_the_defaults_a_user_asks_about(helps):
    assert "[default: (runs/<recipe name>)]" in helps["run"]
    assert "[default: (the recipe's serve.transport.port, else 8000)]" in helps["serve"]
    assert "[default: configs/digits-cnn.yaml]" in helps["train"]
    assert "[default: bundle]" in helps["package"] and "[default: 16]" in helps["package"]
    top = helps[""]
    for needle in ("--version", "--verbose", "--quiet", "--install-completion", "Exit codes: 0 done; 1 the work failed"):
        assert needle in top, needle
    for command in STAGES + ["run", "serve", "package", "lineage", "compare", "promote"]:
        assert command in top


def test_help_is_instant():
    """`pipeline --help` must not wait for torch (about 2 s here): measured from a fresh interpreter."""
    started = time.perf_counter()
    p = subprocess_cli("--help")
    seconds = time.perf_counter() - started
    assert p.returncode == 0 and "Usage" in p.stdout
    assert seconds < 1.5, f"pipeline --help took {seconds:.2f} s"


def test_options_every_run_command_takes():
    """--recipe, --set, --workdir, --json on every stage command and run; --no-track where the command can run
    without MLflow (register cannot: registering is writing to the registry, its help says so)."""
    group = typer.main.get_command(app)
    for name in STAGES + ["run"]:
        opts = {o for p in group.commands[name].params for o in p.opts}
        assert {"--recipe", "--set", "--workdir", "--json"} <= opts, name
        assert ("--no-track" in opts) == (name != "register"), name
    assert "no `--no-track`" in group.commands["register"].help


# ---------------------------------------------------------------- stage names and usage errors (exit 2)

def test_a_misspelt_stage_exits_2_and_lists_the_stages():
    result = invoke("run", "--force", "trian", code=2)
    message = " ".join(result.stderr.replace("│", " ").split())  # click's error box, unwrapped
    assert "unknown stage 'trian'; the stages are " + ", ".join(STAGES) in message
    result = invoke("run", "train", code=2)  # a stage name without --force
    assert "only taken with --force" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["run", "--no-such-option"], "No such option"),
    (["-v", "-q", "run"], "contradict"),
    (["run", "-r", str(ROOT / "configs" / "digits-cnn.yaml"), "--set", "train.epoch=3"], "unknown key `train.epoch`"),
    (["run", "--resume", "--force"], "--resume continues the recorded recipe"),
    (["run", "--resume", "-w", "/nonexistent/run"], "nothing to resume in /nonexistent/run"),
    (["package", "--samples", "some"], "--samples must be a count"),
    (["serve", "--name", "x"], "--name renames a single --model"),
    (["serve", "--model", "missing.onnx"], "model file 'missing.onnx' not found"),
])
def test_usage_errors_exit_2(args, fragment):
    result = invoke(*args, code=2)
    assert fragment in result.stderr, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_version():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.stdout.strip() == f"onnx-pipeline {version('onnx-pipeline')}"


# ---------------------------------------------------------------- logging and --json

def test_quiet_verbose_and_json_on_stdout(tiny_yaml, tmp_path):
    """-q keeps INFO logs off stderr, -v turns on DEBUG for the project's loggers, and --json is one JSON
    document on stdout whatever the log level."""
    quiet = invoke("-q", "prepare", "-r", str(tiny_yaml), "-w", str(tmp_path / "q"), "--no-track", "--json")
    assert logging.getLogger("pipeline").level == logging.WARNING
    doc = json.loads(quiet.stdout)
    assert doc["status"] == "done" and doc["run_dir"] == str(tmp_path / "q")
    assert [s["stage"] for s in doc["stages"]] == ["prepare"] and doc["stages"][0]["status"] == "done"
    assert " INFO " not in quiet.stderr and "prepare" not in quiet.stderr, quiet.stderr

    loud = invoke("-v", "prepare", "-r", str(tiny_yaml), "-w", str(tmp_path / "v"), "--no-track")
    assert logging.getLogger("pipeline").level == logging.DEBUG and logging.getLogger("stages").level == logging.DEBUG
    assert "prepare" in loud.stderr and "┃" not in loud.stderr and "prepare" in loud.stdout  # table on stdout


def test_benchmark_and_run_json(benchmarked, copy_of):
    """`benchmark --json` carries every row of the table; `run --explain --json` the plan; `run --json` the
    summary of every stage (the earlier ones reused from the stage commands' stamps)."""
    rd = copy_of(benchmarked)
    recipe = rd.root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "benchmark": {**TINY["benchmark"], "batch_sizes": [1]}}))
    bench = json.loads(invoke("benchmark", "-r", str(recipe), "-w", str(rd.root), "--no-track", "--json").stdout)
    rows = bench["benchmark"]
    assert rows and {r["batch_size"] for r in rows} == {1} and {"variant", "provider", "median_ms", "p99_ms",
                                                                  "samples_per_s"} <= set(rows[0])
    assert bench["stages"][0]["stage"] == "benchmark"

    plan = json.loads(invoke("run", "-r", str(recipe), "-w", str(rd.root), "--no-track", "--explain", "--json").stdout)
    assert [p["stage"] for p in plan["plan"]] == STAGES
    assert [p["run"] for p in plan["plan"]] == [False] * 6 + [True], plan  # register never ran here
    done = json.loads(invoke("run", "-r", str(recipe), "-w", str(rd.root), "--no-track", "--json").stdout)
    assert done["status"] == "done" and [s["status"] for s in done["stages"]] == ["reused"] * 6 + ["done"]
    assert done["benchmark"] == rows and done["pipeline_run_id"] is None  # untracked


# ---------------------------------------------------------------- exit codes 130, 143 (1: test_config, test_record)

@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_exits_130_or_143(prepared, copy_of, tiny_yaml, sig, code):
    rd = copy_of(prepared)
    # SIGINT at its default in the child, as in a terminal: a shell without job control starts its
    # `cmd &` jobs (a `make test &` in a script, say) with SIGINT ignored, which every child inherits,
    # and Python then installs no KeyboardInterrupt handler at all (Ctrl-C cannot reach such a job).
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-r", str(tiny_yaml), "-w", str(rd.root),
                             "--no-track", "--set", "train.epochs=100000"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if json.loads(rd.state.read_text()).get("current_stage") == "train":
                    break
            except (OSError, json.JSONDecodeError):
                pass
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # it did not stop: do not leave it training for ever
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err[-2000:]
    assert "error: interrupted" in err and "pipeline run --resume" in err and "Traceback" not in err


# ---------------------------------------------------------------- renamed flags

def test_deprecated_force_spellings_warn_and_still_work(exported, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old").write_text("x")
    args = ["package", "--model", str(exported.onnx), "--samples", "0", "--output", str(out)]
    refused = invoke(*args, code=2)
    assert "exists and is not empty" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "old").exists()
    invoke(*args, "--overwrite")
    assert (out / "model.json").is_file() and not (out / "old").exists()
    again = invoke(*args, "--force")
    assert "`package --force` is deprecated" in again.stderr and "--overwrite" in again.stderr

    promote = invoke("promote", "nobody", "--force", code=1)
    assert "`promote --force` is deprecated" in promote.stderr and "use --allow-worse" in promote.stderr
    assert promote.stderr.splitlines()[-1].startswith("error: ") and "nobody" in promote.stderr  # no such model


# ---------------------------------------------------------------- from any directory, without a recipe

def test_package_and_lineage_outside_the_repository(exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default store: mlruns/ here, which does not exist
    result = invoke("package", "--model", str(exported.onnx), "--workdir", str(exported.root), "--samples", "4")
    assert (tmp_path / "dist" / "tiny" / "samples.json").is_file(), result.stdout
    assert invoke("package", "--model", "models:/tiny@champion", code=2).stderr.startswith(
        "error: models:/tiny@champion: no MLflow store at sqlite:///mlruns/mlflow.db")
    lineage = invoke("lineage", "models:/tiny@champion", code=2)
    assert "set MLFLOW_TRACKING_URI" in lineage.stderr
    assert invoke("package", code=2).stderr.startswith("error: nothing to package: no recipe here")
    assert not (tmp_path / "mlruns").exists()  # no empty store left behind


def test_serve_a_file_from_another_directory(exported, tmp_path):
    """`pipeline serve --model x.onnx` needs no recipe: run from a temporary directory, it serves on the
    built-in defaults (here with --port), answers an inference, and stops on SIGTERM."""
    import httpx
    import numpy as np

    from tests.test_serve import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(exported.onnx), "--port",
                             str(port), "--grpc-port", str(free_port()), "--set", "serve.batching.max_batch_size=8"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.2)
        x = np.load(exported.data)["x_test"][:2].astype(np.float32)
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        r = httpx.post(f"{base}/v2/models/model/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["shape"] == [2, 10]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert "Traceback" not in proc.stdout.read()


def test_shell_completion_knows_commands_and_stage_names():
    """Typer's completion, as bash asks for it (what `pipeline --install-completion` installs)."""
    def complete(words: str, cword: int) -> list[str]:
        p = subprocess.run([str(Path(sys.executable).parent / "pipeline")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "_PIPELINE_COMPLETE": "complete_bash",
                                "COMP_WORDS": words, "COMP_CWORD": str(cword)})
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert complete("pipeline se", 1) == ["serve"]
    assert complete("pipeline run --force tr", 3) == ["train"]
