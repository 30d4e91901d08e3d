"""Run one enrichment in a subprocess and, optionally, kill it at a chosen phase.

Test code, not package code: ``tests/test_crash_matrix.py`` and ``tests/test_kill_fuzzer.py``
start it with
``python tests/crash_runner.py --workdir D --base-url U --warehouse W [--crash-at PHASE]``.
The pipeline lives in ``D/pipelines``, its destination is the DuckDB file
``D/destination.duckdb`` (dataset ``enriched``, which also holds the job journal
``_apione_journal`` and dlt's state) and the input is ``crm.companies`` of the DuckDB file
``W``. With ``--crash-at`` one function is wrapped, in this process only, so that at its
``--crash-after``-th call the process signals itself: SIGKILL by default (no cleanup, no
``finally``, no atexit), or SIGTERM with ``--signal TERM`` (the run is asked to stop and
goes on to its next safe point; where dlt does not intercept SIGTERM it dies at once):

* ``input_read``: the first chunk of input rows was read, nothing was submitted;
* ``send``: ``Journal.send`` returned: the intent is journaled, the request did not leave;
* ``answer_lost``: ApiOne answered the submit (the job exists and is billed) but
  ``Journal.job_created`` is entered and the original is never called: the answer is lost;
* ``after_submit``: ``Journal.job_created`` returned: the job id is journaled;
* ``polling``: ``AsyncApiOneClient.get_job`` returned;
* ``fetching``: ``AsyncApiOneClient.get_results`` returned;
* ``spend``: ``Journal.spend`` returned: the job is spent and its resend journaled, its
  report (ledger and outcome rows) is not loaded;
* ``collected``: ``Journal.collected`` returned: the collected jobs point at this run's
  load package, which is not committed yet;
* ``normalize``: dlt's normalize step starts (the extracted package is on disk);
* ``load``: dlt's load step has completed a merge (SQL follow-up) job, so some final
  tables already changed, but the package is not marked loaded in ``_dlt_loads``
  (falls back to the start of ``Load.complete_package`` if there is no such job);
* ``load_committed``: a load job committed in the destination, but dlt's worker has not
  recorded that yet (``save_pending_transition`` is entered, the original never called):
  dlt runs the job again when the package is resumed. With ``--crash-table T`` only
  jobs of table ``T`` count.

Prints one JSON line with the load ids on success; exits 1 with the error on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

PHASES = (
    "input_read",
    "send",
    "answer_lost",
    "after_submit",
    "polling",
    "fetching",
    "spend",
    "collected",
    "normalize",
    "load",
    "load_committed",
)
DEFAULT_CRASH_AFTER = {"send": 2, "answer_lost": 2, "after_submit": 2, "polling": 3}
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}
JOURNAL_TABLE = "_apione_journal"


def die(sig: int = signal.SIGKILL) -> None:
    """Signal this process: SIGKILL dies at once; SIGTERM returns (the run stops later)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)


def install_crash(
    phase: str, after: int, sig: int = signal.SIGKILL, table: str | None = None
) -> None:
    """Wrap the function of ``phase`` so that the process is signalled at the right moment."""
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == after  # once: a SIGTERM run goes on and may pass here again

    if phase == "input_read":
        from apione_source.reader import InputReader

        orig_rows = InputReader.rows

        def rows(self: Any, *args: Any, **kwargs: Any) -> Any:
            for chunk in orig_rows(self, *args, **kwargs):
                if due():
                    die(sig)  # the chunk was read; nothing of it was classified or submitted
                yield chunk

        InputReader.rows = rows  # type: ignore[method-assign]

    elif phase in ("send", "spend", "collected"):
        from apione_source.journal import Journal

        name = phase
        original = getattr(Journal, name)

        def after_write(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            if due():
                die(sig)
            return result

        setattr(Journal, name, after_write)

    elif phase in ("after_submit", "answer_lost"):
        from apione_source.journal import Journal

        orig_job_created = Journal.job_created

        def job_created(self: Any, *args: Any, **kwargs: Any) -> Any:
            if phase == "answer_lost" and due():
                die(sig)  # the HTTP answer arrived, the job id was never journaled
            result = orig_job_created(self, *args, **kwargs)
            if phase == "after_submit" and due():
                die(sig)
            return result

        Journal.job_created = job_created  # type: ignore[method-assign]

    elif phase in ("polling", "fetching"):
        from apione_source.client import AsyncApiOneClient

        name = "get_job" if phase == "polling" else "get_results"
        orig_call = getattr(AsyncApiOneClient, name)

        async def call(self: Any, job_id: str) -> Any:
            answer = await orig_call(self, job_id)
            if due():
                die(sig)
            return answer

        setattr(AsyncApiOneClient, name, call)

    elif phase == "normalize":
        from dlt.pipeline.pipeline import Pipeline

        orig_normalize = Pipeline.normalize

        def normalize(self: Any, *args: Any, **kwargs: Any) -> Any:
            if due():
                die(sig)
            return orig_normalize(self, *args, **kwargs)

        Pipeline.normalize = normalize  # type: ignore[method-assign]

    elif phase == "load":
        from dlt.load.load import Load

        orig_complete_jobs = Load.complete_jobs
        orig_complete_package = Load.complete_package

        def complete_jobs(self: Any, load_id: str, jobs: Any, schema: Any) -> Any:
            remaining, finalized, exc = orig_complete_jobs(self, load_id, jobs, schema)
            for job in finalized:
                if job.job_file_info().file_format == "sql" and job.state() == "completed":
                    if due():
                        die(sig)  # a merge ran: final tables changed, the load is not complete
                    break
            return remaining, finalized, exc

        def complete_package(self: Any, *args: Any, **kwargs: Any) -> Any:
            if calls["n"] < after:  # no merge job was the one: the package is about to complete
                calls["n"] = after
                die(sig)
            return orig_complete_package(self, *args, **kwargs)

        Load.complete_jobs = complete_jobs  # type: ignore[method-assign]
        Load.complete_package = complete_package  # type: ignore[method-assign]

    elif phase == "load_committed":
        from dlt.common.storages.load_package import PackageStorage

        orig_save = PackageStorage.save_pending_transition

        def save_pending_transition(self: Any, load_id: str, file_name: str, *a: Any) -> Any:
            if (table is None or file_name.split(".")[0] == table) and due():
                die(sig)  # the destination committed the job; dlt will run it again
            return orig_save(self, load_id, file_name, *a)

        PackageStorage.save_pending_transition = save_pending_transition  # type: ignore[method-assign]

    else:
        raise SystemExit(f"unknown phase {phase!r}; use one of {', '.join(PHASES)}")


def install_fast_retries() -> None:
    """Make the client's own retries of 429/5xx reads quick (the sandbox says Retry-After 0)."""
    import apione_source.source as source_module
    from apione_source.client import AsyncApiOneClient
    from apione_source.retry import RetryPolicy

    policy = RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.05, max_total_seconds=5)

    class FastRetryClient(AsyncApiOneClient):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("retry", policy)
            super().__init__(*args, **kwargs)

    source_module.AsyncApiOneClient = FastRetryClient  # type: ignore[misc]


# --- for the tests: starting this runner, reading its destination, the invariants ---------
#
# Imported by test_crash_matrix.py and test_kill_fuzzer.py; nothing here runs in the runner.

ROOT = Path(__file__).resolve().parent.parent
# Bytecode of runner subprocesses, kept across sessions (validated by mtime); see runner_env.
PYCACHE = Path(tempfile.gettempdir()) / "apione-dlt-test-pycache"
FINAL = ("matched", "not_found", "invalid", "error")  # tables.FINAL_STATUSES
SPENT = ("failed", "expired", "timed_out", "vanished", "lost")  # journal.SPENT_REASONS


def runner_env(workdir: Path, pycache: Path | None = None) -> dict[str, str]:
    """Environment of a runner subprocess (no API key from the caller's environment).

    ``pycache``: where Python may cache bytecode when ``PYTHONDONTWRITEBYTECODE`` is set
    (every run would compile dlt again: about 2.5 of its 4 seconds).
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DLT_PROJECT_DIR": str(workdir / "project"),
        "DLT_DATA_DIR": str(workdir / "dlt_data"),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        "RUNTIME__LOG_LEVEL": "WARNING",
    }
    env.pop("SOURCES__APIONE__API_KEY", None)
    if pycache is not None and env.pop("PYTHONDONTWRITEBYTECODE", None):
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def runner_command(
    workdir: Path,
    base_url: str,
    warehouse: Path,
    *,
    crash_at: str | None = None,
    crash_after: int | None = None,
    sig: str = "KILL",
    **options: Any,
) -> list[str]:
    """The command line of one run; ``options`` are flags (``wait_budget=2`` -> ``--wait-budget 2``,
    ``fresh_dir=True`` -> ``--fresh-dir``)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--workdir",
        str(workdir),
        "--base-url",
        base_url,
        "--warehouse",
        str(warehouse),
    ]
    if crash_at:
        cmd += ["--crash-at", crash_at, "--signal", sig]
    if crash_after is not None:
        cmd += ["--crash-after", str(crash_after)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not None and value is not False:
            cmd += [flag, str(value)]
    return cmd


class Dest:
    """The runner's destination (DuckDB), read between runs only (a runner locks the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        import duckdb

        con = duckdb.connect(str(self.path), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()

    def tables(self) -> set[str]:
        if not self.path.exists():
            return set()
        rows = self.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'enriched'"
        )
        return {r[0] for r in rows}

    def columns(self, table: str) -> list[str]:
        rows = self.query(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'enriched' AND table_name = ? ORDER BY column_name",
            [table],
        )
        return [r[0] for r in rows]

    def rows(self, table: str, columns: str) -> list[tuple[Any, ...]]:
        """``SELECT columns FROM enriched.table``; no rows while the table does not exist."""
        if table not in self.tables():
            return []
        return self.query(f"SELECT {columns} FROM enriched.{table}")

    def completed_loads(self) -> set[str]:
        return {r[0] for r in self.rows("_dlt_loads", "load_id, status") if r[1] == 0}

    def journal(self) -> list[dict[str, Any]]:
        """Every row of the job journal."""
        from apione_source.journal import COLUMNS

        return [
            dict(zip(COLUMNS, r, strict=True))
            for r in self.rows(JOURNAL_TABLE, ", ".join(f'"{c}"' for c in COLUMNS))
        ]

    def entries(self) -> dict[str, Any]:
        """The journal folded into entries the way ``Journal.open`` folds them: ``done`` and
        ``unreported`` set, finished entries (those a next run deletes) left out. The table
        itself is not touched."""
        from apione_source.journal import Journal, MemoryStore

        store = MemoryStore()
        store.rows = self.journal()
        scopes = {r["scope"] for r in store.rows}
        done = self.completed_loads()
        entries: dict[str, Any] = {}
        for scope in scopes:
            journal = Journal(store, scope, "", "", lambda: 0.0)
            journal.store = _NoDelete(store)  # type: ignore[assignment]
            journal.open(lambda loads: loads & done)
            entries.update(journal.entries)
        return entries

    def open_entries(self) -> list[Any]:
        """Entries a next run still has to act on (send, poll, collect or report)."""
        return [e for e in self.entries().values() if not e.done or e.unreported]

    def in_flight(self) -> int:
        return sum(1 for r in self.rows("apione_jobs", "status") if r[0] == "in_flight")


class _NoDelete:
    def __init__(self, store: Any) -> None:
        self.store = store

    def read(self, scope: str, entry_ids: Any = None, lean: bool = False) -> list[dict[str, Any]]:
        return self.store.read(scope, entry_ids, lean)

    def delete(self, scope: str, entry_ids: Any) -> None:
        pass


def billed_key(record: Any) -> str:
    """The sandbox's billing key of a record as sent (its canonical JSON)."""
    if isinstance(record, str):
        record = json.loads(record)
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def billing_problems(dest: Dest, billed_per_key: dict[str, int], outcomes: str) -> list[str]:
    """Invariant (a): every key is billed at most once plus once per spent job of it.

    A spent job (failed, expired, timed_out, vanished, lost) is one whose records were
    sent again; each must be reported in the outcomes table (status = the reason) and in
    the job ledger (a row with that status).
    """
    spent_jobs: dict[str, set[tuple[str, str]]] = {}
    known_keys = set()
    for job_id, status, record in dest.rows(outcomes, "job_id, status, input"):
        key = billed_key(record)
        known_keys.add(key)
        if status in SPENT:
            spent_jobs.setdefault(key, set()).add((job_id, status))
    ledger = {(j, s) for j, s in dest.rows("apione_jobs", "job_id, status")}
    problems = []
    for key, billed in sorted(billed_per_key.items()):
        jobs = spent_jobs.get(key, set())
        explained = len({j for j, _ in jobs})
        if billed > 1 + explained:
            problems.append(
                f"key {key} billed {billed} times, explained by {explained} spent job(s) "
                f"{sorted(jobs)}"
            )
        if key not in known_keys:
            problems.append(f"key {key} billed {billed} times but has no outcome at all")
    for key, jobs in sorted(spent_jobs.items()):
        for job_id, status in sorted(jobs):
            if (job_id, status) not in ledger:
                problems.append(f"spent job {job_id} ({status}) of key {key} is not in the ledger")
    return problems


def latest_outcomes(
    rows: list[tuple[Any, ...]],
) -> dict[Any, list[tuple[Any, ...]]]:
    """Per group, its latest rows: max by (submitted_at or finished_at, attempt).

    ``rows`` are ``(group, job_id, attempt, status, submitted_at, finished_at)``; more than
    one row per group comes back only when two jobs tie.
    """
    by_group: dict[Any, list[tuple[Any, ...]]] = {}
    for row in rows:
        by_group.setdefault(row[0], []).append(row)
    out = {}
    for group, group_rows in by_group.items():

        def order(r: tuple[Any, ...]) -> tuple[Any, ...]:
            return (r[4] if r[4] is not None else r[5], r[2])

        top = max(order(r) for r in group_rows)
        out[group] = [r for r in group_rows if order(r) == top]
    return out


def outcome_problems(dest: Dest, valid_pks: set[str], names: dict[str, str]) -> list[str]:
    """Invariant (b): every valid input row has exactly one latest outcome, and it is final;
    no table holds a merge key twice.

    ``names``: table -> merge key column.
    """
    problems = []
    outcomes = next(t for t, k in names.items() if k == "outcome_id")
    rows = dest.rows(outcomes, "input_pk, job_id, attempt, status, submitted_at, finished_at")
    latest = latest_outcomes([r for r in rows if r[0] is not None])
    missing = sorted(valid_pks - set(latest), key=lambda p: (len(p), p))
    if missing:
        problems.append(f"{len(missing)} valid input row(s) without an outcome: {missing[:10]}")
    for pk in sorted(set(latest) & valid_pks):
        top = latest[pk]
        if len({r[1] for r in top}) > 1:
            problems.append(f"input row {pk}: two latest outcomes {sorted(top, key=repr)}")
        elif top[0][3] not in FINAL:
            history = sorted((r for r in rows if r[0] == pk), key=repr)
            problems.append(f"input row {pk}: latest outcome is {top[0][3]!r}: {history}")
    for table, key in names.items():
        if table not in dest.tables():
            continue
        total, distinct = dest.query(
            f"SELECT count(*), count(DISTINCT {key}) FROM enriched.{table}"
        )[0]
        if total != distinct:
            problems.append(f"{table} has {total - distinct} duplicate {key}(s)")
    return problems


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--warehouse", required=True, type=Path)
    parser.add_argument("--crash-at", choices=PHASES)
    parser.add_argument("--crash-after", type=int, default=None)
    parser.add_argument("--signal", choices=sorted(SIGNALS), default="KILL")
    parser.add_argument("--crash-table", default=None, help="load_committed: only this table")
    parser.add_argument("--api-key", default="sk_test_sandbox")
    parser.add_argument("--pipeline-name", default="apione_crash")
    parser.add_argument("--records-per-job", type=int, default=500)
    parser.add_argument("--concurrent-jobs", type=int, default=None)
    parser.add_argument("--wait-budget", type=float, default=30.0)
    parser.add_argument("--job-timeout", type=float, default=6 * 3600.0)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--records-per-load", type=int, default=50_000)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--cursor-column", default=None, help="read only rows it says changed")
    parser.add_argument("--ttl-days", type=int, default=None, help="both TTLs (0: enrich again)")
    parser.add_argument("--fast-retries", action="store_true")
    parser.add_argument(
        "--fresh-dir",
        action="store_true",
        help="delete the pipelines dir first: the journal and dlt's state are in the destination",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.fresh_dir:
        shutil.rmtree(workdir / "pipelines", ignore_errors=True)
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
        install_crash(args.crash_at, after, SIGNALS[args.signal], args.crash_table)
    if args.fast_retries:
        install_fast_retries()

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
        concurrent_jobs=args.concurrent_jobs,
        wait_budget_seconds=args.wait_budget,
        job_timeout_seconds=args.job_timeout,
        chunk_size=args.chunk_size,
        records_per_load=args.records_per_load,
        max_attempts=args.max_attempts,
        cursor_column=args.cursor_column,
        **(
            {}
            if args.ttl_days is None
            else {"ttl_matched_days": args.ttl_days, "ttl_not_found_days": args.ttl_days}
        ),
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
