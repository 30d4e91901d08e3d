"""The appended tables hold each row once: what a crash or a late package wrote twice goes.

The outcome and list tables only gain rows, so where the destination lets the connector
take a copy out again (DuckDB, PostgreSQL: rows have an identity there) they are loaded
with plain ``append``, dlt's fastest path, where a merge would stage every package and
delete before it inserts. On DuckDB a run that settles after each of its loads
(``run_enrichment``) appends the enrichment and input tables too: there a later load
*renews* a key's row, and the settle deletes the older row as the merge would have. A
merge of those wide rows was a 1M run's memory peak (it stages the package's rows and
numbers them in a window to drop duplicates), and no other process can read a DuckDB file
while the run holds it, so none sees the old row next to the new one. Two schedules can
also leave rows twice, and a merge would have dropped both:

* **A load job that runs twice.** Killed after the warehouse committed it and before dlt
  recorded that, it runs again when the package is resumed: the package holds some rows
  twice, alike down to their ``_dlt_id``.
* **The same rows in two packages.** A job's results are collected again when the load
  that carried them did not complete (its package was lost after part of it loaded, or it
  waited on a machine that was down and loaded late).

:func:`settle` looks at the keys that completed loads carry (an outcome's ``outcome_id``;
a list's ``job_id``, whose elements always travel together) and keeps, for each, the rows
of the *last completed load* that holds it, as a merge's last write would. It deletes a
row only where a row of its key is in a completed load that its own load did not complete
after (or its own load never completed), so the winner's rows are never deleted; on
PostgreSQL settles take a lock, so two workers settling at once see each other's
deletes. Copies within a load keep one row per ``_dlt_id``.

Every completed load is settled once (``_<prefix>settled`` records which, for 30 days
after the scope's newest). The run settles at its start and after each of its loads, so a
package that something else loaded (a plain ``pipeline.run()``) is settled by the next
run. At its start it also looks for rows of loads that never completed (a package killed
midway, then abandoned) whose keys a completed load holds. A scope's first settle (a new
dataset, or an upgrade from a version that merged these tables) takes the loads before it
as settled once a look over the tables finds nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from apione_source.history import LOADS_TABLE
from apione_source.tables import TableNames

logger = logging.getLogger(__name__)

#: Destinations whose appended tables can be settled: a row's identity (DuckDB's
#: ``rowid``, PostgreSQL's ``ctid``) tells two copies of it apart. Elsewhere the outcome
#: and list tables are merged.
APPEND_DIALECTS = ("duckdb", "postgres")
#: Where the renewed tables are appended too (see the module docstring). On PostgreSQL a
#: reader could see a key's old row next to its new one until the settle; the merge runs
#: in the server there, outside the run's memory.
RENEW_DIALECTS = ("duckdb",)
# Marks are kept, and completed loads looked at, this far back from the scope's newest
# settled load: a load that completed earlier would have had to escape every settle since.
HORIZON = "30 days"
_CHUNK = 200  # load ids per IN (...)
LOCK_TIMEOUT = "10min"  # PostgreSQL: how long a settle waits for another worker's
_FIRST = ""  # the mark a scope's first settle leaves: what loaded before it was merged


def appends(dialect: str) -> bool:
    """True where the outcome and list tables are appended (and settled) on ``dialect``."""
    return dialect in APPEND_DIALECTS


def appended_tables(names: TableNames, dialect: str, scd2: bool) -> dict[str, str]:
    """The tables of ``names`` appended on ``dialect``, each with the column kept once.

    The renewed ones (:func:`renewed_tables`) only by a run that settles after each of
    its loads; every settle looks at them.

    Args:
        names: The enrichment type's tables.
        dialect: The destination's dialect; none are appended outside
            :data:`APPEND_DIALECTS`, the renewed ones only in :data:`RENEW_DIALECTS`.
        scd2: The enrichment table keeps a history (dlt's ``scd2``): merged, never settled.
    """
    if dialect not in APPEND_DIALECTS:
        return {}
    tables = {names.outcomes: "outcome_id", **dict.fromkeys(names.lists.values(), "job_id")}
    if dialect in RENEW_DIALECTS:
        tables.update(renewed_tables(names))
        if scd2:
            del tables[names.enrichment]
    return tables


def renewed_tables(names: TableNames) -> dict[str, str]:
    """Tables where a later load's row for a key replaces the older one as a rule."""
    return {names.enrichment: "key", names.inputs: "input_pk"}


def settle(
    client: Any,
    dialect: str,
    names: TableNames,
    schema_name: str,
    *,
    scd2: bool = False,
    unfinished: bool = False,
) -> int:
    """Settle every completed load of ``schema_name`` that is not settled yet.

    Args:
        client: An open dlt SQL client of the destination (autocommit).
        dialect: ``duckdb`` or ``postgres``.
        names: The enrichment type's tables.
        schema_name: The dlt schema whose loads carry these tables.
        scd2: The enrichment table keeps a history: it is not settled.
        unfinished: Also settle the keys of loads that never completed (a scan of each
            appended table's load ids: once per run, at its start).

    Returns:
        How many rows were deleted: written twice, or renewed by a later load.
    """
    q = _Sql(client, names)
    with q.locked(dialect):
        client.execute_sql(
            f"CREATE TABLE IF NOT EXISTS {q.marks} ({q.col('scope')} TEXT, {q.col('load_id')} TEXT)"
        )
        # Which tables exist, asked without an error: on PostgreSQL dlt resets the
        # connection after a failed statement, which would drop the lock.
        present = q.present_tables()
        if LOADS_TABLE not in present:
            return 0  # no load completed yet
        # the renewed tables too: a plain run merges them, and then holds each key once
        appended = appended_tables(names, dialect, scd2)
        tables = {t: k for t, k in appended.items() if t in present}
        if not q.column(f"SELECT 1 FROM {q.marks} WHERE {q.col('scope')} = %s LIMIT 1", q.scope):
            # This scope's first settle. The run appends only after it, so the loads that
            # completed before were merged: settled, once a look finds nothing twice (it
            # would, were the marks dropped after appended loads).
            if not any(q.has_twice(t, k) for t, k in tables.items()):
                q.mark_first(schema_name)
                return 0
            q.mark([_FIRST])  # and every completed load is settled below
        renewed = renewed_tables(names)
        twice = superseded = 0  # rows written twice; rows a later load renewed, as a rule

        def settle_loads(table: str, key: str, load_ids: list[str]) -> None:
            nonlocal twice, superseded
            older, copies = _settle_table(q, dialect, table, key, load_ids)
            twice += copies
            if table in renewed:
                superseded += older
            else:
                twice += older

        if unfinished:
            for table, key in tables.items():
                settle_loads(table, key, q.unfinished_loads(table))
        pending = q.pending_loads(schema_name)
        for start in range(0, len(pending), _CHUNK):
            chunk = pending[start : start + _CHUNK]
            for table, key in tables.items():
                settle_loads(table, key, chunk)
            q.mark(chunk)
        if pending:
            q.forget_old_marks()
    if twice:
        logger.warning("%d row(s) written twice by a crash or a late package were taken out", twice)
    if superseded:
        logger.debug("%d row(s) renewed by a later load were taken out", superseded)
    return twice + superseded


def _settle_table(
    q: _Sql, dialect: str, table: str, key: str, load_ids: list[str]
) -> tuple[int, int]:
    """Settle ``load_ids`` in ``table`` (rows kept once by ``key``).

    Returns:
        The rows deleted: those another completed load holds the key of, then copies.
    """
    if not load_ids:
        return 0, 0
    t = q.client.make_qualified_table_name(table)
    k, lid, rid = q.col(key), q.col("_dlt_load_id"), q.col("_dlt_id")
    marks = ", ".join(["%s"] * len(load_ids))
    # keys of these loads that other loads hold too: none in a table that only gains rows,
    # unless something went wrong; a renewed table's keys enriched again
    twice = (
        f"SELECT {k} FROM {t} WHERE {k} IN (SELECT {k} FROM {t} WHERE {lid} IN ({marks}))"
        f" GROUP BY {k} HAVING count(DISTINCT {lid}) > 1"
    )
    if not q.column(f"SELECT count(*) FROM ({twice}) d", *load_ids)[0]:
        twice = ""
    older = copies = 0
    if twice:
        loads, load_id = q.loads, q.col("load_id")
        status, at = q.col("status"), q.col("inserted_at")
        # A row goes where a row of its key is in a completed load that its own load did
        # not complete after: the last completed load's rows are never deleted.
        older = q.delete(
            f"{t} AS x WHERE x.{k} IN ({twice}) AND EXISTS ("
            f"SELECT 1 FROM {t} o JOIN {loads} lo ON lo.{load_id} = o.{lid}"
            f" WHERE lo.{status} = 0 AND o.{k} = x.{k} AND o.{lid} <> x.{lid}"
            f" AND NOT EXISTS (SELECT 1 FROM {loads} lx WHERE lx.{status} = 0"
            f" AND lx.{load_id} = x.{lid} AND (lx.{at} > lo.{at}"
            f" OR (lx.{at} = lo.{at} AND lx.{load_id} > lo.{load_id}))))",
            *load_ids,
        )
    # a load job that ran twice: one row per _dlt_id (its copies are alike)
    copied = q.column(
        f"SELECT {lid} FROM {t} WHERE {lid} IN ({marks}) GROUP BY {lid}"
        f" HAVING count(*) > count(DISTINCT {rid})",
        *load_ids,
    )
    for copy_of in copied:
        if dialect == "postgres":
            where = (
                f"{t} AS a USING {t} AS b WHERE a.{lid} = %s AND b.{lid} = %s"
                f" AND a.{rid} = b.{rid} AND a.ctid > b.ctid"
            )
        else:
            where = (
                f"{t} WHERE {lid} = %s AND rowid NOT IN"
                f" (SELECT min(rowid) FROM {t} WHERE {lid} = %s GROUP BY {rid})"
            )
        copies += q.delete(where, copy_of, copy_of)
    return older, copies


class _Sql:
    """The statements :func:`settle` needs, over a dlt SQL client, for one scope."""

    def __init__(self, client: Any, names: TableNames) -> None:
        self.client = client
        self.scope = names.outcomes
        self.marks = client.make_qualified_table_name(names.settled)
        self.loads = client.make_qualified_table_name(LOADS_TABLE)

    def col(self, name: str) -> str:
        return str(self.client.escape_column_name(name))

    def column(self, sql: str, *args: Any) -> list[Any]:
        with self.client.execute_query(sql, *args) as cur:
            return [row[0] for row in cur.fetchall()]

    def delete(self, where: str, *args: Any) -> int:
        """``DELETE FROM <where>``; returns how many rows it deleted."""
        return len(self.column(f"DELETE FROM {where} RETURNING 1", *args))

    @contextmanager
    def locked(self, dialect: str) -> Iterator[None]:
        """PostgreSQL: one settle of the scope at a time, across workers.

        Without it two settles could each see the other's winner as a loser (a load that
        completed while the other's delete ran) and delete both. DuckDB has one writer.
        A settle waits at most :data:`LOCK_TIMEOUT` for another, then fails.
        """
        if dialect != "postgres":
            yield
            return
        key = f"apione-settle:{self.marks}:{self.scope}"
        self.client.execute_sql(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        try:
            self.client.execute_sql("SELECT pg_advisory_lock(hashtext(%s))", key)
        finally:
            self.client.execute_sql("RESET lock_timeout")
        try:
            yield
        finally:
            self.client.execute_sql("SELECT pg_advisory_unlock(hashtext(%s))", key)

    def present_tables(self) -> set[str]:
        """The tables of the dataset."""
        with self.client.execute_query(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_catalog = current_database() AND table_schema = %s",
            self.client.dataset_name,
        ) as cur:
            return {row[0] for row in cur.fetchall()}

    def has_twice(self, table: str, key: str) -> bool:
        """Whether any key of ``table`` is in two loads, or any row twice in one."""
        t = self.client.make_qualified_table_name(table)
        k, lid, rid = self.col(key), self.col("_dlt_load_id"), self.col("_dlt_id")
        return bool(
            self.column(f"SELECT 1 FROM {t} GROUP BY {k} HAVING count(DISTINCT {lid}) > 1 LIMIT 1")
            or self.column(f"SELECT 1 FROM {t} GROUP BY {lid}, {rid} HAVING count(*) > 1 LIMIT 1")
        )

    def _since(self) -> str:
        """The oldest completion time still looked at (NULL before any settled load)."""
        lid, at, scope = self.col("load_id"), self.col("inserted_at"), self.col("scope")
        return (
            f"(SELECT max(l.{at}) FROM {self.loads} l JOIN {self.marks} s"
            f" ON s.{lid} = l.{lid} WHERE s.{scope} = %s) - INTERVAL '{HORIZON}'"
        )

    def pending_loads(self, schema_name: str) -> list[str]:
        """Completed loads of ``schema_name`` not settled yet, oldest first."""
        lid, at, scope = self.col("load_id"), self.col("inserted_at"), self.col("scope")
        since = self._since()
        return self.column(
            f"SELECT l.{lid} FROM {self.loads} l WHERE l.{self.col('status')} = 0"
            f" AND l.{self.col('schema_name')} = %s"
            f" AND (l.{at} >= {since} OR {since} IS NULL) AND NOT EXISTS (SELECT 1"
            f" FROM {self.marks} s WHERE s.{scope} = %s AND s.{lid} = l.{lid})"
            f" ORDER BY l.{at}, l.{lid}",
            schema_name,
            self.scope,
            self.scope,
            self.scope,
        )

    def unfinished_loads(self, table: str) -> list[str]:
        """Loads that put rows into ``table`` and never completed."""
        lid, load_id = self.col("_dlt_load_id"), self.col("load_id")
        return self.column(
            f"SELECT DISTINCT t.{lid} FROM {self.client.make_qualified_table_name(table)} t"
            f" WHERE NOT EXISTS (SELECT 1 FROM {self.loads} l"
            f" WHERE l.{load_id} = t.{lid} AND l.{self.col('status')} = 0)"
        )

    def mark(self, load_ids: list[str]) -> None:
        """Record ``load_ids`` as settled (one statement)."""
        rows = ", ".join(["(%s, %s)"] * len(load_ids))
        args = [v for load_id in load_ids for v in (self.scope, load_id)]
        self.client.execute_sql(
            f"INSERT INTO {self.marks} ({self.col('scope')}, {self.col('load_id')}) VALUES {rows}",
            *args,
        )

    def mark_first(self, schema_name: str) -> None:
        """The scope's first settle: every completed load counts as settled."""
        done = self.column(
            f"SELECT {self.col('load_id')} FROM {self.loads}"
            f" WHERE {self.col('status')} = 0 AND {self.col('schema_name')} = %s",
            schema_name,
        )
        for start in range(0, len(done), _CHUNK):
            self.mark(done[start : start + _CHUNK])
        # (a crash midway leaves the loads not marked yet to be settled like any other)
        self.mark([_FIRST])

    def forget_old_marks(self) -> None:
        """Marks of loads past the horizon: never looked at again."""
        lid, scope = self.col("load_id"), self.col("scope")
        self.client.execute_sql(
            f"DELETE FROM {self.marks} WHERE {scope} = %s AND {lid} IN"
            f" (SELECT {lid} FROM {self.loads} WHERE {self.col('inserted_at')} < {self._since()})",
            self.scope,
            self.scope,
        )
