"""Freshness decided by the warehouse, when the input table shares it with the outcomes.

The warehouse leaves out rows read before with the same values whose key has a fresh
final outcome; everything else still goes through the connector's own checks. Each test
runs real pipelines into one DuckDB file that holds both the input and the results, and
asserts what was billed (the sandbox's counters) and what was read.
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest
from dlt.destinations.impl.duckdb.configuration import DuckDbCredentials

from apione_source.history import load_known_keys
from apione_source.models import EnrichmentType
from apione_source.reader import Freshness, InputReader, InputSpec
from apione_source.sandbox import Sandbox
from apione_source.source import apione, run_enrichment, run_summaries
from apione_source.tables import TableNames
from tests.e2e import company_key, found_domains

COMPANY = TableNames("apione_", EnrichmentType.COMPANY)


class SharedWarehouse:
    """One DuckDB file: input ``crm.companies`` and the pipeline's dataset ``enriched``."""

    def __init__(self, tmp: Path, sandbox: Sandbox) -> None:
        self.path = tmp / "warehouse.duckdb"
        self.sandbox = sandbox
        self.exec("CREATE SCHEMA crm; CREATE TABLE crm.companies(id INT, domain VARCHAR)")
        self.pipeline = dlt.pipeline(
            pipeline_name="shared",
            destination=dlt.destinations.duckdb(str(self.path)),
            dataset_name="enriched",
            pipelines_dir=str(tmp / "pipelines"),
        )

    def exec(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        con = duckdb.connect(str(self.path))
        try:
            return con.execute(sql, params).fetchall() if params else con.execute(sql).fetchall()
        finally:
            con.close()

    def source(self, **overrides: Any) -> Any:
        """The ``apione`` source over this warehouse's ``crm.companies``."""
        kwargs: dict[str, Any] = {
            "api_key": self.sandbox.config.api_key,
            "base_url": self.sandbox.base_url,
            "enrichment_type": "company",
            "input_table": "companies",
            "primary_key": "id",
            "input_dataset": "crm",
            "input_credentials": str(self.path),
            "wait_budget_seconds": 30,
            **overrides,
        }
        return apione(**kwargs)

    def run(self, source: Any = None, plain: bool = False, **overrides: Any) -> dict[str, Any]:
        """A scheduled run (``run_enrichment``), or with ``plain`` a ``pipeline.run``."""
        run = self.pipeline.run if plain else partial(run_enrichment, self.pipeline)
        run(source or self.source(**overrides)).raise_on_failed_jobs()
        return run_summaries(self.pipeline)["company_enrichment"]

    def billed(self) -> dict[str, int]:
        return dict(self.sandbox.usage()["billed_per_key"])


@pytest.fixture
def shared(tmp_path: Path, sandbox: Sandbox) -> SharedWarehouse:
    return SharedWarehouse(tmp_path, sandbox)


def _insert(wh: SharedWarehouse, rows: list[tuple[int, str | None]]) -> None:
    wh.exec(
        f"INSERT INTO crm.companies VALUES {', '.join(['(?, ?)'] * len(rows))}",
        [v for r in rows for v in r],
    )


def test_given_nothing_changed_when_run_again_then_the_warehouse_leaves_every_row_out(
    shared: SharedWarehouse,
) -> None:
    domains = found_domains(30)
    _insert(shared, [*enumerate(domains), (100, "not a domain"), (101, None)])
    first = shared.run()
    assert first["records_submitted"] == 30 and first["rows_rejected"] == 2

    second = shared.run()

    assert shared.sandbox.usage()["records_billed"] == 30
    assert second["records_submitted"] == 0
    # every row counted, the 30 fresh ones left out by the warehouse, the bad ones re-checked
    assert second["rows_read"] == 32
    assert second["rows_already_fresh"] == 30
    assert second["rows_rejected"] == 2
    inputs = shared.exec(f"SELECT input_pk, key FROM enriched.{COMPANY.inputs} WHERE key <> ''")
    assert sorted(inputs) == sorted((str(i), d) for i, d in enumerate(domains))


def _disposition(wh: SharedWarehouse, table: str) -> str:
    return str(wh.pipeline.default_schema.get_table(table)["write_disposition"])


def test_renewed_keys_keep_one_row_whether_the_run_appended_or_merged_them(
    shared: SharedWarehouse, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduled run appends the enrichment and input tables and settles after each load;
    a plain ``pipeline.run`` (whose load only the next run settles) merges them."""
    domains = found_domains(40)
    _insert(shared, list(enumerate(domains)))
    shared.run()
    renewed = (COMPANY.enrichment, COMPANY.inputs)
    assert {_disposition(shared, t) for t in renewed} == {"append"}
    seen_jobs = {r[0] for r in shared.exec(f"SELECT job_id FROM enriched.{COMPANY.enrichment}")}

    # one source for all three: the plain run switches back what the scheduled one switched
    source = shared.source(ttl_matched_days=0)
    for plain in (False, True, False):
        caplog.clear()
        with caplog.at_level("WARNING", logger="apione_source"):
            shared.run(source, plain=plain)
        assert _disposition(shared, COMPANY.enrichment) == ("merge" if plain else "append")
        # every key and input row enriched again: one row each, from the new jobs
        rows = shared.exec(f"SELECT key, job_id FROM enriched.{COMPANY.enrichment}")
        assert sorted(k for k, _ in rows) == sorted(domains)
        assert not {j for _, j in rows} & seen_jobs
        seen_jobs |= {j for _, j in rows}
        inputs = shared.exec(f"SELECT input_pk, key FROM enriched.{COMPANY.inputs}")
        assert sorted(inputs) == sorted((str(i), d) for i, d in enumerate(domains))
        # a renewed key is not a crash's copy
        assert "written twice" not in caplog.text
    assert set(shared.billed().values()) == {4}


def test_a_primary_key_the_input_holds_twice_has_one_input_row(shared: SharedWarehouse) -> None:
    domains = found_domains(4)
    _insert(shared, [(1, domains[0]), (2, domains[1]), (2, domains[2]), (3, domains[3])])

    shared.run(records_per_load=2, records_per_job=1)
    shared.run(records_per_load=2, records_per_job=1, ttl_matched_days=0)

    pks = shared.exec(f"SELECT input_pk FROM enriched.{COMPANY.inputs} ORDER BY 1")
    assert pks == [("1",), ("2",), ("3",)]


def test_given_changed_new_and_stale_rows_then_exactly_those_are_sent(
    shared: SharedWarehouse,
) -> None:
    domains = found_domains(20)
    _insert(shared, list(enumerate(domains)))
    shared.run()
    fresh_ones = found_domains(3, prefix="new")
    # row 0 changes to a new domain, row 50 is new, row 51 is new but shares row 1's key
    shared.exec("UPDATE crm.companies SET domain = ? WHERE id = 0", [fresh_ones[0]])
    _insert(shared, [(50, fresh_ones[1]), (51, domains[1].upper())])

    second = shared.run()

    billed = shared.billed()
    assert billed[company_key(fresh_ones[0])] == 1 and billed[company_key(fresh_ones[1])] == 1
    assert billed[company_key(domains[1])] == 1  # row 51 reused row 1's outcome
    assert second["records_submitted"] == 2
    latest = shared.exec(f"SELECT key FROM enriched.{COMPANY.outcomes} WHERE input_pk = '51'")
    assert latest == [(domains[1],)]

    # every outcome turns stale: every key is sent again, once
    third = shared.run(ttl_matched_days=0, ttl_not_found_days=0)
    assert third["records_submitted"] == 21  # 19 unchanged keys, 2 new ones; row 51 joins
    expected = {company_key(d): 2 for d in [*domains[1:], *fresh_ones[:2]]}
    expected[company_key(domains[0])] = 1  # row 0 no longer carries it
    assert shared.billed() == expected


def test_given_separate_warehouses_then_freshness_is_decided_in_python(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    wh = SharedWarehouse(tmp_path, sandbox)
    wh.pipeline = dlt.pipeline(
        pipeline_name="apart",
        destination=dlt.destinations.duckdb(str(tmp_path / "out.duckdb")),
        dataset_name="enriched",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    _insert(wh, list(enumerate(found_domains(10))))
    wh.run()
    second = wh.run()
    assert second["records_submitted"] == 0 and second["rows_already_fresh"] == 10
    assert sandbox.usage()["records_billed"] == 10
    con = duckdb.connect(str(tmp_path / "out.duckdb"), read_only=True)
    try:
        # the table exists (every table does, for the dbt package) but holds no
        # fingerprints without a shared warehouse
        (fingerprints,) = con.execute(f"SELECT count(*) FROM enriched.{COMPANY.inputs}").fetchone()
    finally:
        con.close()
    assert fingerprints == 0


def test_given_records_per_load_when_run_then_results_load_in_several_packages_once(
    shared: SharedWarehouse,
) -> None:
    domains = found_domains(60)
    _insert(shared, list(enumerate(domains)))

    summary = shared.run(records_per_job=10, concurrent_jobs=2, records_per_load=15)

    loads = shared.exec("SELECT load_id FROM enriched._dlt_loads WHERE status = 0")
    assert len(loads) >= 3  # 60 results, a package every 15 or so
    assert summary["records_submitted"] == 60 and summary["records_collected"] == 60
    assert shared.sandbox.usage()["records_billed"] == 60
    # every row once, every job completed once, one row for the run (its whole summary)
    outcomes = shared.exec(f"SELECT input_pk, count(*) FROM enriched.{COMPANY.outcomes} GROUP BY 1")
    assert sorted(int(pk) for pk, n in outcomes if n == 1) == list(range(60))
    jobs = shared.exec(f"SELECT status, count(*) FROM enriched.{COMPANY.jobs} GROUP BY 1")
    assert jobs == [("completed", 6)]
    runs = shared.exec(f"SELECT records_collected FROM enriched.{COMPANY.runs}")
    assert runs == [(60,)]
    # outcomes reached the warehouse package by package, not all at the end
    per_load = shared.exec(f"SELECT count(DISTINCT load_id) FROM enriched.{COMPANY.outcomes}")
    assert per_load[0][0] >= 3
    # dlt's staging copies went before each checkpoint, the last package's too
    assert shared.exec(f"SELECT count(*) FROM enriched_staging.{COMPANY.jobs}") == [(0,)]
    # the outcome and list tables are appended on DuckDB, and in a scheduled run the
    # enrichment and input tables too: never staged
    staged = shared.exec(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'enriched_staging'"
    )
    appended = {COMPANY.outcomes, COMPANY.enrichment, COMPANY.inputs, *COMPANY.lists.values()}
    assert appended.isdisjoint(t for (t,) in staged)
    # and the next run has nothing to do
    assert (
        shared.run(records_per_job=10, concurrent_jobs=2, records_per_load=15)["records_submitted"]
        == 0
    )


def test_given_a_row_rejected_then_fixed_back_to_its_old_value_then_its_rejection_goes(
    shared: SharedWarehouse,
) -> None:
    _insert(shared, [(1, "good1.com"), (2, "good2.com")])
    shared.run()
    shared.exec("UPDATE crm.companies SET domain = 'not a domain' WHERE id = 1")
    assert shared.run()["rows_rejected"] == 1
    shared.exec("UPDATE crm.companies SET domain = 'good1.com' WHERE id = 1")

    third = shared.run()

    assert third["rows_rejected"] == 0 and third["records_submitted"] == 0
    assert shared.exec(f"SELECT input_pk FROM enriched.{COMPANY.rejected}") == []
    assert shared.sandbox.usage()["records_billed"] == 2


def test_key_lookups_in_duckdb_find_every_key_whatever_its_characters(tmp_path: Path) -> None:
    """Keys go to DuckDB as one string split in SQL; a key holding the separator must
    still be found (else it would look new, and be paid for again)."""
    pipeline = dlt.pipeline(
        pipeline_name="lookups",
        destination=dlt.destinations.duckdb(str(tmp_path / "out.duckdb")),
        dataset_name="enriched",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    keys = ["plain.com", "odd\x1fkey.com", "", "é.com"]
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = [
        {
            "key": k,
            "status": "matched",
            "finished_at": now,
            "job_id": "job_1",
            "input_pk": str(i),
            "input": "{}",
            "submitted_at": now,
            "attempt": 1,
        }
        for i, k in enumerate(keys)
    ]
    pipeline.run(rows, table_name=COMPANY.outcomes)

    plain = load_known_keys(pipeline, COMPANY, must_exist=True, keys=["plain.com", "é.com", ""])
    odd = load_known_keys(pipeline, COMPANY, must_exist=True, keys=keys)

    assert set(plain.keys) == {"plain.com", "é.com", ""}
    assert set(odd.keys) == set(keys)


@pytest.mark.parametrize("keep_order", [True, False], ids=["insertion-order", "no-order"])
def test_reading_the_input_lets_duckdb_checkpoint_what_loads_meanwhile(
    tmp_path: Path, keep_order: bool
) -> None:
    """A run reads its input while it loads into the same file. A read left open on the
    database makes DuckDB refuse every CHECKPOINT once a load changed a table, and keep
    all that was loaded in memory; the rows still come whole and in key order (also
    with an input column named like DuckDB's own row number)."""
    path, n = tmp_path / "warehouse.duckdb", 300_000
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA crm; CREATE TABLE crm.companies(id INT, rowid VARCHAR)")
    # more than one row group (122,880 rows): DuckDB may then scan them in any order
    con.execute(f"INSERT INTO crm.companies SELECT {n} - range, 'd' || range FROM range({n})")
    con.close()
    config = {"preserve_insertion_order": keep_order}
    destination = dlt.destinations.duckdb(DuckDbCredentials(str(path), global_config=config))
    reader = InputReader(
        InputSpec(destination, "crm", "companies", "id", {"domain": "rowid"}), chunk_size=50_000
    )
    fresh = Freshness("enriched", COMPANY.outcomes, COMPANY.inputs, {})
    loads = dlt.pipeline(
        pipeline_name="loads",
        destination=destination,
        dataset_name="enriched",
        pipelines_dir=str(tmp_path / "pipelines"),
    )
    read: list[str | None] = []
    with loads.sql_client() as client:
        for reads in (reader.candidates(fresh), reader.rows()):
            for i, chunk in enumerate(reads):
                read += [row.pk for row in chunk]
                if i == 1:  # mid-read: a load changes a table, then DuckDB checkpoints
                    loads.run([{"n": i}], table_name="loaded")
                    client.execute_sql("CHECKPOINT")
        left = client.execute_sql("SELECT table_name FROM duckdb_tables() WHERE temporary")
    assert read == [str(pk) for pk in range(1, n + 1)] * 2
    assert left == []  # nothing of the reads stays behind
