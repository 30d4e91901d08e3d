"""The job lifecycle end to end: nothing is paid twice by signals, drift or a second pipeline.

Each test runs real dlt pipelines against the sandbox over loopback HTTP and checks the
sandbox's own per-key billing.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import dlt
import duckdb
import pytest
from dlt.pipeline.exceptions import PipelineStepFailed

from apione_source.errors import JournalCorruptError
from apione_source.history import KnownKeys, Ttls, _fold, load_known_keys
from apione_source.journal import IN_FLIGHT, SENDING, Journal
from tests.e2e import (
    COMPANY,
    Env,
    assert_one_final_outcome_per_row,
    enrich_process,
    open_journal,
)


def _latest_statuses(env: Env) -> dict[str, str]:
    """Each input row's latest outcome, by job order then attempt (as the README says)."""
    rows = env.query(
        f"SELECT input_pk, status FROM enriched.{COMPANY.outcomes} "
        "QUALIFY row_number() OVER (PARTITION BY input_pk ORDER BY "
        "coalesce(submitted_at, finished_at) DESC, attempt DESC) = 1"
    )
    return dict(rows)


def test_given_an_older_jobs_report_written_after_a_newer_match_then_the_match_stays_latest() -> (
    None
):
    # A key matched by job 2 (attempt 2); job 1's "expired" report is written afterwards
    # (a re-report after a crash). Write order must not decide the key's state.
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    known = KnownKeys()
    rows = [
        ("a.com", "matched", t0 + timedelta(minutes=5), "job_2", "1", {"domain": "a.com"}, t0),
        ("a.com", "expired", t0 + timedelta(minutes=9), "job_1", "1", {"domain": "a.com"},
         t0 - timedelta(minutes=1)),
    ]  # fmt: skip
    # history.load_known_keys orders by job (submitted_at), then attempt
    for key, status, finished, job, pk, record, sent in sorted(rows, key=lambda r: r[6]):
        _fold(known, key, status, finished, job, pk, record, sent)
    assert known.keys["a.com"].status == "matched"
    day = timedelta(days=1)
    assert known.is_fresh("a.com", t0 + day, Ttls(matched=90 * day, not_found=day, error=day))


def test_given_two_pipelines_over_the_same_tables_when_one_carries_jobs_then_the_other_never_pays_them(  # noqa: E501
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_seconds_base=6.0)
    env.insert_companies([(i, f"twin{i}.com") for i in range(30)])

    # pipeline A submits everything; its jobs outlive its wait budget
    env.run(records_per_job=10, wait_budget_seconds=1.5)
    assert env.sandbox.usage()["records_billed"] == 30
    assert {e.phase for e in open_journal(env.out)} == {IN_FLIGHT}

    # pipeline B: another name, same destination dataset and input table
    other = dlt.pipeline(
        pipeline_name="apione_twin",
        destination=dlt.destinations.duckdb(str(env.out)),
        dataset_name="enriched",
        pipelines_dir=str(env.tmp / "pipelines_twin"),
    )
    env.pipeline = other
    env.run(records_per_job=10, wait_budget_seconds=20)

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 30, "pipeline B paid for A's jobs again"
    assert set(usage["billed_per_key"].values()) == {1}
    assert open_journal(env.out) == []
    assert set(_latest_statuses(env)) == {str(i) for i in range(30)}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_given_a_signal_while_a_submit_is_in_the_air_then_it_is_journaled_and_never_paid_twice(
    make_env: Callable[..., Env], sig: signal.Signals
) -> None:
    # every answer takes 1 s: a signal right after the first job exists lands while the
    # second submit is in the air
    env = make_env(latency_seconds=1.0)
    env.insert_companies([(i, f"sig{i}.com") for i in range(40)])

    proc = enrich_process(env, records_per_job=10, wait_budget_seconds=60)
    deadline = time.monotonic() + 60
    while env.sandbox.usage()["jobs_created"] < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)

    assert proc.returncode != 0, f"a stopped run must not end green:\n{out}"
    assert "Signal" in out or "signal" in out, out
    # the submit in the air was answered and journaled: no lost answer to pay again
    assert all(e.phase != SENDING for e in open_journal(env.out)), out
    billed_after_stop = env.sandbox.usage()["records_billed"]
    assert billed_after_stop in (10, 20), out

    rerun = enrich_process(env, records_per_job=10, wait_budget_seconds=60)
    out2, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, out2
    usage = env.sandbox.usage()
    assert usage["records_billed"] == 40 and set(usage["billed_per_key"].values()) == {1}
    rows = env.query(f"SELECT input_pk, attempt, status FROM enriched.{COMPANY.outcomes}")
    assert_one_final_outcome_per_row(rows, {str(i) for i in range(40)})


def test_given_a_uuid_cursor_column_when_run_again_then_only_new_rows_are_sent(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(input_ddl="CREATE TABLE crm.companies(id INT, domain VARCHAR, version UUID)")

    def add(ids: range) -> None:
        for i in ids:
            # ordered like UUIDv7: later rows sort higher
            env.exec(
                "INSERT INTO crm.companies VALUES (?, ?, ?)",
                [i, f"uu{i}.com", uuid.UUID(int=i + 1)],
            )

    add(range(5))
    env.run(cursor_column="version")
    env.run(cursor_column="version")  # crashed on UUID > str before
    add(range(5, 8))
    env.run(cursor_column="version")

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 8 and set(usage["billed_per_key"].values()) == {1}
    assert set(_latest_statuses(env)) == {str(i) for i in range(8)}


@pytest.mark.parametrize("drift", ["short_results_rate", "bad_index_rate", "wrong_echo_rate"])
def test_given_results_that_do_not_line_up_then_those_records_end_error_and_are_not_paid_again(
    make_env: Callable[..., Env], drift: str
) -> None:
    env = make_env(**{drift: 1.0})
    env.insert_companies([(i, f"drift{i}.com") for i in range(20)])

    env.run(records_per_job=10)
    env.run(records_per_job=10)  # the mismatched records are not sent again

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 20 and set(usage["billed_per_key"].values()) == {1}
    statuses = dict(env.query(f"SELECT job_id, status FROM enriched.{COMPANY.jobs}"))
    assert set(statuses.values()) == {"mismatched"}
    latest = _latest_statuses(env)
    assert set(latest) == {str(i) for i in range(20)}  # every row has its outcome
    errors = env.query(
        f"SELECT input_pk, error FROM enriched.{COMPANY.outcomes} WHERE status = 'error'"
    )
    assert 2 <= len(errors) <= 4 and all("mismatched" in e for _, e in errors), errors
    assert open_journal(env.out) == []


def test_given_a_404_on_each_new_jobs_first_status_then_nothing_vanishes_or_is_paid_twice(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(status_404_first_rate=1.0)
    env.insert_companies([(i, f"replica{i}.com") for i in range(25)])

    env.run(records_per_job=10)

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 25 and set(usage["billed_per_key"].values()) == {1}
    assert set(dict(env.query(f"SELECT job_id, status FROM enriched.{COMPANY.jobs}")).values()) == {
        "completed"
    }
    assert set(_latest_statuses(env)) == {str(i) for i in range(25)}


def test_given_job_ids_of_another_shape_then_every_job_is_polled_and_collected(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_id_style="odd")
    env.insert_companies([(i, f"odd{i}.com") for i in range(15)])

    env.run(records_per_job=10)

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 15 and set(usage["billed_per_key"].values()) == {1}
    jobs = dict(env.query(f"SELECT job_id, status FROM enriched.{COMPANY.jobs}"))
    assert len(jobs) == 2 and all("/" in j and " " in j for j in jobs), jobs
    assert set(jobs.values()) == {"completed"}


def test_given_an_unknown_status_then_the_slot_is_freed_and_the_job_collected_later(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the free plan has one job slot: a poller that never gave it back stalled every run
    env = make_env(plan="free", unknown_status_rate=1.0, unknown_status_calls=2)
    env.insert_companies([(i, f"paused{i}.com") for i in range(100)])

    env.run(plan="free", wait_budget_seconds=20)

    assert env.sandbox.usage()["records_billed"] == 100  # both jobs went out: slot freed
    entries = open_journal(env.out)
    assert len(entries) == 2 and all(e.phase == IN_FLIGHT and e.deferrals == 1 for e in entries)
    (deferred,) = env.query("SELECT jobs_deferred FROM enriched.apione_runs")
    assert deferred == (2,)

    # later runs look again once the rest is over (skipped here by the test)
    monkeypatch.setattr("apione_source.scheduler.JobScheduler.is_due", lambda self, e: True)
    env.run(plan="free", wait_budget_seconds=20)  # the second look: still "paused"
    env.run(plan="free", wait_budget_seconds=20)

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 100 and set(usage["billed_per_key"].values()) == {1}
    assert open_journal(env.out) == []
    assert set(_latest_statuses(env)) == {str(i) for i in range(100)}


class _Crash(BaseException):
    """Stands for the process dying (no except clause catches a BaseException here)."""


def test_given_a_run_died_between_billing_and_journaling_then_the_next_run_resends_once_and_says_so(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    env.insert_companies([(i, f"lost{i}.com") for i in range(25)])
    real = Journal.job_created
    calls = {"n": 0}

    def dies_on_second(self: Journal, entry: Any, job_id: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash  # ApiOne created (and billed) job 2; we never wrote its id
        real(self, entry, job_id)

    monkeypatch.setattr(Journal, "job_created", dies_on_second)
    with pytest.raises((_Crash, PipelineStepFailed)):
        env.run(records_per_job=10)
    monkeypatch.setattr(Journal, "job_created", real)
    assert [e.phase for e in open_journal(env.out)].count(SENDING) == 1

    env.run(records_per_job=10)
    env.run(records_per_job=10)

    usage = env.sandbox.usage()
    lost_jobs = env.query(f"SELECT job_id FROM enriched.{COMPANY.jobs} WHERE status = 'lost'")
    assert len(lost_jobs) == 1
    lost_keys = {
        k
        for (k,) in env.query(f"SELECT key FROM enriched.{COMPANY.outcomes} WHERE status = 'lost'")
    }
    assert len(lost_keys) == 10
    for key, n in usage["billed_per_key"].items():
        assert n == (2 if json.loads(key)["domain"] in lost_keys else 1), key
    assert open_journal(env.out) == []
    rows = env.query(f"SELECT input_pk, attempt, status FROM enriched.{COMPANY.outcomes}")
    assert_one_final_outcome_per_row(rows, {str(i) for i in range(25)})


def test_given_a_corrupt_journal_row_then_the_run_fails_saying_where_and_how_out(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_seconds_base=30.0)
    env.insert_companies([(1, "corrupt.com")])
    env.run(wait_budget_seconds=0.5)  # the job is in flight
    con = duckdb.connect(str(env.out))
    try:
        con.execute(f"UPDATE enriched.{COMPANY.journal} SET items = '[[' WHERE event = 'send'")
    finally:
        con.close()

    with pytest.raises(JournalCorruptError) as corrupt:
        env.run()

    message = str(corrupt.value)
    assert "_apione_journal" in message and "entry" in message and "DELETE" in message
    assert env.sandbox.usage()["records_billed"] == 1


def test_given_outcomes_written_before_submitted_at_existed_then_the_history_reads_them(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    con = duckdb.connect(str(env.out))
    try:  # an outcomes table as the previous version wrote it
        con.execute("CREATE SCHEMA enriched")
        con.execute(
            f"CREATE TABLE enriched.{COMPANY.outcomes} (outcome_id VARCHAR, input_pk VARCHAR, "
            "key VARCHAR, job_id VARCHAR, attempt BIGINT, status VARCHAR, error VARCHAR, "
            "input JSON, finished_at TIMESTAMP WITH TIME ZONE, load_id VARCHAR)"
        )
        con.execute(
            f"INSERT INTO enriched.{COMPANY.outcomes} VALUES ('o1', '1', 'a.com', 'job_1', 1, "
            "'matched', NULL, '{\"domain\": \"a.com\"}', now(), 'l1')"
        )
    finally:
        con.close()

    known = load_known_keys(env.pipeline, COMPANY, must_exist=True)

    assert known.keys["a.com"].status == "matched" and known.keys["a.com"].pks == {"1"}
