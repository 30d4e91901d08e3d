"""Run one enrichment in a subprocess and, optionally, SIGKILL it at a chosen phase.

Test code, not package code: ``tests/test_crash_matrix.py`` starts it with
``python tests/crash_runner.py --workdir D --base-url U --warehouse W [--crash-at PHASE]``.
The pipeline lives in ``D/pipelines``, its destination is the DuckDB file
``D/destination.duckdb`` (dataset ``enriched``) and the input is ``crm.companies`` of the
DuckDB file ``W``. With ``--crash-at`` one function is wrapped, in this process only, so
that the process kills itself with SIGKILL (no cleanup, no ``finally``, no atexit) at:

* ``input_read``: the first chunk of input rows was read, nothing was submitted;
* ``after_submit``: ``Journal.submitted`` returned for the ``--crash-after``-th job (2);
* ``answer_lost``: ApiOne answered the ``--crash-after``-th submit (2) but the job id was
  not journaled yet (``Journal.submitted`` is entered, the original is never called);
* ``polling``: ``AsyncApiOneClient.get_job`` returned for the ``--crash-after``-th time (3);
* ``fetching``: ``AsyncApiOneClient.get_results`` returned for the first job;
* ``normalize``: dlt's normalize step starts (the extracted package is on disk);
* ``load``: dlt's load step has completed a merge (SQL follow-up) job, so some final
  tables already changed, but the package is not marked loaded in ``_dlt_loads``
  (falls back to the start of ``Load.complete_package`` if there is no such job).

Prints one JSON line with the load ids on success; exits 1 with the error on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

PHASES = (
    "input_read",
    "after_submit",
    "answer_lost",
    "polling",
    "fetching",
    "normalize",
    "load",
)
DEFAULT_CRASH_AFTER = {"after_submit": 2, "answer_lost": 2, "polling": 3}


def die() -> None:
    """Kill this process the hard way: no exception handlers, no cleanup."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_crash(phase: str, after: int) -> None:
    """Wrap the function of ``phase`` so that the process dies at the right moment."""
    calls = {"n": 0}

    def bump() -> int:
        calls["n"] += 1
        return calls["n"]

    if phase == "input_read":
        from apione_source.reader import InputReader

        orig_rows = InputReader.rows

        def rows(self: Any, *args: Any, **kwargs: Any) -> Any:
            for _chunk in orig_rows(self, *args, **kwargs):
                die()  # the chunk was read; nothing of it was classified or submitted
                yield _chunk  # pragma: no cover

        InputReader.rows = rows  # type: ignore[method-assign]

    elif phase in ("after_submit", "answer_lost"):
        from apione_source.journal import Journal

        orig_submitted = Journal.submitted

        def submitted(self: Any, *args: Any, **kwargs: Any) -> Any:
            if phase == "answer_lost" and bump() >= after:
                die()  # the HTTP answer arrived, the job id was never journaled
            job = orig_submitted(self, *args, **kwargs)
            if phase == "after_submit" and bump() >= after:
                die()
            return job

        Journal.submitted = submitted  # type: ignore[method-assign]

    elif phase == "polling":
        from apione_source.client import AsyncApiOneClient

        orig_get_job = AsyncApiOneClient.get_job

        async def get_job(self: Any, job_id: str) -> Any:
            status = await orig_get_job(self, job_id)
            if bump() >= after:
                die()
            return status

        AsyncApiOneClient.get_job = get_job  # type: ignore[method-assign]

    elif phase == "fetching":
        from apione_source.client import AsyncApiOneClient

        orig_get_results = AsyncApiOneClient.get_results

        async def get_results(self: Any, job_id: str) -> Any:
            results = await orig_get_results(self, job_id)
            if bump() >= after:
                die()
            return results

        AsyncApiOneClient.get_results = get_results  # type: ignore[method-assign]

    elif phase == "normalize":
        from dlt.pipeline.pipeline import Pipeline

        def normalize(self: Any, *args: Any, **kwargs: Any) -> Any:
            die()

        Pipeline.normalize = normalize  # type: ignore[method-assign]

    elif phase == "load":
        from dlt.load.load import Load

        orig_complete_jobs = Load.complete_jobs
        orig_complete_package = Load.complete_package

        def complete_jobs(self: Any, load_id: str, jobs: Any, schema: Any) -> Any:
            remaining, finalized, exc = orig_complete_jobs(self, load_id, jobs, schema)
            for job in finalized:
                if job.job_file_info().file_format == "sql" and job.state() == "completed":
                    die()  # a merge ran: final tables changed, the load is not complete
            return remaining, finalized, exc

        def complete_package(self: Any, *args: Any, **kwargs: Any) -> Any:
            die()
            return orig_complete_package(self, *args, **kwargs)  # pragma: no cover

        Load.complete_jobs = complete_jobs  # type: ignore[method-assign]
        Load.complete_package = complete_package  # type: ignore[method-assign]

    else:
        raise SystemExit(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--warehouse", required=True, type=Path)
    parser.add_argument("--crash-at", choices=PHASES)
    parser.add_argument("--crash-after", type=int, default=None)
    parser.add_argument("--api-key", default="sk_test_sandbox")
    parser.add_argument("--pipeline-name", default="apione_crash")
    parser.add_argument("--records-per-job", type=int, default=500)
    parser.add_argument("--wait-budget", type=float, default=30.0)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--max-attempts", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # Keep the project's .dlt/config.toml out: an empty project dir, before dlt loads.
    project = workdir / "project"
    project.mkdir(exist_ok=True)
    os.environ.setdefault("DLT_PROJECT_DIR", str(project))
    os.environ.setdefault("DLT_DATA_DIR", str(workdir / "dlt_data"))
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

    import dlt

    from apione_source import apione, run_enrichment

    if args.crash_at:
        after = args.crash_after or DEFAULT_CRASH_AFTER.get(args.crash_at, 1)
        install_crash(args.crash_at, after)

    pipeline = dlt.pipeline(
        pipeline_name=args.pipeline_name,
        destination=dlt.destinations.duckdb(str(workdir / "destination.duckdb")),
        dataset_name="enriched",
        pipelines_dir=str(workdir / "pipelines"),
    )
    source = apione(
        api_key=args.api_key,
        base_url=args.base_url,
        enrichment_type="company",
        input_table="companies",
        primary_key="id",
        input_columns={"domain": "domain"},
        input_dataset="crm",
        input_credentials=str(args.warehouse),
        records_per_job=args.records_per_job,
        wait_budget_seconds=args.wait_budget,
        chunk_size=args.chunk_size,
        max_attempts=args.max_attempts,
    )
    try:
        info = run_enrichment(pipeline, source)
        info.raise_on_failed_jobs()
    except Exception as exc:
        print(f"run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise
    print(json.dumps({"loads_ids": list(info.loads_ids)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
