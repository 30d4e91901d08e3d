"""A job's matched payloads into the enrichment table and its list tables.

Where the payloads have exactly the contract's shape (no field the model does not know, an
object or a list where the model has one, no value arrow would change to fit), arrow turns
them into one struct array at once and the flat columns and list tables are cut from it:
row by row (:func:`apione_source.tables.enrichment_rows`, then a dict per row into
arrow) a company result cost more Python than its HTTP and JSON together. Anything else
(a field ApiOne added, a value of another type), and SCD2's version hash, goes row by
row, which keeps it in new or variant columns. Both ways give the same rows for the same
payloads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from apione_source.models import PAYLOAD_MODELS, RecordResult
from apione_source.output import MISFITS, Output, temporal
from apione_source.tables import ListRows, TableNames, enrichment_rows, list_element, nested_model


@dataclass(frozen=True)
class _Object:
    """The fields an object of the contract may hold, and how arrow reads it.

    Attributes:
        type: The struct type arrow converts it with (timestamps and dates as text).
        keys: Its fields that have a column or a list table.
        nested: Field -> its shape, for the fields that are objects or lists.
        ints: Its fields of whole numbers (arrow would cut a float down to one, silently).
    """

    type: pa.StructType
    keys: frozenset[str]
    nested: Mapping[str, _Object | _List]
    ints: frozenset[str]


@dataclass(frozen=True)
class _List:
    """A list: of objects (``element``), or of scalars (``element`` None: text)."""

    type: pa.ListType
    element: _Object | None


class PayloadTables:
    """The enrichment and list-table rows of matched payloads, buffered in an Output."""

    def __init__(self, names: TableNames, out: Output) -> None:
        """Read the payload's shape from its model and the tables' arrow schemas.

        Args:
            names: The tables' names.
            out: Where the rows go (its :attr:`~apione_source.output.Output.schemas` type
                them).
        """
        self._names = names
        self._out = out
        model = PAYLOAD_MODELS[names.enrichment_type]
        self._shape = self._object(model, out.schemas[names.enrichment], "", names.lists)

    def add(
        self,
        enriched: Sequence[tuple[str, RecordResult]],
        job_id: str,
        enriched_at: datetime,
        *,
        version_hash: bool,
    ) -> None:
        """Buffer the rows of a job's matched results: by arrow at once, or row by row.

        Args:
            enriched: Each matched result with its key, in the job's order.
            job_id: The job they came from.
            enriched_at: When they were collected.
            version_hash: Add ``data_hash``, the row version SCD2 compares (row by row).
        """
        names, out = self._names, self._out
        tables = None
        if not version_hash:
            keys = [key for key, _ in enriched]
            tables = self.build(keys, [r.data for _, r in enriched], job_id, enriched_at)
        if tables is not None:
            for table, data in tables.items():
                out.add_table(table, data)
            return
        rows: list[dict[str, Any]] = []
        elements = {f: ListRows() for f in names.lists}
        for key, result in enriched:
            row, lists = enrichment_rows(
                key, job_id, enriched_at, result, names.lists, version_hash=version_hash
            )
            rows.append(row)
            for name, values in lists.items():
                elements[name].add(key, job_id, values)
        out.add(names.enrichment, rows)
        for name, gathered in elements.items():
            out.add_columns(names.lists[name], gathered.columns)
            out.add(names.lists[name], gathered.rows)

    def build(
        self,
        keys: Sequence[str],
        payloads: Sequence[dict[str, Any] | None],
        job_id: str,
        enriched_at: datetime,
    ) -> dict[str, pa.Table] | None:
        """Table -> rows of ``payloads`` (the enrichment table, and list tables with rows).

        Args:
            keys: The key of each payload.
            payloads: Matched results' ``data``, in the job's order.
            job_id: The job they came from.
            enriched_at: When they were collected.

        Returns:
            The tables, typed by the schemas; None when a payload is not of the
            contract's shape, or a value does not fit its column.
        """
        datas = [p or {} for p in payloads]
        if not all(_fits(d, self._shape) for d in datas):
            return None
        try:
            payload = pa.array(datas, type=self._shape.type)
            key = pa.array(keys, pa.string())
            columns, lists = _columns(payload, self._shape, "")
            schema = self._out.schemas[self._names.enrichment]
            columns.update(
                key=key,
                job_id=_repeat(job_id, len(keys), pa.string()),
                enriched_at=_repeat(enriched_at, len(keys), schema.field("enriched_at").type),
            )
            tables = {self._names.enrichment: _table(columns, schema)}
            for field, (array, shape) in lists.items():
                table = self._names.lists[field]
                rows = _elements(array, shape, key, job_id, self._out.schemas[table])
                if rows.num_rows:
                    tables[table] = rows
        except MISFITS:
            return None
        return tables

    def _object(
        self, model: type[BaseModel], flat: pa.Schema, prefix: str, lists: Mapping[str, str]
    ) -> _Object:
        """The shape of ``model``, its values typed by the flat columns ``prefix...``."""
        fields: list[pa.Field] = []
        nested: dict[str, _Object | _List] = {}
        for name, info in model.model_fields.items():
            element = list_element(info.annotation)
            inner = nested_model(info.annotation)
            if element is not None and name in lists:
                element_model = nested_model(element)
                schema = self._out.schemas[lists[name]]
                if element_model is None:
                    of: _Object | None = None
                    type_: pa.DataType = pa.list_(_as_read(schema.field("value").type))
                else:
                    of = self._object(element_model, schema, "", {})
                    type_ = pa.list_(of.type)
                nested[name] = _List(type_, of)
            elif inner is not None and element is None:
                shape = self._object(inner, flat, f"{prefix}{name}__", {})
                nested[name] = shape
                type_ = shape.type
            elif flat.get_field_index(f"{prefix}{name}") >= 0:
                type_ = _as_read(flat.field(f"{prefix}{name}").type)
            else:
                continue  # no column for it (an untyped field): such payloads go the row way
            fields.append(pa.field(name, type_))
        ints = frozenset(f.name for f in fields if pa.types.is_integer(f.type))
        return _Object(pa.struct(fields), frozenset(f.name for f in fields), nested, ints)


def _fits(value: Any, shape: _Object) -> bool:
    """True when ``value`` is an object of ``shape``: nothing unknown, nothing misplaced.

    A null object or list, or a null element of a list of objects, does not fit: the row
    way keeps it as a column of its own. Nor does a fraction where whole numbers go: the
    row way keeps it in a variant column.
    """
    if type(value) is not dict or not shape.keys.issuperset(value):
        return False
    if float in map(type, map(value.get, shape.ints)):
        return False
    for name, inner in shape.nested.items():
        if name not in value:
            continue
        item = value[name]
        fits = _fits(item, inner) if isinstance(inner, _Object) else _fits_list(item, inner)
        if not fits:
            return False
    return True


def _fits_list(value: Any, shape: _List) -> bool:
    """True when ``value`` is a list of ``shape`` (its objects each fit)."""
    if type(value) is not list:
        return False
    return shape.element is None or all(_fits(v, shape.element) for v in value)


def _columns(
    array: pa.Array, shape: _Object, prefix: str
) -> tuple[dict[str, pa.Array], dict[str, tuple[pa.Array, _List]]]:
    """Flat columns of a struct ``array`` (``location__city``), and its lists by field."""
    columns: dict[str, pa.Array] = {}
    lists: dict[str, tuple[pa.Array, _List]] = {}
    # flatten(): each child with its parent's nulls, as a missing object's fields are null
    for field, child in zip(shape.type, array.flatten(), strict=True):
        inner = shape.nested.get(field.name)
        if isinstance(inner, _Object):
            columns.update(_columns(child, inner, f"{prefix}{field.name}__")[0])
        elif inner is not None:
            lists[field.name] = (child, inner)
        else:
            columns[f"{prefix}{field.name}"] = child
    return columns, lists


def _elements(
    lists: pa.Array, shape: _List, key: pa.Array, job_id: str, schema: pa.Schema
) -> pa.Table:
    """One row per element of ``lists``: its key, job, position and the element."""
    values = lists.flatten()
    parent = pc.list_parent_indices(lists)
    starts = pc.subtract(lists.offsets, lists.offsets[0]).cast(pa.int64())
    idx = pc.subtract(pa.array(range(len(values)), pa.int64()), starts.take(parent))
    columns = {"value": values} if shape.element is None else _columns(values, shape.element, "")[0]
    columns.update(key=key.take(parent), job_id=_repeat(job_id, len(values), pa.string()), idx=idx)
    return _table(columns, schema)


def _table(columns: dict[str, pa.Array], schema: pa.Schema) -> pa.Table:
    """``columns`` in ``schema``'s order and types (text cast to timestamps and dates)."""
    fields = [f for f in schema if f.name in columns]
    arrays = [columns[f.name].cast(f.type) for f in fields]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _as_read(type_: pa.DataType) -> pa.DataType:
    """How arrow reads a value of ``type_`` from JSON: timestamps and dates come as text."""
    return pa.string() if temporal(type_) else type_


def _repeat(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    """``value`` ``n`` times (the job, the time of a job's rows)."""
    return pa.repeat(pa.scalar(value, type_), n)
