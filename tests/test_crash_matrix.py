"""Crash matrix: SIGKILL a real run at every phase, rerun it, and compare with a clean run.

Each case starts a sandbox in this process, runs ``tests/crash_runner.py`` as a
subprocess that kills itself (SIGKILL) at one phase, checks what the job journal (a table
of the destination dataset) holds right after, reruns the runner without a crash until
the journal has nothing open and no job is in flight, and then checks that the final
tables equal those of a clean run (separate workdir, separate sandbox with the same
seed), that every valid input row has exactly one final outcome, and that no key was
billed more than once per spent job of it (a lost submit answer, a failed job), each of
which the ledger reports.

Every case runs twice: with the pipelines dir kept between runs, and ``fresh_dir``: each
run after the crash starts on an empty pipelines dir (the journal and dlt's state live in
the destination, so no local disk is needed; a package extracted but not loaded is lost
and must be fetched again).
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pytest

from apione_source.journal import IN_FLIGHT, SENDING, TO_SEND
from apione_source.sandbox import Sandbox
from apione_source.tables import FINAL_STATUSES
from tests.crash_runner import (
    PYCACHE,
    Dest,
    billing_problems,
    outcome_problems,
    runner_command,
    runner_env,
)
from tests.e2e import (
    COMPANY,
    MERGE_KEYS,
    TEN_KB,
    assert_one_final_outcome_per_row,
    company_key,
)

pytestmark = [pytest.mark.slow, pytest.mark.crash]

PIPELINE_NAME = "apione_crash"
SEED = 7
RECORDS_PER_JOB = 250
FINAL = FINAL_STATUSES
CHILD_TABLES = (f"{COMPANY.enrichment}_tags", f"{COMPANY.enrichment}_technologies")


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
    crash_table: str | None = None,
    fresh_dir: bool = False,
    max_attempts: int = 3,
    wait_budget: float = 30.0,
    ttl_days: int | None = None,
    timeout: float = 180.0,
) -> subprocess.CompletedProcess[str]:
    cmd = runner_command(
        workdir,
        sandbox.base_url,
        warehouse,
        crash_at=crash_at,
        crash_after=crash_after,
        crash_table=crash_table,
        pipeline_name=PIPELINE_NAME,
        records_per_job=RECORDS_PER_JOB,
        wait_budget=wait_budget,
        fresh_dir=fresh_dir,
        max_attempts=max_attempts,
        ttl_days=ttl_days,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        cmd,
        cwd=workdir,
        env=runner_env(workdir, PYCACHE),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- reading the destination ----------------------------------------------------------------------


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
                f"SELECT p.key, c.idx, {sel} FROM enriched.{child} c "
                f"JOIN enriched.{COMPANY.enrichment} p ON c.key = p.key AND c.job_id = p.job_id"
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
    assert dest.open_entries() == []
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
    crash_table: str | None = None
    crash_at: str | None = None  # the runner's phase, when the case's name is not one


# Seed 360 fails exactly the 2nd job of the first 11 at failure_rate 0.3; the results of
# a record do not depend on the seed, so the tables still equal the clean run's.
FAILS_JOB_2 = {"seed": 360, "failure_rate": 0.3}
CASES = {
    "input_read": Case(),
    # jobs take a moment, so the killed run leaves jobs running on the server
    "send": Case(sandbox={"job_seconds_base": 0.5}),
    "answer_lost": Case(sandbox={"job_seconds_base": 0.5}),
    "after_submit": Case(sandbox={"job_seconds_base": 1.0}),
    "polling": Case(sandbox={"job_seconds_base": 1.0}, crash_after=3),
    "fetching": Case(),
    "spend": Case(sandbox=FAILS_JOB_2, crash_after=1),
    "collected": Case(),
    "normalize": Case(),
    "load": Case(),
    # the insert of the enrichment rows into the staging dataset committed, dlt did not
    # record it: resuming the package runs it again
    "load_committed": Case(crash_table=COMPANY.enrichment),
    # the same for the job's other tables and the run's summary
    "load_committed_outcomes": Case(crash_table=COMPANY.outcomes, crash_at="load_committed"),
    "load_committed_list": Case(
        crash_table=f"{COMPANY.enrichment}_tags", crash_at="load_committed"
    ),
    "load_committed_runs": Case(crash_table=COMPANY.runs, crash_at="load_committed"),
}
# dlt 1.31 (a residual of dlt-hub/dlt#3023): a job that committed just before a SIGKILL,
# before dlt recorded it, runs again when the package is resumed, so a staging table holds
# its rows twice. The merged tables are single tables (no nested chain), which
# delete-insert dedups by primary key; the appended ones (outcomes, lists) are settled
# after the load (apione_source/settle.py): the load_committed cases check that nothing
# is left twice.


def check_after_crash(phase: str, sb: Sandbox, dest: Dest) -> int:
    """Check what the journal holds right after the SIGKILL; returns the submits in the air."""
    usage = sb.usage()
    created = set(sb.engine._jobs)
    entries = list(dest.entries().values())
    if phase == "input_read":
        assert usage["submit_calls"] == 0
        assert usage["records_billed"] == 0
        assert entries == []
        return 0
    journaled = {e.job_id for e in entries if e.job_id}
    phases = Counter(e.phase for e in entries)
    sending = phases[SENDING]
    if phase == "send":
        # the 2nd intent is durable, its request never left: the server has one job
        assert len(created) == 1 and journaled == created
        assert phases == {IN_FLIGHT: 1, SENDING: 1}
        assert usage["records_billed"] == RECORDS_PER_JOB
    elif phase == "after_submit":
        # both answered submits are durable, with their ids, before anything else happens
        assert len(created) == 2 and journaled == created
        assert phases == {IN_FLIGHT: 2}
        assert sorted(len(e.items) for e in entries) == [RECORDS_PER_JOB, RECORDS_PER_JOB]
    elif phase == "answer_lost":
        # the server created (and billed) 2 jobs; only the first id reached the journal,
        # the second submit is still `sending`: its answer is lost
        assert len(created) == 2
        assert len(journaled) == 1 and journaled < created
        assert phases == {IN_FLIGHT: 1, SENDING: 1}
        assert usage["records_billed"] == 2 * RECORDS_PER_JOB
    elif phase in ("polling", "fetching"):
        assert journaled and journaled <= created
        # polls run concurrently with submits: a submit may be in the air at the kill
        assert set(phases) <= {IN_FLIGHT, SENDING} and sending <= 1
        assert not any(e.collected_in or e.spent for e in entries)
        assert COMPANY.outcomes not in dest.tables()
        if phase == "fetching":
            assert usage["results_calls"] >= 1
    elif phase == "spend":
        # the failed job is spent and its records wait to be resent; the report of it
        # (ledger and outcome rows) went nowhere yet
        spent = [s for e in entries for s in e.spent]
        assert [(s.reason, len(s.items)) for s in spent] == [("failed", RECORDS_PER_JOB)]
        assert [e.phase for e in entries if e.spent] == [TO_SEND]
        assert all(e.unreported for e in entries if e.spent)
        assert journaled <= created
        assert COMPANY.outcomes not in dest.tables()
    elif phase in ("collected", "normalize", "load") or phase.startswith("load_committed"):
        # everything was fetched into one extracted package that is not loaded
        assert journaled == created
        assert phases == {IN_FLIGHT: len(created)}
        load_ids = {load for e in entries for load in e.collected_in}
        assert all(e.collected_in for e in entries)
        assert len(load_ids) == 1
        assert not load_ids & dest.completed_loads()
        assert not any(e.done for e in entries)
        if phase in ("collected", "normalize"):
            assert COMPANY.outcomes not in dest.tables()
    return sending


@pytest.mark.parametrize("disk", ["kept_dir", "fresh_dir"])
@pytest.mark.parametrize("phase", CASES)
def test_given_sigkill_at_phase_when_rerun_then_tables_equal_a_clean_run_and_nothing_is_paid_twice(
    phase: str,
    disk: str,
    tmp_path: Path,
    sandbox_factory: Callable[..., Sandbox],
    clean: tuple[Snapshot, dict[str, Any]],
) -> None:
    case = CASES[phase]
    sb = sandbox_factory(**{"seed": SEED, **case.sandbox})
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    workdir = tmp_path / "work"
    dest = Dest(workdir / "destination.duckdb")
    fresh = disk == "fresh_dir"

    crashed = run_runner(
        workdir,
        sb,
        warehouse,
        crash_at=case.crash_at or phase,
        crash_after=case.crash_after,
        crash_table=case.crash_table,
    )

    assert crashed.returncode == -signal.SIGKILL, (
        f"the runner was not killed at {phase} (rc {crashed.returncode}):\n{crashed.stderr[-3000:]}"
    )
    in_the_air = check_after_crash(phase, sb, dest)

    for _ in range(3):
        rerun = run_runner(workdir, sb, warehouse, fresh_dir=fresh)
        assert rerun.returncode == 0, f"rerun after {phase} failed:\n{rerun.stderr[-5000:]}"
        if dest.in_flight() == 0 and not dest.open_entries():
            break
    assert dest.in_flight() == 0
    assert dest.open_entries() == [], "the journal still holds unfinished work"

    reference, _ = clean
    got = snapshot(dest)

    # the same tables as a clean run
    assert got.final_outcomes == reference.final_outcomes
    assert got.enrichment_columns == reference.enrichment_columns
    assert got.enrichment == reference.enrichment
    for child in CHILD_TABLES:
        assert got.children[child] == reference.children[child], child
    assert got.rejected == reference.rejected
    for child in CHILD_TABLES:
        orphans = dest.query(
            f"SELECT count(*) FROM enriched.{child} c LEFT JOIN enriched.{COMPANY.enrichment} p "
            f"ON c.key = p.key AND c.job_id = p.job_id WHERE p.key IS NULL"
        )[0][0]
        assert orphans == 0, f"{child} has {orphans} orphaned row(s)"

    # every valid input row: exactly one final outcome, and it is its latest attempt;
    # no merge key twice in any table
    rows = dest.query(f"SELECT input_pk, attempt, status FROM enriched.{COMPANY.outcomes}")
    assert_one_final_outcome_per_row(rows, VALID_PKS)
    assert outcome_problems(dest, VALID_PKS, MERGE_KEYS) == []

    # billing: every key once, plus once per spent job of it (each in the ledger)
    usage = sb.usage()
    per_key = usage["billed_per_key"]
    assert set(per_key) == {company_key(k) for k in UNIQUE_KEYS}
    assert billing_problems(dest, per_key, COMPANY.outcomes) == []
    ledger = Counter()
    lost_records = 0
    for _job_id, status, count in got.ledger:
        ledger[status] += 1
        if status == "lost":
            lost_records += count
    assert usage["records_billed"] <= len(UNIQUE_KEYS) + lost_records + ledger["failed"] * (
        RECORDS_PER_JOB
    )
    # every submit whose answer the crash swallowed is reported once in the ledger
    assert ledger["lost"] == in_the_air
    if phase == "spend":
        assert ledger["failed"] == 1
        assert set(ledger) == {"completed", "failed"}
        # the failed job's records were paid once more, nothing else
        assert usage["records_billed"] == len(UNIQUE_KEYS) + RECORDS_PER_JOB
        return
    assert set(ledger) <= {"completed", "lost"}
    if phase == "answer_lost":
        assert ledger["lost"] == 1
        # the server did create the lost job: exactly its records were paid twice
        assert (
            usage["records_billed"]
            == len(UNIQUE_KEYS) + lost_records
            == (len(UNIQUE_KEYS) + RECORDS_PER_JOB)
        )
    else:
        # Only a submit the kill caught in the air (a run submits while it polls and
        # fetches) may be paid twice, and then it is a `lost` row; a `send` crash kills
        # before the request leaves, so nothing is.
        if phase == "send":
            assert usage["records_billed"] == len(UNIQUE_KEYS)
            assert set(per_key.values()) == {1}
        else:
            assert usage["records_billed"] <= len(UNIQUE_KEYS) + lost_records


@pytest.mark.parametrize("disk", ["kept_dir", "fresh_dir"])
def test_given_sigkill_as_renewed_keys_load_when_rerun_then_each_key_keeps_its_newest_row_once(
    disk: str, tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    """DuckDB appends the enrichment table in a scheduled run and settles it after the
    load: killed in between, a renewed key has its old row and its new one. The next run
    keeps only the new one, and pays for nothing again."""
    sb = sandbox_factory(seed=SEED)
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    workdir = tmp_path / "work"
    dest = Dest(workdir / "destination.duckdb")
    assert run_runner(workdir, sb, warehouse).returncode == 0
    first_jobs = {j for (j,) in dest.query(f"SELECT job_id FROM enriched.{COMPANY.jobs}")}
    keys = dest.query(f"SELECT count(*) FROM enriched.{COMPANY.enrichment}")[0][0]

    crashed = run_runner(
        workdir,
        sb,
        warehouse,
        ttl_days=0,
        crash_at="load_committed",
        crash_table=COMPANY.enrichment,
    )

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    twice = dest.query(
        f"SELECT count(*) FROM (SELECT key FROM enriched.{COMPANY.enrichment}"
        " GROUP BY key HAVING count(*) > 1)"
    )[0][0]
    assert twice == keys  # every key renewed, the old row not yet taken out
    for _ in range(3):
        rerun = run_runner(workdir, sb, warehouse, fresh_dir=disk == "fresh_dir")
        assert rerun.returncode == 0, rerun.stderr[-5000:]
        if dest.in_flight() == 0 and not dest.open_entries():
            break
    assert dest.open_entries() == []
    rows = dest.query(f"SELECT key, job_id FROM enriched.{COMPANY.enrichment}")
    assert len(rows) == keys == len({k for k, _ in rows})
    assert not {j for _, j in rows} & first_jobs  # the renewal's rows, not the first run's
    assert outcome_problems(dest, VALID_PKS, MERGE_KEYS) == []
    # each key paid for twice, once per run that asked for it
    assert set(sb.usage()["billed_per_key"].values()) == {2}


def test_given_sigkill_after_a_job_gave_up_when_rerun_then_its_records_are_not_sent_again(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    """Found by the kill fuzzer (seed 1011): a spent job whose records ran out of attempts
    is reported again by the next run, and its records must not go out a further time
    just because that report had not reached the destination yet."""
    sb = sandbox_factory(**FAILS_JOB_2)
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    workdir = tmp_path / "work"
    dest = Dest(workdir / "destination.duckdb")

    crashed = run_runner(workdir, sb, warehouse, crash_at="spend", crash_after=1, max_attempts=1)

    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    [gave_up] = [e for e in dest.entries().values() if e.spent]
    assert gave_up.spent[0].resend == set() and gave_up.unreported
    rerun = run_runner(workdir, sb, warehouse, max_attempts=1)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert dest.open_entries() == []

    usage = sb.usage()
    assert usage["records_billed"] == len(UNIQUE_KEYS)
    assert billing_problems(dest, usage["billed_per_key"], COMPANY.outcomes) == []
    errors = dest.query(
        f"SELECT count(DISTINCT key) FROM enriched.{COMPANY.outcomes} WHERE status = 'error'"
    )[0][0]
    assert errors == RECORDS_PER_JOB


def test_given_sigterm_while_a_slice_loads_then_the_run_stops_before_the_next_slice(
    tmp_path: Path, sandbox_factory: Callable[..., Sandbox]
) -> None:
    """dlt's load handles a SIGTERM by finishing the package and forgetting the signal;
    the run must still stop then, not go on submitting until an orchestrator SIGKILLs it
    (most likely mid-submit: a lost answer, paid twice)."""
    sb = sandbox_factory(seed=SEED)
    warehouse = make_warehouse(tmp_path / "warehouse.duckdb")
    workdir = tmp_path / "work"
    workdir.mkdir()
    cmd = runner_command(
        workdir,
        sb.base_url,
        warehouse,
        crash_at="load",
        sig="TERM",
        pipeline_name=PIPELINE_NAME,
        records_per_job=RECORDS_PER_JOB,
        concurrent_jobs=1,
        records_per_load=RECORDS_PER_JOB,
        wait_budget=60,
    )
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        env=runner_env(workdir, PYCACHE),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    jobs_at_stop = sb.usage()["jobs_created"]
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "Signal" in proc.stderr or "signal" in proc.stderr, proc.stderr[-2000:]
    total_jobs = -(-len(UNIQUE_KEYS) // RECORDS_PER_JOB)
    assert jobs_at_stop < total_jobs, "the run went on after SIGTERM"
