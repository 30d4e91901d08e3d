"""The warehouse scenarios on BigQuery's stand-in, bqemulator (own venv, see conftest)."""

from __future__ import annotations

import pytest

from tests.warehouses.scenarios import Scenarios

pytestmark = [
    pytest.mark.slow,
    pytest.mark.bigquery,
    # dlt reads through the REST API; the Storage API client is not installed (nor emulated)
    pytest.mark.filterwarnings("ignore:Cannot create BigQuery Storage client:UserWarning"),
]


class TestBigQuery(Scenarios):
    input_wh = "bigquery"
    output_wh = "bigquery"
