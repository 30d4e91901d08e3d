"""Run options end to end: the per-run cap, cursor-mode refresh, NULL keys, SCD2 history."""

from __future__ import annotations

import dataclasses
import gc
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from apione_source.errors import AuthenticationError
from apione_source.scheduler import JobScheduler
from apione_source.webhooks import SIGNATURE_HEADER, verify_signature
from tests.e2e import (
    COMPANY,
    Env,
    assert_no_duplicate_keys,
    billed,
)


def _stamp(i: int) -> str:
    return f"2024-01-01 {i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}"


def test_given_a_per_run_cap_when_run_repeatedly_then_each_run_stays_under_it_and_all_arrive(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"capped{i}.com") for i in range(300)])

    per_run = []
    for _ in range(4):
        before = billed(env.sandbox)[1]
        env.run(max_records_per_run=120, records_per_job=50)
        per_run.append(billed(env.sandbox)[1] - before)

    assert per_run == [120, 120, 60, 0]
    assert env.count(COMPANY.outcomes) == 300


def test_given_a_cap_in_cursor_mode_when_run_repeatedly_then_no_row_is_skipped(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    # ties on the cursor straddle the cap boundary on purpose
    env.insert_companies([(i, f"cursored{i}.com", _stamp(i // 3)) for i in range(200)])

    for _ in range(4):
        env.run(cursor_column="updated_at", max_records_per_run=70, records_per_job=25)

    assert billed(env.sandbox)[1] == 200
    pks = {r[0] for r in env.query(f"SELECT input_pk FROM enriched.{COMPANY.outcomes}")}
    assert pks == {str(i) for i in range(200)}


def test_given_cursor_mode_when_ttl_expires_then_unchanged_rows_are_refreshed_from_history(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"aging{i}.com", _stamp(i)) for i in range(40)])
    env.run(cursor_column="updated_at")
    assert billed(env.sandbox) == (1, 40)

    # no row changed, so the cursor reads nothing; the expired outcomes are resent anyway
    env.run(cursor_column="updated_at", ttl_matched_days=0, ttl_not_found_days=0)

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 80
    assert set(usage["billed_per_key"].values()) == {2}
    assert_no_duplicate_keys(env, COMPANY.enrichment)
    assert env.query(
        f"SELECT count(DISTINCT job_id) FROM enriched.{COMPANY.outcomes} WHERE attempt = 1"
    ) == [(2,)]


def test_given_rows_with_null_primary_key_when_run_then_they_are_rejected_not_sent(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(1, "keyed.com"), (None, "orphan-one.com"), (None, "orphan-two.com")])
    env.run()

    assert billed(env.sandbox) == (1, 1)
    assert env.query(f"SELECT input_pk, reason FROM enriched.{COMPANY.rejected}") == [
        ("<NULL>", "null_primary_key")
    ]


def test_given_scd2_when_an_unchanged_company_is_reenriched_then_no_new_version_opens(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"history{i}.com") for i in range(30)])
    env.run(scd2=True)
    first = env.query(
        f"SELECT key, _dlt_valid_from FROM enriched.{COMPANY.enrichment} ORDER BY key"
    )
    assert first and all(valid_from is not None for _, valid_from in first)

    env.run(scd2=True, ttl_matched_days=0, ttl_not_found_days=0)  # paid again, same data

    assert billed(env.sandbox)[1] == 60
    rows = env.query(
        f"SELECT key, _dlt_valid_from, _dlt_valid_to FROM enriched.{COMPANY.enrichment} "
        "ORDER BY key"
    )
    # one current version per key, the original one: the data did not change
    assert [(k, f) for k, f, _ in rows] == first
    assert all(valid_to is None for *_, valid_to in rows)


def test_given_a_webhook_url_when_run_then_apione_delivers_signed_results_there(
    make_env: Callable[..., Env],
) -> None:
    received: list[tuple[bytes, str]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((body, self.headers[SIGNATURE_HEADER]))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = make_env(webhook_secret="whsec_test")
        env.insert_companies([(i, f"hooked{i}.com") for i in range(30)])
        env.run(webhook_url=f"http://127.0.0.1:{server.server_port}/hooks/apione")
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)  # delivery is asynchronous on the sandbox's side
    finally:
        server.shutdown()

    [(body, signature)] = received
    verify_signature("whsec_test", body, signature)  # raises if it does not verify
    assert json.loads(body)["event"] == "job.completed"
    assert len(json.loads(body)["results"]) == 30


def test_given_a_rejected_row_when_it_is_fixed_then_it_is_enriched_and_leaves_the_rejected_table(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(1, "fine.com"), (2, "not a domain"), (3, None)])
    env.run()
    assert {r[0] for r in env.query(f"SELECT input_pk FROM enriched.{COMPANY.rejected}")} == {
        "2",
        "3",
    }

    env.exec("UPDATE crm.companies SET domain = 'fixed-now.com' WHERE id = 2")
    env.run()

    assert env.query(f"SELECT input_pk, reason FROM enriched.{COMPANY.rejected}") == [("3", "null")]
    assert env.query(f"SELECT key FROM enriched.{COMPANY.outcomes} WHERE input_pk = '2'") == [
        ("fixed-now.com",)
    ]
    assert billed(env.sandbox)[1] == 2


def test_given_instant_jobs_when_run_then_jobs_waiting_to_be_collected_stay_bounded(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ApiOne finishing jobs faster than rows are written must not make the run submit the
    whole table first (holding every record until collected): records_per_load bounds it."""
    env = make_env()
    env.insert_companies([(i, f"fast{i}.com") for i in range(3000)])
    waiting_at_submit: list[int] = []
    submit = JobScheduler.submit

    async def counted(self: JobScheduler, entry: Any, items: Any) -> str:
        waiting_at_submit.append(self.waiting)
        return await submit(self, entry, items)

    monkeypatch.setattr(JobScheduler, "submit", counted)

    env.run(records_per_job=100, concurrent_jobs=5, records_per_load=100)

    # bound: max(twice the plan's jobs, two loads' worth of records) = max(10, 2) jobs
    assert len(waiting_at_submit) == 30
    assert max(waiting_at_submit) < 10
    assert billed(env.sandbox) == (30, 3000)  # jobs, records: each record billed once
    assert env.count(COMPANY.outcomes) == 3000


def test_given_the_key_revoked_while_jobs_pile_up_then_the_run_fails_and_none_is_paid_twice(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    env.insert_companies([(i, f"revoked{i}.com") for i in range(3000)])
    engine, key = env.sandbox.engine, env.sandbox.config.api_key
    submit, submits = JobScheduler.submit, []

    async def revoking(self: JobScheduler, entry: Any, items: Any) -> str:
        submits.append(self.waiting)
        if len(submits) == 15:  # the run is backlogged by now (bound: 10 jobs waiting)
            engine.config = dataclasses.replace(engine.config, api_key="sk_test_revoked")
        return await submit(self, entry, items)

    monkeypatch.setattr(JobScheduler, "submit", revoking)
    with pytest.raises(AuthenticationError):
        env.run(records_per_job=100, concurrent_jobs=5, records_per_load=100)
    assert max(submits) >= 9  # it was backlogged when the key went

    engine.config = dataclasses.replace(engine.config, api_key=key)
    monkeypatch.setattr(JobScheduler, "submit", submit)
    env.run(records_per_job=100, concurrent_jobs=5, records_per_load=100)

    usage = env.sandbox.usage()
    assert usage["records_billed"] == 3000 and max(usage["billed_per_key"].values()) == 1
    assert env.count(COMPANY.outcomes) == 3000


def test_given_jobs_that_take_a_while_then_each_jobs_results_load_while_the_next_runs(
    make_env: Callable[..., Env],
) -> None:
    """Results reach the warehouse while later jobs run, not all at the end of the run
    (a package per job here: the next job ends later than a load takes); and the run
    ends with its last results, not with a package of nothing."""
    env = make_env(job_seconds_base=2.5)
    env.insert_companies([(i, f"paced{i}.com") for i in range(20)])

    env.run(records_per_job=10, concurrent_jobs=1)

    loads = env.query("SELECT load_id, inserted_at FROM enriched._dlt_loads ORDER BY load_id")
    outcomes = dict(
        env.query(f"SELECT _dlt_load_id, count(*) FROM enriched.{COMPANY.outcomes} GROUP BY 1")
    )
    assert [outcomes.get(load_id) for load_id, _ in loads] == [10, 10]
    (second_job_done,) = env.query(
        f"SELECT max(completed_at) FROM enriched.{COMPANY.jobs} WHERE status = 'completed'"
    )[0]
    first_loaded = loads[0][1]
    assert first_loaded < second_job_done.replace(tzinfo=first_loaded.tzinfo)
    assert billed(env.sandbox) == (2, 20)


def test_given_a_run_when_it_ends_then_the_process_has_its_own_collector_settings_back(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run collects garbage less often while it runs (a big run allocates millions of
    rows), and only then: the process it runs in (an orchestrator's worker) keeps its own."""
    env = make_env()
    env.insert_companies([(i, f"gc{i}.com") for i in range(30)])
    seen: list[tuple[int, int, int]] = []
    submit = JobScheduler.submit

    async def recording(self: JobScheduler, *args: Any, **kwargs: Any) -> Any:
        seen.append(gc.get_threshold())
        return await submit(self, *args, **kwargs)

    monkeypatch.setattr(JobScheduler, "submit", recording)
    before = gc.get_threshold()
    gc.set_threshold(1234, *before[1:])
    try:
        env.run(records_per_job=10)
        after = gc.get_threshold()
    finally:
        gc.set_threshold(*before)

    assert len(seen) == 3
    assert all(t[0] >= 100_000 and t[1:] == before[1:] for t in seen)
    assert after == (1234, *before[1:])
