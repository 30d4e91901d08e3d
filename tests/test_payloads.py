"""Matched payloads built by arrow at once (payloads.py): the same rows as row by row."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import pytest

from apione_source.models import EnrichmentType, RecordResult, RecordStatus
from apione_source.output import Output
from apione_source.payloads import PayloadTables
from apione_source.sandbox import data
from apione_source.tables import TableNames, table_columns

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
TYPES = {
    EnrichmentType.COMPANY: (data.company, lambda i: {"domain": f"c{i}.example.com"}),
    EnrichmentType.PEOPLE: (data.person, lambda i: {"email": f"jane.doe{i}@c{i}.example.com"}),
    EnrichmentType.EMAIL: (data.email_check, lambda i: {"email": f"a.b{i}@c{i}.example.com"}),
}


def _payloads(etype: EnrichmentType, n: int = 40) -> list[dict[str, Any] | None]:
    """Sandbox payloads, and the same with fields left out, nulls and empty lists."""
    build, record = TYPES[etype]
    payloads: list[dict[str, Any] | None] = [build(record(i)) for i in range(n)]
    first = payloads[0]
    assert first is not None
    for i, (name, value) in enumerate(first.items()):
        changed = copy.deepcopy(first)
        if i % 2 or isinstance(value, (dict, list)):
            del changed[name]  # left out (a null object or list goes the row way, below)
        else:
            changed[name] = None
        payloads.append(changed)
    names = TableNames("apione_", etype)
    for name in names.lists:
        payloads.append({**first, name: []})
    payloads.append({})
    payloads.append(None)
    return payloads


def _row_way(etype: EnrichmentType, payloads: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The rows as SCD2 writes them (row by row, for its version hash), the hash apart."""
    tables = _added(etype, payloads, version_hash=True)
    for row in tables[TableNames("apione_", etype).enrichment]:
        del row["data_hash"]
    return tables


def _arrow_way(etype: EnrichmentType, payloads: list[dict[str, Any] | None]) -> dict[str, Any]:
    names = TableNames("apione_", etype)
    keys = [f"k{i}" for i in range(len(payloads))]
    tables = PayloadTables(names, _output(etype)).build(keys, payloads, "j1", NOW)
    assert tables is not None, "payloads of the contract's shape go the fast way"
    return _added(etype, payloads, version_hash=False)


def _added(
    etype: EnrichmentType, payloads: list[dict[str, Any] | None], *, version_hash: bool
) -> dict[str, Any]:
    out = _output(etype)
    results = [
        (f"k{i}", RecordResult(index=i, input={}, status=RecordStatus.MATCHED, data=p))
        for i, p in enumerate(payloads)
    ]
    PayloadTables(TableNames("apione_", etype), out).add(
        results, "j1", NOW, version_hash=version_hash
    )
    return _rows(out)


def _output(etype: EnrichmentType) -> Output:
    return Output(table_columns(TableNames("apione_", etype)), load_id="1")


def _rows(out: Output) -> dict[str, Any]:
    """Table -> its rows, as dicts of their non-null values (dlt's row ids apart)."""
    tables = {}
    for item in out.flush():
        rows = item.data.drop_columns(["_dlt_id"]).to_pylist()
        tables[item.meta.table_name] = [{k: v for k, v in r.items() if v is not None} for r in rows]
    return tables


@pytest.mark.parametrize("etype", list(EnrichmentType))
def test_given_payloads_of_the_contract_then_both_ways_give_the_same_rows(
    etype: EnrichmentType,
) -> None:
    payloads = _payloads(etype)

    fast = _arrow_way(etype, payloads)

    assert fast == _row_way(etype, payloads)
    names = TableNames("apione_", etype)
    assert len(fast[names.enrichment]) == len(payloads)  # a row even for an empty payload
    for table in names.lists.values():
        assert fast[table], f"{table} has the lists' elements"


def _company(**changes: Any) -> dict[str, Any]:
    payload = data.company({"domain": "a.example.com"})
    for path, value in changes.items():
        *parents, name = path.split("__")
        target = payload
        for parent in parents:
            target = target[parent]
        target[name] = value
    return payload


@pytest.mark.parametrize(
    "payload",
    [
        _company(new_field=1),  # a field ApiOne added: a new column
        _company(location__floor=3),  # the same inside an object
        _company(location=None),  # a null object
        _company(location="Berlin"),  # text where an object is
        _company(tags=None),  # a null list
        _company(tags="a, b"),  # text where a list is
        _company(tags=["ok", {"odd": "element"}]),  # an object among text elements
        _company(tags=["ok", 7]),  # a number among text elements
        _company(employee_count="about 10"),  # text in a number column: a variant
        _company(updated_at="last Tuesday"),  # text that is no timestamp
        _company(updated_at=1704067200),  # a number for a timestamp
        _company(founded_year=1999.5),  # a fraction arrow would cut to 1999
        _company(employee_count=2**63),  # beyond a 64-bit integer
    ],
)
def test_given_a_payload_off_the_contract_then_the_job_goes_the_row_way(
    payload: dict[str, Any],
) -> None:
    names = TableNames("apione_", EnrichmentType.COMPANY)
    good = data.company({"domain": "b.example.com"})
    tables = PayloadTables(names, _output(EnrichmentType.COMPANY)).build(
        ["a", "b"], [payload, good], "j1", NOW
    )
    assert tables is None

    rows = _added(EnrichmentType.COMPANY, [payload, good], version_hash=False)

    assert rows == _row_way(EnrichmentType.COMPANY, [payload, good])
    assert len(rows[names.enrichment]) == 2  # the row way keeps both, odd values and all


def test_given_people_with_null_elements_in_their_history_then_the_row_way() -> None:
    names = TableNames("apione_", EnrichmentType.PEOPLE)
    payload = data.person({"email": "jane.doe@acme.example.com"})
    payload["employment_history"] = [*payload["employment_history"], None]
    tables = PayloadTables(names, _output(EnrichmentType.PEOPLE)).build(["a"], [payload], "j1", NOW)
    assert tables is None
