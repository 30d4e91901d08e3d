"""The appended tables' repair on each warehouse: a resumed package whose load jobs ran
twice, holding a job that another package loaded first (:mod:`apione_source.repair`)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import dlt
import pytest

from apione_source.models import EnrichmentType
from apione_source.repair import repair_load
from apione_source.tables import TableNames

NAMES = TableNames("apione_", EnrichmentType.COMPANY)
TAGS = NAMES.lists["tags"]


def _resources(job_id: str) -> list[Any]:
    outcomes = [{"outcome_id": f"{job_id}-{i}", "job_id": job_id, "key": f"k{i}"} for i in range(3)]
    tags = [{"key": "k0", "job_id": job_id, "idx": i, "value": f"t{i}"} for i in range(2)]
    return [
        dlt.resource(outcomes, name=NAMES.outcomes, write_disposition="append"),
        dlt.resource(tags, name=TAGS, write_disposition="append"),
        dlt.resource([{"type": "company"}], name=NAMES.runs, write_disposition="append"),
    ]


@pytest.mark.parametrize("warehouse_name", ["duckdb", "postgres", "snowflake"])
def test_given_a_resumed_package_loaded_twice_when_repaired_then_its_jobs_rows_once_from_it(
    warehouse_name: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    warehouse = request.getfixturevalue(f"{warehouse_name}_warehouse")
    if warehouse.activate is not None:
        warehouse.activate(monkeypatch)
    if warehouse.kind == "postgres":
        # dlt's UNIQUE on _dlt_id (create_indexes) fails a load job that runs twice
        # instead: the ctid path is for the tables created without it
        warehouse.destination_kwargs["create_indexes"] = False
    pipeline = dlt.pipeline(
        "repair",
        destination=warehouse.destination(),
        dataset_name=f"repair_{uuid.uuid4().hex[:8]}",
        pipelines_dir=str(tmp_path / "pipelines"),
    )

    def load(job_id: str) -> str:
        return str(pipeline.run(_resources(job_id), **warehouse.run_kwargs).loads_ids[0])

    earlier = load("job_1")  # another run collected job_1 again and loaded it first
    resumed = load("job_1")  # the package that waited on a machine that was down
    other = load("job_2")
    with pipeline.sql_client() as client:
        col = client.escape_column_name

        def rows(table: str) -> list[tuple[Any, ...]]:
            sql = (
                f"SELECT {col('job_id') if table != NAMES.runs else col('type')}, "
                f"{col('_dlt_load_id')} FROM {client.make_qualified_table_name(table)}"
            )
            with client.execute_query(sql) as cur:
                return sorted(tuple(r) for r in cur.fetchall())

        # its load jobs ran twice: every row of the package is in twice
        for table in (NAMES.outcomes, TAGS, NAMES.runs):
            qualified = client.make_qualified_table_name(table)
            client.execute_sql(
                f"INSERT INTO {qualified} SELECT * FROM {qualified} WHERE "
                f"{col('_dlt_load_id')} = %s",
                resumed,
            )
        assert len(rows(NAMES.outcomes)) == 12

        repair_load(client, warehouse.kind, NAMES, resumed)
        repair_load(client, warehouse.kind, NAMES, resumed)  # idempotent

        assert rows(NAMES.outcomes) == sorted([("job_1", resumed)] * 3 + [("job_2", other)] * 3)
        assert rows(TAGS) == sorted([("job_1", resumed)] * 2 + [("job_2", other)] * 2)
        assert rows(NAMES.runs) == sorted(
            [("company", earlier), ("company", resumed), ("company", other)]
        )
