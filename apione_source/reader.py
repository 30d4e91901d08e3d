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
from dataclasses import dataclass
from typing import Any

import dlt
from dlt.common.destination.reference import TDestinationReferenceArg
from dlt.destinations.exceptions import DatabaseUndefinedRelation
from dlt.destinations.sql_client import SqlClientBase

from apione_source.errors import ConfigurationError

logger = logging.getLogger(__name__)


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
    """One input row: its primary key (as text; None if NULL), fields and cursor value."""

    pk: str | None
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
                    # NULL cursors never compare: read those rows every run (known keys
                    # cost nothing) rather than never again.
                    sql += f" WHERE {cursor_col} >= %s OR {cursor_col} IS NULL"
                    args.append(cursor_from)
                order.insert(0, cursor_col)
            sql += " ORDER BY " + ", ".join(order)
            with client.execute_query(sql, *args) as cur:
                while batch := cur.fetchmany(self.chunk_size):
                    yield [_to_row(r, fields, self.spec.cursor_column is not None) for r in batch]


def _to_row(raw: Sequence[Any], fields: list[str], has_cursor: bool) -> InputRow:
    values = dict(zip(fields, raw[1 : 1 + len(fields)], strict=True))
    pk = None if raw[0] is None else str(raw[0])
    return InputRow(pk=pk, values=values, cursor=raw[-1] if has_cursor else None)
