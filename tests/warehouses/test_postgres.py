"""The warehouse scenarios on PostgreSQL (a throwaway local cluster, see conftest)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dlt
import psycopg2
import pytest
from dlt.destinations.exceptions import DatabaseException

from apione_source import apione, run_enrichment
from apione_source import settle as settle_module
from apione_source.settle import settle
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


# --- settling the appended tables (tests/test_settle.py, on PostgreSQL) --------------------

from tests.test_settle import (  # noqa: E402
    SETTLED,
    Db,
    open_db,
    test_a_job_in_two_completed_loads_keeps_the_rows_of_the_last_completed,  # noqa: F401
    test_a_load_job_run_twice_leaves_each_row_once_and_a_load_is_settled_once,  # noqa: F401
    test_a_load_settled_late_does_not_win_over_one_that_completed_after_it,  # noqa: F401
    test_a_scopes_first_settle_takes_what_loaded_before_as_settled_once_a_look_agrees,  # noqa: F401
    test_before_any_load_there_is_nothing_to_settle,  # noqa: F401
    test_rows_a_dead_package_wrote_after_its_twin_settled_go_at_the_next_start,  # noqa: F401
    test_rows_of_a_load_that_never_completed_give_way_and_only_where_one_did,  # noqa: F401
    test_the_horizon_follows_this_scopes_own_loads,  # noqa: F401
)


@pytest.fixture
def client(postgres_server: str, tmp_path: Path) -> Iterator[Db]:
    """The settle tests' database: a fresh dataset of the throwaway cluster."""
    destination = dlt.destinations.postgres(postgres_server)
    yield from open_db(destination, f"settle_{uuid.uuid4().hex[:8]}", tmp_path, "postgres")


def test_a_settle_waits_while_another_worker_settles_the_same_scope(
    client: Db, postgres_server: str
) -> None:
    """Two settles at once could each delete the other's winner: the second one waits."""
    other = psycopg2.connect(postgres_server.replace(":unused@", "@"))
    other.autocommit = True
    key = f"apione-settle:{client.names[SETTLED]}:{COMPANY.outcomes}"  # per dataset
    with other.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))  # the other worker's
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (settle(client.client, "postgres", COMPANY, "apione"), done.set())
        )
        worker.start()
        waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            cur.execute(waiting)
            if cur.fetchone()[0]:
                break
        assert not done.is_set(), "the settle did not wait for the lock"
        cur.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
    worker.join(30)
    other.close()
    assert done.is_set()


def test_a_settle_that_cannot_get_the_lock_in_time_fails_the_run(
    client: Db, postgres_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker holding the scope's lock for good must not hang every other run."""
    monkeypatch.setattr(settle_module, "LOCK_TIMEOUT", "200ms")
    other = psycopg2.connect(postgres_server.replace(":unused@", "@"))
    other.autocommit = True
    try:
        with other.cursor() as cur:
            key = f"apione-settle:{client.names[SETTLED]}:{COMPANY.outcomes}"
            cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))
            with pytest.raises(DatabaseException, match="lock timeout"):
                settle(client.client, "postgres", COMPANY, "apione")
    finally:
        other.close()
