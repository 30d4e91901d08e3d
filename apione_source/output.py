"""Hands the run's rows to dlt as arrow tables: dlt's fastest path into a destination.

Rows are gathered per table and turned into one arrow table per ``flush_rows`` rows,
typed by the table's hints (:func:`apione_source.tables.table_columns`). dlt writes an
arrow table straight to a parquet file and loads it with the destination's bulk loader
(DuckDB's ``read_parquet``, Snowflake's ``COPY``, ...); dicts would instead go row by row
through dlt's normalizer and, on DuckDB, through ``INSERT ... VALUES``: about 10x slower.

A column the hints do not know (a field ApiOne added) is typed from its values, as dlt
would. Objects and lists in a text column (an outcome's ``input``, say) are kept as JSON
text: an arrow column has one type, and JSON text reads back the same on every warehouse.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Iterator
from typing import Any

import dlt
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.destination.capabilities import DestinationCapabilitiesContext
from dlt.common.libs.pyarrow import columns_to_arrow
from dlt.common.schema.typing import TTableSchemaColumns

_CAPS = DestinationCapabilitiesContext.generic_capabilities()

#: What arrow raises for a value that does not fit its type (ArrowInvalid is a ValueError,
#: ArrowTypeError a TypeError); the rows then go the careful way.
MISFITS = (TypeError, ValueError, OverflowError, pa.ArrowNotImplementedError)


class Output:
    """Rows per table, yielded to dlt as typed arrow tables."""

    def __init__(
        self, columns: dict[str, TTableSchemaColumns], load_id: str, flush_rows: int = 10_000
    ) -> None:
        """Prepare buffers for the tables in ``columns`` (table -> hinted columns).

        Args:
            columns: Every table's hinted columns (arrow types come from them).
            load_id: The load package the rows go to (dlt's ``_dlt_load_id``).
            flush_rows: A table's rows become an arrow table once this many are buffered;
                bounds memory, and keeps files big enough to load fast.
        """
        self.flush_rows = flush_rows
        self.load_id = load_id
        #: Table -> the arrow schema of its hinted columns.
        self.schemas = {t: columns_to_arrow(c, _CAPS, "UTC") for t, c in columns.items()}
        self._rows: dict[str, list[dict[str, Any]]] = {t: [] for t in columns}
        # rows given column by column, already arrow, and how many rows they hold
        self._pieces: dict[str, list[pa.Table]] = {t: [] for t in columns}
        self._piece_rows = dict.fromkeys(columns, 0)

    def add(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Buffer ``rows`` for ``table``."""
        self._rows[table].extend(rows)

    def add_columns(self, table: str, columns: dict[str, list[Any]]) -> None:
        """Buffer rows of ``table`` given column by column (hinted columns only)."""
        n = len(next(iter(columns.values()), []))
        if not n:
            return
        schema = self.schemas[table]
        try:
            if not set(columns) <= set(schema.names):
                raise ValueError("columns the hints do not know")  # e.g. scalars for objects
            if any(_alters(schema.field(name).type, values) for name, values in columns.items()):
                raise ValueError("a value arrow would change to fit its column")
            piece = pa.Table.from_pydict(
                columns, schema=pa.schema([schema.field(name) for name in columns])
            )
        except MISFITS:
            # a value or a column that does not fit: the rows go the careful way
            rows = zip(*columns.values(), strict=True)
            self.add(table, [dict(zip(columns, row, strict=True)) for row in rows])
            return
        self.add_table(table, piece)

    def add_table(self, table: str, data: pa.Table) -> None:
        """Buffer rows of ``table`` already typed as arrow (by :attr:`schemas`)."""
        self._pieces[table].append(data)
        self._piece_rows[table] += data.num_rows

    def ready(self) -> Iterator[Any]:
        """Arrow tables of every table holding at least ``flush_rows`` rows."""
        for table, rows in self._rows.items():
            if len(rows) + self._piece_rows[table] >= self.flush_rows:
                yield self._take(table)

    def flush(self) -> Iterator[Any]:
        """Arrow tables of everything buffered."""
        for table, rows in self._rows.items():
            if rows or self._pieces[table]:
                yield self._take(table)

    def _take(self, table: str) -> Any:
        rows, self._rows[table] = self._rows[table], []
        pieces, self._pieces[table], self._piece_rows[table] = self._pieces[table], [], 0
        if rows:
            pieces.append(self._table(table, rows))
        data = (
            pieces[0]
            if len(pieces) == 1
            else pa.concat_tables(pieces, promote_options="permissive")
        )
        return dlt.mark.with_table_name(self._with_dlt_columns(data), table)

    def to_arrow(self, table: str, rows: list[dict[str, Any]]) -> pa.Table:
        """``rows`` as one arrow table: hinted columns typed, other columns inferred.

        A value that does not fit its hinted type (text in a number column, say) goes to
        a ``<column>__v_text`` variant column instead (named as dlt names its variants).
        """
        return self._with_dlt_columns(self._table(table, rows))

    def _table(self, table: str, rows: list[dict[str, Any]]) -> pa.Table:
        try:
            return self._fast(table, rows)
        except MISFITS:
            return self._careful(table, rows)

    def _with_dlt_columns(self, data: pa.Table) -> pa.Table:
        """``data`` with dlt's own columns, as dlt adds them to rows it normalizes.

        Lineage to ``_dlt_loads``, and the NOT NULL columns of tables that a version before
        arrow created.
        """
        data = data.append_column(
            pa.field("_dlt_load_id", pa.string(), nullable=False),
            pa.array([self.load_id] * data.num_rows, type=pa.string()),
        )
        return data.append_column(
            pa.field("_dlt_id", pa.string(), nullable=False), _row_ids(data.num_rows)
        )

    def _fast(self, table: str, rows: list[dict[str, Any]]) -> pa.Table:
        """The common case, converted by arrow itself: every value fits its column.

        Timestamps and dates that arrive as ISO text (as in ApiOne's payloads) are read as
        text and cast by arrow. Raises when a value does not fit.
        """
        schema = self.schemas[table]
        present = set().union(*rows)
        if not present <= set(schema.names):
            raise ValueError("columns the hints do not know")  # typed from their values
        fields, cast = [], []
        for field in schema:
            if field.name not in present:
                continue
            if _alters(field.type, (r.get(field.name) for r in rows)):
                raise ValueError("a value arrow would change to fit its column")
            if temporal(field.type):
                first = next((r[field.name] for r in rows if r.get(field.name) is not None), None)
                if isinstance(first, str):
                    cast.append(field)
                    field = pa.field(field.name, pa.string())
            fields.append(field)
        data = pa.Table.from_pylist(rows, schema=pa.schema(fields))
        for field in cast:
            i = data.schema.get_field_index(field.name)
            data = data.set_column(i, field, data.column(i).cast(field.type))
        return data

    def _careful(self, table: str, rows: list[dict[str, Any]]) -> pa.Table:
        """Column by column: unknown columns inferred, misfits kept in variant columns."""
        schema = self.schemas[table]
        names = list(dict.fromkeys(name for row in rows for name in row))
        arrays, fields = [], []
        for name in names:
            values = [row.get(name) for row in rows]
            index = schema.get_field_index(name)
            if index < 0:
                array = _infer(values)
                arrays.append(array)
                fields.append(pa.field(name, array.type))
                continue
            field = schema.field(index)
            if pa.types.is_string(field.type) and any(isinstance(v, (dict, list)) for v in values):
                values = [_json_text(v) for v in values]
            array, misfits = _typed(values, field.type)
            arrays.append(array)
            fields.append(field)
            if misfits is not None:
                arrays.append(misfits)
                fields.append(pa.field(f"{name}__v_text", pa.string()))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _row_ids(n: int) -> pa.Array:
    """``n`` unique row ids: a random prefix and the row's number, built by arrow.

    (dlt's own ids are 16 random bytes each: a million of them cost a second of Python.)
    """
    numbers = pa.array(range(n), type=pa.int64()).cast(pa.string())
    return pc.binary_join_element_wise(secrets.token_urlsafe(12), numbers, "")


def _typed(values: list[Any], type_: pa.DataType) -> tuple[pa.Array, pa.Array | None]:
    """``values`` as ``type_``, converting text (ISO timestamps, say); misfits apart.

    Returns:
        The values that fit (null where one does not), and the text of those that do not
        (None when all fit): the ``<column>__v_text`` variant.
    """
    if not _alters(type_, values):
        try:
            return pa.array(values, type=type_), None
        except MISFITS:
            pass
    # A cast checks what it cuts (2.0 fits a whole number, 2.5 does not), but would turn
    # other values into something else: those do not fit, whatever a cast makes of them.
    recast = _recast(type_)
    if recast.isdisjoint(map(type, values)):
        try:
            return pa.array(values).cast(type_), None  # e.g. "2024-02-03T16:02:18Z"
        except MISFITS:
            pass
    fits: list[Any] = []
    misfits: list[str | None] = []
    for value in values:
        try:
            if type(value) in recast:
                raise ValueError(f"a cast would change {value!r}")
            # each value as the column's type already: mixed ones (7 among text) then fit
            fits.append(pa.array([value]).cast(type_)[0].as_py())
        except MISFITS:
            fits.append(None)
            misfits.append(value if isinstance(value, str) else json.dumps(value, default=str))
        else:
            misfits.append(None)
    return pa.array(fits, type=type_), pa.array(misfits, type=pa.string())


def temporal(type_: pa.DataType) -> bool:
    """True for a timestamp or a date type (which ApiOne sends as ISO text)."""
    return bool(pa.types.is_timestamp(type_) or pa.types.is_date(type_))


def _alters(type_: pa.DataType, values: Iterable[Any]) -> bool:
    """True when arrow would silently change one of ``values`` to convert it to ``type_``.

    ``pa.array([2.5], pa.int64())`` is ``[2]``, and a number for a timestamp or a date is
    read as a count of its units since 1970.
    """
    altered: frozenset[type]
    if pa.types.is_integer(type_):
        altered = frozenset({float})
    elif temporal(type_):
        altered = frozenset({int, float})
    else:
        return False
    return not altered.isdisjoint(map(type, values))


def _recast(type_: pa.DataType) -> frozenset[type]:
    """The Python types a cast to ``type_`` would turn into other values.

    True into 1, 1 into True, a number into a time since 1970.
    """
    if pa.types.is_integer(type_):
        return frozenset({bool})
    if pa.types.is_boolean(type_) or temporal(type_):
        return frozenset({int, float})
    return frozenset()


def _json_text(value: Any) -> Any:
    return json.dumps(value, default=str) if isinstance(value, (dict, list)) else value


def _infer(values: list[Any]) -> pa.Array:
    """An arrow array of values of a column no hint types; JSON text if they are mixed."""
    try:
        array = pa.array(values)
    except MISFITS:  # mixed types, or an integer beyond 64 bits
        array = None
    if array is None or (pa.types.is_null(array.type) and any(v is not None for v in values)):
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values])
    return array
