"""Warehouse stand-ins for the warehouse suites: Postgres, fakesnow (Snowflake), bqemulator.

Each stand-in is started once per test session, only when a test asks for it, listens on
127.0.0.1 only, and is stopped (process ended, temp dir removed) at the end of the
session. Every workaround a stand-in needs lives here, in test code, never in
``apione_source``:

- Postgres: a throwaway cluster made with ``initdb`` / ``pg_ctl`` (as the ``postgres``
  user when run as root) on a free port, trust auth. Skipped when the server binaries are
  missing, except in CI (``CI=true``), where that fails.
- Snowflake: ``fakesnow.server`` in this process. dlt's destination is built with
  ``supports_multiple_statements=False`` and parquet loads, and three statement forms dlt
  emits for staging are rewritten before they reach fakesnow (see ``_fakesnow_sql``).
- BigQuery: bqemulator from its own venv (``.cache/bqemulator-venv``, made on first use)
  as a subprocess, with DuckDB's spatial extension skipped (it is downloaded at start-up,
  which fails offline). dlt's service-account credentials are made to return anonymous
  credentials and ``BIGQUERY_EMULATOR_HOST`` points the client at the emulator, both per
  test (so the opt-in real-cloud suite in the same session is unaffected).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dlt
import pytest

from apione_source.sandbox import Sandbox
from tests.warehouses.harness import Env, Warehouse

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BQEMULATOR_VERSION = "1.4.0"
BQEMULATOR_VENV = Path(os.environ.get("APIONE_BQEMULATOR_VENV", REPO / ".cache/bqemulator-venv"))
# bqemulator imports numpy without declaring it
BQEMULATOR_PACKAGES = (f"bqemulator=={BQEMULATOR_VERSION}", "numpy")
BQ_PROJECT = "apione-test"


def _unavailable(reason: str) -> None:
    """Skip a stand-in that cannot run here, but fail in CI, where it must."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the stand-in must be available; see .ci/run)")
    pytest.skip(reason)


def _require(module: str, extra: str) -> None:
    """Skip (fail in CI) when a warehouse driver is not installed."""
    try:
        __import__(module)
    except ImportError:
        _unavailable(f"{module} is not installed: uv sync --extra {extra} --group warehouses")


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f}s\n{tail}")


# --- dlt isolation ------------------------------------------------------------------------


# --- per-test environment ------------------------------------------------------------


def _suffix() -> str:
    return f"{os.getpid()}_{time.time_ns() % 10**12}"


@pytest.fixture
def make_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sandbox_factory: Callable[..., Sandbox],
) -> Iterator[Callable[..., Env]]:
    """Build an Env from two warehouse fixture names (input, output); datasets are dropped."""
    made: list[Env] = []

    def make(input_wh: str, output_wh: str, **sandbox_kwargs: Any) -> Env:
        inp: Warehouse = request.getfixturevalue(f"{input_wh}_warehouse")
        out: Warehouse = (
            inp if output_wh == input_wh else request.getfixturevalue(f"{output_wh}_warehouse")
        )
        for wh in {id(inp): inp, id(out): out}.values():
            if wh.activate:
                wh.activate(monkeypatch)
        suffix = _suffix()
        pipeline = dlt.pipeline(
            pipeline_name=f"apione_wh_{suffix}",
            destination=out.destination(),
            dataset_name=f"enriched_{suffix}",
            pipelines_dir=str(tmp_path / "pipelines"),
        )
        env = Env(
            sandbox=sandbox_factory(**sandbox_kwargs),
            input_wh=inp,
            output_wh=out,
            input_dataset=f"crm_{suffix}",
            output_dataset=pipeline.dataset_name,
            pipeline=pipeline,
        )
        made.append(env)
        env.create_companies()
        return env

    yield make
    for env in made:
        for wh, dataset in ((env.input_wh, env.input_dataset), (env.output_wh, env.output_dataset)):
            with contextlib.suppress(Exception):
                wh.drop_dataset(dataset)


# --- DuckDB -------------------------------------------------------------------------------


@pytest.fixture
def duckdb_warehouse(tmp_path: Path) -> Warehouse:
    """A DuckDB file per test (input and output may share it)."""
    return Warehouse("duckdb", str(tmp_path / "warehouse.duckdb"))


# --- Postgres -----------------------------------------------------------------------------


def _postgres_bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    # Debian keeps the server binaries out of PATH
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields a dlt connection string."""
    _require("psycopg2", "postgres")
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        _unavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: "
            "apt-get install postgresql (or run .ci/run)"
        )
    assert bin_dir is not None
    as_user: dict[str, Any] = {}
    base = Path(tempfile.mkdtemp(prefix="apione_pg_"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            shutil.chown(base, "postgres", "postgres")
        except LookupError:
            shutil.rmtree(base, ignore_errors=True)
            _unavailable("running as root and there is no postgres user to run initdb as")
        as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
    data, log, port = base / "data", base / "server.log", free_port()

    def pg(*args: str) -> None:
        subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            cwd=base,
            **as_user,
        )

    started = False
    try:
        pg("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        pg("pg_ctl", "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        started = True
        # dlt wants a password in the URL even under trust auth
        yield f"postgresql://postgres:unused@127.0.0.1:{port}/postgres"
    except subprocess.CalledProcessError as exc:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        stderr = exc.stderr.decode(errors="replace")
        raise RuntimeError(f"postgres failed: {stderr}\n{tail}") from exc
    finally:
        if started:
            with contextlib.suppress(subprocess.CalledProcessError):
                pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_warehouse(postgres_server: str) -> Warehouse:
    return Warehouse("postgres", postgres_server)


# --- Snowflake: fakesnow ------------------------------------------------------------------

_STAGE_LITERAL = re.compile(r"'(@[^']*)'")
_OPTION_COMMA = re.compile(r",\s*(?=[A-Z_]+\s*=)")
_CASE_INSENSITIVE = re.compile(r"MATCH_BY_COLUMN_NAME\s*=\s*'CASE_INSENSITIVE'", re.IGNORECASE)


def _fakesnow_sql(sql: str) -> str:
    """Rewrite the three staging statement forms dlt emits that fakesnow cannot parse.

    - stage locations quoted as string literals: ``'@"DS"."%T"/f'`` -> ``@"DS"."%T"/f``;
    - commas between PUT / COPY options: ``AUTO_COMPRESS = FALSE, ...`` -> no comma;
    - ``MATCH_BY_COLUMN_NAME='CASE_INSENSITIVE'`` -> the bare word.
    """
    head = sql.lstrip()[:4].upper()
    if head not in ("PUT ", "COPY"):
        return sql
    sql = _STAGE_LITERAL.sub(r"\1", sql)
    sql = _CASE_INSENSITIVE.sub("MATCH_BY_COLUMN_NAME = CASE_INSENSITIVE", sql)
    return _OPTION_COMMA.sub(" ", sql)


@pytest.fixture(scope="session")
def fakesnow_server() -> Iterator[dict[str, Any]]:
    """fakesnow's Snowflake server on 127.0.0.1 in this process; yields its conn kwargs."""
    _require("snowflake.connector", "snowflake")
    if importlib.util.find_spec("fakesnow") is None:  # importing it makes a bucket dir
        _unavailable("fakesnow is not installed: uv sync --group warehouses")
    tmp = Path(tempfile.mkdtemp(prefix="apione_fakesnow_"))
    # fakesnow makes its stage bucket (fakesnow_bucket_*) in the temp dir when imported:
    # import it with the temp dir pointed at ours, then put the temp dir back
    old_tempdir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = tempfile.tempdir = str(tmp)
    try:
        import fakesnow  # imports fakesnow.transforms.stage, which makes the bucket

        serve = fakesnow.server  # the function (importing fakesnow.server shadows it)
    finally:
        tempfile.tempdir = old_tempdir
        if old_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old_env
    try:
        with serve(host="127.0.0.1") as conn:
            yield conn
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _patch_snowflake_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    from dlt.destinations.impl.snowflake.sql_client import SnowflakeSqlClient

    original = SnowflakeSqlClient.execute_query

    @contextlib.contextmanager
    def execute_query(self: Any, query: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if isinstance(query, str):
            query = _fakesnow_sql(query)
        with original(self, query, *args, **kwargs) as cur:
            yield cur

    monkeypatch.setattr(SnowflakeSqlClient, "execute_query", execute_query)


@pytest.fixture
def snowflake_warehouse(fakesnow_server: dict[str, Any]) -> Warehouse:
    c = fakesnow_server
    return Warehouse(
        "snowflake",
        f"snowflake://{c['user']}:{c['password']}@{c['account']}/APIONE"
        f"?host={c['host']}&port={c['port']}&protocol={c['protocol']}",
        # fakesnow: one statement per call; COPY matches columns by name only for parquet
        destination_kwargs={
            "supports_multiple_statements": False,
            "preferred_loader_file_format": "parquet",
        },
        types={"int": "INT", "text": "VARCHAR", "timestamp": "TIMESTAMP_NTZ"},
        activate=_patch_snowflake_sql,
    )


# --- BigQuery: bqemulator -----------------------------------------------------------------


def ensure_bqemulator_venv() -> Path:
    """The bqemulator venv's python, creating the venv (cached) on first use."""
    python = BQEMULATOR_VENV / "bin" / "python"
    marker = BQEMULATOR_VENV / f".bqemulator-{BQEMULATOR_VERSION}"
    if marker.exists() and python.exists():
        return python
    uv = shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is needed to create the bqemulator venv (pip install uv)")
    shutil.rmtree(BQEMULATOR_VENV, ignore_errors=True)
    BQEMULATOR_VENV.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT")}
    subprocess.run(
        [uv, "venv", "--quiet", "--python", sys.executable, str(BQEMULATOR_VENV)],
        check=True,
        env=env,
    )
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--python", str(python), *BQEMULATOR_PACKAGES],
        check=True,
        env=env,
    )
    marker.touch()
    return python


@pytest.fixture(scope="session")
def bqemulator_server() -> Iterator[str]:
    """bqemulator from its own venv, on 127.0.0.1; yields its REST endpoint."""
    _require("google.cloud.bigquery", "bigquery")
    try:
        python = ensure_bqemulator_venv()
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        _unavailable(f"cannot create the bqemulator venv at {BQEMULATOR_VENV}: {exc}")
    base = Path(tempfile.mkdtemp(prefix="apione_bqemu_"))
    (base / "uploads").mkdir()
    rest_port, grpc_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
        "BQEMU_REST_HOST": "127.0.0.1",
        "BQEMU_REST_PORT": str(rest_port),
        "BQEMU_GRPC_HOST": "127.0.0.1",
        "BQEMU_GRPC_PORT": str(grpc_port),
        "BQEMU_DEFAULT_PROJECT_ID": BQ_PROJECT,
        "BQEMU_UPLOAD_STAGING_DIR": str(base / "uploads"),
        "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false",  # avro: another download
        "BQEMU_LOG_LEVEL": "warning",
        "BQEMU_METRICS_ENABLED": "false",
        "TMPDIR": str(base),
    }
    log = base / "bqemulator.log"
    endpoint = f"http://127.0.0.1:{rest_port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(python), str(Path(__file__).with_name("bqemulator_launcher.py")), "--ephemeral"],
            env=env,
            cwd=base,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"bqemulator exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        _wait_for(healthy, 120, "bqemulator", log)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def _anonymous_gcp(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    from dlt.common.configuration.specs import GcpServiceAccountCredentials
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", endpoint)
    # the emulator reads gzipped jsonl as malformed JSON; parquet cannot carry the
    # outcomes' json column to BigQuery (dlt refuses it): load plain jsonl
    monkeypatch.setenv("DATA_WRITER__DISABLE_COMPRESSION", "true")
    # keep google-auth away from the GCE metadata server (an unused loopback address)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.254:1")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.254:1")
    monkeypatch.setattr(
        GcpServiceAccountCredentials,
        "to_native_credentials",
        lambda self: AnonymousCredentials(),
    )
    # A table created empty (the connector creates every table on its first run) is a
    # 0-byte jsonl file here (uncompressed), whose resumable upload the emulator answers
    # 308 forever; one newline is the same zero rows. (Real BigQuery gets gzip: never 0 B.)
    load = bigquery.Client.load_table_from_file

    def load_table_from_file(self: Any, file_obj: Any, *args: Any, **kwargs: Any) -> Any:
        if hasattr(file_obj, "fileno") and os.fstat(file_obj.fileno()).st_size == 0:
            file_obj = io.BytesIO(b"\n")
        return load(self, file_obj, *args, **kwargs)

    monkeypatch.setattr(bigquery.Client, "load_table_from_file", load_table_from_file)


@pytest.fixture
def bigquery_warehouse(bqemulator_server: str) -> Warehouse:
    return Warehouse(
        "bigquery",
        {
            "project_id": BQ_PROJECT,
            "client_email": f"tests@{BQ_PROJECT}.iam.gserviceaccount.com",
            "private_key": "not-a-key",
        },
        types={"int": "INT64", "text": "STRING", "timestamp": "TIMESTAMP"},
        activate=lambda mp: _anonymous_gcp(mp, bqemulator_server),
    )
