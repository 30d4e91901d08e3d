"""The dbt package (dbt/apione_dlt) built the way a user's project uses it, after real loads.

A dbt project that adds the package through ``packages.yml`` (a copy of
``dbt/apione_dlt/integration_tests`` pointing at the package by absolute path) runs
``dbt deps``, ``dbt build`` (models and every test of the package) and
``dbt source freshness`` over what the pipeline loaded on DuckDB and PostgreSQL. The
assertions are what an analyst checks: one row per input row in ``current``, the right
status for each kind of row, and credits that add up to what the sandbox billed. For
Snowflake and BigQuery the package is compiled (no connection is opened).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from apione_source.models import EnrichmentType
from apione_source.tables import TableNames
from tests.warehouses.harness import Env

pytestmark = [pytest.mark.slow, pytest.mark.dbt]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "dbt" / "apione_dlt"
DBT = Path(sys.executable).parent / "dbt"
COMPANY = TableNames("apione_", EnrichmentType.COMPANY)
ONLY_COMPANIES = ("--vars", "{apione_enrichment_types: [companies]}")  # what the tests load
FAULTS = {"failure_rate": 0.3, "seed": 11}  # some jobs fail: their records are resent


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's dbt project that adds the package through packages.yml."""
    if not DBT.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("dbt is not installed: CI installs the dbt group (see .ci/run)")
        pytest.skip("dbt is not installed: uv sync --group dbt")
    root = tmp_path / "analytics"
    shutil.copytree(
        PACKAGE / "integration_tests",
        root,
        ignore=shutil.ignore_patterns("target", "dbt_packages", "logs", "package-lock.yml"),
    )
    (root / "packages.yml").write_text(f"packages:\n  - local: {PACKAGE}\n")
    return root


def dbt(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run one dbt command in ``project``; its output, or a failure showing it."""
    full_env = {
        **os.environ,
        "DBT_PROFILES_DIR": str(project),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "False",
        "DBT_USE_COLORS": "False",
        **(env or {}),
    }
    proc = subprocess.run(
        [str(DBT), *args], cwd=project, env=full_env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(f"dbt {' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def load(env: Env) -> dict[str, Any]:
    """Two runs with every kind of row and every reason to bill; what the input holds."""
    rows: list[tuple[Any, ...]] = [(i, f"firm{i}.com") for i in range(30)]
    rows += [(30, "https://www.Firm1.com/about"), (31, None), (32, "not a domain")]
    env.insert_companies(rows)
    env.input_exec(f"INSERT INTO {env.input_table()} (id, domain) VALUES (NULL, 'nopk.com')")
    env.run(records_per_job=4, max_attempts=8)
    # a row changes its key, a good row goes bad, and every fresh key goes stale
    env.input_exec(
        f"UPDATE {env.input_table()} SET domain = 'renamed2.com' WHERE id = 2",
        f"UPDATE {env.input_table()} SET domain = '' WHERE id = 3",
    )
    env.run(records_per_job=4, max_attempts=8, ttl_matched_days=0, ttl_not_found_days=0)
    # stale keys still carried by a good row: 30 but firm2 (renamed) and firm3 (now bad)
    return {"ids": {str(i) for i in range(33)} | {"<NULL>"}, "refreshed": 28}


def build(project: Path, env: Env, target: str, settings: dict[str, str]) -> dict[str, str]:
    settings = {"APIONE_DBT_SCHEMA": env.output_dataset, **settings}
    dbt(project, "deps", env=settings)
    dbt(project, "build", "--target", target, *ONLY_COMPANIES, env=settings)
    dbt(project, "source", "freshness", "--target", target, *ONLY_COMPANIES, env=settings)
    return settings


def check_marts(env: Env, expected: dict[str, Any]) -> None:
    """What an analyst checks in the marts after the two runs of :func:`load`."""
    current = env.query(
        f"SELECT input_pk, key, status, rejection_reason, name, result_age_hours "
        f"FROM {env.out('apione__companies_current')}"
    )
    by_pk = {str(r[0]): r for r in current}
    # every input row exactly once (the NULL primary key row as <NULL>)
    assert len(current) == len(by_pk) == len(expected["ids"])
    assert set(by_pk) == expected["ids"]
    # rejected rows, with their reason, and a row that went bad after it was enriched
    assert by_pk["31"][2:4] == ("rejected", "null")
    assert by_pk["32"][2:4] == ("rejected", "invalid_domain")
    assert by_pk["3"][2:4] == ("rejected", "empty")
    assert by_pk["<NULL>"][2:4] == ("rejected", "null_primary_key")
    # a row that changed its key shows the new key's outcome, never the old one's
    assert by_pk["2"][1] == "renamed2.com"
    # two rows with one key share its outcome; matched rows carry the enrichment
    assert by_pk["30"][1] == by_pk["1"][1] == "firm1.com"
    assert by_pk["30"][2] == by_pk["1"][2]
    for pk, key, status, _, name, age in current:
        assert status in ("matched", "not_found", "rejected"), (pk, status)
        assert (name is not None) == (status == "matched"), (pk, status, name)
        if status != "rejected":
            assert key and age is not None and 0 <= age <= 1, (pk, key, age)

    # the credits add up to what ApiOne (the sandbox) billed, and say why
    credits = {
        reason: int(n)
        for reason, n in env.query(
            f"SELECT reason, sum(records_billed) FROM {env.out('apione__credits_daily')} "
            "GROUP BY reason"
        )
    }
    usage = env.sandbox.usage()
    sends_per_key = usage["billed_per_key"]
    assert sum(credits.values()) == usage["records_billed"], credits
    assert credits["first_send"] == len(sends_per_key)  # each key's first send, once
    assert credits["refresh"] == expected["refreshed"]
    # the rest were resent after failed jobs: the sandbox failed some (seeded)
    assert credits["resubmitted_after_failure"] > 0
    assert set(credits) == {"first_send", "refresh", "resubmitted_after_failure"}
    jobs = env.query(f"SELECT status, count(*) FROM {env.out('apione__jobs')} GROUP BY status")
    assert dict(jobs).keys() == {"completed", "failed"}
    assert sum(n for _, n in jobs) == usage["jobs_created"]


def check_descriptions(env: Env) -> None:
    """Every column of every loaded table is described in dlt's schema."""
    schema = env.pipeline.default_schema
    names = [COMPANY.enrichment, COMPANY.outcomes, COMPANY.rejected, COMPANY.inputs]
    names += [COMPANY.jobs, COMPANY.runs, *COMPANY.lists.values()]
    for table in names:
        assert schema.tables[table].get("description"), table
        for column, hints in schema.tables[table]["columns"].items():
            assert hints.get("description"), f"{table}.{column} has no description"


def test_builds_and_tests_on_duckdb_after_a_real_load(
    make_env: Callable[..., Env], project: Path
) -> None:
    env = make_env("duckdb", "duckdb", **FAULTS)
    expected = load(env)
    check_descriptions(env)
    settings = build(project, env, "duckdb", {"APIONE_DBT_DUCKDB_PATH": env.output_wh.credentials})
    check_marts(env, expected)
    check_documented(project, settings)


def check_documented(project: Path, settings: dict[str, str]) -> None:
    """Every column of every source and model, as the warehouse has it, is described."""
    dbt(project, "docs", "generate", "--target", "duckdb", *ONLY_COMPANIES, env=settings)
    catalog = json.loads((project / "target" / "catalog.json").read_text())
    manifest = json.loads((project / "target" / "manifest.json").read_text())
    checked = 0
    for kind in ("nodes", "sources"):
        for unique_id, entry in catalog[kind].items():
            node = manifest[kind][unique_id]
            if node["package_name"] != "apione_dlt":
                continue
            described = {name.lower(): col["description"] for name, col in node["columns"].items()}
            for column in entry["columns"]:
                assert described.get(column.lower()), f"{unique_id}.{column} is not described"
                checked += 1
    assert checked > 250  # the sources and models of companies, and jobs and runs


def test_builds_and_tests_on_postgres_after_a_real_load(
    make_env: Callable[..., Env], project: Path
) -> None:
    env = make_env("postgres", "postgres", **FAULTS)
    expected = load(env)
    url = urlparse(str(env.output_wh.credentials))
    settings = {
        "APIONE_DBT_PG_HOST": str(url.hostname),
        "APIONE_DBT_PG_PORT": str(url.port),
        "APIONE_DBT_PG_USER": str(url.username),
        "APIONE_DBT_PG_PASSWORD": str(url.password),
        "APIONE_DBT_PG_DBNAME": url.path.lstrip("/"),
    }
    build(project, env, "postgres", settings)
    check_marts(env, expected)


@pytest.mark.parametrize(
    ("target", "dialect_mark"),
    [("snowflake", "convert_timezone('UTC'"), ("bigquery", "`compile-only`.`enriched`.")],
)
def test_compiles_for_snowflake_and_bigquery(project: Path, target: str, dialect_mark: str) -> None:
    dbt(project, "deps")
    dbt(project, "compile", "--target", target, "--no-populate-cache")
    compiled = project / "target" / "compiled" / "apione_dlt" / "models"
    current = (compiled / "marts" / "companies" / "apione__companies_current.sql").read_text()
    assert dialect_mark in current
    models = {p.stem for p in compiled.rglob("*.sql")}
    expected = {"apione__companies_current", "apione__people_current", "apione__credits_daily"}
    assert expected <= models


def test_generated_files_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "dbt" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"run `uv run python dbt/generate.py`:\n{proc.stderr}"
