"""The warehouse scenarios with the input table in one warehouse and the results in another.

The dbt-style join needs both in one warehouse, so these run the other scenarios only;
the two-stand-in combination runs the core ones (first run, incremental runs), since TTL
and cursor reads are covered per warehouse.
"""

from __future__ import annotations

import pytest

from tests.warehouses.scenarios import CoreScenarios, Scenarios

pytestmark = [pytest.mark.slow]


@pytest.mark.postgres
class TestPostgresToDuckDB(Scenarios):
    input_wh = "postgres"
    output_wh = "duckdb"


@pytest.mark.bigquery
@pytest.mark.snowflake
@pytest.mark.filterwarnings("ignore:Cannot create BigQuery Storage client:UserWarning")
class TestBigQueryToSnowflake(CoreScenarios):
    input_wh = "bigquery"
    output_wh = "snowflake"
