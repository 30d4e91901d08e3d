"""The warehouse scenarios on DuckDB: input and results in one DuckDB file."""

from __future__ import annotations

import pytest

from tests.warehouses.scenarios import KillScenarios, Scenarios

pytestmark = [pytest.mark.slow]


class TestDuckDB(Scenarios):
    input_wh = "duckdb"
    output_wh = "duckdb"


class TestDuckDBKilled(KillScenarios):
    input_wh = "duckdb"
    output_wh = "duckdb"
