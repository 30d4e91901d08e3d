"""The apione-dlt demo: enrich companies, people and emails from a DuckDB warehouse.

Runs entirely on this machine: it starts the ApiOne sandbox in-process, creates
``demo_data/warehouse.duckdb`` with sample input tables (duplicates and bad rows
included), and runs the real pipelines into the same warehouse, dataset ``enriched``.
Run it twice: the second run submits nothing.

    apione-dlt demo             # run the demo (demo_data/ in the current directory)
    apione-dlt demo --show      # look at the loaded data
    apione-dlt demo --reset     # start over
    apione-dlt demo --dbt       # build the dbt package over it (in a clone, dbt installed)

``pipelines/demo.py`` runs it with ``demo_data/`` in the repository.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import dlt
import duckdb

from apione_source import apione, run_enrichment
from apione_source.sandbox import Sandbox

# The dbt project that adds the package (dbt/apione_dlt) through packages.yml, as yours
# would: in a clone of the repository, not in the installed package.
DBT_PROJECT = Path("dbt") / "apione_dlt" / "integration_tests"
API_KEY = "sk_demo_sandbox"  # the sandbox's own key; never a real one
DATASET = "enriched"

# (enrichment type, input table, ApiOne field -> column)
JOBS = [
    ("company", "companies", {"domain": "website"}),
    (
        "people",
        "people",
        {
            "email": "email",
            "first_name": "first_name",
            "last_name": "last_name",
            "domain": "company_domain",
        },
    ),
    ("email", "contacts", {"email": "email"}),
]


def create_warehouse(path: Path) -> None:
    """Create the sample input tables: ~3,000 companies, ~1,500 people, ~1,500 emails."""
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE SCHEMA crm")
        # Every 9th company is another spelling of an earlier one, every 61st is garbage.
        con.execute(
            """
            CREATE TABLE crm.companies AS
            SELECT i AS id,
                   'Company ' || i AS name,
                   CASE
                       WHEN i % 61 = 0
                           THEN (['', 'not a domain', NULL, 'localhost'])[1 + (i // 61) % 4]
                       WHEN i % 9 = 0 THEN 'https://www.Company' || (i - 1) || '.example.com/about'
                       ELSE 'company' || i || '.example.com'
                   END AS website,
                   TIMESTAMP '2026-01-01' + INTERVAL (i) MINUTE AS updated_at
            FROM range(1, 3001) t(i)
            """
        )
        con.execute(
            """
            CREATE TABLE crm.people AS
            SELECT i AS id,
                   'First' || i AS first_name,
                   'Last' || i AS last_name,
                   CASE WHEN i % 3 = 0 THEN NULL
                        WHEN i % 47 = 0 THEN 'broken-at-example'
                        ELSE 'person' || (i % 1400) || '@company' || (i % 700) || '.example.com'
                   END AS email,
                   'company' || (i % 700) || '.example.com' AS company_domain
            FROM range(1, 1501) t(i)
            """
        )
        con.execute(
            """
            CREATE TABLE crm.contacts AS
            SELECT i AS id,
                   CASE WHEN i % 53 = 0 THEN '   '
                        WHEN i % 10 = 0 THEN ' USER' || (i - 1) || '@Mail.Example.com '
                        ELSE 'user' || i || '@mail.example.com'
                   END AS email
            FROM range(1, 1501) t(i)
            """
        )
    finally:
        con.close()


class _ProgressHandler(logging.Handler):
    """Shows apione_source progress lines on one live line in a terminal."""

    def __init__(self, label: str) -> None:
        super().__init__(logging.INFO)
        self.label = label
        self.tty = sys.stdout.isatty()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("progress: "):
            line = f"  {self.label:8} {msg.removeprefix('progress: ')}"
            if self.tty:
                sys.stdout.write("\r\033[K" + line)
                sys.stdout.flush()
            return
        if self.tty:
            sys.stdout.write("\r\033[K")
        print(f"  {self.label:8} {msg}", flush=True)


def run_demo(data_dir: Path) -> None:
    """Run the three demo pipelines against an in-process sandbox and print a summary."""
    data_dir.mkdir(exist_ok=True)
    warehouse = data_dir / "warehouse.duckdb"
    if not warehouse.exists():
        create_warehouse(warehouse)
        print(f"created sample warehouse {warehouse}")
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    log = logging.getLogger("apione_source")
    log.setLevel(logging.INFO)
    log.propagate = False
    started = time.monotonic()
    # Jobs take about a second plus a little per record, as a real API would.
    with Sandbox(
        plan="growth", api_key=API_KEY, job_seconds_base=0.5, job_seconds_per_record=0.001, seed=7
    ) as sandbox:
        print(f"ApiOne sandbox at {sandbox.base_url}")
        for etype, table, columns in JOBS:
            handler = _ProgressHandler(etype)
            log.addHandler(handler)
            try:
                pipeline = dlt.pipeline(
                    pipeline_name=f"apione_demo_{etype}",
                    destination=dlt.destinations.duckdb(str(warehouse)),
                    dataset_name=DATASET,
                    pipelines_dir=str(data_dir / "pipelines"),
                )
                source = apione(
                    api_key=API_KEY,
                    base_url=sandbox.base_url,
                    enrichment_type=etype,
                    input_table=table,
                    input_dataset="crm",
                    input_credentials=str(warehouse),
                    input_columns=columns,
                    primary_key="id",
                    wait_budget_seconds=120,
                )
                run_enrichment(pipeline, source)
            finally:
                log.removeHandler(handler)
        usage = sandbox.usage()
    _print_summary(warehouse, usage, time.monotonic() - started)


def _print_summary(warehouse: Path, usage: dict[str, object], seconds: float) -> None:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        tables = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ? "
            "AND table_name NOT LIKE '\\_dlt%' ESCAPE '\\' ORDER BY table_name",
            [DATASET],
        ).fetchall()
        print("\nrows per table (dataset 'enriched')")
        for (name,) in tables:
            (n,) = con.execute(f'SELECT count(*) FROM {DATASET}."{name}"').fetchone()  # type: ignore[misc]
            print(f"  {name:42} {n:>7}")
        jobs = con.execute(
            f"SELECT status, count(*) FROM {DATASET}.apione_jobs GROUP BY 1 ORDER BY 1"
        ).fetchall()
    finally:
        con.close()
    print("jobs in the ledger: " + ", ".join(f"{s} {n}" for s, n in jobs))
    print(
        f"this run: {usage['jobs_created']} jobs created, "
        f"{usage['records_billed']} records billed by the sandbox, {seconds:.1f} s"
    )
    print("\nlook at the data:  apione-dlt demo --show  (or pipelines/demo.py --show)")


def show(warehouse: Path) -> None:
    """Print a few rows of each enriched table."""
    con = duckdb.connect(str(warehouse), read_only=True)
    con.execute(f"SET search_path = '{DATASET}'")
    try:
        for sql in (
            "SELECT key, name, industry, employee_count, location__country"
            " FROM apione_companies ORDER BY key LIMIT 5",
            "SELECT key, full_name, title, seniority FROM apione_people ORDER BY key LIMIT 5",
            "SELECT key, deliverability, is_free_provider"
            " FROM apione_email_checks ORDER BY key LIMIT 5",
            "SELECT status, count(*) AS n FROM apione_companies_outcomes GROUP BY 1 ORDER BY 2",
            "SELECT input_pk, reason, detail FROM apione_companies_rejected LIMIT 5",
            "SELECT job_id, type, status, record_count, matched, not_found"
            " FROM apione_jobs ORDER BY submitted_at LIMIT 5",
        ):
            print(sql)
            con.sql(sql).show()
    finally:
        con.close()


def build_dbt(warehouse: Path, project: Path) -> None:
    """Build and test the dbt package over the demo warehouse; print its companies status."""
    try:
        from dbt.cli.main import dbtRunner
    except ImportError:
        sys.exit("dbt is not installed: uv run --group dbt python pipelines/demo.py --dbt")
    if not project.is_dir():
        sys.exit(f"no dbt project at {project}: run it from a clone of apione-dlt")
    os.environ.update(
        DBT_PROFILES_DIR=str(project),
        DBT_SEND_ANONYMOUS_USAGE_STATS="False",
        APIONE_DBT_DUCKDB_PATH=str(warehouse.resolve()),
        APIONE_DBT_SCHEMA=DATASET,
    )
    dbt = dbtRunner()
    for command in (["deps"], ["build", "--target", "duckdb"]):
        result = dbt.invoke([*command, "--project-dir", str(project), "--quiet"])
        if not result.success:
            sys.exit(f"dbt {command[0]} failed (see {project / 'logs'})")
    done = Counter(r.node.resource_type for r in result.result)  # type: ignore[union-attr]
    print(f"dbt build: {done['model']} models and {done['test']} tests passed")
    con = duckdb.connect(str(warehouse.resolve()))  # as dbt-duckdb opened it, still open
    try:
        sql = (
            f"SELECT input_pk, key, status, rejection_reason, name, industry, result_age_hours "
            f"FROM {DATASET}.apione__companies_current "
            "QUALIFY row_number() OVER (PARTITION BY status ORDER BY input_pk) <= 3 "
            "ORDER BY status, input_pk"
        )
        print(f"\n{sql}")
        con.sql(sql).show()
        con.sql(
            f"SELECT status, count(*) AS input_rows FROM {DATASET}.apione__companies_current "
            "GROUP BY 1 ORDER BY 2 DESC"
        ).show()
    finally:
        con.close()


def main(argv: list[str] | None = None, *, root: Path | None = None) -> int:
    """Run the demo; ``root`` holds ``demo_data/`` and the dbt project (default: cwd)."""
    parser = argparse.ArgumentParser(
        prog="apione-dlt demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--show", action="store_true", help="show the loaded data")
    parser.add_argument("--reset", action="store_true", help="delete demo_data/ first")
    parser.add_argument(
        "--dbt", action="store_true", help="build the dbt package over the demo's data"
    )
    args = parser.parse_args(argv)
    base = Path.cwd() if root is None else root
    data_dir = base / "demo_data"
    warehouse = data_dir / "warehouse.duckdb"
    if args.show:
        show(warehouse)
        return 0
    if args.dbt:
        if not warehouse.exists():
            run_demo(data_dir)
        build_dbt(warehouse, base / DBT_PROJECT)
        return 0
    if args.reset and data_dir.exists():
        shutil.rmtree(data_dir)
    run_demo(data_dir)
    return 0
