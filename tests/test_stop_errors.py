"""A refused key (401) mid-way: what was collected stays, jobs in flight survive, the next
run with the right key collects them, and nothing is paid twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest

from apione_source import apione, run_enrichment
from apione_source.errors import AuthenticationError
from apione_source.sandbox import Sandbox
from tests.e2e import journal_jobs_in_flight

# ~7 s (three runs and a 3 s wait budget): slow, to keep the default suite fast
pytestmark = pytest.mark.slow

KEY_A = "sk_test_key_A_right"
KEY_B = "sk_test_key_B_WRONG_7731"
COMPANIES = 50  # jobs of 20, 20 and 10 records


def test_given_jobs_in_flight_when_next_run_has_wrong_key_then_it_stops_and_a_later_run_collects(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    # a job takes 0.2 s per record: the 10-record job (2 s) finishes within run 1's
    # wait budget (3 s), the two 20-record jobs (4 s) do not
    sb = sandbox_factory(api_key=KEY_A, job_seconds_per_record=0.2)
    warehouse = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(warehouse))
    try:
        con.execute("CREATE SCHEMA crm")
        con.execute("CREATE TABLE crm.companies(id INT, domain VARCHAR)")
        con.executemany(
            "INSERT INTO crm.companies VALUES (?, ?)",
            [(i, f"stopfirm{i}.com") for i in range(COMPANIES)],
        )
    finally:
        con.close()
    out = tmp_path / "destination.duckdb"
    pipeline = dlt.pipeline(
        pipeline_name="apione_stop",
        destination=dlt.destinations.duckdb(str(out)),
        dataset_name="enriched",
        pipelines_dir=str(tmp_path / "pipelines"),
    )

    def run(key: str, budget: float) -> Any:
        return run_enrichment(
            pipeline,
            apione(
                api_key=key,
                base_url=sb.base_url,
                enrichment_type="company",
                input_table="companies",
                primary_key="id",
                input_columns={"domain": "domain"},
                input_dataset="crm",
                input_credentials=str(warehouse),
                records_per_job=20,
                wait_budget_seconds=budget,
            ),
        )

    def query(sql: str) -> list[tuple[Any, ...]]:
        c = duckdb.connect(str(out), read_only=True)
        try:
            return c.execute(sql).fetchall()
        finally:
            c.close()

    def tables() -> dict[str, list[tuple[Any, ...]]]:
        return {
            "enrichment": query("SELECT key, job_id FROM enriched.apione_companies ORDER BY key"),
            "outcomes": query(
                "SELECT outcome_id, status FROM enriched.apione_companies_outcomes "
                "ORDER BY outcome_id"
            ),
        }

    def journal_in_flight() -> set[str]:
        return journal_jobs_in_flight(out)

    # run 1: key A; one job is collected, two are still running at the end of the budget
    run(KEY_A, budget=3.0)
    ledger1 = dict(query("SELECT job_id, status FROM enriched.apione_jobs"))
    in_flight = {j for j, s in ledger1.items() if s == "in_flight"}
    assert len(ledger1) == 3 and len(in_flight) == 2, ledger1
    assert journal_in_flight() == in_flight
    collected = tables()
    assert len(collected["outcomes"]) == 10
    assert sb.usage()["records_billed"] == COMPANIES

    # run 2: a wrong key B -> AuthenticationError, after loading; nothing is lost
    with pytest.raises(AuthenticationError) as raised:
        run(KEY_B, budget=10)
    message = str(raised.value)
    assert "SOURCES__APIONE__API_KEY" in message and "secrets.toml" in message
    assert KEY_B not in message and KEY_B not in repr(raised.value)
    assert tables() == collected
    ledger2 = dict(query("SELECT job_id, status FROM enriched.apione_jobs"))
    assert {j for j, s in ledger2.items() if s == "in_flight"} == in_flight
    assert journal_in_flight() == in_flight
    usage = sb.usage()
    assert usage["records_billed"] == COMPANIES

    # run 3: key A again collects the carried jobs; nothing was billed twice
    run(KEY_A, budget=20)
    ledger3 = dict(query("SELECT job_id, status FROM enriched.apione_jobs"))
    assert set(ledger3) == set(ledger1)
    assert set(ledger3.values()) == {"completed"}
    assert journal_in_flight() == set()
    pks = {r[0] for r in query("SELECT DISTINCT input_pk FROM enriched.apione_companies_outcomes")}
    assert pks == {str(i) for i in range(COMPANIES)}
    per_pk = query(
        "SELECT input_pk, count(*) FROM enriched.apione_companies_outcomes GROUP BY 1 "
        "HAVING count(*) > 1"
    )
    assert per_pk == []
    usage = sb.usage()
    assert usage["records_billed"] == COMPANIES
    assert set(usage["billed_per_key"].values()) == {1}
    assert usage["jobs_created"] == 3
