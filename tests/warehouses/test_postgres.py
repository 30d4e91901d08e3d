"""The warehouse scenarios on PostgreSQL (a throwaway local cluster, see conftest)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dlt
import pytest

from apione_source import apione, run_enrichment
from tests.conftest import SANDBOX_API_KEY
from tests.warehouses.harness import Env
from tests.warehouses.scenarios import COMPANY, KillScenarios, Scenarios

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


class TestPostgres(Scenarios):
    input_wh = "postgres"
    output_wh = "postgres"


class TestPostgresKilled(KillScenarios):
    input_wh = "postgres"
    output_wh = "postgres"


@pytest.mark.parametrize("output", ["postgres", "duckdb"])
def test_configured_only_by_environment_variables_as_the_readme_shows(
    make_env: Callable[..., Env],
    postgres_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    output: str,
) -> None:
    env = make_env("postgres", "postgres")
    env.insert_companies([(i, f"firm{i}.com") for i in range(10)] + [(900, None)])
    settings = {
        "SOURCES__APIONE__API_KEY": SANDBOX_API_KEY,
        "SOURCES__APIONE__BASE_URL": env.sandbox.base_url,
        "SOURCES__APIONE__ENRICHMENT_TYPE": "company",
        "SOURCES__APIONE__INPUT_TABLE": "companies",
        "SOURCES__APIONE__PRIMARY_KEY": "id",
        "SOURCES__APIONE__INPUT_DESTINATION": "postgres",
        "SOURCES__APIONE__INPUT_DATASET": env.input_dataset,
    }
    if output == "postgres":  # one warehouse: the input reuses the destination's credentials
        settings["DESTINATION__POSTGRES__CREDENTIALS"] = postgres_server
    else:  # input in Postgres, results in DuckDB
        settings["SOURCES__APIONE__INPUT_CREDENTIALS"] = postgres_server
        settings["DESTINATION__DUCKDB__CREDENTIALS"] = str(tmp_path / "results.duckdb")
    for key, value in settings.items():
        monkeypatch.setenv(key, value)

    pipeline = dlt.pipeline(
        "apione_from_env",
        destination=output,
        dataset_name=env.output_dataset,
        pipelines_dir=str(tmp_path / "env_pipelines"),
    )
    run_enrichment(pipeline, apione()).raise_on_failed_jobs()

    with pipeline.sql_client() as client:
        outcomes = client.make_qualified_table_name(COMPANY.outcomes)
        rejected = client.make_qualified_table_name(COMPANY.rejected)
        with client.execute_query(f"SELECT count(DISTINCT input_pk) FROM {outcomes}") as cur:
            assert cur.fetchall()[0][0] == 10
        with client.execute_query(f"SELECT input_pk, reason FROM {rejected}") as cur:
            assert [tuple(r) for r in cur.fetchall()] == [("900", "null")]
    assert env.sandbox.usage()["records_billed"] == 10
