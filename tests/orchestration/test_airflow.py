"""The Airflow example (orchestration/airflow/) run by ``airflow dags test`` against the sandbox.

Needs the ``airflow`` dependency group: ``uv run --group airflow pytest -m airflow``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import ROOT, Env

pytest.importorskip("airflow")

pytestmark = pytest.mark.airflow

DAGS = ROOT / "orchestration" / "airflow"
AIRFLOW = Path(sys.executable).parent / "airflow"


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A throwaway Airflow: its home, a sqlite metadata DB, the example's DAGs folder."""
    home = tmp_path_factory.mktemp("airflow_home")
    settings = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    }
    migrated = subprocess.run(
        [str(AIRFLOW), "db", "migrate"],
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    yield settings


def _dags_test(env: Env, airflow: dict[str, str], data_dir: str, api_key: str | None = None) -> str:
    """``airflow dags test`` of the example, configured by env vars as a worker would be;
    every run on its own dlt data dir (a fresh worker). Returns its output; asserts nothing."""
    config = {
        **airflow,
        "SOURCES__APIONE__API_KEY": api_key or env.sandbox.config.api_key,
        "SOURCES__APIONE__BASE_URL": env.sandbox.base_url,
        "SOURCES__APIONE__ENRICHMENT_TYPE": "company",
        "SOURCES__APIONE__INPUT_TABLE": "companies",
        "SOURCES__APIONE__PRIMARY_KEY": "id",
        "SOURCES__APIONE__INPUT_DATASET": "crm",
        "SOURCES__APIONE__INPUT_CREDENTIALS": str(env.warehouse),
        "SOURCES__APIONE__WAIT_BUDGET_SECONDS": "30",
        "DESTINATION__DUCKDB__CREDENTIALS": str(env.out),
        "DLT_DATA_DIR": str(env.tmp / data_dir),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
    }
    run = subprocess.run(
        [str(AIRFLOW), "dags", "test", "apione_enrichment"],
        cwd=env.tmp,
        env={**os.environ, **config},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    return f"exit code {run.returncode}\n{run.stdout}"


def test_given_the_sandbox_when_the_dag_runs_twice_then_the_tables_load_and_nothing_is_paid_twice(
    make_env: Callable[..., Env], airflow_home: dict[str, str]
) -> None:
    env = make_env()
    env.insert_companies([(i, f"airflow{i}.com") for i in range(30)] + [(99, "not a domain")])

    out = _dags_test(env, airflow_home, "worker_1")

    assert out.startswith("exit code 0\n"), out
    assert "DagRun Finished" in out and "state=success" in out, out
    assert (
        "company_enrichment: rows read 31, rejected 1 (invalid_domain 1), already fresh 0, "
        "submitted 30 records in 1 jobs, collected 30" in out
    ), out
    billed = env.sandbox.usage()["records_billed"]
    assert billed == 30
    assert env.count("apione_companies_outcomes") == 30
    assert env.count("apione_companies_rejected") == 1
    assert 0 < env.count("apione_companies") <= 30
    (row,) = env.query("SELECT rows_read, records_submitted FROM enriched.apione_runs")
    assert row == (31, 30)

    # a second run on another worker (an empty local dir) pays for nothing
    again = _dags_test(env, airflow_home, "worker_2")

    assert again.startswith("exit code 0\n"), again
    assert "already fresh 30, submitted 0 records in 0 jobs" in again, again
    assert env.sandbox.usage()["records_billed"] == billed


def test_given_a_wrong_key_when_the_dag_runs_then_the_run_fails_naming_the_fix(
    make_env: Callable[..., Env], airflow_home: dict[str, str]
) -> None:
    env = make_env()
    env.insert_companies([(1, "a.com"), (2, "b.com")])

    out = _dags_test(env, airflow_home, "worker_1", api_key="sk_wrong_airflow_7")

    assert not out.startswith("exit code 0\n"), out
    assert "DagRun failed" in out, out
    assert "AuthenticationError: ApiOne rejected the API key (401)" in out, out
    assert "SOURCES__APIONE__API_KEY" in out
    assert "company_enrichment: rows read 2, rejected 0" in out  # what it did before failing
    assert "sk_wrong_airflow_7" not in out
    assert env.sandbox.usage()["records_billed"] == 0
