"""Rows to arrow tables (output.py) and the shapes of the enrichment and list tables."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa

from apione_source.models import EnrichmentType, RecordResult, RecordStatus
from apione_source.output import Output
from apione_source.tables import ListRows, TableNames, enrichment_rows, table_columns

COMPANY = TableNames("apione_", EnrichmentType.COMPANY)
PEOPLE = TableNames("apione_", EnrichmentType.PEOPLE)
EMAIL = TableNames("apione_", EnrichmentType.EMAIL)
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _output(names: TableNames) -> Output:
    return Output(table_columns(names), load_id="1234.5", flush_rows=3)


def test_given_api_text_when_converted_then_columns_get_their_hinted_types() -> None:
    out = _output(COMPANY)
    table = out.to_arrow(
        COMPANY.enrichment,
        [
            {
                "key": "a.io",
                "job_id": "j",
                "enriched_at": NOW,
                "employee_count": 12,
                "updated_at": "2024-02-03T16:02:18Z",
            },
            {
                "key": "b.io",
                "job_id": "j",
                "enriched_at": NOW,
                "employee_count": None,
                "updated_at": None,
            },
        ],
    )
    assert table.schema.field("employee_count").type == pa.int64()
    assert pa.types.is_timestamp(table.schema.field("updated_at").type)
    assert table.column("updated_at")[0].as_py() == datetime(
        2024, 2, 3, 16, 2, 18, tzinfo=timezone.utc
    )
    # dlt's own columns, as on rows dlt normalizes itself
    assert table.column("_dlt_load_id").to_pylist() == ["1234.5", "1234.5"]
    assert len(set(table.column("_dlt_id").to_pylist())) == 2


def test_given_a_value_of_the_wrong_type_when_converted_then_it_is_kept_in_a_variant() -> None:
    table = _output(COMPANY).to_arrow(
        COMPANY.enrichment,
        [
            {"key": "a.io", "job_id": "j", "enriched_at": NOW, "employee_count": "about 10"},
            {"key": "b.io", "job_id": "j", "enriched_at": NOW, "employee_count": 7},
        ],
    )
    assert table.column("employee_count").to_pylist() == [None, 7]
    assert table.column("employee_count__v_text").to_pylist() == ["about 10", None]


def test_given_fractions_huge_numbers_or_bools_for_numbers_then_kept_in_a_variant() -> None:
    rows = [
        {"key": k, "job_id": "j", "enriched_at": NOW, "employee_count": v}
        for k, v in (("a.io", 12.5), ("b.io", 7.0), ("c.io", 2**64), ("d.io", 3), ("e.io", True))
    ]
    table = _output(COMPANY).to_arrow(COMPANY.enrichment, rows)
    # arrow alone would make 12.5 a 12 and True a 1, silently, and fail on 2**64
    assert table.column("employee_count").to_pylist() == [None, 7, None, 3, None]
    assert table.column("employee_count__v_text").to_pylist() == [
        "12.5",
        None,
        str(2**64),
        None,
        "true",
    ]


def test_given_a_number_for_a_yes_or_no_then_kept_in_a_variant() -> None:
    rows = [
        {"key": k, "job_id": "j", "enriched_at": NOW, "mx_found": v}
        for k, v in (("a@b.io", 2), ("c@d.io", True), ("e@f.io", 0.5))
    ]
    table = _output(EMAIL).to_arrow(EMAIL.enrichment, rows)
    assert table.column("mx_found").to_pylist() == [None, True, None]  # a cast: 2, 0.5 -> True
    assert table.column("mx_found__v_text").to_pylist() == ["2", None, "0.5"]


def test_given_a_number_for_a_timestamp_then_kept_in_a_variant_not_read_as_1970() -> None:
    rows = [
        {"key": k, "job_id": "j", "enriched_at": NOW, "updated_at": v}
        for k, v in (("a.io", 1704067200), ("b.io", "2024-02-03T16:02:18Z"))
    ]
    table = _output(COMPANY).to_arrow(COMPANY.enrichment, rows)
    assert table.column("updated_at").to_pylist() == [
        None,
        datetime(2024, 2, 3, 16, 2, 18, tzinfo=timezone.utc),
    ]
    assert table.column("updated_at__v_text").to_pylist() == ["1704067200", None]
    only_numbers = _output(COMPANY).to_arrow(COMPANY.enrichment, rows[:1])
    assert only_numbers.column("updated_at").to_pylist() == [None]


def test_given_unknown_fields_and_objects_in_text_columns_then_nothing_is_dropped() -> None:
    out = _output(COMPANY)
    table = out.to_arrow(
        COMPANY.outcomes,
        [
            {
                "outcome_id": "o1",
                "key": "a.io",
                "status": "matched",
                "finished_at": NOW,
                "input": {"domain": "a.io"},
                "new_field": 3,
            },
            {
                "outcome_id": "o2",
                "key": "b.io",
                "status": "matched",
                "finished_at": NOW,
                "input": None,
                "new_field": "x",
            },
        ],
    )
    assert [json.loads(v) if v else v for v in table.column("input").to_pylist()] == [
        {"domain": "a.io"},
        None,
    ]
    assert table.column("new_field").to_pylist() == ["3", '"x"']  # mixed types: JSON text


def test_given_an_integer_beyond_64_bits_in_an_unknown_field_then_kept_as_text() -> None:
    rows = [{"job_id": "j1", "status": "completed", "new_count": 2**64}]
    table = _output(COMPANY).to_arrow(COMPANY.jobs, rows)  # arrow alone: OverflowError
    assert table.column("new_count").to_pylist() == [str(2**64)]


def test_given_rows_over_the_flush_size_then_only_full_tables_are_handed_over() -> None:
    out = _output(COMPANY)
    rows = [{"job_id": f"j{i}", "status": "completed"} for i in range(4)]
    out.add(COMPANY.jobs, rows[:2])
    assert list(out.ready()) == []
    out.add(COMPANY.jobs, rows[2:])
    [ready] = list(out.ready())
    assert ready.data.num_rows == 4 and ready.meta.table_name == COMPANY.jobs
    assert list(out.flush()) == []  # nothing left behind
    out.add(COMPANY.runs, [{"load_id": "1", "type": "company"}])
    assert [t.data.num_rows for t in out.flush()] == [1]


def test_given_a_person_then_objects_flatten_and_lists_go_to_their_list_table() -> None:
    result = RecordResult(
        index=0,
        input={"email": "a@b.io"},
        status=RecordStatus.MATCHED,
        data={
            "full_name": "A B",
            "company": {"name": "B", "domain": "b.io"},
            "employment_history": [
                {"company": "B", "title": "CTO", "start_date": "2020-01-01"},
                {"company": "C", "title": "Dev"},
            ],
        },
    )
    row, lists = enrichment_rows(
        "a@b.io", "j1", NOW, result, list(PEOPLE.lists), version_hash=False
    )
    assert row["company__domain"] == "b.io" and "employment_history" not in row
    gathered = ListRows()
    gathered.add("a@b.io", "j1", lists["employment_history"])
    history = gathered.rows
    assert [(r["key"], r["job_id"], r["idx"], r["title"]) for r in history] == [
        ("a@b.io", "j1", 0, "CTO"),
        ("a@b.io", "j1", 1, "Dev"),
    ]
    table = _output(PEOPLE).to_arrow(PEOPLE.lists["employment_history"], history)
    assert table.column("start_date").to_pylist()[0].isoformat() == "2020-01-01"


def test_given_list_elements_gathered_by_column_then_one_table_with_every_element() -> None:
    out = _output(COMPANY)
    tags = ListRows()
    tags.add("a.io", "j1", ["saas", "b2b"])
    tags.add("b.io", "j1", [])
    tags.add("c.io", "j2", [7, {"odd": "element"}])  # off-contract: rows, kept, not dropped
    tags.add("d.io", "j2", [8])  # a number where text is hinted
    out.add_columns(COMPANY.lists["tags"], tags.columns)
    out.add(COMPANY.lists["tags"], tags.rows)

    [table] = [t.data for t in out.flush()]

    got = sorted(zip(*(table.column(c).to_pylist() for c in ("key", "job_id", "idx")), strict=True))
    assert got == [
        ("a.io", "j1", 0),
        ("a.io", "j1", 1),
        ("c.io", "j2", 0),
        ("c.io", "j2", 1),
        ("d.io", "j2", 0),
    ]
    values = dict(
        zip(table.column("key").to_pylist(), table.column("value").to_pylist(), strict=True)
    )
    assert values["d.io"] == "8" and "saas" in table.column("value").to_pylist()
    assert table.column("_dlt_id").null_count == 0
    assert len(set(table.column("_dlt_id").to_pylist())) == table.num_rows


def test_given_scalars_where_a_list_of_objects_is_hinted_then_kept_not_a_crash() -> None:
    out = _output(PEOPLE)
    history = ListRows()
    history.add("a@b.io", "j1", ["Acme", "Initech"])  # off-contract: objects expected
    out.add_columns(PEOPLE.lists["employment_history"], history.columns)

    [table] = [t.data for t in out.flush()]

    assert table.column("value").to_pylist() == ["Acme", "Initech"]
    assert table.column("idx").to_pylist() == [0, 1]
