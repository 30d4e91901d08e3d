"""A run that cannot do its job fails, through plain ``pipeline.run``, and loses nothing."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from dlt.pipeline.exceptions import PipelineStepFailed

from apione_source import apione, run_enrichment
from apione_source.errors import (
    ApiUnreachableError,
    AuthenticationError,
    ConfigurationError,
    RequestRefusedError,
)
from tests.e2e import COMPANY, Env, open_journal


def _source(env: Env, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "api_key": env.sandbox.config.api_key,
        "base_url": env.sandbox.base_url,
        "enrichment_type": "company",
        "input_table": "companies",
        "primary_key": "id",
        "input_dataset": "crm",
        "input_credentials": str(env.warehouse),
        "wait_budget_seconds": 30,
    }
    kwargs.update(overrides)
    return apione(**kwargs)


def test_given_a_wrong_key_when_plain_pipeline_run_then_it_fails_naming_the_fix(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"k{i}.com") for i in range(5)])

    with pytest.raises(PipelineStepFailed) as failed:
        env.pipeline.run(_source(env, api_key="sk_wrong_key_123"))

    text = str(failed.value)
    assert "401" in text and "SOURCES__APIONE__API_KEY" in text
    assert "sk_wrong_key_123" not in text
    assert env.sandbox.usage()["records_billed"] == 0
    # run_enrichment raises the connector's own error
    with pytest.raises(AuthenticationError):
        run_enrichment(env.pipeline, _source(env, api_key="sk_wrong_key_123"))


def test_given_a_base_url_without_api_v1_when_run_then_it_fails_and_blocks_no_row(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"url{i}.com") for i in range(12)])

    with pytest.raises(RequestRefusedError) as refused:
        run_enrichment(env.pipeline, _source(env, base_url=env.sandbox.root_url))

    message = str(refused.value)
    assert "404" in message and "base_url" in message and "127.0.0.1" in message
    assert env.count(COMPANY.outcomes) == 0  # nothing that would keep rows from going out
    assert env.sandbox.usage()["records_billed"] == 0

    # the URL fixed: every row goes out on the next run, no TTL trick needed
    run_enrichment(env.pipeline, _source(env))
    usage = env.sandbox.usage()
    assert usage["records_billed"] == 12 and set(usage["billed_per_key"].values()) == {1}
    assert env.count(COMPANY.outcomes) == 12
    assert open_journal(env.out) == []


@pytest.mark.slow
def test_given_an_unreachable_api_when_run_then_it_fails_within_the_bound_naming_the_host(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"down{i}.com") for i in range(3)])
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    started = time.monotonic()
    with pytest.raises(ApiUnreachableError) as down:
        run_enrichment(
            env.pipeline,
            _source(env, base_url=f"http://127.0.0.1:{port}/api/v1", unreachable_seconds=1),
        )

    elapsed = time.monotonic() - started
    message = str(down.value)
    assert f"127.0.0.1:{port}" in message and "ConnectError" in message
    assert elapsed < 120, f"took {elapsed:.0f}s, not bounded by unreachable_seconds"


def test_given_a_wrong_table_when_the_source_is_built_then_nothing_is_touched_until_run(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    missing = env.tmp / "no_such_warehouse.duckdb"

    # building the source (what Dagster does when it loads definitions) touches nothing
    wrong_table = _source(env, input_table="no_such_table")
    wrong_file = _source(env, input_credentials=str(missing))

    with pytest.raises(ConfigurationError, match="no_such_table"):
        run_enrichment(env.pipeline, wrong_table)
    with pytest.raises(ConfigurationError, match="does not exist"):
        run_enrichment(env.pipeline, wrong_file)
    assert not missing.exists(), "checking the input created an empty DuckDB file"
    assert env.sandbox.usage()["submit_calls"] == 0
