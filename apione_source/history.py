"""What earlier runs recorded: each key's outcome history, and which loads completed.

Read from the destination (the truth that survives a wiped working dir) through the
pipeline's own SQL client. When the input table shares the warehouse with the outcomes
(DuckDB, PostgreSQL), the warehouse itself leaves out the rows with nothing to send
(:meth:`apione_source.reader.InputReader.candidates`) and only the keys of the rows that
come are looked up here. Otherwise the whole outcome history is folded into memory at the
start of the run (about 200 bytes per key).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import dlt
from dlt.destinations.exceptions import DatabaseUndefinedRelation
from dlt.destinations.impl.duckdb.sql_client import DuckDbSqlClient
from dlt.destinations.sql_client import SqlClientBase

from apione_source.tables import FINAL_STATUSES, TableNames

_KEY_SEPARATOR = "\x1f"  # chr(31), the ASCII unit separator: keys with it go as a list

LOADS_TABLE = "_dlt_loads"


@dataclass(slots=True)
class KeyState:
    """What earlier runs recorded for one normalized key."""

    status: str
    finished_at: datetime
    job_id: str | None
    input: Any
    pks: set[str] = field(default_factory=set)
    retries: int = 0  # non-final outcomes since the last final one
    submitted_at: datetime | None = None  # when the job of this outcome was sent


@dataclass(frozen=True)
class Ttls:
    """How long a final outcome stays fresh, by status.

    Attributes:
        matched: ``matched`` and ``invalid`` (ApiOne will say the same again).
        not_found: ``not_found``.
        error: ``error`` (a per-record failure, or a record given up on): short, since
            the cause is usually on ApiOne's side and passes.
    """

    matched: timedelta
    not_found: timedelta
    error: timedelta

    def for_status(self, status: str) -> timedelta:
        """The TTL of a final ``status``."""
        if status in ("matched", "invalid"):
            return self.matched
        return self.error if status == "error" else self.not_found


@dataclass
class KnownKeys:
    """The outcome history of every key, loaded from the destination."""

    keys: dict[str, KeyState] = field(default_factory=dict)

    def is_fresh(self, key: str, now: datetime, ttls: Ttls) -> bool:
        """True if ``key`` has a final outcome younger than its TTL."""
        state = self.keys.get(key)
        if state is None or state.status not in FINAL_STATUSES:
            return False
        return now - state.finished_at < ttls.for_status(state.status)

    def stale(self, now: datetime, ttls: Ttls) -> Iterator[tuple[str, KeyState]]:
        """Keys whose last outcome is no longer fresh."""
        for key, state in self.keys.items():
            if not self.is_fresh(key, now, ttls):
                yield key, state


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


@contextmanager
def _opened(pipeline: dlt.Pipeline, client: SqlClientBase[Any] | None) -> Iterator[Any]:
    if client is not None:
        yield client
    else:
        with pipeline.sql_client() as opened:
            yield opened


def load_known_keys(
    pipeline: dlt.Pipeline,
    names: TableNames,
    *,
    must_exist: bool,
    keys: Sequence[str] | None = None,
    client: SqlClientBase[Any] | None = None,
    chunk_size: int = 50_000,
) -> KnownKeys:
    """Load keys' latest outcome (and their input rows) from the destination.

    Args:
        pipeline: The running pipeline.
        names: Table names.
        must_exist: True once an earlier run loaded outcomes (dlt state says so): then a
            missing table is an error, never "nothing was paid for yet".
        keys: Only these keys, in one query with a list parameter (DuckDB and PostgreSQL,
            the warehouses that decide freshness themselves); None: every key.
        client: An open SQL client of the pipeline's destination to use (one is opened
            otherwise): a run looking keys up chunk by chunk keeps one open.
        chunk_size: Rows fetched per round trip.

    Returns:
        The history; empty before the first outcome was loaded.

    Raises:
        DatabaseUndefinedRelation: The outcomes table is missing though it must exist.
    """
    known = KnownKeys()
    if keys is not None and not keys:
        return known
    try:
        with _opened(pipeline, client) as client:
            cols = ["key", "status", "finished_at", "job_id", "input_pk", "input", "submitted_at"]
            c = {name: client.escape_column_name(name) for name in [*cols, "attempt"]}
            table = client.make_qualified_table_name(names.outcomes)
            with client.execute_query(f"SELECT * FROM {table} WHERE 1 = 0") as cur:
                present = {d[0].lower() for d in cur.description}
            if "submitted_at" not in present:
                # written by a version before outcomes had it; dlt adds it on the next load
                c["submitted_at"] = "CAST(NULL AS TIMESTAMP)"
            # Job order, then attempt: never write order (an old job's report may be
            # written after a newer job's results).
            select = f"SELECT {', '.join(c[n] for n in cols)} FROM {table}"
            order = (
                f" ORDER BY COALESCE({c['submitted_at']}, {c['finished_at']}), {c['attempt']}, "
                f"{c['finished_at']}"
            )
            sql, args = select + order, []  # every key
            if keys is not None:
                where, key_args = _any_key(client, c["key"], list(keys))
                sql, args = f"{select} WHERE {where}{order}", key_args
            with client.execute_query(sql, *args) as cur:
                while batch := cur.fetchmany(chunk_size):
                    for key, status, finished_at, job_id, input_pk, input_, sent in batch:
                        _fold(
                            known,
                            key,
                            status,
                            _aware(finished_at),
                            job_id,
                            input_pk,
                            input_,
                            _aware(sent) if sent is not None else None,
                        )
    except DatabaseUndefinedRelation:
        # Failing open here would pay for every record again: only on a first run.
        if must_exist:
            raise
    return known


def _any_key(client: Any, column: str, keys: list[str]) -> tuple[str, list[Any]]:
    """SQL for "``column`` is one of ``keys``" and its one parameter (4x a parameter per key).

    On DuckDB the keys go as one string split in SQL: DuckDB binds a list parameter
    element by element, 16x slower where numpy is not installed (a DuckDB deployment
    need not have it): 0.6 s per 10,000 keys, a minute of a million-record run.
    """
    if not keys:
        return "1 = 0", []  # (split, an empty string would be the key '')
    if isinstance(client, DuckDbSqlClient) and not any(_KEY_SEPARATOR in k for k in keys):
        return f"{column} = ANY(string_split(%s, chr(31)))", [_KEY_SEPARATOR.join(keys)]
    return f"{column} = ANY(%s)", [keys]


def _fold(
    known: KnownKeys,
    key: str,
    status: str,
    finished_at: datetime,
    job_id: str | None,
    input_pk: str | None,
    input_: Any,
    submitted_at: datetime | None,
) -> None:
    """Fold one outcome row (rows come in job order) into the key's state."""
    if isinstance(input_, str):  # JSON columns come back as text on some warehouses
        input_ = json.loads(input_)
    is_retry = status not in FINAL_STATUSES
    state = known.keys.get(key)
    if state is None:
        state = known.keys[key] = KeyState(
            status, finished_at, job_id, input_, retries=int(is_retry), submitted_at=submitted_at
        )
    elif job_id != state.job_id:
        # a later job: count consecutive non-final ones (one per job, not per row)
        state.retries = state.retries + 1 if is_retry else 0
        state.status, state.finished_at, state.job_id = status, finished_at, job_id
        state.submitted_at = submitted_at
        state.input = input_ or state.input
    if input_pk is not None:
        state.pks.add(input_pk)


def rejected_pks(pipeline: dlt.Pipeline, names: TableNames) -> set[str]:
    """Primary keys of the input rows currently in the rejected table (empty before any)."""
    try:
        with pipeline.sql_client() as client:
            sql = (
                f"SELECT {client.escape_column_name('input_pk')} FROM "
                f"{client.make_qualified_table_name(names.rejected)}"
            )
            with client.execute_query(sql) as cur:
                return {r[0] for r in cur.fetchall()}
    except DatabaseUndefinedRelation:
        return set()


def confirmed_loads(pipeline: dlt.Pipeline, load_ids: list[str]) -> set[str]:
    """Which of ``load_ids`` completed at the destination (``_dlt_loads.status = 0``)."""
    if not load_ids:
        return set()
    try:
        with pipeline.sql_client() as client:
            table = client.make_qualified_table_name(LOADS_TABLE)
            marks = ", ".join(["%s"] * len(load_ids))
            sql = (
                f"SELECT {client.escape_column_name('load_id')} FROM {table} WHERE "
                f"{client.escape_column_name('status')} = 0 AND "
                f"{client.escape_column_name('load_id')} IN ({marks})"
            )
            with client.execute_query(sql, *load_ids) as cur:
                return {r[0] for r in cur.fetchall()}
    except DatabaseUndefinedRelation:
        return set()
