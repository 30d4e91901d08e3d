"""Small defects of issue 8: identifiers with ``%``, identifiers that need quoting, and
cursors that do not survive dlt's state as they are.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest

from apione_source import apione
from apione_source.errors import ConfigurationError
from apione_source.reader import (
    InputReader,
    InputRow,
    InputSpec,
    check_identifier,
    decode_cursor,
    encode_cursor,
)

# --- identifiers: '%' refused, quotes / spaces / Unicode read fine ----------------------------


@pytest.mark.parametrize("name", ["companies", "my table", 'pr\u00e9nom "x"', "o'neil", "\u540d"])
def test_given_name_without_percent_when_checked_then_returned(name: str) -> None:
    assert check_identifier("input_table", name) == name


@pytest.mark.parametrize("name", ["a%sb", "%", "100%", "a%%b", "x\x00y"])
def test_given_name_with_percent_or_nul_when_checked_then_error_names_the_setting(
    name: str,
) -> None:
    with pytest.raises(ConfigurationError, match=r"sources\.apione\.cursor_column"):
        check_identifier("cursor_column", name)


def test_given_non_string_name_when_checked_then_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"sources\.apione\.primary_key"):
        check_identifier("primary_key", 7)


def make_spec(warehouse: Path, **overrides: Any) -> InputSpec:
    fields: dict[str, Any] = {
        "destination": dlt.destinations.duckdb(str(warehouse)),
        "dataset": "crm",
        "table": "companies",
        "primary_key": "id",
        "columns": {"domain": "domain"},
        "cursor_column": "updated_at",
        **overrides,
    }
    return InputSpec(**fields)


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        ("dataset", "crm%s", "input_dataset"),
        ("table", "compa%nies", "input_table"),
        ("primary_key", "id%s", "primary_key"),
        ("columns", {"domain": "dom%sain"}, "input_columns.domain"),
        ("cursor_column", "updated%s", "cursor_column"),
    ],
)
def test_given_percent_in_an_input_name_when_spec_built_then_error_names_the_setting(
    tmp_path: Path, field: str, value: Any, setting: str
) -> None:
    with pytest.raises(ConfigurationError, match=rf"sources\.apione\.{setting}\b"):
        make_spec(tmp_path / "w.duckdb", **{field: value})


def company_warehouse(path: Path) -> Path:
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA crm")
        con.execute("CREATE TABLE crm.companies(id INT, domain VARCHAR, updated_at INT)")
        con.execute("INSERT INTO crm.companies VALUES (1, 'a.com', 1)")
    finally:
        con.close()
    return path


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("input_table", "compa%nies"),
        ("input_dataset", "crm%"),
        ("primary_key", "i%sd"),
        ("cursor_column", "updated%sat"),
        ("input_columns", {"domain": "dom%ain"}),
        ("table_prefix", "apione%_"),
    ],
)
def test_given_percent_in_a_setting_when_source_built_then_configuration_error(
    tmp_path: Path, setting: str, value: Any
) -> None:
    warehouse = company_warehouse(tmp_path / "w.duckdb")
    kwargs: dict[str, Any] = {
        "api_key": "sk_test_x",
        "base_url": "http://127.0.0.1:9/api/v1",  # never called: config fails first
        "enrichment_type": "company",
        "input_table": "companies",
        "primary_key": "id",
        "input_dataset": "crm",
        "input_credentials": str(warehouse),
        setting: value,
    }
    named = "input_columns.domain" if setting == "input_columns" else setting
    with pytest.raises(ConfigurationError, match=rf"sources\.apione\.{named}\b.*'%'"):
        apione(**kwargs)


ODD_PK, ODD_FIRST, ODD_LAST, ODD_CURSOR = 'id "x"', 'pr\u00e9nom "x"', "o'neil", "upd at \u00e9"


def odd_names_warehouse(path: Path) -> Path:
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA crm")
        con.execute(
            'CREATE TABLE crm."my table" ("id ""x""" INT, "pr\u00e9nom ""x""" VARCHAR, '
            '"o\'neil" VARCHAR, "upd at \u00e9" INT)'
        )
        con.execute(
            'INSERT INTO crm."my table" VALUES '
            "(1, 'Ana', 'Lee', 10), (2, 'Bo', 'Ng', 20), (3, NULL, 'Ox', NULL), (4, 'Cy', 'Ra', 30)"
        )
    finally:
        con.close()
    return path


def test_given_quotes_spaces_unicode_in_names_when_reading_then_rows_with_and_without_cursor(
    tmp_path: Path,
) -> None:
    warehouse = odd_names_warehouse(tmp_path / "w.duckdb")
    columns = {"first_name": ODD_FIRST, "last_name": ODD_LAST}
    with_cursor = InputReader(
        make_spec(
            warehouse,
            table="my table",
            primary_key=ODD_PK,
            columns=columns,
            cursor_column=ODD_CURSOR,
        ),
        chunk_size=2,
    )
    with_cursor.check()
    everything = [row for chunk in with_cursor.rows() for row in chunk]
    assert everything == [  # by cursor, then key; NULL cursors last (DuckDB's default)
        InputRow("1", {"first_name": "Ana", "last_name": "Lee"}, 10),
        InputRow("2", {"first_name": "Bo", "last_name": "Ng"}, 20),
        InputRow("4", {"first_name": "Cy", "last_name": "Ra"}, 30),
        InputRow("3", {"first_name": None, "last_name": "Ox"}, None),
    ]
    since = [row for chunk in with_cursor.rows(cursor_from=20) for row in chunk]
    assert sorted(r.pk for r in since if r.pk) == ["2", "3", "4"]  # >= 20, and the NULL one
    assert {r.pk: r.cursor for r in since} == {"2": 20, "3": None, "4": 30}

    without_cursor = InputReader(
        make_spec(
            warehouse, table="my table", primary_key=ODD_PK, columns=columns, cursor_column=None
        )
    )
    without_cursor.check()
    rows = [row for chunk in without_cursor.rows() for row in chunk]
    assert [(r.pk, r.values["first_name"]) for r in rows] == [
        ("1", "Ana"),
        ("2", "Bo"),
        ("3", None),
        ("4", "Cy"),
    ]


# --- cursors that dlt state does not give back as they were ----------------------------------

UUIDS = sorted(uuid.UUID(int=n) for n in (5, 2**64 + 7, 2**127 - 1, 2**127 + 3, 2**128 - 9))
CURSOR_VALUES: list[Any] = [
    uuid.UUID("8f14e45f-ceea-467a-9af4-7f1c9bd8a1c2"),
    Decimal("12.50"),
    Decimal("1E+30"),
    dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone.utc),
    dt.datetime(2024, 5, 6, 7, 8, 9),
    dt.date(2024, 5, 6),
    dt.time(7, 8, 9),
    dt.timedelta(days=3, seconds=4, microseconds=5),
    42,
    -(2**63),
    2**63 - 1,
    2**100,
    -(2**70),
    1.5,
    "2024-05-06 x",
    b"\x00\xff",
    True,
    None,
]


@pytest.mark.parametrize("value", CURSOR_VALUES, ids=repr)
def test_given_cursor_value_when_encoded_and_decoded_then_same_value_and_type(value: Any) -> None:
    encoded = encode_cursor(value)
    decoded = decode_cursor(encoded)
    assert decoded == value and type(decoded) is type(value)
    assert decode_cursor(decoded) == value  # idempotent
    if isinstance(value, (uuid.UUID, Decimal, dt.timedelta)) or (
        isinstance(value, int) and not -(2**63) <= value < 2**63
    ):
        assert isinstance(encoded, dict) and len(encoded) == 1
        json.dumps(encoded)  # plain JSON


def test_given_buffer_cursor_when_encoded_then_bytes() -> None:
    assert encode_cursor(bytearray(b"ab")) == b"ab"
    assert encode_cursor(memoryview(b"ab")) == b"ab"


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], object()], ids=repr)
def test_given_unsupported_cursor_type_when_encoded_then_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match="cursor_column"):
        encode_cursor(value)


def test_given_legacy_plain_str_state_and_uuid_column_when_decoded_like_then_uuid() -> None:
    text = str(UUIDS[1])
    assert decode_cursor(text) == text  # no hint: a str column's value stays a str
    assert decode_cursor(text, like=UUIDS[2]) == UUIDS[1]
    assert decode_cursor(text, like="other text") == text
    assert decode_cursor({"unknown": 1}) == {"unknown": 1}


def _state_pipeline(tmp: Path) -> dlt.Pipeline:
    return dlt.pipeline(
        pipeline_name="cursor_state",
        destination=dlt.destinations.duckdb(str(tmp / "out.duckdb")),
        dataset_name="cursors",
        pipelines_dir=str(tmp / "pipelines"),
    )


def _state_round_trip(tmp: Path, values: dict[str, Any], restore: bool) -> dict[str, Any]:
    """Store ``values`` in resource state in one run; return what the next run reads."""
    read: dict[str, Any] = {}

    @dlt.resource(name="cursor_state")
    def writes() -> Iterator[dict[str, int]]:
        dlt.current.resource_state().update(values)
        yield {"n": 1}

    @dlt.resource(name="cursor_state")
    def reads() -> Iterator[dict[str, int]]:
        read.update(dlt.current.resource_state())
        yield {"n": 2}

    _state_pipeline(tmp).run(writes())
    if restore:  # the local working dir is gone: state comes back from the destination
        shutil.rmtree(tmp / "pipelines")
        pipeline = _state_pipeline(tmp)
        pipeline.sync_destination()
    else:
        pipeline = _state_pipeline(tmp)  # a fresh object: state read back from disk
    pipeline.run(reads())
    return {k: read[k] for k in values}


def fresh_values() -> dict[str, tuple[Any, Any]]:
    """name -> (cursor value as DuckDB returns it, a larger value as DuckDB returns it)."""
    queries = {
        "uuid": f"SELECT '{UUIDS[1]}'::UUID, '{UUIDS[3]}'::UUID",
        "decimal": "SELECT 12.50::DECIMAL(10, 2), 12.51::DECIMAL(10, 2)",
        "timestamptz": "SELECT TIMESTAMPTZ '2024-05-06 07:08:09.5+00', "
        "TIMESTAMPTZ '2024-05-06 07:08:09.6+00'",
        "timestamp": "SELECT TIMESTAMP '2024-05-06 07:08:09', TIMESTAMP '2024-05-06 07:08:10'",
        "date": "SELECT DATE '2024-05-06', DATE '2024-05-07'",
        "bigint": "SELECT 41::BIGINT, 42::BIGINT",
        "hugeint": "SELECT (2::HUGEINT ** 100)::HUGEINT, (2::HUGEINT ** 100)::HUGEINT + 1",
        "varchar": "SELECT 'abc', 'abd'",
    }
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        pairs = {name: con.execute(sql).fetchone() for name, sql in queries.items()}
    finally:
        con.close()
    return {name: (pair[0], pair[1]) for name, pair in pairs.items() if pair is not None}


@pytest.mark.parametrize("restore", [False, True], ids=["from_disk", "from_destination"])
def test_given_cursors_in_dlt_state_when_next_run_reads_them_then_they_compare_with_fresh_values(
    tmp_path: Path, restore: bool
) -> None:
    values = fresh_values()
    stored = {name: encode_cursor(old) for name, (old, _) in values.items()}
    back = _state_round_trip(tmp_path, stored, restore)
    for name, (old, newer) in values.items():
        decoded = decode_cursor(back[name], like=newer)
        assert decoded == old and type(decoded) is type(old), name
        assert newer > decoded and not decoded > newer, name
        assert not old > decoded, name


def test_given_uuid_cursor_stored_raw_in_dlt_state_then_it_comes_back_as_str(
    tmp_path: Path,
) -> None:
    """Why :func:`encode_cursor` exists: dlt gives a raw UUID back as text."""
    back = _state_round_trip(tmp_path, {"raw": UUIDS[1]}, restore=False)
    assert back["raw"] == str(UUIDS[1])
    with pytest.raises(TypeError):
        _ = UUIDS[3] > back["raw"]


def uuid_warehouse(path: Path) -> Path:
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA crm")
        con.execute("CREATE TABLE crm.companies(id INT, domain VARCHAR, updated_at UUID)")
        con.executemany(
            "INSERT INTO crm.companies VALUES (?, ?, ?)",
            [(i, f"c{i}.com", str(u)) for i, u in enumerate(reversed(UUIDS))]
            + [(99, "null.com", None)],
        )
    finally:
        con.close()
    return path


@pytest.mark.parametrize("form", ["uuid", "encoded", "str"])
def test_given_uuid_cursor_when_reading_from_it_then_sql_compares_as_uuid(
    tmp_path: Path, form: str
) -> None:
    reader = InputReader(make_spec(uuid_warehouse(tmp_path / "w.duckdb")))
    reader.check()
    everything = [r for chunk in reader.rows() for r in chunk]
    assert [r.cursor for r in everything if r.cursor is not None] == UUIDS
    start = UUIDS[2]  # the 2**127 - 1 one: text order and unsigned order agree
    cursor_from = {"uuid": start, "encoded": encode_cursor(start), "str": str(start)}[form]
    rows = [r for chunk in reader.rows(cursor_from=cursor_from) for r in chunk]
    assert [r.cursor for r in rows if r.cursor is not None] == UUIDS[2:]
    assert [r.pk for r in rows if r.cursor is None] == ["99"]
    assert all(isinstance(r.cursor, uuid.UUID) for r in rows if r.cursor is not None)


def test_given_uuid_cursor_when_query_built_then_text_cast_to_uuid_not_a_uuid_arg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg2 cannot adapt a ``uuid.UUID`` argument ("can't adapt type 'UUID'"): the
    reader sends text and casts it in SQL, which DuckDB and Postgres both understand."""
    from dlt.destinations.impl.duckdb.sql_client import DuckDbSqlClient

    sent: list[tuple[str, tuple[Any, ...]]] = []
    real = DuckDbSqlClient.execute_query

    def spy(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        sent.append((query, args))
        return real(self, query, *args, **kwargs)

    monkeypatch.setattr(DuckDbSqlClient, "execute_query", spy)
    reader = InputReader(make_spec(uuid_warehouse(tmp_path / "w.duckdb")))
    rows = [r for chunk in reader.rows(cursor_from=UUIDS[2]) for r in chunk]
    assert len(rows) == 4
    query, args = next((q, a) for q, a in sent if a)  # the one query with an argument
    assert "CAST(%s AS UUID)" in query
    assert args == (str(UUIDS[2]),)
