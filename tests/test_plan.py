"""The dry run (``apione-dlt plan``) predicts what the real run bills, and spends nothing.

Against the sandbox over HTTP and real DuckDB files: a plan is made, then the real run,
and the sandbox's own billing counters must move by exactly what the plan said.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from apione_source import apione
from apione_source.errors import ConfigurationError, CreditLimitError
from apione_source.plan import Plan, plan_run
from tests.conftest import SANDBOX_API_KEY
from tests.e2e import COMPANY, Env, billed

ROWS = [(i, f"firm{i % 40}.com") for i in range(60)]  # 40 keys, 20 rows repeat one
BAD = [(900, "not a domain"), (901, None)]


def plan(env: Env, **overrides: object) -> Plan:
    kwargs: dict[str, object] = {
        "api_key": SANDBOX_API_KEY,
        "base_url": env.sandbox.base_url,
        "enrichment_type": "company",
        "input_table": "companies",
        "primary_key": "id",
        "input_dataset": "crm",
        "input_credentials": str(env.warehouse),
        "input_columns": {"domain": "domain"},
        **overrides,
    }
    return plan_run(env.pipeline, apione(**kwargs))


def calls(env: Env) -> tuple[int, int, int]:
    u = env.sandbox.usage()
    return u["submit_calls"], u["status_calls"], u["results_calls"]


def test_the_plan_is_what_the_run_bills_and_the_plan_itself_spends_nothing(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies(ROWS + BAD)

    first = plan(env, records_per_job=8)

    assert calls(env) == (0, 0, 0)  # no request reached ApiOne
    assert env.tables() <= {"_apione_journal"}  # nothing loaded
    assert (first.rows_read, first.rejected) == (62, {"invalid_domain": 1, "null": 1})
    assert (first.records_to_send, first.jobs, first.credits) == (40, 5, 40)
    assert first.rounds == 1  # 5 jobs, growth's 20 at once
    env.run(records_per_job=8, input_columns={"domain": "domain"})
    assert billed(env.sandbox) == (first.jobs, first.credits)

    # fresh keys, a row with a new key, a fixed bad row, a row of a known key
    env.insert_companies([(100, "new1.com"), (101, "new2.com"), (102, "firm3.com")])
    env.exec("UPDATE crm.companies SET domain = 'fixed.com' WHERE id = 900")
    second = plan(env, records_per_job=8)

    assert second.already_fresh == 61  # 60 + the new row of a known key
    assert (second.records_to_send, second.jobs) == (3, 1)
    assert second.rejected == {"null": 1}
    before = billed(env.sandbox)
    env.run(records_per_job=8, input_columns={"domain": "domain"})
    after = billed(env.sandbox)
    assert (after[0] - before[0], after[1] - before[1]) == (second.jobs, second.credits)


def test_a_capped_plan_stops_where_the_run_stops(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.insert_companies(ROWS)

    capped = plan(env, records_per_job=8, max_records_per_run=20)

    assert capped.capped and (capped.credits, capped.jobs) == (20, 3)
    env.run(records_per_job=8, max_records_per_run=20, input_columns={"domain": "domain"})
    assert billed(env.sandbox) == (3, 20)


def test_carried_over_jobs_are_in_flight_not_billed_again(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_seconds_base=30)
    env.insert_companies(ROWS)
    env.run(wait_budget_seconds=0.5, input_columns={"domain": "domain"})
    assert env.count(COMPANY.jobs) == 1  # carried over, still running

    carried = plan(env)

    assert (carried.in_flight, carried.records_to_send, carried.credits) == (40, 0, 0)
    assert carried.already_fresh == 0


def test_the_credit_guardrail_refuses_before_sending_and_shows_the_plan(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies(ROWS)

    with pytest.raises(CreditLimitError) as refused:
        env.run(max_credits_per_run=39, input_columns={"domain": "domain"})

    assert calls(env)[0] == 0 and billed(env.sandbox) == (0, 0)
    message = str(refused.value)
    assert "would bill 40 credits, more than max_credits_per_run (39)" in message
    assert "credits          40" in message  # what `apione-dlt plan` prints
    assert refused.value.plan.credits == 40

    env.run(max_credits_per_run=40, input_columns={"domain": "domain"})
    assert billed(env.sandbox)[1] == 40


def test_a_wrong_setting_fails_the_plan_as_it_would_fail_the_run(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    with pytest.raises(ConfigurationError, match="no column"):
        plan(env, input_columns={"domain": "website"})


def test_the_command_line_plan_is_configured_like_the_pipeline(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies(ROWS + BAD)
    config = {
        "SOURCES__APIONE__API_KEY": SANDBOX_API_KEY,
        "SOURCES__APIONE__BASE_URL": env.sandbox.base_url,
        "SOURCES__APIONE__ENRICHMENT_TYPE": "company",
        "SOURCES__APIONE__INPUT_TABLE": "companies",
        "SOURCES__APIONE__PRIMARY_KEY": "id",
        "SOURCES__APIONE__INPUT_DATASET": "crm",
        "SOURCES__APIONE__INPUT_CREDENTIALS": str(env.warehouse),
        "SOURCES__APIONE__INPUT_COLUMNS": '{"domain": "domain"}',
        "SOURCES__APIONE__RECORDS_PER_JOB": "8",
        "DESTINATION__DUCKDB__CREDENTIALS": str(env.out),
        "PIPELINE_NAME": "apione_cli",
        "RUNTIME__DLTHUB_TELEMETRY": "false",
    }
    command = [sys.executable, "-m", "apione_source.cli", "plan"]
    common = ["--pipelines-dir", str(env.tmp / "cli_pipelines")]
    run = lambda *extra: subprocess.run(  # noqa: E731
        [*command, *common, *extra],
        env={**os.environ, **config},
        cwd=env.tmp,  # not the repo: its .dlt/ must not configure this
        capture_output=True,
        text=True,
        timeout=120,
    )

    text = run()
    as_json = run("--json")

    assert text.returncode == 0, text.stderr
    assert "credits          40 (one per record sent)" in text.stdout
    assert "rejected         2 (invalid_domain 1, null 1)" in text.stdout
    assert SANDBOX_API_KEY not in text.stdout + text.stderr
    figures = json.loads(as_json.stdout)
    assert (figures["credits"], figures["jobs"], figures["rows_read"]) == (40, 5, 62)
    assert calls(env) == (0, 0, 0)

    broken = subprocess.run(
        [*command, *common],
        env={**os.environ, **config, "SOURCES__APIONE__INPUT_TABLE": "nope"},
        cwd=env.tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode == 2
    assert "apione-dlt plan:" in broken.stderr and "Traceback" not in broken.stderr


def test_the_guardrail_keeps_loading_in_slices(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.insert_companies(ROWS)

    env.run(
        max_credits_per_run=1000,
        records_per_load=10,
        records_per_job=10,
        input_columns={"domain": "domain"},
    )

    (loads,) = env.query("SELECT count(*) FROM enriched._dlt_loads")[0]
    assert loads >= 2  # 40 records, a package every 10 to 20: planning did not stop slicing
    assert billed(env.sandbox) == (4, 40)


@pytest.mark.parametrize("seed", [4, 5])
def test_lost_submit_answers_count_against_the_credit_limit(
    make_env: Callable[..., Env], seed: int
) -> None:
    # half the 500s on submit come after the job was created (and billed)
    env = make_env(transient_error_rate=0.4, seed=seed)
    env.insert_companies([(i, f"firm{i}.com") for i in range(100)])

    env.run(max_credits_per_run=100, records_per_job=10, input_columns={"domain": "domain"})

    assert billed(env.sandbox)[1] <= 100


def test_records_waiting_to_be_sent_go_out_in_pieces_under_a_small_cap(
    make_env: Callable[..., Env],
) -> None:
    # 30 records an earlier run could not send (a refused submit: `to send` in the
    # journal), and a cap below them: they used to wait forever for a run with room
    from apione_source.journal import BatchItem, Journal, SqlStore

    env = make_env()
    env.insert_companies([(i, f"firm{i}.com") for i in range(30)])
    with SqlStore(env.pipeline.sql_client, COMPANY.journal, "duckdb") as store:
        journal = Journal(store, COMPANY.outcomes, env.pipeline.pipeline_name, "run0", time.time)
        journal.open(lambda loads: set())
        entry = journal.new_entry()
        items = [BatchItem(f"firm{i}.com", {"domain": f"firm{i}.com"}, [str(i)]) for i in range(30)]
        journal.send(entry, items)
        journal.unsent(entry, "refused before processing")

    first = plan(env, records_per_job=50, max_records_per_run=20)
    assert (first.records_to_resend, first.jobs) == (20, 1)
    env.run(records_per_job=50, max_records_per_run=20, input_columns={"domain": "domain"})
    assert billed(env.sandbox) == (1, 20)

    assert plan(env, records_per_job=50, max_records_per_run=20).records_to_resend == 10
    env.run(records_per_job=50, max_records_per_run=20, input_columns={"domain": "domain"})
    assert billed(env.sandbox) == (2, 30)
    assert set(env.sandbox.usage()["billed_per_key"].values()) == {1}
    assert env.count(COMPANY.outcomes) == 30
