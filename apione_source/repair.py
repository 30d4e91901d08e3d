"""A job's rows in the append-only tables exactly once, whatever loaded them twice.

The outcome and list tables only ever gain rows, and a job's rows are always written
together (one collection, or one report of a spent job) into one load package. So they
are loaded with plain ``append``, dlt's fastest path, where a merge would stage and
delete on every load. Without the merge, three schedules could leave a job's rows in
twice; each is taken back out here, on the rare path that causes it:

* **A job collected (or reported) again** because the load that carried it first never
  completed (its package was lost after some of its tables loaded, or failed): the run
  deletes what that load left of the job before it writes the job's rows again
  (:func:`drop_jobs`).
* **A package resumed after a crash** can hold a job that another run has collected and
  loaded since (the package waited on a machine that was down): once it is loaded, the
  job keeps this package's rows only (:func:`repair_load`).
* **A load job that runs twice**: killed after the warehouse committed it and before dlt
  recorded that, it runs again when its package is resumed. :func:`repair_load` keeps one
  row per ``_dlt_id`` of the package where the warehouse has row identity (DuckDB's
  ``rowid``, PostgreSQL's ``ctid``); Snowflake's ``COPY`` (its load history) and BigQuery's
  load jobs (dlt names them after the file) do not load a file twice in the first place.

Every statement is one ``DELETE``: atomic, idempotent, and a crash between two of them
leaves nothing a second run of the same repair would not finish.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from dlt.destinations.exceptions import DatabaseUndefinedRelation

from apione_source.tables import TableNames

logger = logging.getLogger(__name__)

_CHUNK = 100  # job ids per statement


def _col(client: Any, name: str) -> str:
    return str(client.escape_column_name(name))


def _delete(client: Any, target: str, where: str, *args: Any) -> None:
    """``DELETE FROM target WHERE ...``; a table not created yet holds nothing to delete."""
    with contextlib.suppress(DatabaseUndefinedRelation):
        client.execute_sql(f"DELETE FROM {target} WHERE {where}", *args)


def drop_jobs(client: Any, names: TableNames, job_ids: Sequence[str], loads: set[str]) -> None:
    """Delete the rows that ``loads`` (loads that never completed) wrote for ``job_ids``.

    Called before those jobs' rows are written again in another package.

    Args:
        client: An open dlt SQL client of the destination.
        names: The tables of the enrichment type.
        job_ids: The jobs collected or reported again.
        loads: The loads that carried them before.
    """
    if not job_ids or not loads:
        return
    job, load = _col(client, "job_id"), _col(client, "_dlt_load_id")
    load_marks = ", ".join(["%s"] * len(loads))
    for start in range(0, len(job_ids), _CHUNK):
        chunk = list(job_ids[start : start + _CHUNK])
        job_marks = ", ".join(["%s"] * len(chunk))
        for table in names.appended:
            _delete(
                client,
                client.make_qualified_table_name(table),
                f"{job} IN ({job_marks}) AND {load} IN ({load_marks})",
                *chunk,
                *sorted(loads),
            )


def repair_load(client: Any, dialect: str, names: TableNames, load_id: str) -> None:
    """After a resumed package ``load_id`` loaded: its jobs' rows once, all from it.

    Args:
        client: An open dlt SQL client of the destination.
        dialect: The destination type (``duckdb``, ``postgres``...).
        names: The tables of the enrichment type.
        load_id: The package's load id.
    """
    job, load, row = _col(client, "job_id"), _col(client, "_dlt_load_id"), _col(client, "_dlt_id")
    # every job a package carries has rows in the outcomes table
    jobs_of_load = (
        f"SELECT {job} FROM {client.make_qualified_table_name(names.outcomes)} WHERE {load} = %s"
    )
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
        if table != names.runs:
            # the same jobs loaded by another package (collected again meanwhile): this
            # one's rows are complete (its load completed), the other's go
            _delete(
                client, qualified, f"{job} IN ({jobs_of_load}) AND {load} <> %s", load_id, load_id
            )
    logger.info("resumed package %s: each of its jobs' rows is in once", load_id)
