"""Hostile input rows: NULLs, blanks, wrong types, huge and control-laden strings, unicode,
SQL-looking text, IDNs, plus tags and near-duplicates, for company, email and people.

Whatever the row, the run must not crash, and each row must end either enriched (one
outcome row, its key billed once) or rejected with a reason. The input is only read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pytest

from apione_source import apione, run_enrichment
from apione_source.models import EnrichmentType
from apione_source.normalize import REJECTION_REASONS
from apione_source.sandbox import Sandbox
from apione_source.tables import TableNames
from tests.conftest import SANDBOX_API_KEY

TEN_KB = "x" * 10_240
SQL = "'; DROP TABLE crm.companies; --"
FINAL = ("matched", "not_found", "invalid", "error")


@dataclass
class Case:
    """One input table, the enrichment run over it, and its tables."""

    tmp: Path
    sandbox: Sandbox
    warehouse: Path
    names: TableNames

    def __post_init__(self) -> None:
        self.out = self.tmp / f"{self.names.enrichment}.duckdb"

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        con = duckdb.connect(str(self.out), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def tables(self) -> set[str]:
        rows = self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'enriched'"
        )
        return {r[0] for r in rows}

    def run(self, **kwargs: Any) -> None:
        pipeline = dlt.pipeline(
            pipeline_name=f"hostile_{self.names.enrichment}_{kwargs['input_table']}",
            destination=dlt.destinations.duckdb(str(self.out)),
            dataset_name="enriched",
            pipelines_dir=str(self.tmp / "pipelines"),
        )
        info = run_enrichment(
            pipeline,
            apione(
                api_key=SANDBOX_API_KEY,
                base_url=self.sandbox.base_url,
                input_dataset="crm",
                input_credentials=str(self.warehouse),
                wait_budget_seconds=30,
                **kwargs,
            ),
        )
        info.raise_on_failed_jobs()


@pytest.fixture
def warehouse(tmp_path: Path) -> Path:
    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA crm")
    finally:
        con.close()
    return path


def fill(warehouse: Path, ddl: str, rows: list[tuple[Any, ...]]) -> None:
    con = duckdb.connect(str(warehouse))
    try:
        con.execute(ddl)
        marks = ", ".join("?" * len(rows[0]))
        table = ddl.split("(")[0].split()[-1]
        con.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    finally:
        con.close()


def input_count(warehouse: Path, table: str) -> int:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        return int(con.execute(f"SELECT count(*) FROM crm.{table}").fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


def assert_each_row_enriched_once_or_rejected(
    case: Case, pks: set[str], expected_rejected: set[str] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """Returns ``{pk: key}`` of enriched rows and ``{pk: reason}`` of rejected ones."""
    names, tables = case.names, case.tables()
    outcomes: list[tuple[str, str, str]] = (
        case.query(f"SELECT input_pk, key, status FROM enriched.{names.outcomes}")
        if names.outcomes in tables
        else []
    )
    rejected_rows = case.query(f"SELECT input_pk, reason, detail FROM enriched.{names.rejected}")
    per_pk = Counter(pk for pk, _, _ in outcomes)
    assert all(n == 1 for n in per_pk.values()), per_pk.most_common(3)
    assert {s for _, _, s in outcomes} <= set(FINAL)
    enriched = {pk: key for pk, key, _ in outcomes}
    rejected = {pk: reason for pk, reason, _ in rejected_rows}
    assert not set(enriched) & set(rejected), "a row is both enriched and rejected"
    assert set(enriched) | set(rejected) == pks, "a row was dropped silently"
    assert set(rejected.values()) <= REJECTION_REASONS
    assert all(detail and len(detail) < 500 for _, _, detail in rejected_rows)
    if expected_rejected is not None:
        assert set(rejected) == expected_rejected
    usage = case.sandbox.usage()
    assert set(usage["billed_per_key"].values()) <= {1}
    assert usage["records_billed"] == len(set(enriched.values()))
    return enriched, rejected


# --- company ----------------------------------------------------------------------------------

COMPANY_ROWS: dict[str, Any] = {
    "null": None,
    "empty": "",
    "spaces": "   ",
    "whitespace": "\t\r\n ",
    "ten_kb": TEN_KB,
    "ten_kb_domain": "a" * 10_000 + ".com",
    "nul_byte": "evil\x00corp.com",
    "unit_sep": "evil\x1fcorp.com",
    "del": "evil\x7fcorp.com",
    "c1": "evil\x85corp.com",
    "zero_width": "evil\u200bcorp.com",
    "rtl_override": "\u202eevilcorp.com",
    "emoji": "\u2603.com",
    "sql": SQL,
    "sql_domain": "x.com'; DROP TABLE crm.companies; --",
    "sql_union": "a.com' UNION SELECT * FROM crm.companies --",
    "json": '{"domain": "json.com"}',
    "idn": "münchen.de",
    "idn_upper": "MÜNCHEN.DE",
    "idn_puny": "xn--mnchen-3ya.de",
    "idn_www": "https://www.München.de/impressum",
    "cyrillic_homoglyph": "\u0455tripe.com",
    "stripe": "stripe.com",
    "stripe_upper": "STRIPE.COM",
    "stripe_www": "www.stripe.com",
    "stripe_url": "https://www.Stripe.com:443/pricing?x=1#y",
    "stripe_dot": "stripe.com.",
    "email_not_domain": "user@stripe.com",
    "ip": "192.168.0.1",
    "localhost": "localhost",
    "label_64": "a" * 64 + ".com",
    "label_63": "b" * 63 + ".com",
    "tab_inside": "tab\tinside.com",
    "newline_inside": "line\nbreak.com",
    "quote": 'quo"te.com',
    "percent": "%27%3B.com",
}


def test_given_hostile_company_rows_when_run_then_each_is_enriched_once_or_rejected(
    tmp_path: Path, warehouse: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    fill(
        warehouse,
        "CREATE TABLE crm.companies(id VARCHAR, domain VARCHAR)",
        list(COMPANY_ROWS.items()),
    )
    case = Case(
        tmp_path, sandbox_factory(), warehouse, TableNames("apione_", EnrichmentType.COMPANY)
    )

    case.run(enrichment_type="company", input_table="companies", primary_key="id")

    enriched, rejected = assert_each_row_enriched_once_or_rejected(case, set(COMPANY_ROWS))
    # the same company, however spelled, is one key, billed once
    assert {enriched[pk] for pk in ("idn", "idn_upper", "idn_puny", "idn_www")} == {
        "xn--mnchen-3ya.de"
    }
    assert {enriched[pk] for pk in ("stripe", "stripe_upper", "stripe_www", "stripe_url")} == {
        "stripe.com"
    }
    assert enriched["stripe_dot"] == "stripe.com"
    # a homoglyph is another domain, never conflated with the real one
    assert enriched["cyrillic_homoglyph"] != "stripe.com"
    assert enriched["label_63"] == "b" * 63 + ".com"
    expected_reasons = {
        "null": "null",
        "empty": "empty",
        "spaces": "empty",
        "whitespace": "empty",
        "ten_kb": "too_long",
        "ten_kb_domain": "too_long",
        "nul_byte": "control_characters",
        "unit_sep": "control_characters",
        "del": "control_characters",
        "c1": "control_characters",
        "sql": "invalid_domain",
        "email_not_domain": "invalid_domain",
        "ip": "invalid_domain",
        "localhost": "invalid_domain",
        "tab_inside": "control_characters",
        "newline_inside": "control_characters",
    }
    for pk, reason in expected_reasons.items():
        assert rejected.get(pk) == reason, (pk, rejected.get(pk), enriched.get(pk))
    for pk in ("zero_width", "rtl_override", "emoji", "sql_domain", "sql_union", "json", "quote"):
        assert pk in rejected, (pk, enriched.get(pk))
    assert rejected["label_64"] in ("too_long", "invalid_domain")
    # the input is intact
    assert input_count(warehouse, "companies") == len(COMPANY_ROWS)
    assert "companies" not in case.tables()


@pytest.mark.parametrize(
    ("ddl", "rows", "reasons"),
    [
        pytest.param(
            "CREATE TABLE crm.companies_int(id INTEGER, domain INTEGER)",
            [(1, 42), (2, None), (3, 0), (4, -7)],
            {"1": "not_a_string", "2": "null", "3": "not_a_string", "4": "not_a_string"},
            id="integer-column",
        ),
        pytest.param(
            "CREATE TABLE crm.companies_blob(id INTEGER, domain BLOB)",
            [(1, b"stripe.com"), (2, b"\x00\xff\xfe"), (3, None), (4, b"")],
            {"1": "not_a_string", "2": "not_a_string", "3": "null", "4": "not_a_string"},
            id="blob-column",
        ),
    ],
)
def test_given_domain_column_of_wrong_type_when_run_then_every_row_is_rejected_and_nothing_billed(
    tmp_path: Path,
    warehouse: Path,
    sandbox_factory: Callable[..., Sandbox],
    ddl: str,
    rows: list[tuple[Any, ...]],
    reasons: dict[str, str],
) -> None:
    fill(warehouse, ddl, rows)
    table = ddl.split("(")[0].split(".")[-1]
    case = Case(
        tmp_path, sandbox_factory(), warehouse, TableNames("apione_", EnrichmentType.COMPANY)
    )

    case.run(enrichment_type="company", input_table=table, primary_key="id")

    _, rejected = assert_each_row_enriched_once_or_rejected(case, set(reasons), set(reasons))
    assert rejected == reasons
    assert case.sandbox.usage()["submit_calls"] == 0
    assert input_count(warehouse, table) == len(rows)


# --- email -------------------------------------------------------------------------------------

EMAIL_ROWS: dict[str, Any] = {
    "plain": "jane@example.com",
    "upper": "JANE@EXAMPLE.COM",
    "padded": "  jane@example.com \n",
    "plus": "jane+news@example.com",
    "plus_upper": "Jane+News@Example.com",
    "plus_other": "jane+billing@example.com",
    "idn_domain": "hans@münchen.de",
    "idn_puny": "hans@xn--mnchen-3ya.de",
    "unicode_local": "zoë@example.com",
    "null": None,
    "empty": "",
    "spaces": "   ",
    "ten_kb": TEN_KB + "@example.com",
    "no_at": "jane.example.com",
    "two_at": "jane@@example.com",
    "sql": "'; DROP TABLE crm.emails; --@example.com",
    "sql_plain": SQL,
    "control": "ja\x00ne@example.com",
    "zero_width": "ja\u200bne@example.com",
    "dots": "jane..doe@example.com",
    "ip_domain": "jane@127.0.0.1",
}


def test_given_hostile_email_rows_when_run_then_each_is_enriched_once_or_rejected(
    tmp_path: Path, warehouse: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    fill(warehouse, "CREATE TABLE crm.emails(id VARCHAR, email VARCHAR)", list(EMAIL_ROWS.items()))
    case = Case(tmp_path, sandbox_factory(), warehouse, TableNames("apione_", EnrichmentType.EMAIL))

    case.run(enrichment_type="email", input_table="emails", primary_key="id")

    enriched, rejected = assert_each_row_enriched_once_or_rejected(case, set(EMAIL_ROWS))
    assert {enriched[pk] for pk in ("plain", "upper", "padded")} == {"jane@example.com"}
    # plus tags are different mailboxes; their case is not
    assert enriched["plus"] == enriched["plus_upper"] == "jane+news@example.com"
    assert len({enriched["plain"], enriched["plus"], enriched["plus_other"]}) == 3
    assert enriched["idn_domain"] == enriched["idn_puny"] == "hans@xn--mnchen-3ya.de"
    for pk in ("null", "empty", "spaces", "ten_kb", "no_at", "two_at", "sql", "sql_plain"):
        assert pk in rejected, (pk, enriched.get(pk))
    for pk in ("control", "zero_width", "dots", "ip_domain"):
        assert pk in rejected, (pk, enriched.get(pk))
    assert rejected["null"] == "null"
    assert rejected["ten_kb"] == "too_long"
    assert rejected["control"] == "control_characters"
    assert input_count(warehouse, "emails") == len(EMAIL_ROWS)


# --- people ------------------------------------------------------------------------------------

PEOPLE_DDL = (
    "CREATE TABLE crm.people(id VARCHAR, email VARCHAR, linkedin_url VARCHAR, "
    "first_name VARCHAR, last_name VARCHAR, domain VARCHAR)"
)
PEOPLE_ROWS: dict[str, tuple[Any, ...]] = {
    "email": ("ann@example.com", None, None, None, None),
    "email_upper": ("ANN@EXAMPLE.COM", "https://linkedin.com/in/ann", None, None, None),
    "email_plus": ("ann+x@example.com", None, None, None, None),
    "linkedin": (None, "https://www.linkedin.com/in/bob-smith/", None, None, None),
    "linkedin_dup": (None, "linkedin.com/in/BOB-SMITH?trk=x", None, None, None),
    "bad_email_good_linkedin": ("not-an-email", "https://linkedin.com/in/carol", None, None, None),
    "names": (None, None, "Zoë", "Müller", "münchen.de"),
    "names_dup": (None, None, "  ZOË ", "MÜLLER", "https://www.xn--mnchen-3ya.de/"),
    "sql_names": (None, None, "Robert'); DROP TABLE crm.people;--", "Tables", "school.edu"),
    "all_null": (None, None, None, None, None),
    "all_empty": ("", " ", "", "", ""),
    "half_name": (None, None, "Dan", None, "example.com"),
    "control_name": (None, None, "E\x00ve", "Adams", "example.com"),
    "huge_name": (None, None, TEN_KB, "Adams", "example.com"),
    "bad_everything": ("nope", "https://example.com/in/x", "F", "L", "not a domain"),
    "sql_email": (SQL, None, None, None, None),
}


def test_given_hostile_people_rows_when_run_then_each_is_enriched_once_or_rejected(
    tmp_path: Path, warehouse: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    fill(warehouse, PEOPLE_DDL, [(pk, *v) for pk, v in PEOPLE_ROWS.items()])
    case = Case(
        tmp_path, sandbox_factory(), warehouse, TableNames("apione_", EnrichmentType.PEOPLE)
    )

    case.run(enrichment_type="people", input_table="people", primary_key="id")

    enriched, rejected = assert_each_row_enriched_once_or_rejected(case, set(PEOPLE_ROWS))
    assert enriched["email"] == enriched["email_upper"] == "email:ann@example.com"
    assert enriched["email_plus"] == "email:ann+x@example.com"
    assert enriched["linkedin"] == enriched["linkedin_dup"]
    assert enriched["linkedin"].startswith("linkedin:")
    assert enriched["bad_email_good_linkedin"].startswith("linkedin:")
    assert enriched["names"] == enriched["names_dup"]
    assert enriched["names"].endswith("@xn--mnchen-3ya.de")
    assert "sql_names" in enriched  # odd, but a name: sent as data, never as SQL
    assert rejected["all_null"] == "missing_fields"
    assert rejected["all_empty"] == "missing_fields"
    assert rejected["half_name"] == "missing_fields"
    assert rejected["control_name"] == "control_characters"
    assert rejected["huge_name"] == "too_long"
    for pk in ("bad_everything", "sql_email"):
        assert pk in rejected
    assert input_count(warehouse, "people") == len(PEOPLE_ROWS)
