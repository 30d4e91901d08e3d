"""A job's rows in the append-only tables exactly once, whatever loaded them twice.

The outcome and list tables only ever gain rows, and a job's rows are always written
together (one collection, or one report of a spent job) into one load package. So they
are loaded with plain ``append``, dlt's fastest path, where a merge would stage and
delete on every load. Without the merge, three schedules could leave a job's rows in
twice; each is taken back out here, on the rare path that causes it:

* **A job collected (or reported) again** because the load that carried it first never
  completed (its package was lost after some of its tables loaded, or failed): the run
  deletes what other loads hold of the rows before it writes them again
  (:func:`drop_rewritten`).
* **A package resumed after a crash** can hold a job that another run has collected and
  loaded since (the package waited on a machine that was down): once it is loaded, the
  job keeps this package's rows only (:func:`repair_load`).
* **A load job that runs twice**: killed after the warehouse committed it and before dlt
  recorded that, it runs again when its package is resumed. :func:`repair_load` keeps one
  row per ``_dlt_id`` of the package: by the warehouse's row identity (DuckDB's ``rowid``,
  PostgreSQL's ``ctid``), or else by rewriting the copied rows once in a transaction.
  BigQuery needs neither: dlt names its load jobs after the file and restores a job that
  exists instead of loading the file again.

Every change is one ``DELETE`` (or one transaction): atomic, idempotent, and a crash
between two of them leaves nothing a second run of the same repair would not finish.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from dlt.destinations.exceptions import DatabaseUndefinedRelation

from apione_source.tables import TableNames

logger = logging.getLogger(__name__)

_CHUNK = 100  # ids per statement


def _col(client: Any, name: str) -> str:
    return str(client.escape_column_name(name))


def _delete(client: Any, target: str, where: str, *args: Any) -> None:
    """``DELETE FROM target WHERE ...``; a table not created yet holds nothing to delete."""
    with contextlib.suppress(DatabaseUndefinedRelation):
        client.execute_sql(f"DELETE FROM {target} WHERE {where}", *args)


def drop_rewritten(
    client: Any, names: TableNames, job_id: str, outcome_ids: Sequence[str], load_id: str
) -> None:
    """Delete what other loads hold of the rows about to go out again in ``load_id``.

    Called before a job collected or reported again writes its rows: a load that never
    completed may have left some of them, as may an input row that reused the job's
    outcome meanwhile (the same ``outcome_id``: the last one written is the one kept, as a
    merge would).

    Args:
        client: An open dlt SQL client of the destination.
        names: The tables of the enrichment type.
        job_id: The job collected or reported again: its list elements.
        outcome_ids: The outcome rows about to be written.
        load_id: The package they go into.
    """
    job, load = _col(client, "job_id"), _col(client, "_dlt_load_id")
    for table in names.lists.values():
        _delete(
            client,
            client.make_qualified_table_name(table),
            f"{job} = %s AND {load} <> %s",
            job_id,
            load_id,
        )
    outcome = _col(client, "outcome_id")
    for start in range(0, len(outcome_ids), _CHUNK):
        chunk = list(outcome_ids[start : start + _CHUNK])
        _delete(
            client,
            client.make_qualified_table_name(names.outcomes),
            f"{outcome} IN ({', '.join(['%s'] * len(chunk))}) AND {load} <> %s",
            *chunk,
            load_id,
        )


def _rewrite_copies(client: Any, table: str, load_id: str) -> None:
    """Where rows have no identity (Snowflake...): rows of ``load_id`` copied, once each.

    The copies are alike, so they are replaced by one of each in one transaction.
    """
    load, row = _col(client, "_dlt_load_id"), _col(client, "_dlt_id")
    qualified = client.make_qualified_table_name(table)
    copied = f"SELECT {row} FROM {qualified} WHERE {load} = %s GROUP BY {row} HAVING count(*) > 1"
    try:
        with client.execute_query(f"SELECT count(*) FROM ({copied}) c", load_id) as cur:
            if not cur.fetchall()[0][0]:
                return
    except DatabaseUndefinedRelation:
        return
    once = client.make_qualified_table_name(f"_apione_once_{table}"[:120])
    client.execute_sql(f"DROP TABLE IF EXISTS {once}")
    client.execute_sql(
        f"CREATE TABLE {once} AS SELECT DISTINCT * FROM {qualified} "
        f"WHERE {load} = %s AND {row} IN ({copied})",
        load_id,
        load_id,
    )
    with client.begin_transaction():
        client.execute_sql(
            f"DELETE FROM {qualified} WHERE {load} = %s AND {row} IN (SELECT {row} FROM {once})",
            load_id,
        )
        client.execute_sql(f"INSERT INTO {qualified} SELECT * FROM {once}")
    client.execute_sql(f"DROP TABLE {once}")


def repair_load(client: Any, dialect: str, names: TableNames, load_id: str) -> None:
    """After a resumed package ``load_id`` loaded: its jobs' rows once, all from it.

    Args:
        client: An open dlt SQL client of the destination.
        dialect: The destination type (``duckdb``, ``postgres``...).
        names: The tables of the enrichment type.
        load_id: The package's load id.
    """
    load, row = _col(client, "_dlt_load_id"), _col(client, "_dlt_id")
    for table in [*names.appended, names.runs]:
        qualified = client.make_qualified_table_name(table)
        # a load job that ran twice: one row per _dlt_id (all copies are alike)
        if dialect in ("duckdb", "motherduck"):
            _delete(
                client,
                qualified,
                f"{load} = %s AND rowid NOT IN "
                f"(SELECT min(rowid) FROM {qualified} WHERE {load} = %s GROUP BY {row})",
                load_id,
                load_id,
            )
        elif dialect == "postgres":
            _delete(
                client,
                f"{qualified} AS a USING {qualified} AS b",
                f"a.{load} = %s AND b.{load} = %s AND a.{row} = b.{row} AND a.ctid > b.ctid",
                load_id,
                load_id,
            )
        elif dialect != "bigquery":  # BigQuery restores a load job by its id: never twice
            _rewrite_copies(client, table, load_id)
        if table != names.runs:
            # The same rows loaded by another package (its jobs collected again meanwhile):
            # this one's are complete (its load completed), the other's go. Outcomes by
            # their id (rows reusing a job's outcome are the job's too); a list's elements
            # by job, as only a collection writes them.
            key = _col(client, "outcome_id" if table == names.outcomes else "job_id")
            _delete(
                client,
                qualified,
                f"{key} IN (SELECT {key} FROM {qualified} WHERE {load} = %s) AND {load} <> %s",
                load_id,
                load_id,
            )
    logger.info("resumed package %s: each of its jobs' rows is in once", load_id)
