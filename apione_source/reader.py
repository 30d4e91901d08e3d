"""Reads the input table and what earlier runs loaded, on any dlt SQL destination.

Why dlt's destination SQL clients (``dlt.dataset(...).sql_client``) and not
``sql_database.sql_table``: the same credentials and config that load into DuckDB,
Postgres, Snowflake or BigQuery also read from them, with no extra SQLAlchemy dialect to
install; identifiers are escaped and case-folded by the destination's own rules; and a
plain DB-API cursor with ``fetchmany`` streams results on DuckDB, Snowflake and BigQuery
(psycopg2 buffers a result client-side, which is why we select only the key columns).
``sql_table`` through sqlalchemy-bigquery also returns no rows on the BigQuery emulator
we test against, while DB-API reads work there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import dlt
from dlt.common.destination.reference import TDestinationReferenceArg
from dlt.destinations.exceptions import DatabaseUndefinedRelation
from dlt.destinations.sql_client import SqlClientBase

from apione_source.errors import ConfigurationError
from apione_source.tables import FINAL_STATUSES, TableNames

logger = logging.getLogger(__name__)

LOADS_TABLE = "_dlt_loads"


@dataclass(frozen=True)
class InputSpec:
    """Where the input rows are and which columns matter.

    Attributes:
        destination: A dlt destination (name or instance) to read from.
        dataset: Dataset / schema holding the table.
        table: The input table.
        primary_key: Column identifying an input row.
        columns: ApiOne input field -> column name.
        cursor_column: Optional column that grows when a row is added or changed.
    """

    destination: TDestinationReferenceArg
    dataset: str
    table: str
    primary_key: str
    columns: dict[str, str]
    cursor_column: str | None = None


@dataclass
class InputRow:
    """One input row: its primary key (as text), field values and cursor value."""

    pk: str
    values: dict[str, Any]
    cursor: Any = None


class InputReader:
    """Streams input rows in chunks through the destination's SQL client."""

    def __init__(self, spec: InputSpec, chunk_size: int = 10_000) -> None:
        """Prepare a reader; nothing is queried until :meth:`check` or :meth:`rows`."""
        self.spec = spec
        self.chunk_size = chunk_size

    def _client(self) -> SqlClientBase[Any]:
        dataset = dlt.dataset(self.spec.destination, self.spec.dataset)
        return dataset.sql_client

    def _select(self, client: SqlClientBase[Any]) -> tuple[str, list[str]]:
        names = [self.spec.primary_key, *self.spec.columns.values()]
        if self.spec.cursor_column:
            names.append(self.spec.cursor_column)
        cols = ", ".join(client.escape_column_name(n) for n in names)
        return f"SELECT {cols} FROM {client.make_qualified_table_name(self.spec.table)}", names

    def check(self) -> None:
        """Fail early, before any API call, if the table or a column is missing.

        Raises:
            ConfigurationError: Naming the missing table or columns and the config key.
        """
        with self._client() as client:
            table = client.make_qualified_table_name(self.spec.table)
            try:
                with client.execute_query(f"SELECT * FROM {table} WHERE 1 = 0") as cur:
                    present = {d[0].lower() for d in cur.description}
            except DatabaseUndefinedRelation:
                raise ConfigurationError(
                    f"input table {table} does not exist: check sources.apione.input_dataset "
                    f"and sources.apione.input_table"
                ) from None
        wanted = {self.spec.primary_key, *self.spec.columns.values()}
        if self.spec.cursor_column:
            wanted.add(self.spec.cursor_column)
        missing = sorted(c for c in wanted if c.lower() not in present)
        if missing:
            raise ConfigurationError(
                f"input table {table} has no column(s) {', '.join(missing)}: check "
                f"sources.apione.input_columns, primary_key and cursor_column "
                f"(it has: {', '.join(sorted(present))})"
            )

    def rows(self, cursor_from: Any = None) -> Iterator[list[InputRow]]:
        """Yield input rows in chunks, ordered by cursor (if any) then primary key.

        Args:
            cursor_from: Only rows whose cursor is ``>=`` this (ties are re-read; the
                caller de-duplicates them against what is already known).
        """
        fields = list(self.spec.columns)
        with self._client() as client:
            sql, _ = self._select(client)
            args: list[Any] = []
            order = [client.escape_column_name(self.spec.primary_key)]
            if self.spec.cursor_column:
                cursor_col = client.escape_column_name(self.spec.cursor_column)
                if cursor_from is not None:
                    sql += f" WHERE {cursor_col} >= %s"
                    args.append(cursor_from)
                order.insert(0, cursor_col)
            sql += " ORDER BY " + ", ".join(order)
            with client.execute_query(sql, *args) as cur:
                while batch := cur.fetchmany(self.chunk_size):
                    yield [_to_row(r, fields, self.spec.cursor_column is not None) for r in batch]


def _to_row(raw: Sequence[Any], fields: list[str], has_cursor: bool) -> InputRow:
    values = dict(zip(fields, raw[1 : 1 + len(fields)], strict=True))
    return InputRow(pk=str(raw[0]), values=values, cursor=raw[-1] if has_cursor else None)


@dataclass
class KeyState:
    """What earlier runs recorded for one normalized key."""

    status: str
    finished_at: datetime
    job_id: str | None
    input: Any
    pks: set[str] = field(default_factory=set)
    retries: int = 0  # non-final outcomes since the last final one


@dataclass
class KnownKeys:
    """The outcome history of every key, loaded from the destination."""

    keys: dict[str, KeyState] = field(default_factory=dict)

    def is_fresh(
        self, key: str, now: datetime, ttl_matched: timedelta, ttl_retry: timedelta
    ) -> bool:
        """True if ``key`` has a final outcome younger than its TTL."""
        state = self.keys.get(key)
        if state is None or state.status not in FINAL_STATUSES:
            return False
        ttl = ttl_matched if state.status in ("matched", "invalid") else ttl_retry
        return now - state.finished_at < ttl

    def stale(
        self, now: datetime, ttl_matched: timedelta, ttl_retry: timedelta
    ) -> Iterator[tuple[str, KeyState]]:
        """Keys whose last outcome is no longer fresh."""
        for key, state in self.keys.items():
            if not self.is_fresh(key, now, ttl_matched, ttl_retry):
                yield key, state


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def load_known_keys(
    pipeline: dlt.Pipeline, names: TableNames, chunk_size: int = 50_000
) -> KnownKeys:
    """Load every key's latest outcome (and its input rows) from the destination.

    Returns an empty index on the first run, when the outcomes table does not exist.
    """
    known = KnownKeys()
    try:
        with pipeline.sql_client() as client:
            cols = ["key", "status", "finished_at", "job_id", "input_pk", "input"]
            sql = (
                f"SELECT {', '.join(client.escape_column_name(c) for c in cols)} FROM "
                f"{client.make_qualified_table_name(names.outcomes)} ORDER BY "
                f"{client.escape_column_name('finished_at')}"
            )
            with client.execute_query(sql) as cur:
                while batch := cur.fetchmany(chunk_size):
                    for key, status, finished_at, job_id, input_pk, input_ in batch:
                        _fold(known, key, status, _aware(finished_at), job_id, input_pk, input_)
    except DatabaseUndefinedRelation:
        return known
    except Exception as exc:  # e.g. the dataset itself does not exist yet
        if "not exist" in str(exc).lower() or "not found" in str(exc).lower():
            return known
        raise
    return known


def _fold(
    known: KnownKeys,
    key: str,
    status: str,
    finished_at: datetime,
    job_id: str | None,
    input_pk: str | None,
    input_: Any,
) -> None:
    """Fold one outcome row (rows come oldest first) into the key's state."""
    is_retry = status not in FINAL_STATUSES
    state = known.keys.get(key)
    if state is None:
        state = known.keys[key] = KeyState(
            status, finished_at, job_id, input_, retries=int(is_retry)
        )
    elif job_id != state.job_id and finished_at >= state.finished_at:
        # a later attempt: count consecutive non-final ones (one per job, not per row)
        state.retries = state.retries + 1 if is_retry else 0
        state.status, state.finished_at, state.job_id = status, finished_at, job_id
        state.input = input_ or state.input
    if input_pk is not None:
        state.pks.add(input_pk)


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
