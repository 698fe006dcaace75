"""The team tracking server (`make tracking-server`): MLflow on a PostgreSQL that asks every connection
for a password, a non-superuser MLflow role, secrets in 0600 files, the password kept off command lines
and logs, rotation, the conversion of a cluster an earlier version made with `trust`; and a real
pipeline against it with a password in MLFLOW_TRACKING_URI that must appear nowhere. Skipped, saying
why, where PostgreSQL is not installed (.ci/run installs it)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.test_record import STAGES, children, client_for, parent_runs, pipeline, small_yaml, statuses  # noqa: F401

PASSWORD = "Tr4cking-S3cret"  # in the clients' URI; the server does not check it, nothing may show it


def _postgres_or_skip() -> None:
    from pipeline.tracking_server import PostgresMissing, pg_bin

    try:
        pg_bin("initdb")
    except PostgresMissing as e:
        pytest.skip(f"PostgreSQL is not installed here ({e}); .ci/run installs it with apt-get")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without `runuser`: PostgreSQL refuses to run as root")


@pytest.fixture(scope="module")
def server():
    """PostgreSQL + MLflow server in a temporary directory the postgres user can enter."""
    _postgres_or_skip()
    from pipeline.tracking_server import Postgres, free_port, tracking_server

    root = Path(tempfile.mkdtemp(prefix="onnx-pipeline-tracking-"))
    root.chmod(0o755)
    pg_port = free_port()
    try:
        with tracking_server(root, free_port(), pg_port) as uri:
            yield {"root": root, "uri": uri, "pg": Postgres(root / "postgres", pg_port)}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _connect(pg, user: str, password: str | None, host: str = "127.0.0.1", dbname: str = "mlflow"):
    import psycopg2

    kwargs = {"password": password} if password is not None else {}
    return psycopg2.connect(host=host, port=pg.port, user=user, dbname=dbname, connect_timeout=10, **kwargs)


def _secret(path: Path) -> str:
    from pipeline.tracking_server import read_secret

    return read_secret(path)


# ---------------------------------------------------------------- the database

def test_every_connection_needs_the_password_and_the_secrets_are_0600(server, monkeypatch):
    import psycopg2

    pg = server["pg"]
    monkeypatch.delenv("PGPASSFILE", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    for path in (pg.secret_file, pg.admin_secret_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    hba = (pg.data / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and not line.startswith("#")]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), hba
    for user in ("mlflow", "postgres"):
        for host in ("127.0.0.1", str(pg.root.resolve())):  # TCP, and the Unix socket
            with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
                _connect(pg, user, None, host)
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            _connect(pg, user, "guess")
    with contextlib.closing(_connect(pg, "mlflow", _secret(pg.secret_file), str(pg.root.resolve()))) as conn:
        assert conn.status  # the socket works with the password


def test_the_mlflow_role_is_no_superuser_and_cannot_run_programs(server):
    import psycopg2

    pg = server["pg"]
    with contextlib.closing(_connect(pg, "mlflow", _secret(pg.secret_file))) as conn, conn.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False, False)
        cur.execute("SELECT count(*) FROM alembic_version")  # it owns MLflow's tables (migrated by the server)
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="pg_execute_server_program"):
            cur.execute("COPY (SELECT 1) TO PROGRAM 'id'")


def test_the_password_is_on_no_command_line_or_log(server):
    pg, root = server["pg"], server["root"]
    secrets = [_secret(pg.secret_file), _secret(pg.admin_secret_file)]
    command_lines = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit():
                command_lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    assert any("mlflow server" in c or " server --backend-store-uri" in c for c in command_lines)
    logs = [p.read_text(errors="replace") for p in root.rglob("*.log")]
    assert logs
    for secret in secrets:
        assert not [c for c in command_lines if secret in c]
        assert not [text for text in logs if secret in text]


def test_rotating_the_secrets_keeps_the_running_server_usable(server):
    """Rotation on the running cluster: the old passwords stop working, the new files hold working ones,
    and the MLflow server (its next connections read the new file) still answers."""
    import psycopg2

    from pipeline.tracking_server import rotate_secrets

    pg = server["pg"]
    old = _secret(pg.secret_file), _secret(pg.admin_secret_file)
    rotate_secrets(pg.root, pg.port)
    new = _secret(pg.secret_file), _secret(pg.admin_secret_file)
    assert new[0] != old[0] and new[1] != old[1]
    assert stat.S_IMODE(pg.secret_file.stat().st_mode) == 0o600
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        _connect(pg, "mlflow", old[0])
    with contextlib.closing(_connect(pg, "mlflow", new[0])):
        pass
    client = client_for(server["uri"])
    client.search_experiments()  # the server still reaches its database


def test_a_cluster_an_earlier_version_left_open_is_converted_keeping_its_data(tmp_path):
    """Made as the earlier version made it: `trust` for every local connection, `mlflow` its superuser
    owning the tables. The next start asks for passwords and hands the data to an ordinary `mlflow`."""
    _postgres_or_skip()
    import psycopg2

    from pipeline.tracking_server import Postgres, _as_owner, _give_to_postgres, free_port, pg_bin, start_postgres

    root = Path(tempfile.mkdtemp(prefix="onnx-pipeline-legacy-")) / "postgres"
    root.parent.chmod(0o755)
    root.mkdir()
    port = free_port()
    try:
        _give_to_postgres(root)
        subprocess.run(_as_owner([pg_bin("initdb"), "-D", str(root / "data"), "-U", "mlflow", "--auth=trust", "-E",
                                  "UTF8", "--locale=C"]), check=True, capture_output=True, timeout=180)
        subprocess.run(_as_owner([pg_bin("pg_ctl"), "-D", str(root / "data"), "-l", str(root / "postgres.log"), "-o",
                                  f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "-w", "start"]),
                       check=True, capture_output=True, timeout=180)
        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")) as conn:
            conn.autocommit = True
            conn.cursor().execute("CREATE DATABASE mlflow")
        with contextlib.closing(psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="mlflow")) as conn:
            conn.autocommit = True
            conn.cursor().execute("CREATE TABLE runs (id serial PRIMARY KEY, name text); "
                                  "INSERT INTO runs (name) VALUES ('kept')")
        Postgres(root, port).stop()

        pg = start_postgres(root, port)
        try:
            with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
                _connect(pg, "mlflow", None)
            with contextlib.closing(_connect(pg, "mlflow", _secret(pg.secret_file))) as conn, conn.cursor() as cur:
                cur.execute("SELECT name FROM runs")
                assert cur.fetchall() == [("kept",)]
                cur.execute("INSERT INTO runs (name) VALUES ('new')")  # its tables are its own now
                cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                assert cur.fetchone() == (False,)
        finally:
            pg.stop()
    finally:
        Postgres(root, port).stop()
        shutil.rmtree(root.parent, ignore_errors=True)


def test_a_host_other_than_loopback_is_warned_about():
    from pipeline.tracking_server import exposure_warning

    assert exposure_warning("127.0.0.1", 5000) is None and exposure_warning("localhost", 5000) is None
    assert exposure_warning("::1", 5000) is None
    warning = exposure_warning("0.0.0.0", 5000)
    assert warning.startswith("--host 0.0.0.0 binds every interface: anyone who can reach port 5000")
    assert "no authentication and no TLS" in warning


# ---------------------------------------------------------------- a pipeline against it, a password in the URI

def test_a_tiny_pipeline_against_the_team_server_with_a_password_that_shows_nowhere(server, small_yaml, tmp_path,
                                                                                    monkeypatch):
    """A password in MLFLOW_TRACKING_URI (http://user:password@host) is in no output, file, run tag or param,
    registered version, lineage output or error message."""
    uri = server["uri"].replace("http://", f"http://ci:{PASSWORD}@")
    rundir = tmp_path / "run"
    p = pipeline("run", "-r", str(small_yaml), "-w", str(rundir), "--set", "train.epochs=1", store=uri)
    assert set(statuses(p.stdout).values()) == {"done"}
    client = client_for(server["uri"])
    parent = parent_runs(client)[0]
    assert parent.info.status == "FINISHED"
    assert len(children(client, parent.info.run_id)) == len(STAGES)
    mv = client.get_model_version_by_alias("small", "champion")
    # artifacts went over HTTP into the server's artifact root, not into the client's directories
    assert any((server["root"] / "artifacts").rglob("*.onnx"))
    lineage = pipeline("lineage", "models:/small@champion", store=uri).stdout
    assert f"registered model small version {mv.version}" in lineage and "dataset sha256" in lineage
    refused = pipeline("lineage", "models:/small@no-such-alias", store=uri, check=False)
    assert refused.returncode == 2 and "http://ci:***@127.0.0.1:" in refused.stderr

    shown = [p.stdout, p.stderr, lineage, refused.stdout, refused.stderr]
    shown += [f.read_text(errors="replace") for f in rundir.rglob("*") if f.is_file() and f.suffix in (".json", ".yaml",
                                                                                                         ".md", ".txt")]
    state = json.loads((rundir / "pipeline.json").read_text())
    assert state["tracking_uri"] == uri.replace(PASSWORD, "***")
    exp = client.get_experiment_by_name("small")
    for run in client.search_runs([exp.experiment_id]):
        shown += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    for version in client.search_model_versions("name = 'small'"):
        shown += [json.dumps(version.tags), version.description or "", version.source or ""]
    leaks = [text[max(0, text.find(PASSWORD) - 80):text.find(PASSWORD) + 20] for text in shown if PASSWORD in text]
    assert leaks == []
    binary = [f for f in rundir.rglob("*") if f.is_file() and PASSWORD.encode() in f.read_bytes()]
    assert binary == []
