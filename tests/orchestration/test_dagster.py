"""The Dagster example (orchestration/dagster/definitions.py) against the sandbox.

Needs the ``dagster`` dependency group: ``uv run --group dagster pytest -m dagster``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.e2e import ROOT, Env

dg = pytest.importorskip("dagster")

pytestmark = pytest.mark.dagster

DEFINITIONS = ROOT / "orchestration" / "dagster" / "definitions.py"
TABLES = [
    "apione_companies",
    "apione_companies_tags",
    "apione_companies_technologies",
    "apione_companies_outcomes",
    "apione_companies_rejected",
    "apione_companies_inputs",
    "apione_jobs",
    "apione_runs",
]


def _definitions() -> ModuleType:
    """Import the example as Dagster does (``-f definitions.py``), afresh."""
    spec = importlib.util.spec_from_file_location("apione_dagster_definitions", DEFINITIONS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configure(monkeypatch: pytest.MonkeyPatch, env: Env, api_key: str | None = None) -> None:
    """Configure the run the way a deployment would: dlt's env vars."""
    settings = {
        "SOURCES__APIONE__API_KEY": api_key or env.sandbox.config.api_key,
        "SOURCES__APIONE__BASE_URL": env.sandbox.base_url,
        "SOURCES__APIONE__INPUT_TABLE": "companies",
        "SOURCES__APIONE__PRIMARY_KEY": "id",
        "SOURCES__APIONE__INPUT_DATASET": "crm",
        "SOURCES__APIONE__INPUT_CREDENTIALS": str(env.warehouse),
        "SOURCES__APIONE__WAIT_BUDGET_SECONDS": "30",
        "DESTINATION__DUCKDB__CREDENTIALS": str(env.out),
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)


def _materialize(module: ModuleType, instance: Any) -> Any:
    return dg.materialize([module.company_enrichment], instance=instance, raise_on_error=False)


def _materializations(result: Any) -> dict[str, dict[str, Any]]:
    """Table name -> metadata values of each asset the run materialized."""
    found = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        found[materialization.asset_key.path[-1]] = metadata
    return found


def _log_text(instance: Any, result: Any) -> str:
    return "\n".join(
        entry.user_message + "\n" + str(entry.dagster_event or "")
        for entry in instance.all_logs(result.run_id)
    )


def test_given_no_key_and_a_wrong_table_when_the_definitions_load_then_every_table_is_an_asset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SOURCES__APIONE__API_KEY", raising=False)
    monkeypatch.setenv("SOURCES__APIONE__INPUT_TABLE", "no_such_table")
    monkeypatch.setenv("SOURCES__APIONE__BASE_URL", "http://127.0.0.1:9")  # nothing listens

    defs = _definitions().defs
    dg.Definitions.validate_loadable(defs)
    specs = {tuple(spec.key.path): spec for spec in defs.resolve_all_asset_specs()}
    assert set(specs) == {("enriched", t) for t in TABLES}
    assert specs[("enriched", "apione_companies")].group_name == "apione"

    # ... and as the CLI loads them (what a code server does)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SOURCES__APIONE__API")}
    listed = subprocess.run(
        [Path(sys.executable).parent / "dagster", "asset", "list", "-f", str(DEFINITIONS)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [f"enriched/{t}" for t in sorted(TABLES)]


def test_given_the_sandbox_when_materialized_twice_then_every_table_is_reported_and_paid_once(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    env.insert_companies([(i, f"dagster{i}.com") for i in range(40)] + [(99, "not a domain")])
    _configure(monkeypatch, env)
    module = _definitions()
    instance = dg.DagsterInstance.ephemeral()

    first = _materialize(module, instance)

    assert first.success
    billed = env.sandbox.usage()["records_billed"]
    assert billed == 40
    reported = _materializations(first)
    # every table in the destination is an asset with its columns and row count
    loaded = {t for t in env.tables() if not t.startswith("_")}
    assert loaded == set(TABLES) == set(reported)
    for table in TABLES:
        assert reported[table]["dagster/row_count"] == env.count(table), table
        columns = {c.name for c in reported[table]["dagster/column_schema"].columns}
        (described,) = env.query(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_schema = 'enriched' AND table_name = ?",
            [table],
        )
        assert len(columns) == described[0], table
    companies = reported["apione_companies"]
    assert {"key", "name", "industry", "location__city", "_dlt_id"} <= {
        c.name for c in companies["dagster/column_schema"].columns
    }
    assert companies["rows_loaded"] == env.count("apione_companies") > 0
    assert companies["dagster/table_name"] == "enriched.apione_companies"
    # the run's summary: metadata of the runs table and a log line
    summary = reported["apione_runs"]
    assert summary["records_submitted"] == 40 and summary["rows_rejected"] == 1
    assert summary["summary"].startswith("company_enrichment: rows read 41, rejected 1")
    assert summary["summary"] in _log_text(instance, first)

    second = _materialize(module, instance)

    assert second.success
    assert env.sandbox.usage()["records_billed"] == billed  # nothing paid twice
    again = _materializations(second)
    assert again["apione_runs"]["records_submitted"] == 0
    assert again["apione_runs"]["rows_already_fresh"] == 40
    assert again["apione_companies"]["rows_loaded"] == 0
    assert again["apione_companies"]["dagster/row_count"] == companies["dagster/row_count"]


def test_given_only_rows_that_cannot_be_sent_when_materialized_then_tables_exist_empty(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    env.insert_companies([(1, "not a domain"), (2, None)])
    _configure(monkeypatch, env)

    result = _materialize(_definitions(), dg.DagsterInstance.ephemeral())

    assert result.success
    reported = _materializations(result)
    # the first run creates every table (dbt models downstream find them), empty or not
    assert set(reported) == {t for t in env.tables() if not t.startswith("_")} == set(TABLES)
    with_rows = {t for t, meta in reported.items() if meta["dagster/row_count"]}
    assert with_rows == {"apione_companies_rejected", "apione_runs"}
    assert reported["apione_companies_rejected"]["dagster/row_count"] == 2
    assert env.sandbox.usage()["records_billed"] == 0


def test_given_a_wrong_key_when_materialized_then_the_run_fails_naming_the_fix(
    make_env: Callable[..., Env], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env()
    env.insert_companies([(1, "a.com"), (2, "b.com")])
    _configure(monkeypatch, env, api_key="sk_wrong_dagster_42")
    module = _definitions()
    instance = dg.DagsterInstance.ephemeral()

    result = _materialize(module, instance)

    assert not result.success
    assert result.get_asset_materialization_events() == []
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error
    text = error.to_string()
    assert "AuthenticationError" in text and "SOURCES__APIONE__API_KEY" in text
    logs = _log_text(instance, result)
    assert "company_enrichment: rows read 2, rejected 0" in logs  # what it did before failing
    assert "sk_wrong_dagster_42" not in text + logs
    assert env.sandbox.usage()["records_billed"] == 0
    # raise_on_error (the default) raises the connector's own error
    from apione_source.errors import AuthenticationError

    with pytest.raises(AuthenticationError):
        dg.materialize([module.company_enrichment], instance=instance)
