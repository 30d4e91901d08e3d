"""End-to-end throughput benchmark of the ``apione`` source against the local sandbox.

For ``N`` unique company domains it measures, in one process:

* **connector**: ``run_enrichment`` of the real ``apione`` source reading a DuckDB input
  table, submitting to an in-process sandbox (plan ``scale``: 1,000 records per job,
  50 concurrent jobs, instant jobs) and loading into a fresh DuckDB file;
* **baseline**: plain dlt loading the same result rows (built beforehand from the
  sandbox's own synthetic data generator, outside the timed section) into a fresh DuckDB
  file, with the same table names, write dispositions, primary keys and column hints.

The ratio connector/baseline shows what the API round trips, journal and bookkeeping
cost on top of dlt itself. The sandbox's usage counters prove every record was billed
exactly once; the script exits 1 if ``records_billed != N`` (or rows are missing).

Usage::

    uv run python benchmarks/bench_enrich.py --records 10000
    uv run python benchmarks/bench_enrich.py --records 100000 --repeat 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

# Keep benchmark runs off the network (dlt telemetry) before dlt is imported.
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

import dlt
import duckdb

from apione_source.models import EnrichmentType, RecordResult, RecordStatus
from apione_source.normalize import Normalized, normalize_record
from apione_source.sandbox import Sandbox
from apione_source.sandbox import data as sandbox_data
from apione_source.source import apione, run_enrichment
from apione_source.tables import TableNames, apply_table_hints, enrichment_row, outcome_id

API_KEY = "sk_test_bench"
PLAN = "scale"
RECORDS_PER_JOB = 1000
CONCURRENT_JOBS = 50
TABLE_PREFIX = "apione_"
INPUT_DATASET = "crm"
INPUT_TABLE = "companies"
OUTPUT_DATASET = "apione"
ETYPE = EnrichmentType.COMPANY
NAMES = TableNames(TABLE_PREFIX, ETYPE)


# --- results -----------------------------------------------------------------------------


@dataclass
class RunResult:
    """One timed run (connector or baseline)."""

    seconds: float
    phases: dict[str, float]
    rows_loaded: dict[str, int]


@dataclass
class ConnectorRun(RunResult):
    """A connector run plus the sandbox's usage counters for it."""

    jobs_created: int = 0
    records_billed: int = 0
    max_billed_per_key: int = 0
    max_active_jobs_seen: int = 0
    status_calls: int = 0
    results_calls: int = 0


@dataclass
class Report:
    """What the script prints (as a table or as JSON)."""

    records: int
    repeat: int
    connector_seconds: float
    baseline_seconds: float
    connector_records_per_s: float
    baseline_records_per_s: float
    ratio: float
    connector_phases: dict[str, float]
    baseline_phases: dict[str, float]
    jobs_created: int
    records_billed: int
    billed_exactly_once: bool
    rows_match: bool
    connector_rows: dict[str, int]
    baseline_rows: dict[str, int]
    connector_runs_s: list[float] = field(default_factory=list)
    baseline_runs_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --- input ------------------------------------------------------------------------------


def domain_of(i: int) -> str:
    """The ``i``-th unique benchmark domain (already in normalized form)."""
    return f"company-{i:07d}.example.com"


def make_input(path: Path, n: int) -> None:
    """Create the DuckDB input file with table ``crm.companies(id, domain)`` of ``n`` rows."""
    con = duckdb.connect(str(path))
    try:
        con.execute(f"CREATE SCHEMA {INPUT_DATASET}")
        con.execute(
            f"CREATE TABLE {INPUT_DATASET}.{INPUT_TABLE} AS "
            "SELECT i AS id, 'company-' || lpad(CAST(i AS VARCHAR), 7, '0') || '.example.com' "
            "AS domain FROM range(1, ?) t(i)",
            [n + 1],
        )
    finally:
        con.close()


# --- helpers ----------------------------------------------------------------------------


def _phases(pipeline: dlt.Pipeline) -> dict[str, float]:
    """Seconds per step (extract, normalize, load) of the pipeline's last trace."""
    trace = pipeline.last_trace
    out: dict[str, float] = {}
    if trace is None:
        return out
    for step in trace.steps:
        if step.started_at is not None and step.finished_at is not None:
            secs = (step.finished_at - step.started_at).total_seconds()
            out[step.step] = out.get(step.step, 0.0) + secs
    return out


def _row_counts(db_path: Path, dataset: str) -> dict[str, int]:
    """Row count of every non-dlt table in ``dataset`` of a DuckDB file."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = ? AND table_name NOT LIKE '\\_dlt\\_%' ESCAPE '\\' "
                "ORDER BY table_name",
                [dataset],
            ).fetchall()
        ]
        counts: dict[str, int] = {}
        for t in tables:
            row = con.execute(f'SELECT count(*) FROM "{dataset}"."{t}"').fetchone()
            counts[t] = int(row[0]) if row else 0
        return counts
    finally:
        con.close()


def _pipeline(name: str, workdir: Path, db_path: Path) -> dlt.Pipeline:
    return dlt.pipeline(
        pipeline_name=name,
        pipelines_dir=str(workdir / "pipelines"),
        destination=dlt.destinations.duckdb(str(db_path)),
        dataset_name=OUTPUT_DATASET,
    )


# --- connector --------------------------------------------------------------------------


def run_connector(workdir: Path, input_db: Path, n: int) -> ConnectorRun:
    """Run the real source end to end against a fresh sandbox and output file.

    The timed section is ``run_enrichment`` (extract + normalize + load); building the
    source (config checks, one query on the input table) is excluded.
    """
    out_db = workdir / "connector.duckdb"
    with Sandbox(plan=PLAN, api_key=API_KEY) as sandbox:
        pipeline = _pipeline("bench_connector", workdir, out_db)
        # Every setting that shapes the run is explicit, so the project's
        # .dlt/config.toml (e.g. input_columns, plan) cannot change what is measured.
        source = apione(
            api_key=API_KEY,
            enrichment_type=ETYPE.value,
            input_table=INPUT_TABLE,
            primary_key="id",
            input_columns={"domain": "domain"},
            input_dataset=INPUT_DATASET,
            input_destination=dlt.destinations.duckdb(str(input_db)),
            base_url=sandbox.base_url,
            plan=PLAN,
            records_per_job=RECORDS_PER_JOB,
            concurrent_jobs=CONCURRENT_JOBS,
            wait_budget_seconds=3600.0,
            max_attempts=3,
            max_records_per_run=None,
            cursor_column=None,
            webhook_url=None,
            chunk_size=10_000,
            table_prefix=TABLE_PREFIX,
            scd2=False,
        )
        t0 = time.perf_counter()
        run_enrichment(pipeline, source)
        seconds = time.perf_counter() - t0
        usage = sandbox.usage()
    billed: dict[str, int] = usage.get("billed_per_key", {})
    return ConnectorRun(
        seconds=seconds,
        phases=_phases(pipeline),
        rows_loaded=_row_counts(out_db, OUTPUT_DATASET),
        jobs_created=int(usage["jobs_created"]),
        records_billed=int(usage["records_billed"]),
        max_billed_per_key=max(billed.values(), default=0),
        max_active_jobs_seen=int(usage.get("max_active_jobs_seen", 0)),
        status_calls=int(usage.get("status_calls", 0)),
        results_calls=int(usage.get("results_calls", 0)),
    )


# --- baseline ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """One input row as the connector sees it, and the sandbox's answer for it."""

    pk: str
    key: str
    result: RecordResult


def build_results(n: int) -> list[_Record]:
    """Compute what the sandbox answers for the ``n`` input rows, without HTTP.

    Mirrors ``Engine._build_results``: same submitted record (the normalized one), same
    not-found draw on its canonical JSON, same payload builder.
    """
    out: list[_Record] = []
    for i in range(1, n + 1):
        norm = normalize_record(ETYPE, {"domain": domain_of(i)})
        assert isinstance(norm, Normalized)
        record = dict(norm.record)
        index = (i - 1) % RECORDS_PER_JOB
        if sandbox_data.invalid_reason(ETYPE.value, record) is not None:
            raise RuntimeError(f"benchmark domain {record} is invalid for the sandbox")
        if sandbox_data.is_not_found(sandbox_data.canonical_json(record)):
            result = RecordResult(index=index, input=record, status=RecordStatus.NOT_FOUND)
        else:
            result = RecordResult(
                index=index,
                input=record,
                status=RecordStatus.MATCHED,
                data=sandbox_data.company(record),
            )
        out.append(_Record(str(i), norm.key, result))
    return out


def build_batches(records: list[_Record]) -> list[list[tuple[str, list[dict[str, Any]]]]]:
    """Group the rows per job exactly as the connector yields them for a finished job.

    Returns:
        Per job: (table, rows) pairs in yield order: enrichment rows (matched only),
        outcome rows, then the job's ledger row.
    """
    now = datetime.now(timezone.utc)
    load_id = f"{time.time():.6f}"
    batches: list[list[tuple[str, list[dict[str, Any]]]]] = []
    for start in range(0, len(records), RECORDS_PER_JOB):
        chunk = records[start : start + RECORDS_PER_JOB]
        job_id = f"job_bench{start // RECORDS_PER_JOB:06d}"
        counts = {"matched": 0, "not_found": 0, "invalid": 0, "error": 0}
        enriched: list[dict[str, Any]] = []
        outcomes: list[dict[str, Any]] = []
        for rec in chunk:
            status = rec.result.status.value
            counts[status] += 1
            outcomes.append(
                {
                    "outcome_id": outcome_id(job_id, rec.pk, rec.key),
                    "input_pk": rec.pk,
                    "key": rec.key,
                    "job_id": job_id,
                    "attempt": 1,
                    "status": status,
                    "error": None,
                    "input": rec.result.input,
                    "finished_at": now,
                    "load_id": load_id,
                }
            )
            if status == "matched":
                enriched.append(
                    enrichment_row(rec.key, job_id, now, rec.result, version_hash=False)
                )
        job_row = {
            "job_id": job_id,
            "type": ETYPE.value,
            "status": "completed",
            "record_count": len(chunk),
            "attempt": 1,
            "submitted_at": now - timedelta(seconds=1),
            "completed_at": now,
            "expires_at": now + timedelta(days=90),
            "error": None,
            "submitted_in_load": load_id,
            "updated_in_load": load_id,
            "matched": counts["matched"],
            "not_found": counts["not_found"],
            "invalid": counts["invalid"],
            "errors": counts["error"],
        }
        batch: list[tuple[str, list[dict[str, Any]]]] = []
        if enriched:
            batch.append((NAMES.enrichment, enriched))
        batch.append((NAMES.outcomes, outcomes))
        batch.append((NAMES.jobs, [job_row]))
        batches.append(batch)
    return batches


@dlt.source(name="apione", max_table_nesting=2)
def baseline_source(batches: list[list[tuple[str, list[dict[str, Any]]]]]) -> Any:
    """The connector's tables and hints, fed from prebuilt rows instead of the API."""

    def enrichment() -> Iterator[Any]:
        for batch in batches:
            for table, rows in batch:
                yield dlt.mark.with_table_name(rows, table)

    resource = dlt.resource(enrichment, name="company_enrichment", write_disposition="append")
    apply_table_hints(resource, NAMES, ETYPE, scd2=False)
    return resource


def run_baseline(workdir: Path, records: list[_Record]) -> RunResult:
    """Time ``pipeline.run`` of the prebuilt rows into a fresh DuckDB file."""
    out_db = workdir / "baseline.duckdb"
    batches = build_batches(records)  # fresh dicts per run, outside the timed section
    pipeline = _pipeline("bench_baseline", workdir, out_db)
    source = baseline_source(batches)
    t0 = time.perf_counter()
    pipeline.run(source)
    seconds = time.perf_counter() - t0
    return RunResult(seconds, _phases(pipeline), _row_counts(out_db, OUTPUT_DATASET))


# --- driver -----------------------------------------------------------------------------


def _fresh_dir(root: Path, name: str) -> Path:
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def benchmark(n: int, repeat: int, root: Path, log: Any) -> Report:
    """Run connector and baseline ``repeat`` times each; keep the best of each."""
    input_db = root / "input.duckdb"
    t = time.perf_counter()
    make_input(input_db, n)
    records = build_results(n)
    log(f"prepared {n:,} input rows and sandbox answers in {time.perf_counter() - t:.1f}s")

    connector_runs: list[ConnectorRun] = []
    baseline_runs: list[RunResult] = []
    problems: list[str] = []
    for k in range(1, repeat + 1):
        c = run_connector(_fresh_dir(root, f"connector-{k}"), input_db, n)
        connector_runs.append(c)
        log(
            f"[{k}/{repeat}] connector {c.seconds:.2f}s ({n / c.seconds:,.0f} rec/s), "
            f"jobs {c.jobs_created}, billed {c.records_billed:,}"
        )
        if c.records_billed != n:
            problems.append(f"run {k}: records_billed {c.records_billed} != {n}")
        if c.max_billed_per_key > 1:
            problems.append(f"run {k}: a key was billed {c.max_billed_per_key} times")
        b = run_baseline(_fresh_dir(root, f"baseline-{k}"), records)
        baseline_runs.append(b)
        log(f"[{k}/{repeat}] baseline  {b.seconds:.2f}s ({n / b.seconds:,.0f} rec/s)")
        if c.rows_loaded != b.rows_loaded:
            problems.append(f"run {k}: row counts differ: {c.rows_loaded} vs {b.rows_loaded}")
        if c.rows_loaded.get(NAMES.outcomes) != n:
            problems.append(f"run {k}: {c.rows_loaded.get(NAMES.outcomes)} outcome rows != {n}")

    best_c = min(connector_runs, key=lambda r: r.seconds)
    best_b = min(baseline_runs, key=lambda r: r.seconds)
    return Report(
        records=n,
        repeat=repeat,
        connector_seconds=best_c.seconds,
        baseline_seconds=best_b.seconds,
        connector_records_per_s=n / best_c.seconds,
        baseline_records_per_s=n / best_b.seconds,
        ratio=best_b.seconds / best_c.seconds,
        connector_phases=best_c.phases,
        baseline_phases=best_b.phases,
        jobs_created=best_c.jobs_created,
        records_billed=best_c.records_billed,
        billed_exactly_once=all(
            r.records_billed == n and r.max_billed_per_key == 1 for r in connector_runs
        ),
        rows_match=all(
            c.rows_loaded == b.rows_loaded
            for c, b in zip(connector_runs, baseline_runs, strict=True)
        ),
        connector_rows=best_c.rows_loaded,
        baseline_rows=best_b.rows_loaded,
        connector_runs_s=[r.seconds for r in connector_runs],
        baseline_runs_s=[r.seconds for r in baseline_runs],
        problems=problems,
    )


def _fmt_phases(phases: dict[str, float]) -> str:
    order = ["extract", "normalize", "load"]
    return "  ".join(f"{p} {phases[p]:.2f}s" for p in order if p in phases)


def print_table(r: Report) -> None:
    """Print the report as a small human-readable table."""
    header = f"{'N':>9} | {'connector rec/s':>15} | {'baseline rec/s':>14} | {'ratio':>5}"
    print(header)
    print("-" * len(header))
    print(
        f"{r.records:>9,} | {r.connector_records_per_s:>15,.0f} | "
        f"{r.baseline_records_per_s:>14,.0f} | {r.ratio:>5.2f}"
    )
    print()
    print(
        f"best of {r.repeat}: connector {r.connector_seconds:.2f}s, "
        f"baseline {r.baseline_seconds:.2f}s"
    )
    print(f"connector phases: {_fmt_phases(r.connector_phases)}")
    print(f"baseline  phases: {_fmt_phases(r.baseline_phases)}")
    print(
        f"sandbox usage: jobs_created {r.jobs_created:,}, records_billed {r.records_billed:,} "
        f"({'billed exactly once' if r.billed_exactly_once else 'BILLING MISMATCH'})"
    )
    rows = ", ".join(f"{t} {c:,}" for t, c in r.connector_rows.items())
    print(
        f"rows loaded: {rows} ({'same as baseline' if r.rows_match else 'DIFFERS from baseline'})"
    )
    for p in r.problems:
        print(f"PROBLEM: {p}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=10_000, help="unique domains N (default 10000)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each side; best is kept")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--keep", action="store_true", help="keep the temp dir and print its path")
    args = p.parse_args(argv)
    if args.records < 1 or args.repeat < 1:
        p.error("--records and --repeat must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark.

    Returns:
        0 if every record was billed exactly once and the loaded rows check out, else 1.
    """
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="apione-bench-"))
    try:
        report = benchmark(args.records, args.repeat, root, log)
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print_table(report)
    ok = (
        report.records_billed == args.records and report.billed_exactly_once and not report.problems
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
