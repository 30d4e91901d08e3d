"""Opt-in: the warehouse scenarios against real Postgres, Snowflake and BigQuery.

Skipped unless credentials are given in the environment (never in a file of this repo):

- ``APIONE_TEST_POSTGRES_CREDENTIALS``: ``postgresql://user:password@host:5432/database``
- ``APIONE_TEST_SNOWFLAKE_CREDENTIALS``:
  ``snowflake://user:password@account/database?warehouse=WH&role=ROLE``
- ``APIONE_TEST_BIGQUERY_CREDENTIALS``: a service-account JSON (its content, or the path
  of the file); optional ``APIONE_TEST_BIGQUERY_LOCATION`` (default ``US``).

Every test creates a throwaway input dataset (``crm_<pid>_<n>``) and output dataset
(``enriched_<pid>_<n>``) and drops both afterwards. The ApiOne side is still the local
sandbox: nothing is billed. Run with e.g.
``APIONE_TEST_POSTGRES_CREDENTIALS=... uv run pytest tests/warehouses/test_real_cloud.py
--run-slow``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.warehouses.harness import Warehouse
from tests.warehouses.scenarios import Scenarios

pytestmark = [pytest.mark.slow, pytest.mark.real_cloud]


def _credentials(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.skip(f"real-cloud suite: set {name} to run it")
    return value


@pytest.fixture
def real_postgres_warehouse() -> Warehouse:
    return Warehouse("postgres", _credentials("APIONE_TEST_POSTGRES_CREDENTIALS"))


@pytest.fixture
def real_snowflake_warehouse() -> Warehouse:
    return Warehouse(
        "snowflake",
        _credentials("APIONE_TEST_SNOWFLAKE_CREDENTIALS"),
        types={"int": "INT", "text": "VARCHAR", "timestamp": "TIMESTAMP_NTZ"},
    )


@pytest.fixture
def real_bigquery_warehouse() -> Warehouse:
    raw = _credentials("APIONE_TEST_BIGQUERY_CREDENTIALS")
    info: dict[str, Any] = json.loads(raw if raw.startswith("{") else Path(raw).read_text())
    location = os.environ.get("APIONE_TEST_BIGQUERY_LOCATION", "US")

    def activate(monkeypatch: pytest.MonkeyPatch) -> None:
        # the output destination and the input reader both resolve this
        monkeypatch.setenv("DESTINATION__BIGQUERY__LOCATION", location)
        for var in ("BIGQUERY_EMULATOR_HOST", "DATA_WRITER__DISABLE_COMPRESSION"):
            monkeypatch.delenv(var, raising=False)

    return Warehouse(
        "bigquery",
        info,
        types={"int": "INT64", "text": "STRING", "timestamp": "TIMESTAMP"},
        activate=activate,
    )


@pytest.mark.postgres
class TestRealPostgres(Scenarios):
    input_wh = "real_postgres"
    output_wh = "real_postgres"


@pytest.mark.snowflake
class TestRealSnowflake(Scenarios):
    input_wh = "real_snowflake"
    output_wh = "real_snowflake"


@pytest.mark.bigquery
@pytest.mark.filterwarnings("ignore:Cannot create BigQuery Storage client:UserWarning")
class TestRealBigQuery(Scenarios):
    input_wh = "real_bigquery"
    output_wh = "real_bigquery"
