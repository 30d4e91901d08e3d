"""``apione-dlt demo`` works from any directory, and a second run pays for nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

pytestmark = pytest.mark.slow


def demo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "apione_source.cli", "demo", *args],
        cwd=cwd,
        env={**os.environ, "RUNTIME__DLTHUB_TELEMETRY": "false"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_demo_runs_in_the_current_directory_and_runs_again_for_free(tmp_path: Path) -> None:
    first = demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "records billed by the sandbox" in first.stdout
    con = duckdb.connect(str(tmp_path / "demo_data" / "warehouse.duckdb"), read_only=True)
    try:
        (outcomes,) = con.execute(
            "SELECT count(*) FROM enriched.apione_companies_outcomes"
        ).fetchone()  # type: ignore[misc]
    finally:
        con.close()
    assert outcomes > 2000

    again = demo(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "this run: 0 jobs created, 0 records billed" in again.stdout
