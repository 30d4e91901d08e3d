"""``apione-dlt status`` on a pipeline with carried-over jobs, against the sandbox over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

from apione_source import apione
from apione_source.client import ApiOneClient
from apione_source.status import Status, pipeline_status
from tests.conftest import SANDBOX_API_KEY
from tests.e2e import Env

SETTINGS = {
    "api_key": SANDBOX_API_KEY,
    "enrichment_type": "company",
    "input_table": "companies",
    "primary_key": "id",
    "input_dataset": "crm",
    "input_columns": {"domain": "domain"},
    "retention_seconds": 3600,
}


def status_of(env: Env, *, offline: bool = False, ahead: float = 0.0) -> Status:
    handle = (
        apione(base_url=env.sandbox.base_url, input_credentials=str(env.warehouse), **SETTINGS)
        .resources["company_enrichment"]
        .apione_run
    )
    connect = None if offline else handle.connect
    return pipeline_status(
        env.pipeline, handle.settings, connect, clock=lambda: time.time() + ahead
    )


def test_carried_over_jobs_show_with_their_status_and_time_left(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_seconds_base=60)
    env.insert_companies([(i, f"firm{i}.com") for i in range(30)])
    env.run(wait_budget_seconds=0.5, records_per_job=20, **SETTINGS)

    now = status_of(env)

    assert [(j.phase, j.records) for j in now.jobs] == [("in_flight", 20), ("in_flight", 10)]
    assert {j.api_status for j in now.jobs} <= {"queued", "processing"}
    for job in now.jobs:  # not completed: the soonest the plan allows, from the submit
        assert not job.expiry_known
        assert 3500 < (job.seconds_left(now.now) or 0) <= 3600
        assert not now.close_to_expiry(job)
    assert now.runs[0]["records_submitted"] == 30 and now.runs[0]["jobs_carried_over"] == 2
    assert [n for _, n in now.billed_per_day] == [30]
    assert "jobs in flight: 2" in now.text() and "expire soon" not in now.text()

    later = status_of(env, ahead=3000)  # 10 minutes before the soonest expiry
    assert all(later.close_to_expiry(j) for j in later.jobs)
    assert later.text().count("<< results expire soon: run now") == 2


def test_when_apione_is_unreachable_status_still_shows_the_journal(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(job_seconds_base=60)
    env.insert_companies([(1, "firm1.com")])
    env.run(wait_budget_seconds=0.5, **SETTINGS)
    settings = (
        apione(base_url=env.sandbox.base_url, input_credentials=str(env.warehouse), **SETTINGS)
        .resources["company_enrichment"]
        .apione_run.settings
    )

    def unreachable() -> ApiOneClient:
        return ApiOneClient(SANDBOX_API_KEY, "http://127.0.0.1:9/api/v1", connect_timeout=0.2)

    found = pipeline_status(env.pipeline, settings, unreachable)

    assert found.api_reachable is False and len(found.jobs) == 1
    assert found.jobs[0].api_status is None
    assert "ApiOne unreachable" in found.text()
    assert status_of(env, offline=True).api_reachable is None


def test_status_before_any_run_and_from_the_command_line(make_env: Callable[..., Env]) -> None:
    env = make_env()
    assert status_of(env).text().count("none yet") == 2

    env.insert_companies([(1, "firm1.com")])
    config = {
        **{f"SOURCES__APIONE__{k.upper()}": str(v) for k, v in SETTINGS.items()},
        "SOURCES__APIONE__INPUT_COLUMNS": '{"domain": "domain"}',
        "SOURCES__APIONE__BASE_URL": env.sandbox.base_url,
        "SOURCES__APIONE__INPUT_CREDENTIALS": str(env.warehouse),
        "DESTINATION__DUCKDB__CREDENTIALS": str(env.out),
        "PIPELINE_NAME": env.pipeline.pipeline_name,
        "RUNTIME__DLTHUB_TELEMETRY": "false",
    }
    env.run(**SETTINGS)
    pipelines = env.tmp / "cli_pipelines"
    shown = subprocess.run(
        [sys.executable, "-m", "apione_source.cli", "status", "--pipelines-dir", str(pipelines)],
        env={**os.environ, **config},
        cwd=env.tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "jobs in flight: 0" in shown.stdout
    assert "sent 1  collected 1" in shown.stdout
    assert SANDBOX_API_KEY not in shown.stdout + shown.stderr
