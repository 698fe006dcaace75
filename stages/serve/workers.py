"""Several server processes on one port: a supervisor and its workers.

One Python process serves on about one core (its event loop and the GIL), so ``pipeline serve
--workers N`` runs N worker processes, each a whole server: its own ONNX Runtime session(s), batcher
and event loop, bound to the same port with ``SO_REUSEPORT`` (the kernel spreads new connections
over them). The supervisor (the ``pipeline serve`` process) loads nothing itself:

- it checks that the port is free, writes what to serve into a private state directory and starts
  the workers (``python -m stages.serve.workers STATE_DIR INDEX``, fresh interpreters: no fork of a
  process that holds threads);
- a worker loads and warms its models, binds, starts serving, then writes ``ready-INDEX``; one that
  cannot start writes ``error-INDEX`` (exit code and message) and the supervisor stops the others and
  fails with that message and code (2: the model or settings must change, 1: e.g. no GPU);
- afterwards it restarts a worker that dies (its ``ready-`` file removed meanwhile), gives up (exit 1)
  after ``MAX_RESTARTS`` deaths within ``RESTART_WINDOW_S``, and on SIGTERM / Ctrl-C passes SIGTERM
  to every worker (each drains its in-flight requests, up to ``graceful_shutdown_s``) and waits.

Readiness: a worker's ``/v2/health/ready`` answers 200 only when its own models are warm and every
worker's ``ready-`` file exists (an ``os.path.exists`` per worker per probe), so any worker answers
for the whole server. ``/metrics`` sums every worker's values (``stages.serve.metrics``: the
supervisor sets prometheus-client's multiprocess directory for them).

Threads: the recipe's ``serve.runtime`` is divided among the workers by
``SessionSettings.divided`` (workers x intra-op threads <= cores). On a GPU every worker opens its
own session on the same device (a CUDA context and a copy of the weights each): the code path
exists, its scaling is not measured here (no GPU on the development machine).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from stages.serve.config import ServeConfig
from stages.sessions import cpu_cores

log = logging.getLogger(__name__)

# Default worker count: one per core, at most this many. Past ~8 a small model's server is limited by
# the load balancing of connections and by memory (each worker holds its own sessions: on a GPU a
# CUDA context of several hundred MB and a copy of the weights), not by cores; ask for more explicitly.
DEFAULT_MAX_WORKERS = 8
MAX_RESTARTS = 5  # worker deaths tolerated within RESTART_WINDOW_S before the server gives up
RESTART_WINDOW_S = 60.0
START_TIMEOUT_S = 600.0  # loading and warming a large model on a GPU can take minutes
SPEC_FILE = "spec.pkl"
METRICS_DIR = "metrics"


class WorkerStartError(RuntimeError):
    """A worker could not start: ``code`` is the exit code the command should end with (2: the model,
    recipe or port must change; 1: the work failed), the message says why."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def default_workers(cores: int | None = None) -> int:
    """One worker per core this process may use, at most DEFAULT_MAX_WORKERS."""
    return max(1, min(cores or cpu_cores(), DEFAULT_MAX_WORKERS))


def resolve_workers(config: ServeConfig) -> int:
    """``serve.transport.workers``, 0 meaning default_workers()."""
    return config.transport.workers or default_workers()


def worker_config(config: ServeConfig, workers: int) -> ServeConfig:
    """The serve config one of ``workers`` processes runs with: its runtime's threads divided
    (``SessionSettings.divided``, the one owner of that rule). Raises ValueError naming the key."""
    try:
        divided = config.runtime.session_settings().divided(workers)
    except ValueError as e:
        raise ValueError(str(e).replace("`", "`serve.runtime.", 1)) from None
    runtime = dataclasses.replace(config.runtime, intra_op_threads=divided.intra_op_threads,
                                  allow_spinning=divided.allow_spinning)
    return dataclasses.replace(config, runtime=runtime)


@dataclass(frozen=True)
class _Spec:
    sources: list  # stages.serve.repository.ModelSource
    config: ServeConfig  # already divided per worker
    workers: int


# --- the supervisor ------------------------------------------------------------------------------

def _check_port_free(host: str, port: int) -> None:
    """Refuse a port that something already listens on (the workers' SO_REUSEPORT would otherwise
    share it silently with another server started the same way)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as e:
            raise WorkerStartError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port "
                                   "or stop what uses it", code=2) from None


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one server."""

    def __init__(self, sources: Sequence, config: ServeConfig, workers: int, log_level: str = "info"):
        self.workers = workers
        self.config = worker_config(config, workers)
        self.log_level = log_level
        self.state = Path(tempfile.mkdtemp(prefix="onnx-pipeline-workers-"))
        (self.state / METRICS_DIR).mkdir()
        spec = _Spec(sources=list(sources), config=self.config, workers=workers)
        (self.state / SPEC_FILE).write_bytes(pickle.dumps(spec))
        self.procs: dict[int, subprocess.Popen] = {}
        self.deaths: list[float] = []
        self.stopping = False

    def _start(self, index: int) -> None:
        for name in (f"ready-{index}", f"error-{index}"):
            (self.state / name).unlink(missing_ok=True)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.state / METRICS_DIR)}
        # The workers import `stages` from where this process did (a checkout or site-packages).
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.procs[index] = subprocess.Popen(
            [sys.executable, "-m", "stages.serve.workers", str(self.state), str(index), self.log_level], env=env)

    def _error(self, index: int) -> WorkerStartError | None:
        path = self.state / f"error-{index}"
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        return WorkerStartError(doc["message"], doc["code"])

    def start(self) -> None:
        """Start every worker and wait until all are ready; WorkerStartError (everything stopped) if one fails."""
        t = self.config.transport
        _check_port_free(t.host, t.port)
        if getattr(t, "grpc_port", 0):  # the gRPC transport's port, where there is one
            _check_port_free(t.host, t.grpc_port)
        for i in range(self.workers):
            self._start(i)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                ready = 0
                for i, proc in self.procs.items():
                    error = self._error(i)
                    if error is not None:
                        raise error
                    if proc.poll() is not None:
                        raise WorkerStartError(f"worker {i} exited with code {proc.returncode} while starting; "
                                               "see its log above")
                    ready += (self.state / f"ready-{i}").is_file()
                if ready == self.workers:
                    return
                if time.monotonic() > deadline:
                    raise WorkerStartError(f"{self.workers - ready} of {self.workers} workers not ready after "
                                           f"{START_TIMEOUT_S:.0f} s")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def watch(self) -> int:
        """Serve until SIGTERM / SIGINT (-> 143 / 130, the CLI's codes for them, once every worker has
        stopped) or until workers keep dying (-> 1)."""
        stopped_by = []

        def ask_stop(signum, frame):
            self.stopping = True
            stopped_by.append(signum)

        previous = {s: signal.signal(s, ask_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not self.stopping:
                time.sleep(0.2)
                for i, proc in list(self.procs.items()):
                    if proc.poll() is None or self.stopping:
                        continue
                    (self.state / f"ready-{i}").unlink(missing_ok=True)  # the server is not whole until it is back
                    now = time.monotonic()
                    self.deaths = [d for d in self.deaths if now - d < RESTART_WINDOW_S] + [now]
                    if len(self.deaths) > MAX_RESTARTS:
                        log.error("worker %d (pid %d) exited with code %s; %d workers died within %.0f s: "
                                  "stopping the server", i, proc.pid, proc.returncode, len(self.deaths),
                                  RESTART_WINDOW_S)
                        return 1
                    log.warning("worker %d (pid %d) exited with code %s; starting it again", i, proc.pid,
                                proc.returncode)
                    self._start(i)
            return 130 if stopped_by and stopped_by[0] == signal.SIGINT else 143
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        """SIGTERM to every worker, wait for their graceful shutdown, then kill what is left; remove the state."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.transport.graceful_shutdown_s + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        shutil.rmtree(self.state, ignore_errors=True)


def serve_workers(sources: Sequence, config: ServeConfig, workers: int) -> int:
    """Serve ``sources`` with ``workers`` processes on the configured port until SIGTERM / Ctrl-C.
    Returns the exit code (0 after a graceful stop); raises WorkerStartError when the server cannot start."""
    t = config.transport
    sup = Supervisor(sources, config, workers,
                     log_level=logging.getLevelName(logging.getLogger("stages").getEffectiveLevel()).lower())
    sup.start()
    host = f"[{t.host}]" if ":" in t.host else t.host
    r = sup.config.runtime.session_settings().resolved()
    log.info("KServe v2 server at http://%s:%d/v2: %d workers ready (pids %s), each with %d intra-op thread(s), "
             "serving %s", host, t.port, workers, ", ".join(str(p.pid) for p in sup.procs.values()),
             r.intra_op_threads, ", ".join(f"{s.name} v{s.version}" for s in sources))
    return sup.watch()


# --- a worker ------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the supervisor dies, even by SIGKILL (no orphans holding the port)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:
            pass


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # every worker its own accept queue on the port
    sock.bind(address)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def worker_main(state: Path, index: int) -> int:
    """One worker: load, bind, serve; tell the supervisor (``ready-`` / ``error-`` file)."""
    _die_with_parent()
    ppid = os.getppid()
    spec: _Spec = pickle.loads((state / SPEC_FILE).read_bytes())

    def fail(message: str, code: int) -> int:
        _write(state / f"error-{index}", json.dumps({"message": message, "code": code}))
        return code

    from stages.common import StageError
    from stages.serve.repository import load_sources
    from stages.serve.runtime import GpuRequired

    try:
        runtimes, batching = load_sources(spec.sources, spec.config)
    except GpuRequired as e:
        return fail(str(e), 1)
    except (ValueError, StageError) as e:  # a bad model file, or a repository's config.pbtxt
        return fail(str(e), 2)
    if os.getppid() != ppid:  # the supervisor died while we loaded
        return 1
    t = spec.config.transport
    try:
        sock = _bind(t.host, t.port)
    except OSError as e:
        return fail(f"worker {index} cannot listen on {t.host}:{t.port}: {e.strerror}", 2)
    peers = [state / f"ready-{i}" for i in range(spec.workers)]

    from stages.serve.app import StartupError, serve

    try:
        serve(runtimes, spec.config, batching, sockets=[sock],
              on_started=lambda app: _write(state / f"ready-{index}", str(os.getpid())),
              peers_ready=lambda: all(p.exists() for p in peers))
    except StartupError as e:  # the gRPC port could not be bound
        return fail(f"worker {index}: {e}", 1)
    return 0


def main(argv: list[str]) -> int:
    state, index = Path(argv[0]), int(argv[1])
    level = argv[2] if len(argv) > 2 else "info"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s [worker {index}] %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        return worker_main(state, index)
    except Exception as e:  # anything unexpected while starting: the supervisor reports it
        log.exception("worker %d failed", index)
        _write(state / f"error-{index}", json.dumps({"message": f"worker {index} failed: {type(e).__name__}: {e}",
                                                     "code": 1}))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
