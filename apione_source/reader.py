"""Reads the input table and what earlier runs loaded, on any dlt SQL destination.

Why dlt's destination SQL clients (``dlt.dataset(...).sql_client``) and not
``sql_database.sql_table``: the same credentials and config that load into DuckDB,
Postgres, Snowflake or BigQuery also read from them, with no extra SQLAlchemy dialect to
install; identifiers are escaped and case-folded by the destination's own rules; and a
plain DB-API cursor with ``fetchmany`` streams results on Snowflake and BigQuery, and on
DuckDB from a temporary table (see :func:`_chunks`); psycopg2 buffers a result
client-side, which is why we select only the key columns.
``sql_table`` through sqlalchemy-bigquery also returns no rows on the BigQuery emulator
we test against, while DB-API reads work there.

Identifiers may hold quotes, spaces or any Unicode (each destination escapes them), but
not ``%``: dlt's SQL clients pass query arguments DB-API ``format`` style, so DuckDB's
client rewrites a ``%s`` even inside a quoted name and psycopg2 rejects a lone ``%``.
:func:`check_identifier` refuses those names up front.

A cursor value goes into dlt's resource state between runs; :func:`encode_cursor` and
:func:`decode_cursor` make every type a cursor column can have come back as it went in.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import dlt
from dlt.common.destination import Destination
from dlt.common.destination.reference import TDestinationReferenceArg
from dlt.destinations.exceptions import (
    DatabaseException,
    DatabaseTerminalException,
    DatabaseUndefinedRelation,
)
from dlt.destinations.sql_client import SqlClientBase

from apione_source.duckdb_cache import release_cached_pages
from apione_source.errors import ConfigurationError

logger = logging.getLogger(__name__)

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_duckdb_file(destination: TDestinationReferenceArg) -> None:
    """A DuckDB input file must exist: connecting to a missing one creates it, empty."""
    if not isinstance(destination, Destination) or not destination.destination_type.endswith(
        ".duckdb"
    ):
        return
    database = destination.config_params.get("credentials")
    if (
        isinstance(database, (str, Path))
        and str(database) not in ("", ":memory:")
        and not str(database).startswith(("md:", "motherduck:"))
        and not Path(database).exists()
    ):
        raise ConfigurationError(
            f"the input DuckDB file {database} does not exist: check "
            "sources.apione.input_credentials (the path of the .duckdb file holding the "
            f"input table; relative paths start at {Path.cwd()})"
        )


def check_identifier(setting: str, value: object) -> str:
    """Refuse a table, dataset, column or prefix name the SQL clients cannot pass through.

    Quotes, spaces and Unicode are fine (every destination escapes them); ``%`` is not
    (see the module docstring), nor is a NUL character.

    Args:
        setting: The config key, e.g. ``input_table`` or ``input_columns.domain``;
            named in the error as ``sources.apione.<setting>``.
        value: The configured name.

    Returns:
        ``value``, unchanged.

    Raises:
        ConfigurationError: ``value`` is not a string, or contains ``%`` or NUL.
    """
    if not isinstance(value, str):
        raise ConfigurationError(
            f"sources.apione.{setting} must be a name (a string), got {type(value).__name__}"
        )
    if "%" in value:
        raise ConfigurationError(
            f"sources.apione.{setting} is {value!r}: names containing '%' are not supported "
            "(the warehouse SQL clients read '%' as a query parameter marker); rename it, "
            "or expose it under another name through a view"
        )
    if "\x00" in value:
        raise ConfigurationError(f"sources.apione.{setting} contains a NUL character")
    return value


def encode_cursor(value: Any) -> Any:
    """A cursor value in a form dlt's resource state gives back unchanged.

    dlt's state (typed JSON, checked with dlt 1.31) already round-trips ``None``, ``bool``,
    ``float``, ``str``, ``bytes``, ``int`` (64-bit), timezone-aware and naive ``datetime``,
    ``date`` and ``time``: those are returned as they are. It turns a ``UUID`` into a
    ``str`` (so ``UUID > str`` fails on the next run) and cannot store a ``timedelta``
    or an integer beyond 64 bits: those become a one-key dict tagged with their type.
    ``Decimal`` survives dlt too, but is tagged as well so the state holds plain JSON.
    ``bytearray`` / ``memoryview`` become ``bytes``.

    Args:
        value: A cursor value as the warehouse returned it.

    Returns:
        A value to keep in state; :func:`decode_cursor` turns it back.

    Raises:
        TypeError: A type no cursor column should have (dict, list, ...).
    """
    if value is None or isinstance(value, (bool, float, str, bytes, dt.date, dt.time)):
        return value  # datetime is a date
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _INT64_MAX else {"int": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, dt.timedelta):
        return {"timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(
        f"a cursor_column value of type {type(value).__name__} cannot be kept between "
        "runs: use a column of a number, text, date/time or UUID type"
    )


def decode_cursor(stored: Any, *, like: Any = None) -> Any:
    """The cursor value :func:`encode_cursor` stored; any other value is returned as is.

    Idempotent: a decoded value decodes to itself.

    Args:
        stored: What the state holds.
        like: Optionally a cursor value just read from the warehouse. When it is a
            ``UUID`` and ``stored`` a plain ``str`` (state written before cursors were
            encoded, where dlt had turned the UUID into text), the text is read as a UUID.

    Returns:
        The cursor value, comparable with ``>`` to values of the same column.
    """
    if isinstance(stored, dict) and len(stored) == 1:
        [(tag, text)] = stored.items()
        if tag == "uuid":
            return uuid.UUID(text)
        if tag == "decimal":
            return Decimal(text)
        if tag == "int":
            return int(text)
        if tag == "timedelta":
            days, seconds, microseconds = text
            return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
    if isinstance(like, uuid.UUID) and isinstance(stored, str):
        return uuid.UUID(stored)
    return stored


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

    def __post_init__(self) -> None:
        """Refuse names the SQL clients cannot pass through (see :func:`check_identifier`).

        Raises:
            ConfigurationError: Naming the setting.
        """
        check_identifier("input_dataset", self.dataset)
        check_identifier("input_table", self.table)
        check_identifier("primary_key", self.primary_key)
        for field, column in self.columns.items():
            check_identifier(f"input_columns.{field}", column)
        if self.cursor_column is not None:
            check_identifier("cursor_column", self.cursor_column)


@dataclass
class InputRow:
    """One input row: its primary key (as text; None if NULL), fields and cursor value.

    ``fp`` is the fingerprint of the row's input columns as the warehouse computes it
    (:meth:`InputReader.fingerprint`), when read that way.
    """

    pk: str | None
    values: dict[str, Any]
    cursor: Any = None
    fp: str | None = None


@dataclass(frozen=True)
class Freshness:
    """What the warehouse needs to leave out the rows with nothing to send.

    Attributes:
        dataset: The pipeline's dataset (holding the two tables below).
        outcomes: The outcomes table.
        inputs: The table of input rows as last read (``input_pk``, ``fp``, ``key``).
        cutoffs: Final status -> outcomes finished before this are stale.
    """

    dataset: str
    outcomes: str
    inputs: str
    cutoffs: dict[str, dt.datetime]


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
        _check_duckdb_file(self.spec.destination)
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

    def fingerprint(self, client: SqlClientBase[Any], alias: str = "") -> str:
        """SQL for the MD5 of the row's input columns (DuckDB and PostgreSQL).

        Computed by the warehouse both when a row is read and when it is compared with the
        row as last read, so the two always agree; a NULL and an empty value differ.
        """
        parts = [
            f"COALESCE(CAST({alias}{client.escape_column_name(c)} AS VARCHAR), CHR(30))"
            for c in self.spec.columns.values()
        ]
        return f"MD5(CONCAT_WS(CHR(31), {', '.join(parts)}))"

    def count(self) -> int:
        """Rows in the input table."""
        with self._client() as client:
            table = client.make_qualified_table_name(self.spec.table)
            with client.execute_query(f"SELECT COUNT(*) FROM {table}") as cur:
                row = cur.fetchone()
                return int(row[0]) if row else 0

    def same_warehouse(self, pipeline_client: SqlClientBase[Any]) -> bool:
        """True when the input table lives in the database the pipeline loads into.

        Then the warehouse leaves out rows with nothing to send (:meth:`candidates`).
        Only DuckDB and PostgreSQL, and only without a cursor column (which already
        narrows the read) for now.
        """
        if self.spec.cursor_column is not None:
            return False
        with self._client() as client:
            here = _location(client)
        return here is not None and here == _location(pipeline_client)

    def candidates(self, fresh: Freshness) -> Iterator[list[InputRow]]:
        """Like :meth:`rows`, without the rows the warehouse knows need nothing.

        Left out: rows read before with the same input values (same fingerprint, so the
        same key) whose key's latest outcome (by job order) is final and fresh. Every
        other row comes, with its fingerprint, ordered by primary key.
        """
        fields = list(self.spec.columns)
        with self._client() as client:
            esc = client.escape_column_name
            table = client.make_qualified_table_name(self.spec.table)
            outcomes = f"{esc(fresh.dataset)}.{esc(fresh.outcomes)}"
            inputs = f"{esc(fresh.dataset)}.{esc(fresh.inputs)}"
            pk = f"i.{esc(self.spec.primary_key)}"
            cols = ", ".join([pk, *(f"i.{esc(c)}" for c in self.spec.columns.values())])
            fp = self.fingerprint(client, "i.")
            key, status, finished = esc("key"), esc("status"), esc("finished_at")
            in_pk, in_fp = esc("input_pk"), esc("fp")
            order = (
                f"COALESCE({esc('submitted_at')}, {finished}) DESC, {esc('attempt')} DESC, "
                f"{finished} DESC"
            )
            checks = " OR ".join(f"({status} = %s AND {finished} > %s)" for _ in fresh.cutoffs)
            args: list[Any] = [a for item in fresh.cutoffs.items() for a in item]
            with self._client() as probe:  # a failed probe must not spoil the read
                have = _columns_of(probe, outcomes), _columns_of(probe, inputs)
            exclude = have[0] >= {"key", "status", "finished_at", "submitted_at", "attempt"}
            exclude = exclude and bool(have[1])
            sql = (
                f"WITH latest AS (SELECT {key}, {status}, {finished}, ROW_NUMBER() OVER "
                f"(PARTITION BY {key} ORDER BY {order}) AS rn FROM {outcomes}), "
                f"fresh AS (SELECT {key} FROM latest WHERE rn = 1 AND ({checks})), "
                f"known AS (SELECT s.{in_pk}, s.{in_fp} FROM {inputs} s "
                f"JOIN fresh f ON f.{key} = s.{key}) "
                # an anti-join as a LEFT JOIN: DuckDB plans the correlated NOT EXISTS as a
                # join that de-duplicates every input row first (1M rows: 180 MB more)
                f"SELECT {cols}, {fp} FROM {table} i LEFT JOIN known k "
                f"ON k.{in_pk} = CAST({pk} AS VARCHAR) AND k.{in_fp} = {fp} "
                f"WHERE k.{in_pk} IS NULL ORDER BY {pk}"
            )
            if not exclude:  # a first run (or outcomes from before submitted_at): read all
                sql, args = f"SELECT {cols}, {fp} FROM {table} i ORDER BY {pk}", []
            width = len(fields) + 2  # pk, the input columns, the fingerprint
            with closing(_chunks(client, sql, args, width, self.chunk_size)) as chunks:
                for batch in chunks:
                    yield [_to_candidate(r, fields) for r in batch]

    def rows(self, cursor_from: Any = None) -> Iterator[list[InputRow]]:
        """Yield input rows in chunks, ordered by cursor (if any) then primary key.

        Args:
            cursor_from: Only rows whose cursor is ``>=`` this (ties are re-read; the
                caller de-duplicates them against what is already known). A value as
                :func:`encode_cursor` stored it is decoded first.
        """
        cursor_from = decode_cursor(cursor_from)
        fields = list(self.spec.columns)
        with self._client() as client:
            sql, names = self._select(client)
            args: list[Any] = []
            order = [client.escape_column_name(self.spec.primary_key)]
            if self.spec.cursor_column:
                cursor_col = client.escape_column_name(self.spec.cursor_column)
                if cursor_from is not None:
                    # NULL cursors never compare: read those rows every run (known keys
                    # cost nothing) rather than never again.
                    param = "%s"
                    if isinstance(cursor_from, uuid.UUID):
                        # psycopg2 cannot adapt a UUID; text cast to UUID compares as one
                        # on DuckDB and Postgres (the warehouses with a UUID type).
                        param, cursor_from = "CAST(%s AS UUID)", str(cursor_from)
                    sql += f" WHERE {cursor_col} >= {param} OR {cursor_col} IS NULL"
                    args.append(cursor_from)
                order.insert(0, cursor_col)
            sql += " ORDER BY " + ", ".join(order)
            with closing(_chunks(client, sql, args, len(names), self.chunk_size)) as chunks:
                for batch in chunks:
                    yield [_to_row(r, fields, self.spec.cursor_column is not None) for r in batch]


def _chunks(
    client: SqlClientBase[Any], sql: str, args: list[Any], width: int, size: int
) -> Generator[Sequence[Sequence[Any]], None, None]:
    """The rows of ``sql`` (``width`` columns) in chunks of ``size``, in the query's order.

    On DuckDB the result is first kept in a temporary table and read from there. A read
    holds its transaction until its last row, the whole run for a big input; and while it
    is open on the database the run loads into, DuckDB refuses to CHECKPOINT once a load
    has changed a table, so every row loaded meanwhile stays in memory (1M records:
    +700 MB). A temporary table is no part of that database, and it costs about the
    memory the ``ORDER BY`` held for the whole read anyway (1M rows: 90 against 130 MB).
    """
    if _dialect(client) != "duckdb":
        with client.execute_query(sql, *args) as cur:
            while batch := cur.fetchmany(size):
                yield batch
        return
    # A scan returns rows in insertion order unless that is switched off; sorting again
    # would hold a second copy of the whole result for the whole read (1M rows: 130 MB).
    with client.execute_query("SELECT current_setting('preserve_insertion_order')") as cur:
        keep_order = bool(cur.fetchone()[0])  # type: ignore[index]  # one row, always
    name = f"temp.main._apione_read_{uuid.uuid4().hex}"
    scan = f"SELECT * FROM {name}" + ("" if keep_order else " ORDER BY rowid")
    # columns by position, so that an input column named `rowid` cannot stand in for
    # DuckDB's own row number above
    aliases = ", ".join(f"c{i}" for i in range(width))
    # what earlier statements cached (the run-start settle's scans: 25 MB at 1M keys)
    # would stay beside the query's hash tables, the peak of a run with nothing to send
    release_cached_pages(client)
    client.execute_sql(
        f"CREATE TEMPORARY TABLE {name} AS SELECT * FROM ({sql}) AS q({aliases})", *args
    )
    try:
        # the query's pages and the table itself need not stay in memory until the run's
        # first checkpoint: the table is read a chunk at a time
        release_cached_pages(client)
        with client.execute_query(scan) as cur:
            while batch := cur.fetchmany(size):
                yield batch
    finally:
        try:
            client.execute_sql(f"DROP TABLE IF EXISTS {name}")
        except DatabaseException as exc:  # the connection failed: keep the read's error
            logger.debug("temporary table %s not dropped: %s", name, exc)


def _to_row(raw: Sequence[Any], fields: list[str], has_cursor: bool) -> InputRow:
    values = dict(zip(fields, raw[1 : 1 + len(fields)], strict=True))
    pk = None if raw[0] is None else str(raw[0])
    return InputRow(pk=pk, values=values, cursor=raw[-1] if has_cursor else None)


def _to_candidate(raw: Sequence[Any], fields: list[str]) -> InputRow:
    values = dict(zip(fields, raw[1 : 1 + len(fields)], strict=True))
    pk = None if raw[0] is None else str(raw[0])
    return InputRow(pk=pk, values=values, fp=raw[-1])


def _columns_of(client: SqlClientBase[Any], qualified_table: str) -> set[str]:
    """Lower-cased column names of a table; empty when it does not exist (or is unreadable)."""
    try:
        with client.execute_query(f"SELECT * FROM {qualified_table} WHERE 1 = 0") as cur:
            return {d[0].lower() for d in cur.description}
    except (DatabaseUndefinedRelation, DatabaseTerminalException):
        return set()  # no such table (or schema): nothing to compare with yet


def _location(client: SqlClientBase[Any]) -> tuple[Any, ...] | None:
    """Which database a client talks to, where that can be told for sure (else None)."""
    creds = client.credentials
    dialect = _dialect(client)
    if dialect == "duckdb":
        database = getattr(creds, "database", None)
        if isinstance(database, str) and database not in ("", ":memory:", ":external:"):
            return ("duckdb", str(Path(database).resolve()))
    if dialect == "postgres":
        parts = tuple(getattr(creds, f, None) for f in ("host", "port", "database"))
        if all(parts):
            return ("postgres", *parts)
    return None


def _dialect(client: SqlClientBase[Any]) -> str:
    return type(client).__module__.split(".")[-2]  # dlt.destinations.impl.<dialect>....
