"""Settling the appended tables (DuckDB): rows a crash or a late package wrote twice go,
the last completed load's rows stay, and nothing else is touched.

The tables are built by hand in a real DuckDB file, as dlt leaves them: ``_dlt_loads`` and
appended rows carrying ``_dlt_load_id`` and ``_dlt_id``. The schedules that produce them
end to end are in ``test_crash_matrix.py`` (a load job run twice) and
``tests/warehouses/scenarios.py`` (a package loaded after its jobs were collected again).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dlt
import pytest

from apione_source.settle import settle
from tests.e2e import COMPANY

SCHEMA = "apione"
OUT = "<outcomes>"
TAGS = "<tags>"
ENRICH = "<enrichment>"
SETTLED = "<settled>"
LOADS = "<loads>"


class Db:
    """A dlt SQL client whose statements name the tables as ``<outcomes>``, ``<tags>``..."""

    def __init__(self, client: Any, dialect: str) -> None:
        self.client, self.dialect = client, dialect
        q = client.make_qualified_table_name
        self.names = {
            OUT: q(COMPANY.outcomes),
            TAGS: q(COMPANY.lists["tags"]),
            ENRICH: q(COMPANY.enrichment),
            SETTLED: q(COMPANY.settled),
            LOADS: q("_dlt_loads"),
        }

    def _sql(self, sql: str) -> str:
        for placeholder, name in self.names.items():
            sql = sql.replace(placeholder, name)
        return sql

    def execute_sql(self, sql: str, *args: Any) -> None:
        self.client.execute_sql(self._sql(sql), *args)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.client.execute_query(self._sql(sql)) as cur:
            return sorted(tuple(r) for r in cur.fetchall())


def open_db(destination: Any, dataset: str, pipelines_dir: Path, dialect: str) -> Iterator[Db]:
    """A fresh dataset of ``destination``, as a :class:`Db` (dropped afterwards)."""
    pipeline = dlt.pipeline(
        "settle", destination=destination, dataset_name=dataset, pipelines_dir=str(pipelines_dir)
    )
    with pipeline.sql_client() as opened:
        opened.create_dataset()
        try:
            yield Db(opened, dialect)
        finally:
            opened.drop_dataset()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Db]:
    destination = dlt.destinations.duckdb(str(tmp_path / "w.duckdb"))
    yield from open_db(destination, "enriched", tmp_path / "pipelines", "duckdb")


def _tables(client: Db) -> None:
    client.execute_sql(
        f"CREATE TABLE {LOADS} (load_id VARCHAR, schema_name VARCHAR, "
        "status BIGINT, inserted_at TIMESTAMPTZ, schema_version_hash VARCHAR)"
    )
    client.execute_sql(
        f"CREATE TABLE {OUT} (outcome_id VARCHAR, job_id VARCHAR, status VARCHAR, "
        "_dlt_load_id VARCHAR, _dlt_id VARCHAR)"
    )
    client.execute_sql(
        f"CREATE TABLE {TAGS} (key VARCHAR, job_id VARCHAR, idx BIGINT, value VARCHAR, "
        "_dlt_load_id VARCHAR, _dlt_id VARCHAR)"
    )
    client.execute_sql(
        f"CREATE TABLE {ENRICH} (key VARCHAR, name VARCHAR, _dlt_load_id VARCHAR, _dlt_id VARCHAR)"
    )
    assert _settle(client) == 0  # a run's start, before it appends anything


def _completed(client: Db, load_id: str, day: int, schema: str = SCHEMA) -> None:
    client.execute_sql(
        f"INSERT INTO {LOADS} VALUES (%s, %s, 0, %s, '')",
        load_id,
        schema,
        datetime(2026, 10, 1, tzinfo=timezone.utc) + timedelta(days=day),
    )


def _outcome(client: Db, outcome_id: str, job_id: str, status: str, load_id: str) -> None:
    client.execute_sql(
        f"INSERT INTO {OUT} VALUES (%s, %s, %s, %s, %s)",
        outcome_id,
        job_id,
        status,
        load_id,
        f"{load_id}-{outcome_id}",
    )


def _tags(client: Db, job_id: str, load_id: str, n: int = 2) -> None:
    for idx in range(n):
        client.execute_sql(
            f"INSERT INTO {TAGS} VALUES ('k.com', %s, %s, %s, %s, %s)",
            job_id,
            idx,
            f"tag{idx}",
            load_id,
            f"{load_id}-{job_id}-{idx}",
        )


def _rows(client: Db, sql: str) -> list[tuple[Any, ...]]:
    return client.rows(sql)


def _settle(client: Db, unfinished: bool = False) -> int:
    return settle(client.client, client.dialect, COMPANY, SCHEMA, unfinished=unfinished)


def test_before_any_load_there_is_nothing_to_settle(client: Db) -> None:
    assert _settle(client) == 0


def test_a_load_job_run_twice_leaves_each_row_once_and_a_load_is_settled_once(
    client: Db,
) -> None:
    _tables(client)
    _completed(client, "L1", 1)
    for _ in range(2):  # dlt ran the load job again after a kill: the same rows twice
        _outcome(client, "o1", "j1", "matched", "L1")
        _outcome(client, "o2", "j1", "not_found", "L1")
        _tags(client, "j1", "L1")
    assert _settle(client) == 4
    assert _rows(client, f"SELECT outcome_id, status FROM {OUT}") == [
        ("o1", "matched"),
        ("o2", "not_found"),
    ]
    assert _rows(client, f"SELECT idx FROM {TAGS}") == [(0,), (1,)]
    # settled: a second pass looks at nothing, even rows put in twice since
    _outcome(client, "o1", "j1", "matched", "L1")
    assert _settle(client) == 0
    assert len(_rows(client, f"SELECT * FROM {OUT}")) == 3


def test_a_job_in_two_completed_loads_keeps_the_rows_of_the_last_completed(client: Db) -> None:
    _tables(client)
    _completed(client, "L1", 1)
    _outcome(client, "o1", "j1", "first", "L1")
    _outcome(client, "o9", "j9", "only in L1", "L1")
    _tags(client, "j1", "L1")
    assert _settle(client) == 0
    _completed(client, "L2", 2)  # the job collected again, loaded later
    _outcome(client, "o1", "j1", "second", "L2")
    _tags(client, "j1", "L2")
    assert _settle(client) == 3
    assert _rows(client, f"SELECT outcome_id, status, _dlt_load_id FROM {OUT}") == [
        ("o1", "second", "L2"),
        ("o9", "only in L1", "L1"),
    ]
    assert _rows(client, f"SELECT DISTINCT _dlt_load_id FROM {TAGS}") == [("L2",)]


@pytest.mark.parametrize("scd2", [False, True])
def test_a_renewed_key_keeps_the_last_completed_loads_row_and_is_no_crash_to_warn_of(
    client: Db, caplog: pytest.LogCaptureFixture, scd2: bool
) -> None:
    _tables(client)
    for load_id, day, name in (("L1", 1, "old"), ("L2", 2, "new")):
        _completed(client, load_id, day)
        client.execute_sql(
            f"INSERT INTO {ENRICH} VALUES ('k.com', %s, %s, %s), ('j.com', 'j', %s, 'j')",
            name,
            load_id,
            load_id,
            load_id,
        )
        with caplog.at_level("WARNING", logger="apione_source"):
            settled = settle(client.client, client.dialect, COMPANY, SCHEMA, scd2=scd2)
    # dlt's scd2 keeps every version (and retires the old one itself): never settled
    assert settled == (0 if scd2 else 2)
    rows = client.rows(f"SELECT key, name FROM {ENRICH}")
    assert rows == (
        [("j.com", "j")] * 2 + [("k.com", "new"), ("k.com", "old")]
        if scd2
        else [("j.com", "j"), ("k.com", "new")]
    )
    assert "written twice" not in caplog.text  # renewing a key is no crash
    if scd2:
        return
    # a copy in a renewed table (a load job dlt ran twice) is a crash's all the same
    _completed(client, "L3", 3)
    for _ in range(2):
        client.execute_sql(f"INSERT INTO {ENRICH} VALUES ('k.com', 'newer', 'L3', 'c')")
    with caplog.at_level("WARNING", logger="apione_source"):
        assert settle(client.client, client.dialect, COMPANY, SCHEMA) == 2
    assert "1 row(s) written twice" in caplog.text
    assert client.rows(f"SELECT name FROM {ENRICH} WHERE key = 'k.com'") == [("newer",)]


def test_an_abandoned_packages_renewed_row_gives_way_at_a_runs_start(client: Db) -> None:
    """A package killed midway and lost (a wiped pipelines dir) renewed a key: its row goes
    where a completed load holds the key, as the merge that never ran would have left it.
    (Its jobs are collected again, and their load renews the key once more.)"""
    _tables(client)
    _completed(client, "L1", 1)
    sql = f"INSERT INTO {ENRICH} VALUES ('k.com', %s, %s, %s)"
    client.execute_sql(sql, "old", "L1", "a")
    assert _settle(client) == 0
    client.execute_sql(sql, "lost", "L2", "b")  # L2 never completes

    assert _settle(client) == 0  # after a load: only completed loads are looked at
    assert _settle(client, unfinished=True) == 1  # a run's start
    assert client.rows(f"SELECT name FROM {ENRICH}") == [("old",)]


def test_a_load_settled_late_does_not_win_over_one_that_completed_after_it(
    client: Db,
) -> None:
    """L1 completed before L2 but is settled after it (two workers): L2's rows stay."""
    _tables(client)
    _completed(client, "L2", 2)
    _outcome(client, "o1", "j1", "second", "L2")
    assert _settle(client) == 0
    _completed(client, "L1", 1)
    _outcome(client, "o1", "j1", "first", "L1")
    assert _settle(client) == 1
    assert _rows(client, f"SELECT status FROM {OUT}") == [("second",)]


def test_rows_of_a_load_that_never_completed_give_way_and_only_where_one_did(
    client: Db,
) -> None:
    _tables(client)
    # a package that loaded its outcomes and died: its jobs were collected again
    _outcome(client, "o1", "j1", "from the dead package", "DEAD")
    _outcome(client, "o5", "j5", "nobody else has it", "DEAD")
    _tags(client, "j1", "DEAD")
    _completed(client, "L1", 1)
    _outcome(client, "o1", "j1", "collected again", "L1")
    _tags(client, "j1", "L1")
    assert _settle(client) == 3
    assert _rows(client, f"SELECT outcome_id, status FROM {OUT}") == [
        ("o1", "collected again"),
        ("o5", "nobody else has it"),
    ]
    assert _rows(client, f"SELECT DISTINCT _dlt_load_id FROM {TAGS}") == [("L1",)]


def test_a_scopes_first_settle_takes_what_loaded_before_as_settled_once_a_look_agrees(
    client: Db,
) -> None:
    _tables(client)  # settles once: the scope is known from here on
    client.execute_sql(f"DELETE FROM {SETTLED}")  # as before an upgrade
    _completed(client, "MERGED", 1)  # loaded by a version that merged: nothing twice
    _outcome(client, "o1", "j1", "x", "MERGED")
    assert _settle(client) == 0
    assert _rows(client, f"SELECT load_id FROM {SETTLED}") == [("",), ("MERGED",)]
    # the marks dropped after an appended load put a row in twice: the look finds it
    _completed(client, "L2", 2)
    _outcome(client, "o2", "j2", "x", "L2")
    _outcome(client, "o2", "j2", "x", "L2")
    client.execute_sql(f"DELETE FROM {SETTLED}")
    assert _settle(client) == 1
    assert _rows(client, f"SELECT outcome_id FROM {OUT}") == [("o1",), ("o2",)]


def test_rows_a_dead_package_wrote_after_its_twin_settled_go_at_the_next_start(
    client: Db,
) -> None:
    _tables(client)
    _completed(client, "L1", 1)
    _outcome(client, "o1", "j1", "collected again", "L1")
    assert _settle(client) == 0
    # the late package resumed, loaded its outcomes, and was killed for good
    _outcome(client, "o1", "j1", "late", "DEAD")
    _outcome(client, "o7", "j7", "late, and nobody else has it", "DEAD")
    assert _settle(client) == 0  # after a load: only completed loads are looked at
    assert _settle(client, unfinished=True) == 1  # a run's start
    assert _rows(client, f"SELECT outcome_id, status FROM {OUT}") == [
        ("o1", "collected again"),
        ("o7", "late, and nobody else has it"),
    ]


def test_the_horizon_follows_this_scopes_own_loads(client: Db) -> None:
    _tables(client)
    _completed(client, "OURS", 1)
    _outcome(client, "o1", "j1", "x", "OURS")
    _outcome(client, "o1", "j1", "x", "OURS")
    # another source loads the dataset daily: our month-old load is still settled
    _completed(client, "OTHER", 45, schema="another_source")
    _outcome(client, "o2", "j2", "x", "OTHER")
    _outcome(client, "o2", "j2", "x", "OTHER")
    assert _settle(client) == 1
    assert len(_rows(client, f"SELECT * FROM {OUT} WHERE _dlt_load_id = 'OTHER'")) == 2
    # a load completing (by its clock) over 30 days before our newest settled one is not
    # looked at, and marks that old are forgotten
    _completed(client, "NEW", 60)
    assert _settle(client) == 0
    _completed(client, "SKEWED", 20)
    _outcome(client, "o3", "j3", "x", "SKEWED")
    _outcome(client, "o3", "j3", "x", "SKEWED")
    assert _settle(client) == 0
    settled = _rows(client, f"SELECT load_id FROM {SETTLED}")
    assert settled == [("",), ("NEW",)]
