"""A team tracking server: MLflow backed by PostgreSQL, artifacts in a local folder it serves itself.

``make tracking-server`` runs ``python -m pipeline.tracking_server``: it creates (once) a PostgreSQL
cluster under ``.tracking/postgres`` with Debian's ``initdb``, starts it on 127.0.0.1, creates the
``mlflow`` role and database (and the ``optuna`` database, where `pipeline tune --storage` keeps studies
the team shares), and runs ``mlflow server`` on 127.0.0.1:5000 with ``--serve-artifacts`` and
``--artifacts-destination .tracking/artifacts``. Clients then set
``MLFLOW_TRACKING_URI=http://127.0.0.1:5000`` and change nothing else; artifacts travel over HTTP,
so a client needs no access to the server's disk. Ctrl-C stops both servers.

What the database is protected by. Every connection, over the Unix socket and TCP alike, must give a
password (``scram-sha-256`` in ``pg_hba.conf``; no ``trust`` line, no ``peer``), and PostgreSQL
listens on 127.0.0.1 only. Two generated secrets live beside the data directory, each in a libpq
password file readable by its owner only (mode 0600): ``admin.pgpass`` (the cluster's superuser
``postgres``, used here to create and rotate roles) and ``mlflow.pgpass`` (the role ``mlflow``, which
owns the MLflow database and is not a superuser: it cannot ``COPY ... TO PROGRAM`` or read the
server's files). The MLflow server gets its password through ``PGPASSFILE``: its URI and command line
(what ``ps`` shows) and its log carry none. ``--rotate-secret`` sets new passwords for both roles and
rewrites the files; a running server's next connections read the new file. A cluster made by an
earlier version (``trust`` for every local connection, ``mlflow`` its superuser) is converted in place
on the next start, its runs kept.

What it does not protect: the MLflow HTTP server itself has no authentication and no TLS (anyone who
can reach its port can read and change every run and model: keep it on loopback, which is the
default, and a non-loopback ``--host`` is warned about), and anyone who can read a secret file (its
owner, root) can use that role.

PostgreSQL refuses to run as root: when started as root the cluster belongs to the ``postgres``
user (Debian's package creates it) and its commands run through ``runuser``; the secret files stay
the invoking user's. The tests use ``start_postgres`` / ``start_mlflow`` on a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

log = logging.getLogger(__name__)

ADMIN_USER = "postgres"  # the cluster's superuser: creates the MLflow role and database, rotates secrets
DB_USER = "mlflow"  # owns the MLflow database; not a superuser
DB_NAME = "mlflow"
LEGACY_BOOTSTRAP = "mlflow_bootstrap_legacy"  # what a converted earlier cluster's superuser `mlflow` is renamed to
SECRET_FILE_MODE = 0o600
CONNECT_TIMEOUT_S = 10
GRACEFUL_SHUTDOWN_S = 5  # seconds the MLflow server lets requests in flight finish when stopped
HBA = """# Written by pipeline/tracking_server.py: every connection must give a password (scram-sha-256),
# over the Unix socket and TCP alike; PostgreSQL listens on 127.0.0.1 only.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""
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
    """As root, hand the cluster's folder to the `postgres` user; the secret files stay the invoker's."""
    if os.geteuid() == 0:
        import pwd

        for parent in path.resolve().parents:
            if not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(f"the postgres user cannot enter {parent} (mode {oct(os.stat(parent).st_mode & 0o777)});"
                                   f" put the server's directory somewhere every user may traverse")

        pw = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")]:
            if p.suffix != ".pgpass":
                os.chown(p, pw.pw_uid, pw.pw_gid)


# ---------------------------------------------------------------- secrets

def new_secret() -> str:
    """256 random bits, URL-safe (no ':' or '\\' to escape in a password file)."""
    return secrets.token_urlsafe(32)


def write_secret(path: Path, user: str, secret: str) -> Path:
    """A libpq password file (``*:*:*:user:secret``) created with mode 0600 and renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    try:
        os.write(fd, f"*:*:*:{user}:{secret}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_secret(path: Path) -> str:
    """The password of a file ``write_secret`` wrote (refused when others may read it, as libpq does)."""
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise RuntimeError(f"{path} is readable by others (mode {oct(mode)}); chmod 600 it, then rotate the secret with "
                           "`python -m pipeline.tracking_server --rotate-secret`")
    return Path(path).read_text().strip().split(":", 4)[4]


@dataclass
class Postgres:
    root: Path
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def admin_secret_file(self) -> Path:
        return self.root / "admin.pgpass"

    @property
    def secret_file(self) -> Path:
        """The MLflow role's password (libpq password file, mode 0600), beside the data directory."""
        return self.root / "mlflow.pgpass"

    @property
    def uri(self) -> str:
        """The MLflow role's URI, without its password: libpq reads that from ``env()``'s PGPASSFILE."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DB_NAME}"

    def env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.secret_file.resolve())}

    def connect(self, user: str = ADMIN_USER, dbname: str = "postgres", password: str | None = None):
        """A psycopg2 connection (autocommit) over TCP; the superuser's password from its secret file."""
        import psycopg2

        if password is None:
            password = read_secret(self.admin_secret_file if user == ADMIN_USER else self.secret_file)
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=user, password=password, dbname=dbname,
                                connect_timeout=CONNECT_TIMEOUT_S)
        conn.autocommit = True
        return conn

    def running(self) -> bool:
        return subprocess.run(_as_owner([pg_bin("pg_ctl"), "-D", str(self.data), "status"]), capture_output=True,
                              timeout=30).returncode == 0

    @property
    def optuna_uri(self) -> str:
        """`pipeline tune --storage` for studies every machine of the team joins (the MLflow role's
        password from ``env()``'s PGPASSFILE, as for MLflow)."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{OPTUNA_DB_NAME}"

    def stop(self) -> None:
        subprocess.run(_as_owner([pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, text=True, timeout=60)


def _psycopg2():
    try:
        import psycopg2  # noqa: F401
        from psycopg2 import sql  # noqa: F401
    except ImportError:
        raise RuntimeError("psycopg2 (PostgreSQL's driver) is not installed: pip install -e '.[team]' "
                           "(`make tracking-server` does)") from None
    import psycopg2
    from psycopg2 import sql

    return psycopg2, sql


def _verifier(conn, user: str, secret: str) -> str:
    """The SCRAM verifier of ``secret``, computed here: the password itself never reaches a SQL
    statement (nor PostgreSQL's log, should a statement fail)."""
    from psycopg2.extensions import encrypt_password

    return encrypt_password(secret, user, conn, "scram-sha-256")


def start_postgres(root: Path, port: int) -> Postgres:
    """Create the cluster under ``root`` if needed (password authentication, generated secrets), start it on
    127.0.0.1:``port``, and ensure the MLflow role (not a superuser) and its database."""
    _psycopg2()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pg = Postgres(root, port)
    legacy = (pg.data / "PG_VERSION").is_file() and not pg.admin_secret_file.is_file()
    if not (pg.data / "PG_VERSION").is_file():
        _initdb(pg)
    _give_to_postgres(root)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root.resolve()}"
    _check(_as_owner([pg_bin("pg_ctl"), "-D", str(pg.data), "-l", str(root / "postgres.log"), "-o", opts, "-w", "-t",
                      "60", "start"]), "pg_ctl start", log_file=root / "postgres.log")
    try:
        if legacy:
            _convert_legacy(pg)
        _ensure_role_and_database(pg)
    except BaseException:
        pg.stop()
        raise
    log.info("PostgreSQL %s on 127.0.0.1:%d (data in %s; password authentication, secrets in %s)",
             Path(pg_bin("initdb")).parent.parent.name, port, pg.data, pg.root)
    return pg


def _initdb(pg: Postgres) -> None:
    """A new cluster whose every connection needs a password; the superuser's is generated."""
    admin = new_secret()
    write_secret(pg.admin_secret_file, ADMIN_USER, admin)
    pwfile = pg.root / ".initdb-password"  # initdb reads the superuser's password from a file, then it goes
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    try:
        os.write(fd, f"{admin}\n".encode())
        os.close(fd)
        _give_to_postgres(pg.root)
        _check(_as_owner([pg_bin("initdb"), "-D", str(pg.data), "-U", ADMIN_USER, f"--pwfile={pwfile}",
                          "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"]),
               "initdb")
    finally:
        pwfile.unlink(missing_ok=True)
    _write_hba(pg)


def _write_hba(pg: Postgres) -> None:
    hba = pg.data / "pg_hba.conf"
    hba.write_text(HBA)
    _give_to_postgres(pg.root)


def _ensure_role_and_database(pg: Postgres) -> None:
    """The MLflow role (login, not a superuser, no role or database creation) with the password of its secret
    file (a new one when there is no file), and its database, which other roles cannot connect to."""
    _, sql = _psycopg2()
    with contextlib.closing(pg.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (DB_USER,))
        exists = cur.fetchone() is not None
        if not pg.secret_file.is_file():
            write_secret(pg.secret_file, DB_USER, new_secret())
        verifier = _verifier(conn, DB_USER, read_secret(pg.secret_file))
        verb = "ALTER" if exists else "CREATE"
        cur.execute(sql.SQL(verb + " ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
                            "PASSWORD %s").format(sql.Identifier(DB_USER)), (verifier,))
        for name in (DB_NAME, OPTUNA_DB_NAME):  # MLflow's, and `pipeline tune`'s studies
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(DB_USER)))
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))


def _convert_legacy(pg: Postgres) -> None:
    """A cluster made by an earlier version: every local connection trusted, `mlflow` its (bootstrap)
    superuser owning the MLflow tables. While trust still holds: make the superuser `postgres` with a
    generated password; rename the old superuser and forbid its login (PostgreSQL keeps a bootstrap
    superuser a superuser); give the database and every object in it to a new, ordinary `mlflow` role;
    then require passwords everywhere."""
    psycopg2, sql = _psycopg2()
    log.warning("converting the PostgreSQL cluster in %s, made by an earlier version with `trust` for every local "
                "connection, to password authentication (runs and models are kept)", pg.data)
    admin = new_secret()

    def trusted(user: str, dbname: str = "postgres"):
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=user, dbname=dbname,
                                connect_timeout=CONNECT_TIMEOUT_S)
        conn.autocommit = True
        return conn

    with contextlib.closing(trusted(DB_USER)) as conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ADMIN_USER,))
        verb = "ALTER" if cur.fetchone() else "CREATE"
        cur.execute(sql.SQL(verb + " ROLE {} SUPERUSER LOGIN PASSWORD %s").format(sql.Identifier(ADMIN_USER)),
                    (_verifier(conn, ADMIN_USER, admin),))
    write_secret(pg.admin_secret_file, ADMIN_USER, admin)
    with contextlib.closing(trusted(ADMIN_USER)) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER ROLE {} RENAME TO {}").format(sql.Identifier(DB_USER), sql.Identifier(LEGACY_BOOTSTRAP)))
        cur.execute(sql.SQL("ALTER ROLE {} NOLOGIN PASSWORD NULL").format(sql.Identifier(LEGACY_BOOTSTRAP)))
    pg.secret_file.unlink(missing_ok=True)
    _ensure_role_and_database(pg)  # the ordinary role, its password, the database's owner below
    with contextlib.closing(trusted(ADMIN_USER)) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(DB_NAME), sql.Identifier(DB_USER)))
    with contextlib.closing(trusted(ADMIN_USER, DB_NAME)) as conn, conn.cursor() as cur:
        # REASSIGN OWNED refuses a bootstrap superuser's objects: hand them over one by one.
        cur.execute("""
            SELECT format('ALTER TABLE %%I.%%I OWNER TO %%I', schemaname, tablename, %(to)s) FROM pg_tables
             WHERE tableowner = %(from)s AND schemaname NOT IN ('pg_catalog', 'information_schema')
            UNION ALL
            SELECT format('ALTER SEQUENCE %%I.%%I OWNER TO %%I', schemaname, sequencename, %(to)s) FROM pg_sequences
             WHERE sequenceowner = %(from)s AND schemaname NOT IN ('pg_catalog', 'information_schema')
            UNION ALL
            SELECT format('ALTER VIEW %%I.%%I OWNER TO %%I', schemaname, viewname, %(to)s) FROM pg_views
             WHERE viewowner = %(from)s AND schemaname NOT IN ('pg_catalog', 'information_schema')
            UNION ALL
            SELECT format('ALTER TYPE %%I.%%I OWNER TO %%I', n.nspname, t.typname, %(to)s)
              FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_roles r ON r.oid = t.typowner
             WHERE r.rolname = %(from)s AND t.typtype IN ('e', 'd') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            """, {"to": DB_USER, "from": LEGACY_BOOTSTRAP})
        for (statement,) in cur.fetchall():
            cur.execute(statement)
        cur.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(DB_USER)))
    _write_hba(pg)
    with contextlib.closing(pg.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_reload_conf()")


def rotate_secrets(root: Path, port: int) -> Postgres:
    """New passwords for the superuser and the MLflow role, and their files rewritten (mode 0600). A
    running cluster is changed in place (a running MLflow server's next connections read the new file);
    a stopped one is started for it and stopped again."""
    pg = Postgres(Path(root), port)
    if not pg.admin_secret_file.is_file():
        raise RuntimeError(f"no {pg.admin_secret_file}: start the server once (`make tracking-server`), then rotate")
    was_running = pg.running()
    if not was_running:
        pg = start_postgres(pg.root, port)
    _, sql = _psycopg2()
    try:
        with contextlib.closing(pg.connect()) as conn, conn.cursor() as cur:
            for user, path in ((DB_USER, pg.secret_file), (ADMIN_USER, pg.admin_secret_file)):
                secret = new_secret()
                cur.execute(sql.SQL("ALTER ROLE {} PASSWORD %s").format(sql.Identifier(user)), (_verifier(conn, user, secret),))
                write_secret(path, user, secret)
        log.info("new passwords for %s and %s written to %s and %s", DB_USER, ADMIN_USER, pg.secret_file,
                 pg.admin_secret_file)
    finally:
        if not was_running:
            pg.stop()
    return pg


def _check(cmd: list[str], what: str, log_file: Path | None = None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if p.returncode != 0:
        tail = log_file.read_text()[-2000:] if log_file and log_file.is_file() else ""
        raise RuntimeError(f"{what} failed ({p.returncode}): {(p.stderr or p.stdout)[-2000:]}{tail}")


# ---------------------------------------------------------------- the MLflow server

def exposure_warning(host: str, port: int) -> str | None:
    """What binding ``host`` exposes, when it is not loopback (None when it is)."""
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:  # a name: what it resolves to
        try:
            addresses = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, port)}
        except (OSError, ValueError):
            addresses = set()
    if addresses and all(a.is_loopback for a in addresses):
        return None
    where = "every interface" if any(a.is_unspecified for a in addresses) else f"{host}, beyond this machine"
    return (f"--host {host} binds {where}: anyone who can reach port {port} can read and change every run and "
            "registered model (the MLflow server has no authentication and no TLS here); keep the default 127.0.0.1 "
            "and reach it through an SSH tunnel or an authenticating proxy with TLS")


def start_mlflow(backend_uri: str, artifacts: Path, port: int, host: str = "127.0.0.1",
                 log_file: Path | None = None, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """``mlflow server`` on the backend store, serving artifacts from ``artifacts``; waits until healthy.
    ``env``: added to its environment (PGPASSFILE: the database password stays off its command line)."""
    from pipeline.tracking import redact

    artifacts = Path(artifacts).resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri", backend_uri,
           "--serve-artifacts", "--artifacts-destination", str(artifacts), "--host", host, "--port", str(port),
           "--workers", "1",
           # Ctrl-C stops it within seconds: uvicorn otherwise waits for every idle keep-alive client to hang up.
           "--uvicorn-opts", f"--timeout-graceful-shutdown {GRACEFUL_SHUTDOWN_S}"]
    full_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    deadline = time.time() + 180  # the first start migrates an empty database: tens of seconds on a busy machine
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = Path(log_file).read_text()[-3000:] if log_file else ""
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {tail}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://{probe}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    log.info("MLflow tracking server on http://%s:%d (store %s, artifacts %s)", host, port,
                             redact(backend_uri), artifacts)
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
        server = start_mlflow(pg.uri, root / "artifacts", port, host, log_file=root / "mlflow-server.log", env=pg.env())
        try:
            yield f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        finally:
            stop_process(server)
    finally:
        pg.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(".tracking"), help="where the database and artifacts live")
    parser.add_argument("--host", default="127.0.0.1", help="bind address of the MLflow server (default loopback; "
                                                            "anything else is warned about: no authentication, no TLS)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port on 127.0.0.1")
    parser.add_argument("--rotate-secret", action="store_true", help="set new database passwords, rewrite the secret "
                                                                      "files (mode 0600) and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.rotate_secret:
        try:
            rotate_secrets(args.root.resolve() / "postgres", args.pg_port)
        except (PostgresMissing, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"rotated: new secrets in {args.root / 'postgres'} (admin.pgpass, mlflow.pgpass)", flush=True)
        return 0
    warning = exposure_warning(args.host, args.port)
    if warning:
        log.warning("warning: %s", warning)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        with tracking_server(args.root, args.port, args.pg_port, args.host) as uri:
            print(f"MLflow tracking server: {uri}  (PostgreSQL on 127.0.0.1:{args.pg_port}, password authentication; "
                  f"artifacts in {args.root / 'artifacts'})\n  use it with: MLFLOW_TRACKING_URI={uri} make all\n"
                  f"  tuning studies: PGPASSFILE={Postgres(args.root / 'postgres', args.pg_port).secret_file.resolve()} "
                  f"pipeline tune --storage postgresql+psycopg2://{DB_USER}@127.0.0.1:{args.pg_port}/{OPTUNA_DB_NAME}\n"
                  "  Ctrl-C stops it.", flush=True)
            while not stop["now"]:
                time.sleep(0.5)
    except (PostgresMissing, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # psycopg2's OperationalError: the database refused the superuser's password, ...
        print(f"error: PostgreSQL under {args.root / 'postgres'}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
