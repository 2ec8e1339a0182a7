"""Throw-away servers for the tracking tests: a PostgreSQL 15 cluster and a real ``mlflow server`` on it.

What a team runs (docs/deploy.md), shrunk to one machine: ``initdb`` in a temp folder as an unprivileged user,
listening on 127.0.0.1 only, on a random free port, with a password (scram-sha-256); ``mlflow server
--backend-store-uri postgresql://... --artifacts-destination DIR --serve-artifacts`` on loopback, optionally with
``--app-name basic-auth`` (its user store in a second database of the same cluster, a random admin password).

Used from tests as ``from servers import tracking_stack`` (pytest puts tests/tracking on sys.path for the test
modules in it; from elsewhere, insert ``Path(__file__).parent / "tracking"``)::

    with tracking_stack(tmp, auth=True) as stack:   # a module-scoped fixture yields this
        stack.server.url, stack.admin, stack.pg.dump("mlflow")
        stack.server.stop(kill=True); stack.server.start()   # same port, same store

Without PostgreSQL's binaries a test skips with the install command, and fails with it when CI=true.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def _pg_bin() -> Path:
    """MEDXFER_PG_BIN, else the newest /usr/lib/postgresql/<major>/bin (Debian 12's `postgresql` is 15, 13's 17)."""
    if os.environ.get("MEDXFER_PG_BIN"):
        return Path(os.environ["MEDXFER_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
INSTALL_HINT = "apt-get install -y --no-install-recommends postgresql  (or `make services`)"
PG_USER_CANDIDATES = ("postgres", "medxfer-pg")  # the Debian package's user, else one we create
STARTUP_S = 120.0  # mlflow server: ~15 s on an idle 2-core machine (DB migrations on first start); generous for CI
ADMIN_USER = "admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_postgres() -> Path:
    """PostgreSQL's bin folder; otherwise skip (fail under CI=true) with the command that installs it."""
    missing = [b for b in ("initdb", "pg_ctl", "postgres", "pg_dump", "createdb") if not (PG_BIN / b).exists()]
    if missing:
        msg = f"PostgreSQL binaries {missing} not found in {PG_BIN}; install them: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    # SQLAlchemy 2.1 maps a plain postgresql:// URI to psycopg 3 (not psycopg2): the driver medxfer[server] declares.
    with contextlib.suppress(ImportError):
        import psycopg  # noqa: F401

        return PG_BIN
    msg = "the PostgreSQL driver psycopg is missing; install it: .venv/bin/pip install -e '.[dev,server]'"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def _pg_user() -> str | None:
    """The unprivileged user PostgreSQL runs as when we are root (it refuses to run as root); None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in PG_USER_CANDIDATES:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    name = PG_USER_CANDIDATES[-1]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    return name


# --- PostgreSQL ------------------------------------------------------------------------------------------------------
@dataclass
class Postgres:
    """A running throw-away cluster. ``uri(db)`` is what MLflow gets; ``dump(db)`` is what a backup holds."""

    base: Path  # owned by the cluster's OS user: data/, postgres.log
    port: int
    password: str
    os_user: str | None
    db_user: str = "medxfer"
    host: str = "127.0.0.1"

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def uri(self, db: str) -> str:
        """No password in it: a server's command line is visible to every local user (``ps``); the password
        goes in a libpq password file (:meth:`write_pgpass`, passed as PGPASSFILE), as docs/deploy.md does."""
        return f"postgresql://{self.db_user}@{self.host}:{self.port}/{db}"

    def write_pgpass(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{self.host}:{self.port}:*:{self.db_user}:{self.password}\n")
        path.chmod(0o600)  # libpq ignores a password file others can read
        return path

    def _run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.os_user, "--"] if self.os_user else []
        env = {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}
        return subprocess.run(
            [*prefix, *argv], cwd=self.base, env=env, capture_output=True, text=True, check=True, timeout=120, **kw
        )

    def _conn_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.db_user]

    def createdb(self, name: str) -> str:
        self._run([str(PG_BIN / "createdb"), *self._conn_args(), name])
        return self.uri(name)

    def dump(self, db: str) -> str:
        """``pg_dump`` of one database as SQL text: every row a reviewer or a backup could see."""
        return self._run([str(PG_BIN / "pg_dump"), *self._conn_args(), "--no-owner", db]).stdout

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate"])


def start_postgres(durable: bool = False) -> Postgres:
    """initdb + start on 127.0.0.1:<free port>, TCP only, password auth. ``durable=False`` turns fsync off (a
    throw-away test cluster: ~3x faster DB migrations on a loaded disk); benchmarks pass True to measure what a team
    gets."""
    require_postgres()
    os_user = _pg_user()
    # Not under pytest's tmp_path: that is 0700 root, which the cluster's OS user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="medxfer-pg-"))
    password = secrets.token_urlsafe(18)
    pg = Postgres(base=base, port=free_port(), password=password, os_user=os_user)
    pwfile = base / "pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if os_user:
        info = pwd.getpwnam(os_user)
        os.chown(base, info.pw_uid, info.pw_gid)
        os.chown(pwfile, info.pw_uid, info.pw_gid)
    try:
        pg._run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(pg.data),
                "-U",
                pg.db_user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            ]
        )
        pwfile.unlink()
        opts = [
            "-c listen_addresses=127.0.0.1",
            f"-c port={pg.port}",
            f"-c unix_socket_directories={pg.base}",  # not /var/run/postgresql: may not exist or be root's
            "-c max_connections=50",
        ]
        if not durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        pg._run(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(pg.data),
                "-l",
                str(pg.log),
                "-w",
                "-t",
                "60",
                "-o",
                " ".join(opts),
                "start",
            ]
        )
    except subprocess.CalledProcessError as exc:
        log = pg.log.read_text()[-2000:] if pg.log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start ({exc.cmd[-1]}): {exc.stderr[-2000:]}\n{log}")
    return pg


# --- mlflow server ---------------------------------------------------------------------------------------------------
def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def rest(
    url: str, endpoint: str, method: str = "GET", body: Any = None, auth: tuple[str, str] | None = None, **params: Any
) -> tuple[int, Any]:
    """One REST call as a plain HTTP client (what a browser or curl sees): (status, parsed JSON or text)."""
    import urllib.parse

    q = f"?{urllib.parse.urlencode(params)}" if params else ""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}{endpoint}{q}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", _basic(*auth))
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, raw.decode(errors="replace")


@dataclass
class MlflowServer:
    """``mlflow server`` in its own process group; ``stop()`` then ``start()`` comes back on the same port and store."""

    backend_uri: str
    artifacts: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    auth_config: Path | None = None  # basic-auth ini; None: no auth
    env: dict[str, str] = field(default_factory=dict)  # e.g. PGPASSFILE
    # basic-auth's CSRF key: MLflow refuses to start without one, and a restart must keep it (forms stay valid).
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def argv(self) -> list[str]:
        exe = Path(sys.executable).with_name("mlflow")
        argv = [
            str(exe),
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        return [*argv, "--app-name", "basic-auth"] if self.auth_config else argv

    def start(self, timeout_s: float = STARTUP_S) -> None:
        """Start and wait until /health answers (the app is loaded and its store migrated)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # MLflow's job runner (GenAI scorers, trace roll-ups; medxfer uses none) is six huey processes that each
        # import mlflow: ~20 s of CPU per start on 2 cores, and more to stop.
        env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        if self.auth_config:
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = self.secret_key
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log.open("a") as log:
            log.write(f"--- start {self.starts}\n")
            log.flush()
            # Own session: uvicorn spawns a worker; signalling the group reaches both.
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return
            except urllib.error.HTTPError:
                return  # answered (basic-auth may guard /health): it is up
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop(kill=True)
                    pytest.fail(f"mlflow server not up after {timeout_s:.0f} s:\n{self.log.read_text()[-3000:]}")
                time.sleep(0.3)

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (SIGKILL with ``kill=True``: a crash, nothing flushed) to the whole process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout=3)  # a throw-away store: no need to wait out uvicorn's graceful shutdown
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # The worker may outlive the parent by a moment; the port must be free before a restart binds it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    break
            time.sleep(0.1)

    def restart(self) -> None:
        self.stop()
        self.start()


# --- the stack -------------------------------------------------------------------------------------------------------
@dataclass
class Stack:
    pg: Postgres
    server: MlflowServer
    root: Path  # artifacts/, server/ (log, auth ini)
    admin: tuple[str, str] | None  # (user, password) with basic-auth

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def secrets(self) -> list[str]:
        """Every credential of this stack: none may appear in a dump, an artifact or a log."""
        return [self.pg.password, *([self.admin[1], self.server.secret_key] if self.admin else [])]

    def databases(self) -> list[str]:
        return ["mlflow", "mlflow_auth"] if self.admin else ["mlflow"]

    # basic-auth administration (what the admin does with curl or the UI)
    def create_user(self, username: str, password: str) -> None:
        status, body = rest(
            self.url, "/api/2.0/mlflow/users/create", "POST", {"username": username, "password": password}, self.admin
        )
        assert status == 200, (status, body)

    def grant(self, username: str, resource_type: str, resource_id: str, permission: str) -> None:
        """resource_type: experiment | registered_model; permission: READ | USE | EDIT | MANAGE | NO_PERMISSIONS."""
        body = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
        status, out = rest(
            self.url, "/api/3.0/mlflow/users/permissions/grant", "POST", {**body, "permission": permission}, self.admin
        )
        assert status == 200, (status, out)


def write_auth_config(path: Path, database_uri: str, admin_password: str, default_permission: str) -> Path:
    cfg = configparser.ConfigParser()
    cfg["mlflow"] = {
        "default_permission": default_permission,
        "database_uri": database_uri,
        "admin_username": ADMIN_USER,
        "admin_password": admin_password,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        # As docs/deploy.md: without it every request pays scrypt password hashes (~0.3 s of server CPU, 15 ms with)
        "auth_cache_ttl_seconds": "60",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        cfg.write(f)
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def tracking_stack(
    root: Path, auth: bool = False, default_permission: str = "NO_PERMISSIONS", durable: bool = False
) -> Iterator[Stack]:
    """PostgreSQL + mlflow server (with basic-auth when ``auth``), torn down on exit.

    ``default_permission`` is what an authenticated user gets on a resource nobody granted them; NO_PERMISSIONS
    makes every grant in a test explicit (MLflow's own default is READ)."""
    pg = start_postgres(durable=durable)
    server = None
    try:
        backend = pg.createdb("mlflow")
        admin = None
        auth_ini = None
        if auth:
            admin = (ADMIN_USER, secrets.token_urlsafe(18))
            auth_ini = write_auth_config(
                root / "server" / "basic_auth.ini", pg.createdb("mlflow_auth"), admin[1], default_permission
            )
        pgpass = {"PGPASSFILE": str(pg.write_pgpass(root / "server" / "pgpass"))}
        server = MlflowServer(backend, root / "artifacts", root / "server", auth_config=auth_ini, env=pgpass)
        (root / "artifacts").mkdir(parents=True, exist_ok=True)
        server.start()
        yield Stack(pg=pg, server=server, root=root, admin=admin)
    finally:
        if server is not None:
            server.stop()
        pg.stop()
        shutil.rmtree(pg.base, ignore_errors=True)
