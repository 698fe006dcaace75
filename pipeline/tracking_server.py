"""A team tracking server: MLflow backed by PostgreSQL, artifacts in a local folder it serves itself.

``make tracking-server`` runs ``python -m pipeline.tracking_server``: it creates (once) a PostgreSQL
cluster under ``.tracking/postgres`` with Debian's ``initdb``, starts it on 127.0.0.1, creates the
``mlflow`` database (and ``optuna``, where `pipeline tune --storage` keeps studies the team shares), and
runs ``mlflow server`` on 127.0.0.1:5000 with ``--serve-artifacts`` and
``--artifacts-destination .tracking/artifacts``. Clients then set
``MLFLOW_TRACKING_URI=http://127.0.0.1:5000`` and change nothing else; artifacts travel over HTTP,
so a client needs no access to the server's disk. Ctrl-C stops both servers.

PostgreSQL refuses to run as root: when started as root the cluster belongs to the ``postgres``
user (Debian's package creates it) and its commands run through ``runuser``. Connections are
trusted on loopback only (``listen_addresses=127.0.0.1``); put a password in front before binding
anything wider. The tests use ``start_postgres`` / ``start_mlflow`` on a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

DB_USER = "mlflow"
DB_NAME = "mlflow"
# `pipeline tune`'s studies: a database of their own (Optuna and MLflow both keep an alembic_version table).
OPTUNA_DB_NAME = "optuna"


class PostgresMissing(RuntimeError):
    """PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)."""


def pg_bin(program: str) -> str:
    """A PostgreSQL server program: Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH."""
    for found in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=_version_key, reverse=True):
        return found
    found = shutil.which(program)
    if found:
        return found
    raise PostgresMissing(f"PostgreSQL's `{program}` was not found; install it with `apt-get install -y postgresql` "
                          "(Debian/Ubuntu) and retry")


def _version_key(path: str) -> tuple:
    part = Path(path).parent.parent.name
    return tuple(int(p) for p in part.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(cmd: list[str]) -> list[str]:
    """PostgreSQL will not run as root: run its programs as the `postgres` user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _give_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        import pwd

        for parent in path.resolve().parents:
            if not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(f"the postgres user cannot enter {parent} (mode {oct(os.stat(parent).st_mode & 0o777)});"
                                   f" put the server's directory somewhere every user may traverse")

        pw = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)


@dataclass
class Postgres:
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    @property
    def optuna_uri(self) -> str:
        """`pipeline tune --storage` for studies every machine of the team joins."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{OPTUNA_DB_NAME}"

    def stop(self) -> None:
        subprocess.run(_as_owner([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, text=True, timeout=60)


def start_postgres(root: Path, port: int) -> Postgres:
    """Create the cluster under ``root`` if needed, start it on 127.0.0.1:``port``, ensure the database."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pg = Postgres(root, port)
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (pg.data / "PG_VERSION").is_file():
        _give_to_postgres(root)
        _check(_as_owner([initdb, "-D", str(pg.data), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
                          "--locale=C"]), "initdb")
    _give_to_postgres(root)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    _check(_as_owner([pg_ctl, "-D", str(pg.data), "-l", str(root / "postgres.log"), "-o", opts, "-w", "-t", "60",
                      "start"]), "pg_ctl start", log_file=root / "postgres.log")
    for name in (DB_NAME, OPTUNA_DB_NAME):
        exists = subprocess.run(_as_owner([pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, "-d",
                                           "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"]),
                                capture_output=True, text=True, timeout=60)
        if exists.stdout.strip() != "1":
            _check(_as_owner([pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, name]), "createdb")
    log.info("PostgreSQL %s on 127.0.0.1:%d (data in %s)", Path(initdb).parent.parent.name, port, pg.data)
    return pg


def _check(cmd: list[str], what: str, log_file: Path | None = None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if p.returncode != 0:
        tail = log_file.read_text()[-2000:] if log_file and log_file.is_file() else ""
        raise RuntimeError(f"{what} failed ({p.returncode}): {(p.stderr or p.stdout)[-2000:]}{tail}")


def start_mlflow(backend_uri: str, artifacts: Path, port: int, host: str = "127.0.0.1",
                 log_file: Path | None = None) -> subprocess.Popen:
    """``mlflow server`` on the backend store, serving artifacts from ``artifacts``; waits until healthy."""
    artifacts = Path(artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri", backend_uri,
           "--serve-artifacts", "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 180  # the first start migrates an empty database: tens of seconds on a busy machine
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = Path(log_file).read_text()[-3000:] if log_file else ""
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {tail}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    log.info("MLflow tracking server on http://%s:%d (store %s, artifacts %s)", host, port, backend_uri,
                             artifacts)
                    return proc
        time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"mlflow server did not answer on http://{host}:{port}/health within 180 s")


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session (its workers are in its process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def tracking_server(root: Path, port: int, pg_port: int, host: str = "127.0.0.1") -> Iterator[str]:
    """PostgreSQL + MLflow server under ``root`` for the duration of the block; yields the tracking URI."""
    root = Path(root).resolve()
    pg = start_postgres(root / "postgres", pg_port)
    try:
        server = start_mlflow(pg.uri, root / "artifacts", port, host, log_file=root / "mlflow-server.log")
        try:
            yield f"http://{host}:{port}"
        finally:
            stop_process(server)
    finally:
        pg.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(".tracking"), help="where the database and artifacts live")
    parser.add_argument("--host", default="127.0.0.1", help="bind address of the MLflow server (default loopback)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port on 127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with tracking_server(args.root, args.port, args.pg_port, args.host) as uri:
            print(f"MLflow tracking server: {uri}  (PostgreSQL on 127.0.0.1:{args.pg_port}, artifacts in "
                  f"{args.root / 'artifacts'})\n  use it with: MLFLOW_TRACKING_URI={uri} make all\n"
                  f"  tuning studies: pipeline tune --storage postgresql+psycopg2://{DB_USER}@127.0.0.1:{args.pg_port}/"
                  f"{OPTUNA_DB_NAME}\n  Ctrl-C stops it.", flush=True)
            while not stop["now"]:
                time.sleep(0.5)
    except (PostgresMissing, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
