"""The warehouse scenarios on Snowflake's stand-in, fakesnow in server mode (see conftest)."""

from __future__ import annotations

import pytest

from tests.warehouses.scenarios import Scenarios

pytestmark = [pytest.mark.slow, pytest.mark.snowflake]


class TestSnowflake(Scenarios):
    input_wh = "snowflake"
    output_wh = "snowflake"
