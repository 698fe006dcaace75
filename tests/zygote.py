"""A process that imports the pipeline once and forks a fresh child per `pipeline` command.

The chaos tests start and SIGKILL many `pipeline run` processes; each would spend most of its life
importing torch, MLflow, onnxscript, scikit-learn and matplotlib (6 s on a quiet 2-core machine, far
more on a busy one). The zygote pays that once: every command is a real child process (its own pid,
files, store connections and signals; a SIGKILL kills it as it would a `pipeline` started from a
shell) forked from an interpreter that has the libraries imported but has run nothing.

Protocol, one JSON object per line: the test writes {"run": [args], "env": {...}, "cwd": DIR,
"out": FILE, "err": FILE} and reads {"pid": N}; it writes {"wait": N, "timeout": S} and reads
{"code": exit code, or -signal} (or {"code": null} on timeout). EOF on stdin ends the zygote.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# What a `pipeline run` imports along the way (found by diffing sys.modules around one): all of it here,
# so a child does no importing of its own.
PRELOAD = ("numpy", "torch", "torch.onnx", "torch.distributed", "torch._dynamo", "torch.testing", "onnx", "onnxruntime",
           "onnxruntime.quantization", "onnxruntime.tools", "onnxscript", "mlflow", "mlflow.onnx", "mlflow.data",
           "mlflow.pyfunc", "mlflow.system_metrics.system_metrics_monitor", "mlflow.store.tracking.sqlalchemy_store",
           "mlflow.store.model_registry.sqlalchemy_store", "alembic.command", "git", "scipy.io", "sklearn.metrics",
           "sklearn.datasets", "sklearn.model_selection", "matplotlib.pyplot", "matplotlib.backends.backend_agg",
           "PIL.Image", "typer", "rich", "pipeline.cli", "pipeline.orchestrate", "pipeline.tracking", "pipeline.lineage")


def _child(command: dict) -> None:
    """In the forked child: become the command (never returns)."""
    code = 1
    try:
        os.setsid()  # its own process group: a kill of the test's group leaves it alone, and vice versa
        os.environ.clear()
        os.environ.update(command["env"])
        os.chdir(command["cwd"])
        for fd, path in ((1, command["out"]), (2, command["err"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(os.devnull)
        sys.argv = ["pipeline", *command["run"]]
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from pipeline.cli import app

        try:
            app(prog_name="pipeline")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the child's stderr, as an interpreter would
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def main() -> None:
    import importlib

    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library: the child imports what it needs itself
            pass
    # What the imports made is never freed: out of the collector's sight, a child's gc.collect() (the
    # benchmark calls it before timing) does not walk it (1.5 s a call otherwise), nor touch its pages.
    gc.collect()
    gc.freeze()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if "run" in command:
            pid = os.fork()
            if pid == 0:
                _child(command)
            reply = {"pid": pid}
        else:
            reply = {"code": _wait(command["wait"], command.get("timeout", 600))}
        print(json.dumps(reply), flush=True)


class Zygote:
    """The test's side: start the zygote once, then `start` commands and `wait` for them."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = Path(root), dict(env)
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=self.root, env=self.env)
        ready = json.loads(self.proc.stdout.readline() or "{}")
        if "ready" not in ready:
            raise RuntimeError(f"the zygote did not start (exit {self.proc.poll()})")
        self.count = 0

    def _ask(self, message: dict) -> dict:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, *args: str, logs: Path, env: dict[str, str] | None = None) -> tuple[int, Path, Path]:
        """Start `pipeline ARGS`; returns (pid, its stdout file, its stderr file)."""
        self.count += 1
        out, err = Path(logs) / f"{self.count:03d}.out", Path(logs) / f"{self.count:03d}.err"
        out.touch()
        err.touch()
        reply = self._ask({"run": list(args), "env": {**self.env, **(env or {})}, "cwd": str(self.root),
                           "out": str(out), "err": str(err)})
        return reply["pid"], out, err

    def wait(self, pid: int, timeout: float = 600) -> int | None:
        return self._ask({"wait": pid, "timeout": timeout})["code"]

    def run(self, *args: str, logs: Path, env: dict[str, str] | None = None, timeout: float = 600):
        """Run `pipeline ARGS` to the end: (exit code, stdout, stderr)."""
        pid, out, err = self.start(*args, logs=logs, env=env)
        code = self.wait(pid, timeout)
        return code, out.read_text(), err.read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


if __name__ == "__main__":
    main()
