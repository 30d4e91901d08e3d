"""Crash matrix: SIGKILL a real run at every phase, rerun it, and compare with a clean run.

Each case starts a sandbox in this process, runs ``tests/crash_runner.py`` as a
subprocess that kills itself (SIGKILL) at one phase, checks what survived on disk, reruns
the runner without a crash until no job is in flight, and then checks that the final
tables equal those of a clean run (separate workdir, separate sandbox with the same
seed), that every valid input row has exactly one final outcome, and that nothing was
billed twice except what a lost submit answer explains (and the ledger reports).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pytest

from apione_source.journal import Journal
from apione_source.sandbox import Sandbox
from apione_source.tables import FINAL_STATUSES
from tests.e2e import COMPANY, TEN_KB, assert_one_final_outcome_per_row, company_key

pytestmark = [pytest.mark.slow, pytest.mark.crash]

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "tests" / "crash_runner.py"
PIPELINE_NAME = "apione_crash"
SEED = 7
RECORDS_PER_JOB = 250
FINAL = FINAL_STATUSES
MERGE_KEYS = {
    COMPANY.enrichment: "key",
    COMPANY.outcomes: "outcome_id",
    COMPANY.rejected: "input_pk",
    COMPANY.jobs: "job_id",
}
CHILD_TABLES = (f"{COMPANY.enrichment}__tags", f"{COMPANY.enrichment}__technologies")


# --- the input ------------------------------------------------------------------------------

UNIQUE = 1_150  # 4 full jobs of 250 while reading, and a 5th of 150 at the end
DUPLICATES = {
    **{3_000 + j: f"https://www.FIRM{j * 37}.com/about" for j in range(30)},
    **{3_100 + j: f"firm{j * 53}.com." for j in range(10)},
    **{3_200 + j: f"  FIRM{j * 11}.COM:443  " for j in range(5)},
}
BAD = {
    4_000: None,
    4_001: "",
    4_002: "   ",
    4_003: "not a domain",
    4_004: TEN_KB,
    4_005: "127.0.0.1",
    4_006: "firm\x00evil.com",
    4_007: "localhost",
}


def input_rows() -> list[tuple[int, str | None]]:
    rows: list[tuple[int, str | None]] = [(i, f"firm{i}.com") for i in range(UNIQUE)]
    rows += list(DUPLICATES.items()) + list(BAD.items())
    return rows


VALID_PKS = {str(i) for i in range(UNIQUE)} | {str(pk) for pk in DUPLICATES}
UNIQUE_KEYS = {f"firm{i}.com" for i in range(UNIQUE)}


def make_warehouse(path: Path) -> Path:
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA crm")
        con.execute("CREATE TABLE crm.companies(id INT, domain VARCHAR)")
        con.executemany("INSERT INTO crm.companies VALUES (?, ?)", input_rows())
    finally:
        con.close()
    return path


# --- running the runner -------------------------------------------------------------------------


def run_runner(
    workdir: Path,
    sandbox: Sandbox,
    warehouse: Path,
    *,
    crash_at: str | None = None,
    crash_after: int | None = None,
    wait_budget: float = 30.0,
    timeout: float = 180.0,
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(RUNNER),
        "--workdir",
        str(workdir),
        "--base-url",
        sandbox.base_url,
        "--warehouse",
        str(warehouse),
        "--pipeline-name",
        PIPELINE_NAME,
        "--records-per-job",
        str(RECORDS_PER_JOB),
        "--wait-budget",
        str(wait_budget),
    ]
    if crash_at:
        cmd += ["--crash-at", crash_at]
    if crash_after is not None:
        cmd += ["--crash-after", str(crash_after)]
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DLT_PROJECT_DIR": str(workdir / "project"),
        "DLT_DATA_DIR": str(workdir / "dlt_data"),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        "RUNTIME__LOG_LEVEL": "WARNING",
    }
    env.pop("SOURCES__APIONE__API_KEY", None)
    return subprocess.run(
        cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def journal_path(workdir: Path) -> Path:
    return Journal.path_for(workdir / "pipelines", PIPELINE_NAME, "company_enrichment")


def read_journal(workdir: Path) -> tuple[list[tuple[str, str, int, str | None]], list[int]]:
    """(job_id, state, record_count, load_id) of every job, and the item count of each intent."""
    path = journal_path(workdir)
    assert path.exists(), f"no journal at {path}"
    con = sqlite3.connect(path)
    try:
        jobs = con.execute("SELECT job_id, state, record_count, load_id FROM jobs").fetchall()
        intents = [len(json.loads(r[0])) for r in con.execute("SELECT items FROM intents")]
    finally:
        con.close()
    return jobs, intents


# --- reading the destination ----------------------------------------------------------------------


@dataclass
class Dest:
    path: Path

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        con = duckdb.connect(str(self.path), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def tables(self) -> set[str]:
        if not self.path.exists():
            return set()
        rows = self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'enriched'"
        )
        return {r[0] for r in rows}

    def columns(self, table: str) -> list[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'enriched' AND table_name = ? ORDER BY column_name",
            [table],
        )
        return [r[0] for r in rows]

    def in_flight(self) -> int:
        if COMPANY.jobs not in self.tables():
            return 0
        return int(
            self.query(f"SELECT count(*) FROM enriched.{COMPANY.jobs} WHERE status = 'in_flight'")[
                0
            ][0]
        )


@dataclass
class Snapshot:
    """What a user compares between two runs: everything but ids and timestamps."""

    final_outcomes: set[tuple[str, str, str]]
    enrichment_columns: list[str]
    enrichment: list[tuple[Any, ...]]
    children: dict[str, list[tuple[Any, ...]]]
    rejected: set[tuple[str, str, str]]
    ledger: list[tuple[str, str, int]] = field(default_factory=list)


def _data_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c not in ("enriched_at", "job_id") and not c.startswith("_dlt_")]


def snapshot(dest: Dest) -> Snapshot:
    outcomes = {
        (pk, key, status)
        for pk, key, status in dest.query(
            f"SELECT input_pk, key, status FROM enriched.{COMPANY.outcomes} WHERE status IN {FINAL}"
        )
    }
    cols = _data_columns(dest.columns(COMPANY.enrichment))
    quoted = ", ".join(f'"{c}"' for c in cols)
    enrichment = dest.query(f"SELECT {quoted} FROM enriched.{COMPANY.enrichment} ORDER BY key")
    children = {}
    for child in CHILD_TABLES:
        child_cols = _data_columns(dest.columns(child))
        sel = ", ".join(f'c."{c}"' for c in child_cols)
        children[child] = sorted(
            dest.query(
                f"SELECT p.key, c._dlt_list_idx, {sel} FROM enriched.{child} c "
                f"JOIN enriched.{COMPANY.enrichment} p ON c._dlt_parent_id = p._dlt_id"
            ),
            key=repr,
        )
    rejected = set(dest.query(f"SELECT input_pk, reason, detail FROM enriched.{COMPANY.rejected}"))
    ledger = dest.query(f"SELECT job_id, status, record_count FROM enriched.{COMPANY.jobs}")
    return Snapshot(outcomes, cols, enrichment, children, rejected, ledger)


# --- the clean run, once per module -----------------------------------------------------


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Snapshot, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("clean")
    warehouse = make_warehouse(tmp / "warehouse.duckdb")
    with Sandbox(seed=SEED) as sb:
        result = run_runner(tmp / "work", sb, warehouse)
        assert result.returncode == 0, result.stderr[-3000:]
        usage = sb.usage()
    dest = Dest(tmp / "work" / "destination.duckdb")
    assert dest.in_flight() == 0
    snap = snapshot(dest)
    # sanity of the reference itself
    assert usage["records_billed"] == len(UNIQUE_KEYS)
    assert {pk for pk, _, _ in snap.final_outcomes} == VALID_PKS
    assert {pk for pk, _, _ in snap.rejected} == {str(pk) for pk in BAD}
    assert len(snap.enrichment) > UNIQUE // 2
    yield snap, usage


# --- the matrix ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    sandbox: dict[str, Any] = field(default_factory=dict)
    crash_after: int | None = None


CASES = {
    "input_read": Case(),
    # jobs take a moment, so the killed run leaves jobs running on the server
    "after_submit": Case(sandbox={"job_seconds_base": 1.0}),
    "answer_lost": Case(sandbox={"job_seconds_base": 0.5}),
    "polling": Case(sandbox={"job_seconds_base": 1.0}, crash_after=3),
    "fetching": Case(),
    "normalize": Case(),
    "load": Case(),
}


def check_after_crash(phase: str, workdir: Path, sb: Sandbox, dest: Dest) -> int:
    """Check what must be on disk right after the SIGKILL; returns the submits in the air."""
    usage = sb.usage()
    created = set(sb.engine._jobs)
    if phase == "input_read":
        assert usage["submit_calls"] == 0
        assert usage["records_billed"] == 0
        return 0
    jobs, intents = read_journal(workdir)
    journaled = {j for j, *_ in jobs}
    if phase == "after_submit":
        # both answered submits are durable, with their ids, before anything else happens
        assert len(created) == 2
        assert journaled == created
        assert {state for _, state, _, _ in jobs} == {"in_flight"}
        assert sorted(n for _, _, n, _ in jobs) == [RECORDS_PER_JOB, RECORDS_PER_JOB]
        assert intents == []
    elif phase == "answer_lost":
        # the server created (and billed) 2 jobs; only the first id reached the journal,
        # the second submit is still an intent: its answer is lost
        assert len(created) == 2
        assert len(journaled) == 1 and journaled < created
        assert intents == [RECORDS_PER_JOB]
        assert usage["records_billed"] == 2 * RECORDS_PER_JOB
    elif phase in ("polling", "fetching"):
        assert journaled and journaled <= created
        assert {state for _, state, _, _ in jobs} == {"in_flight"}
        # polls run concurrently with submits: a submit may be in the air at the kill
        assert len(intents) <= 1
        assert COMPANY.outcomes not in dest.tables()
        if phase == "fetching":
            assert usage["results_calls"] >= 1
    elif phase in ("normalize", "load"):
        # everything was fetched into one extracted package that is not loaded
        assert journaled == created
        assert {state for _, state, _, _ in jobs} == {"fetched"}
        load_ids = {load_id for *_, load_id in jobs}
        assert len(load_ids) == 1 and None not in load_ids
        if "_dlt_loads" in dest.tables():
            done = dest.query("SELECT load_id FROM enriched._dlt_loads WHERE status = 0")
            assert not load_ids & {r[0] for r in done}
        if phase == "normalize":
            assert COMPANY.outcomes not in dest.tables()
    return len(intents)


@pytest.mark.parametrize(
    "phase",
    CASES,
)
def test_given_sigkill_at_phase_when_rerun_then_tables_equal_a_clean_run_and_nothing_is_paid_twice(
    phase: str,
    tmp_path: Path,
    sandbox_factory: Callable[..., Sandbox],
    clean: tuple[Snapshot, dict[str, Any]],
) -> None:
    case = CASES[phase]
    sb = sandbox_factory(seed=SEED, **case.sandbox)
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    workdir = tmp_path / "work"
    dest = Dest(workdir / "destination.duckdb")

    crashed = run_runner(workdir, sb, warehouse, crash_at=phase, crash_after=case.crash_after)

    assert crashed.returncode == -signal.SIGKILL, (
        f"the runner was not killed at {phase} (rc {crashed.returncode}):\n{crashed.stderr[-3000:]}"
    )
    in_the_air = check_after_crash(phase, workdir, sb, dest)

    for _ in range(3):
        rerun = run_runner(workdir, sb, warehouse)
        assert rerun.returncode == 0, f"rerun after {phase} failed:\n{rerun.stderr[-5000:]}"
        if dest.in_flight() == 0 and not read_journal(workdir)[0]:
            break
    assert dest.in_flight() == 0
    jobs, intents = read_journal(workdir)
    assert jobs == [] and intents == [], "the journal still holds unfinished work"

    reference, _ = clean
    got = snapshot(dest)

    # the same tables as a clean run
    assert got.final_outcomes == reference.final_outcomes
    assert got.enrichment_columns == reference.enrichment_columns
    assert got.enrichment == reference.enrichment
    for child in CHILD_TABLES:
        assert got.children[child] == reference.children[child], child
    assert got.rejected == reference.rejected
    for table, key in MERGE_KEYS.items():
        total, distinct = dest.query(
            f"SELECT count(*), count(DISTINCT {key}) FROM enriched.{table}"
        )[0]
        assert total == distinct, f"{table} has {total - distinct} duplicate {key}(s)"
    for child in CHILD_TABLES:
        orphans = dest.query(
            f"SELECT count(*) FROM enriched.{child} c LEFT JOIN enriched.{COMPANY.enrichment} p "
            f"ON c._dlt_parent_id = p._dlt_id WHERE p._dlt_id IS NULL"
        )[0][0]
        assert orphans == 0, f"{child} has {orphans} orphaned row(s)"

    # every valid input row: exactly one final outcome, and it is its latest attempt
    rows = dest.query(f"SELECT input_pk, attempt, status FROM enriched.{COMPANY.outcomes}")
    assert_one_final_outcome_per_row(rows, VALID_PKS)

    # billing: every key once, plus at most what the ledger reports as lost submits
    usage = sb.usage()
    per_key = usage["billed_per_key"]
    assert set(per_key) == {company_key(k) for k in UNIQUE_KEYS}
    ledger = Counter()
    lost_records = 0
    for _job_id, status, count in got.ledger:
        ledger[status] += 1
        if status == "lost":
            lost_records += count
    assert usage["records_billed"] <= len(UNIQUE_KEYS) + lost_records
    # every submit whose answer the crash swallowed is reported once in the ledger
    assert ledger["lost"] == in_the_air
    assert set(ledger) <= {"completed", "lost"}
    if phase == "answer_lost":
        assert ledger["lost"] == 1
        # the server did create the lost job: exactly its records were paid twice
        assert (
            usage["records_billed"]
            == len(UNIQUE_KEYS) + lost_records
            == (len(UNIQUE_KEYS) + RECORDS_PER_JOB)
        )
    elif not in_the_air:
        assert usage["records_billed"] == len(UNIQUE_KEYS)
        assert set(per_key.values()) == {1}
