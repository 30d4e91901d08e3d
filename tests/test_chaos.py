"""Chaos: thousands of records against a sandbox that fails jobs, errs on every endpoint
(500 / 503 / 429, some submits created-then-answered-500) and loses results (forced
expiries). The pipeline runs until nothing is in flight; then every valid input row has
exactly one final outcome and every extra credit spent is explained by the job ledger.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import apione_source.source as source_module
from apione_source.client import AsyncApiOneClient
from apione_source.retry import RetryPolicy
from apione_source.sandbox import Sandbox
from apione_source.sandbox.data import unit_hash
from tests.e2e import (
    COMPANY,
    TEN_KB,
    Env,
    assert_no_duplicate_keys,
    assert_one_final_outcome_per_row,
    company_key,
    open_journal,
)

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

SEED = 4  # jobs 3, 6 and 8 fail (see _will_fail)
FAILURE_RATE = 0.1
RETRY_STATUSES = ("failed", "expired", "timed_out", "not_found", "lost")
UNIQUE = 3_000
RECORDS_PER_JOB = 200
MAX_ATTEMPTS = 3
# The client's own retries of 429/5xx, fast enough for a test (the sandbox's Retry-After
# is 0) and patient enough that a read almost never gives up (10% faults, 10 tries).
FAST_RETRY = RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.05, max_total_seconds=5)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    class FastRetryClient(AsyncApiOneClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("retry", FAST_RETRY)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(source_module, "AsyncApiOneClient", FastRetryClient)


def _seq(job: Any) -> int:
    return int(job.salt.rsplit(":", 1)[1])


def _will_fail(seq: int) -> bool:
    """The sandbox's own, reproducible choice of failing jobs (see engine._new_job)."""
    return unit_hash("job_failed", f"{SEED}:{seq}") < FAILURE_RATE


class Expirer(threading.Thread):
    """Expires the results of chosen jobs the moment the sandbox creates them.

    A job's results can be fetched only once it completed, and the pipeline looks at a
    job no earlier than the server's estimate (1 s here): expiring at creation is
    deterministic, whatever the timing of the run.
    """

    def __init__(self, sb: Sandbox, seqs: set[int]) -> None:
        super().__init__(daemon=True, name="expirer")
        self.sb, self.seqs = sb, seqs
        self.expired: set[str] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            with self.sb.engine._lock:
                jobs = list(self.sb.engine._jobs.values())
            for job in jobs:
                if _seq(job) in self.seqs and job.job_id not in self.expired:
                    self.sb.expire(job.job_id)
                    self.expired.add(job.job_id)
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@pytest.fixture
def chaos_env(make_env: Callable[..., Env], fast_retries: None) -> Iterator[tuple[Env, Expirer]]:
    env = make_env(
        seed=SEED,
        failure_rate=FAILURE_RATE,
        transient_error_rate=0.1,
        retry_after_seconds=0,
        job_seconds_base=0.3,
    )
    # a handful of jobs that would complete: their results are gone when fetched
    targets = {s for s in range(2, 40) if not _will_fail(s)}
    expirer = Expirer(env.sandbox, set(sorted(targets)[:4]))
    expirer.start()
    yield env, expirer
    expirer.stop()


def test_given_faulty_api_when_run_until_idle_then_every_row_has_one_final_outcome_and_billing_is_explained(  # noqa: E501
    chaos_env: tuple[Env, Expirer],
) -> None:
    env, expirer = chaos_env
    valid = [(i, f"chaos{i}.com") for i in range(UNIQUE)]
    dups = [(10_000 + i, f"https://www.CHAOS{i * 97}.com/") for i in range(25)]
    bad = [(20_000, None), (20_001, ""), (20_002, "no domain here"), (20_003, TEN_KB)]
    env.insert_companies(valid + dups + bad)
    valid_pks = {str(pk) for pk, _ in valid + dups}

    started = time.monotonic()
    for _run in range(5):
        env.run(records_per_job=RECORDS_PER_JOB, max_attempts=MAX_ATTEMPTS, wait_budget_seconds=60)
        in_flight = env.query(
            f"SELECT count(*) FROM enriched.{COMPANY.jobs} WHERE status = 'in_flight'"
        )[0][0]
        if in_flight == 0 and not open_journal(env.out):
            break
    else:
        pytest.fail("jobs still in flight after 5 runs")
    elapsed = time.monotonic() - started

    # every valid input row: exactly one final outcome, in its latest attempt
    rows = env.query(f"SELECT input_pk, attempt, status FROM enriched.{COMPANY.outcomes}")
    assert_one_final_outcome_per_row(rows, valid_pks)
    assert max(attempt for _, attempt, _ in rows) <= MAX_ATTEMPTS
    rejected = {r[0] for r in env.query(f"SELECT input_pk FROM enriched.{COMPANY.rejected}")}
    assert rejected == {str(pk) for pk, _ in bad}

    # no duplicates in merge tables
    assert_no_duplicate_keys(env, COMPANY.enrichment)
    for table, key in ((COMPANY.outcomes, "outcome_id"), (COMPANY.jobs, "job_id")):
        total, distinct = env.query(
            f"SELECT count(*), count(DISTINCT {key}) FROM enriched.{table}"
        )[0]
        assert total == distinct, table

    # the chaos really happened, and the ledger tells about it
    ledger = env.query(f"SELECT job_id, status, record_count FROM enriched.{COMPANY.jobs}")
    statuses = {s for _, s, _ in ledger}
    with env.sandbox.engine._lock:
        failed_jobs = {j.job_id for j in env.sandbox.engine._jobs.values() if j.failed}
    known_failed = failed_jobs & {j for j, _, _ in ledger}
    assert known_failed, "no failed job reached the pipeline"
    assert {s for j, s, _ in ledger if j in known_failed} == {"failed"}
    assert "in_flight" not in statuses
    usage = env.sandbox.usage()
    assert usage["rejected_submits"]["transient"] > 0
    # forced expiries: every expired job the pipeline knew of is `expired`, with outcomes
    known_expired = expirer.expired & {j for j, _, _ in ledger}
    assert known_expired, "no forced expiry reached the pipeline"
    for job_id in known_expired:
        assert (job_id, "expired") in {(j, s) for j, s, _ in ledger}
        n = env.query(
            f"SELECT count(*) FROM enriched.{COMPANY.outcomes} WHERE job_id = ? "
            f"AND status = 'expired'",
            [job_id],
        )[0][0]
        assert n > 0, f"no expired outcome rows for {job_id}"
    # a lost answer (the sandbox created the job, answered 500) is reported as lost
    if usage["lost_answers"]:
        assert "lost" in statuses

    # billing: one credit per unique key, plus resubmissions the ledger explains
    unique_keys = {company_key(f"chaos{i}.com") for i in range(UNIQUE)}
    assert set(usage["billed_per_key"]) == unique_keys
    explained = sum(n for _, s, n in ledger if s in RETRY_STATUSES)
    assert len(unique_keys) <= usage["records_billed"] <= len(unique_keys) + explained
    # a key is never billed more than max_attempts times, plus lost answers
    lost_jobs = sum(1 for _, s, _ in ledger if s == "lost")
    assert max(usage["billed_per_key"].values()) <= MAX_ATTEMPTS + lost_jobs
    assert elapsed < 120
