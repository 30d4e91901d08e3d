"""Shared end-to-end helpers: an input warehouse, a destination file and a pipeline per test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dlt
import duckdb

from apione_source import apione, run_enrichment
from apione_source.journal import COLUMNS, IN_FLIGHT, Entry, Journal, MemoryStore
from apione_source.models import EnrichmentType
from apione_source.sandbox import Sandbox
from apione_source.sandbox.data import canonical_json, is_not_found
from apione_source.tables import FINAL_STATUSES, TableNames

COMPANY = TableNames("apione_", EnrichmentType.COMPANY)
PEOPLE = TableNames("apione_", EnrichmentType.PEOPLE)
EMAIL = TableNames("apione_", EnrichmentType.EMAIL)
# Each company table's key (a DuckDB expression where it has several columns): no value
# of it may be there twice, whatever was killed when.
MERGE_KEYS = {
    COMPANY.enrichment: "key",
    COMPANY.outcomes: "outcome_id",
    COMPANY.rejected: "input_pk",
    COMPANY.jobs: "job_id",
    **{t: "concat_ws('|', key, job_id, idx)" for t in COMPANY.lists.values()},
    COMPANY.runs: "concat_ws('|', load_id, type)",
}

TEN_KB = "a" * 10_240
ROOT = Path(__file__).resolve().parents[1]


# --- helpers --------------------------------------------------------------------------------


class RealTimeClock:
    """Real unix time plus an offset the test can push forward (for the sandbox only)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def company_key(domain: str) -> str:
    """The sandbox's billing key of a company record with this (normalized) domain."""
    return canonical_json({"domain": domain})


def found_domains(n: int, prefix: str = "co") -> list[str]:
    """``n`` distinct domains the sandbox matches (not in its simulated not_found share)."""
    out, i = [], 0
    while len(out) < n:
        d = f"{prefix}{i}.com"
        if not is_not_found(company_key(d)):
            out.append(d)
        i += 1
    return out


@dataclass
class Env:
    """One test's warehouse, destination file and pipeline."""

    tmp: Path
    sandbox: Sandbox
    warehouse: Path
    out: Path
    pipeline: dlt.Pipeline

    # warehouse side ---------------------------------------------------------------------

    def exec(self, sql: str, params: Iterable[Any] | None = None) -> None:
        con = duckdb.connect(str(self.warehouse))
        try:
            con.execute(sql, params) if params is not None else con.execute(sql)
        finally:
            con.close()

    def insert_companies(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Insert (id, domain) or (id, domain, updated_at) rows in one statement."""
        full = [r if len(r) == 3 else (*r, "2024-01-01") for r in rows]
        marks = ", ".join(["(?, ?, CAST(? AS TIMESTAMP))"] * len(full))
        self.exec(f"INSERT INTO crm.companies VALUES {marks}", [v for r in full for v in r])

    # destination side -------------------------------------------------------------------

    def query(self, sql: str, params: Iterable[Any] | None = None) -> list[tuple[Any, ...]]:
        con = duckdb.connect(str(self.out), read_only=True)
        try:
            cur = con.execute(sql, params) if params is not None else con.execute(sql)
            return cur.fetchall()
        finally:
            con.close()

    def tables(self) -> set[str]:
        if not self.out.exists():
            return set()
        rows = self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'enriched'"
        )
        return {r[0] for r in rows}

    def count(self, table: str) -> int:
        if table not in self.tables():
            return 0
        return int(self.query(f"SELECT count(*) FROM enriched.{table}")[0][0])

    # running ----------------------------------------------------------------------------

    def run(self, **overrides: Any) -> Any:
        kwargs: dict[str, Any] = {
            "api_key": self.sandbox.config.api_key,
            "base_url": self.sandbox.base_url,
            "enrichment_type": "company",
            "input_table": "companies",
            "primary_key": "id",
            "input_dataset": "crm",
            "input_credentials": str(self.warehouse),
            "wait_budget_seconds": 30,
        }
        kwargs.update(overrides)
        info = run_enrichment(self.pipeline, apione(**kwargs))
        info.raise_on_failed_jobs()
        return info


def open_journal(destination: Path, names: TableNames = COMPANY) -> list[Entry]:
    """Entries of the job journal in the destination that are not finished, as a run sees them."""
    con = duckdb.connect(str(destination), read_only=True)
    try:
        rows = con.execute(
            f"SELECT {', '.join(COLUMNS)} FROM enriched.{names.journal} WHERE scope = ?",
            [names.outcomes],
        ).fetchall()
    except duckdb.CatalogException:
        return []
    try:
        loads = con.execute("SELECT load_id FROM enriched._dlt_loads WHERE status = 0")
        done = {r[0] for r in loads.fetchall()}
    except duckdb.CatalogException:
        done = set()  # no load completed yet
    finally:
        con.close()
    store = MemoryStore()
    store.append([dict(zip(COLUMNS, r, strict=True)) for r in rows])
    journal = Journal(store, names.outcomes, "test", "test", time.time)
    journal.open(lambda loads: loads & done)
    return [e for e in journal.entries.values() if not e.done or e.unreported]


def journal_jobs_in_flight(destination: Path, names: TableNames = COMPANY) -> set[str]:
    """Job ids the journal still has to collect."""
    return {
        str(e.job_id)
        for e in open_journal(destination, names)
        if e.phase == IN_FLIGHT and not e.done
    }


def billed(sb: Sandbox) -> tuple[int, int]:
    u = sb.usage()
    return u["jobs_created"], u["records_billed"]


def outcome_counts_per_pk(env: Env, names: TableNames = COMPANY) -> Counter[str]:
    rows = env.query(f"SELECT input_pk, count(*) FROM enriched.{names.outcomes} GROUP BY 1")
    return Counter({pk: n for pk, n in rows})


def assert_no_duplicate_keys(env: Env, table: str) -> None:
    total, distinct = env.query(f"SELECT count(*), count(DISTINCT key) FROM enriched.{table}")[0]
    assert total == distinct, f"{table} has {total - distinct} duplicate key row(s)"


def assert_one_final_outcome_per_row(
    rows: Iterable[tuple[str, int, str]], valid_pks: set[str]
) -> None:
    """Every valid input row has exactly one final outcome, and it is its latest attempt.

    Args:
        rows: ``(input_pk, attempt, status)`` of every outcome row.
        valid_pks: Primary keys of the input rows that could be sent.
    """
    by_pk: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for pk, attempt, status in rows:
        by_pk[pk].append((attempt, status))
    assert set(by_pk) == valid_pks
    for pk, attempts in by_pk.items():
        finals = [a for a in attempts if a[1] in FINAL_STATUSES]
        assert len(finals) == 1, f"input row {pk}: {sorted(attempts)}"
        latest = max(a for a, _ in attempts)
        assert [s for a, s in attempts if a == latest] == [finals[0][1]], sorted(attempts)


def enrich_process(
    env: Env, *, cwd: Path | None = None, api_key: str | None = None, **settings: Any
) -> subprocess.Popen[str]:
    """The production script (``pipelines/enrich.py``) in its own process, configured by
    env vars as a user would; run from ``cwd`` (the repo root uses the shipped .dlt/)."""
    config = {
        "SOURCES__APIONE__API_KEY": api_key or env.sandbox.config.api_key,
        "SOURCES__APIONE__BASE_URL": env.sandbox.base_url,
        "SOURCES__APIONE__ENRICHMENT_TYPE": "company",
        "SOURCES__APIONE__INPUT_TABLE": "companies",
        "SOURCES__APIONE__PRIMARY_KEY": "id",
        "SOURCES__APIONE__INPUT_DATASET": "crm",
        "SOURCES__APIONE__INPUT_COLUMNS": '{"domain": "domain"}',
        "SOURCES__APIONE__INPUT_CREDENTIALS": str(env.warehouse),
        "DESTINATION__DUCKDB__CREDENTIALS": str(env.out),
        "PIPELINE_NAME": "apione_e2e",
        "DLT_DATA_DIR": str(env.tmp / "proc_data"),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
    }
    config.update({f"SOURCES__APIONE__{k.upper()}": str(v) for k, v in settings.items()})
    environ = {k: v for k, v in os.environ.items() if k not in ("DLT_PROJECT_DIR",)}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "enrich.py")],
        cwd=cwd or env.tmp,
        env={**environ, **config},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
