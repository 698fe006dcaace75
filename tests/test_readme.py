"""The README tells the truth: its quick start runs as written, and every `pipeline` command and option
it (or docs/) names exists.

The quick start's shell blocks are marked in README.md with an HTML comment before each ```bash block:
`<!-- quickstart -->` (run it; it must succeed), `<!-- quickstart: background URL -->` (a server: start
it, wait until URL answers, stop it by PID at the end) or `<!-- quickstart: skip (reason) -->`. They run
in order, in a clean copy of the repository (so `runs/`, `mlruns/` and `dist/` are the copy's, never the
checkout's), each in a fresh bash that first replays the earlier blocks' `source`/`export`/`cd` lines, as
one interactive shell would keep them. Three documented deviations keep the test cheap and safe on a
shared machine:

- `pipeline run` gets QUICK_SET: a smaller model, one quantized variant and a short benchmark (the
  default recipe takes minutes here), with every other word of the command as written;
- the server gets a free port instead of 8000 (`--port N`, and `:8000` -> `:N` in URLs), and gRPC a
  free one instead of 8001 (`--grpc-port M`);
- the installed `.venv` is the checkout's (a symlink), with PYTHONPATH at the copy, and
  MLFLOW_TRACKING_URI unset so the default store `mlruns/` (in the copy) is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import typer

from tests.conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKED = re.compile(r"<!-- quickstart(?::\s*(?P<kind>skip|background)\b\s*(?P<arg>[^>]*?))?\s*-->\s*\n"
                    r"```bash\n(?P<body>.*?)\n```", re.S)
QUICK_SET = ("--set model.channels=[8,16] --set model.hidden=32 --set train.epochs=3 "
             "--set quantize.variants=[int8-dynamic] --set quantize.calibration_samples=32 "
             "--set benchmark.batch_sizes=[1] --set benchmark.warmup_runs=1 --set benchmark.min_runs=3 "
             "--set benchmark.min_seconds=0.01 --set benchmark.include_torch=false --set register.target_batch_size=1")
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".venv-triton", "node_modules", "mlruns", "runs", "dist",
                                     "__pycache__", ".pytest_cache", ".tracking", "gpu-out")
STATE_COMMANDS = ("source", "export", "cd")


def quick_start() -> str:
    text = README.read_text()
    start = text.index("## Quick start")
    return text[start:text.index("\n## ", start + 1)]


def blocks() -> list[tuple[str, str, str]]:
    """(kind, argument, body) of every marked block of the quick start, in order."""
    return [(m["kind"] or "run", (m["arg"] or "").strip(), m["body"]) for m in MARKED.finditer(quick_start())]


def grpc_port() -> int:
    from tests.test_serve import free_port

    return free_port()


def adapt(body: str, port: int) -> str:
    """The deviations named in the module docstring, applied to one block."""
    lines = []
    for line in body.splitlines():
        line = re.sub(r"^pipeline run\b", f"pipeline run {QUICK_SET}", line)
        line = re.sub(r"^pipeline serve\b", f"pipeline serve --port {port} --grpc-port {grpc_port()}", line)
        lines.append(line.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    return "\n".join(lines)


def test_every_quick_start_block_is_marked():
    section = quick_start()
    assert section.count("```bash") == len(blocks()) >= 4, "a ```bash block of the quick start has no marker"
    kinds = [kind for kind, _, _ in blocks()]
    assert kinds.count("background") == 1 and kinds.count("run") >= 3
    assert len([line for line in section.splitlines() if line.strip()]) <= 60, "the quick start grew past a page"


def test_quick_start_runs_as_written(tmp_path):
    from tests.test_serve import free_port

    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORE, symlinks=True)
    (copy / ".venv").symlink_to((ROOT / ".venv").resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = str(copy)
    port = free_port()
    state: list[str] = []
    outputs: list[tuple[str, str]] = []
    server, server_log = None, tmp_path / "server.log"
    started = time.perf_counter()
    try:
        for kind, arg, body in blocks():
            if kind == "skip":
                continue
            prelude = "\n".join(state)
            script = adapt(body, port)
            block_started = time.perf_counter()
            if kind == "background":
                commands = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
                assert len(commands) == 1, "a background block holds one command, so its PID is the server's"
                with server_log.open("w") as log:
                    server = subprocess.Popen(["bash", "-c", f"set -e\n{prelude}\nexec {commands[0]}"], cwd=copy,
                                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                _wait_ready(arg.replace(":8000", f":{port}"), server, server_log)
            else:
                p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", f"{prelude}\n{script}"], cwd=copy, env=env,
                                   capture_output=True, text=True, timeout=900)
                assert p.returncode == 0, f"quick start block failed ({p.returncode}):\n{script}\n" \
                                          f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
                outputs.append((body, p.stdout))
            print(f"{time.perf_counter() - block_started:5.1f} s  {body.splitlines()[-1][:60]}")
            state += [line for line in body.splitlines() if line.split()[:1] and line.split()[0] in STATE_COMMANDS]
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print(f"quick start ran in {time.perf_counter() - started:.0f} s")

    answer = next(json.loads(out) for body, out in outputs if "/infer" in body)
    (logits,) = answer["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [1, 10]
    assert max(range(10), key=lambda i: logits["data"][i]) == 0, "the README says the image is a zero"
    assert (copy / "dist" / "digits-cnn" / "model.json").is_file()
    assert (copy / "mlruns" / "mlflow.db").is_file()  # the default store, in the copy
    assert "Traceback" not in server_log.read_text()


def _wait_ready(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while True:
        assert server.poll() is None, f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline, f"{url} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.3)


# ---------------------------------------------------------------- every command and option named exists

GLOBAL_OPTIONS = {"--verbose", "-v", "--quiet", "-q", "--version", "--install-completion", "--show-completion", "--help"}


def _named_commands(text: str):
    """(command, options) for every `pipeline COMMAND ...` in code: up to a pipe, `&&`, `#` or the line's end."""
    for m in re.finditer(r"(?<![\w/.-])pipeline((?:\s+-[a-z]\b|\s+--[a-z-]+)*)\s+([a-z]+(?:-[a-z]+)*)([^`\n|&#]*)", text):
        options = re.findall(r"(?<![\w-])(--?[a-zA-Z][a-z-]*)", m[3])
        yield m[2], [*re.findall(r"--?[a-z-]+", m[1]), *options]


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_pipeline_command_and_option_named_exists(doc):
    group = typer.main.get_command(__import__("pipeline.cli", fromlist=["app"]).app)
    found = 0
    for command, options in _named_commands(doc.read_text()):
        if command not in group.commands:
            continue  # prose such as "pipeline run directory", checked by hand
        found += 1
        known = {o for p in group.commands[command].params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
        unknown = [o for o in options if o not in known | GLOBAL_OPTIONS]
        assert not unknown, f"{doc.name}: `pipeline {command}` has no option {unknown}"
    assert found >= (20 if doc == README else 1)


def test_links_to_docs_and_anchors_resolve():
    def anchors(path: Path) -> set[str]:
        return {re.sub(r"[^\w\- ]", "", h.strip("# ").lower()).replace(" ", "-")
                for h in path.read_text().splitlines() if h.startswith("#")}

    for doc in (README, *DOCS):
        for target, anchor in re.findall(r"\]\(((?:docs/)?[\w.-]*\.md)?(?:#([\w-]+))?\)", doc.read_text()):
            path = (doc.parent / target) if target else doc
            assert path.is_file(), f"{doc.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(path), f"{doc.name} links to {target}#{anchor}: no such heading"
