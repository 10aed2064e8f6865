"""A shared tracking server: PostgreSQL backend store, served artifact store, `mlflow server` on top.

The embedded default (a local SQLite store, one process) stays the default; this module is the path
for a team. Every ``geopose-ml`` command works unchanged against the server through
``MLFLOW_TRACKING_URI=http://HOST:PORT``, and Optuna studies live on the same PostgreSQL instance
(in their own database: Optuna and MLflow both keep an ``alembic_version`` table, so they must not
share one).

Two building blocks:

- :class:`PostgresCluster` starts a throw-away PostgreSQL cluster (``initdb`` in a directory, a free
  loopback port, a private unix-socket directory, ``trust`` authentication on loopback only). Debian
  keeps ``initdb``/``pg_ctl`` off ``PATH`` in ``/usr/lib/postgresql/<version>/bin`` and they refuse to
  run as root, so when run as root they are run as the ``postgres`` user on directories it owns.
  Used by the tests and by ``geopose-ml server --init-postgres DIR``; a production team points
  ``--backend-store-uri`` at its own managed PostgreSQL instead.
- :class:`MlflowServer` starts ``mlflow server`` in its own process group, waits for ``/health`` and
  kills the whole group (gunicorn/uvicorn workers included) when stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from geopose_mlops.errors import GeoposeError

POSTGRES_USER = "postgres"  # superuser name inside the throw-away cluster (and the OS user on Debian)
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"  # where Debian installs initdb, pg_ctl, postgres


class ServerError(GeoposeError):
    """PostgreSQL or the MLflow server could not be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_postgres_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: ``PATH`` first, else Debian's newest version.

    Raises:
        ServerError: PostgreSQL's server binaries are not installed (``apt-get install postgresql``).
    """
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    candidates = sorted(
        Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")),
        key=lambda p: _version_key(p.parent.name),
    )
    for bin_dir in reversed(candidates):
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            return bin_dir
    raise ServerError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found on PATH nor in {POSTGRES_BIN_GLOB}; "
        "install them, e.g. `apt-get install -y postgresql`"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit()) or (0,)


def _as_postgres_user(command: list[str]) -> list[str]:
    """Prefix ``command`` so it runs as the ``postgres`` user when we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser") is None:
        raise ServerError("running as root and `runuser` is missing: cannot run PostgreSQL as the postgres user")
    return ["runuser", "-u", POSTGRES_USER, "--", *command]


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    import pwd

    try:
        entry = pwd.getpwnam(POSTGRES_USER)
    except KeyError as err:
        raise ServerError(f"running as root but there is no OS user {POSTGRES_USER!r} to own {path}") from err
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ServerError(f"{what} failed (exit {result.returncode}): {' | '.join(detail)}")


@dataclass
class PostgresCluster:
    """A throw-away PostgreSQL cluster on a loopback port; a context manager that stops it on exit.

    Attributes:
        root: Directory that holds the cluster (``data/``, ``socket/``, ``postgres.log``); created.
        port: TCP port on 127.0.0.1 (0: pick a free one at start).
        bin_dir: Directory of ``initdb``/``pg_ctl`` (None: :func:`find_postgres_bin`).
    """

    root: Path
    port: int = 0
    bin_dir: Path | None = None
    host: str = field(default="127.0.0.1", init=False)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (``PGDATA``)."""
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        """Private unix-socket directory (the default /var/run/postgresql may not exist or be writable)."""
        return self.root / "socket"

    def start(self) -> PostgresCluster:
        """``initdb`` (once) and start the server; waits until it accepts connections.

        Raises:
            ServerError: A binary is missing or ``initdb``/``pg_ctl`` failed (their last lines quoted).
        """
        self.bin_dir = Path(self.bin_dir) if self.bin_dir else find_postgres_bin()
        self.root = Path(self.root).resolve()
        self.port = self.port or free_port(self.host)
        for folder in (self.root, self.data_dir, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
            _chown_to_postgres(folder)
        self.data_dir.chmod(0o700)  # postgres refuses a data directory others can read
        if os.geteuid() == 0 and subprocess.run(_as_postgres_user(["test", "-w", str(self.data_dir)])).returncode:
            raise ServerError(
                f"{self.data_dir}: the {POSTGRES_USER} user cannot reach it (a parent directory is private "
                "to root); put the cluster under a directory others can traverse, e.g. one made by "
                "tempfile.mkdtemp() directly under /tmp"
            )
        if not (self.data_dir / "PG_VERSION").is_file():
            initdb = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", POSTGRES_USER]
            _run(_as_postgres_user([*initdb, "-A", "trust", "-E", "UTF8", "--no-instructions"]), "initdb")
        options = f"-h {self.host} -p {self.port} -k {self.socket_dir} -c fsync=off -c max_connections=200"
        pg_ctl = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.root / "postgres.log")]
        _run(_as_postgres_user([*pg_ctl, "-o", options, "-w", "-t", "60", "start"]), "pg_ctl start")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown); harmless if it is not running."""
        if self.bin_dir is None or not (self.data_dir / "postmaster.pid").exists():
            return
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
        subprocess.run(_as_postgres_user(command), capture_output=True, check=False)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if absent) and return its SQLAlchemy URL (:meth:`url`)."""
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=POSTGRES_USER, dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def url(self, database: str) -> str:
        """``postgresql+psycopg2://postgres@127.0.0.1:PORT/DATABASE`` (MLflow and Optuna both take it)."""
        return f"postgresql+psycopg2://{POSTGRES_USER}@{self.host}:{self.port}/{database}"

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def mlflow_server_command(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
) -> list[str]:
    """The ``mlflow server`` command line: SQL backend store, artifacts served through the server.

    Clients then log artifacts to ``mlflow-artifacts:/`` URIs that the server stores under
    ``artifacts_destination`` (a directory or an object-store URI), so workers need no shared disk.
    """
    destination = str(artifacts_destination)
    if "://" not in destination:
        destination = str(Path(destination).resolve())
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination", destination,
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip


def wait_for_health(url: str, timeout_s: float = 120.0, process: subprocess.Popen | None = None) -> None:
    """Poll ``{url}/health`` until it answers 200.

    Raises:
        ServerError: ``process`` exited first, or ``timeout_s`` (seconds) passed.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(f"mlflow server exited with code {process.returncode} before {url}/health answered")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ServerError(f"{url}/health did not answer within {timeout_s:.0f} s")


@dataclass
class MlflowServer:
    """``mlflow server`` as a child process group; a context manager that kills the group on exit.

    Attributes:
        backend_store_uri: SQLAlchemy URL of the backend store (PostgreSQL for a team).
        artifacts_destination: Where the server stores artifacts it is sent.
        host: Interface to bind (127.0.0.1: this machine only; 0.0.0.0: the network).
        port: TCP port (0: a free one).
        workers: Server worker processes.
        log_path: File for the server's stdout and stderr (None: ``mlflow-server.log`` beside a local
            ``artifacts_destination``, else in the working directory).
    """

    backend_store_uri: str
    artifacts_destination: str | Path
    host: str = "127.0.0.1"
    port: int = 0
    workers: int = 2
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """The tracking URI clients set as ``MLFLOW_TRACKING_URI``."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start the server and wait until ``/health`` answers (it migrates an empty database first)."""
        self.port = self.port or free_port(self.host if self.host != "0.0.0.0" else "127.0.0.1")
        local = "://" not in str(self.artifacts_destination)
        if local:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        default_log = Path(self.artifacts_destination).resolve().parent if local else Path.cwd()
        log_path = Path(self.log_path or default_log / "mlflow-server.log")
        command = mlflow_server_command(
            self.backend_store_uri, self.artifacts_destination, self.host, self.port, self.workers
        )
        # The server's background job runner (GenAI features) starts a dozen consumer processes that
        # this platform never uses; off unless the caller's environment turns it on.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        with open(log_path, "ab") as log:
            # A new session makes the server the leader of its own process group, so stop() can kill
            # its workers too: killing only the parent would leave them holding the port.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        try:
            wait_for_health(self.url, timeout_s, self.process)
        except ServerError as err:
            self.stop()
            tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
            raise ServerError(f"{err}; last lines of {log_path}: {tail}") from err
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group, wait up to ``timeout_s`` seconds, then SIGKILL what is left."""
        if self.process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
        self.process = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    backend_store_uri: str | None,
    artifacts_destination: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 2,
    init_postgres: Path | None = None,
    echo=print,
) -> None:
    """Run the tracking server in the foreground until interrupted (``geopose-ml server``).

    Args:
        backend_store_uri: SQLAlchemy URL of an existing PostgreSQL database (or any MLflow store).
        artifacts_destination: Directory or object-store URI the server keeps artifacts in.
        host: Interface to bind; 0.0.0.0 to serve other machines.
        port: TCP port.
        workers: Server worker processes.
        init_postgres: Instead of ``backend_store_uri``: keep a PostgreSQL cluster in this directory
            (``initdb`` on first use), with databases ``mlflow`` (tracking) and ``optuna`` (studies).
        echo: Where the URLs to share with the team are printed.

    Raises:
        ServerError: Neither or both of ``backend_store_uri`` and ``init_postgres`` are given, or a
            server failed to start.
    """
    if (backend_store_uri is None) == (init_postgres is None):
        raise ServerError("give exactly one of --backend-store-uri URL or --init-postgres DIR")
    cluster = None
    if init_postgres is not None:
        cluster = PostgresCluster(Path(init_postgres)).start()
        backend_store_uri = cluster.create_database("mlflow")
        echo(f"postgres: {cluster.url('')} (data in {cluster.data_dir}, log {cluster.root / 'postgres.log'})")
        echo(f"optuna storage: --storage {cluster.create_database('optuna')}")
    server = MlflowServer(backend_store_uri, Path(artifacts_destination), host, port, workers)
    try:
        server.start()
        echo(f"tracking: export MLFLOW_TRACKING_URI={server.url}   (Ctrl-C stops)")
        server.process.wait()
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        server.stop()
        if cluster is not None:
            cluster.stop()
