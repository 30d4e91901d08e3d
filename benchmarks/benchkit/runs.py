"""One measured run of each kind: the connector, dlt's baseline, the API-limit client."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import api_limit
from benchkit.procs import API_KEY, PYTHON, ChildRun, SandboxProcess, child_env, run_child
from benchkit.warehouse import (
    INPUT_DATASET,
    INPUT_TABLE,
    OUTPUT_DATASET,
    input_domains,
    outcome_rows,
    row_counts,
)

HERE = Path(__file__).resolve().parent
CONNECTOR_RUNNER = HERE / "run_connector.py"
BASELINE_RUNNER = HERE / "run_baseline.py"
PIPELINE_NAME = "bench_enrich"
# The destination's DuckDB setting, for the connector and dlt's baseline alike: the README
# recommends a memory limit where the pipeline shares a machine (DuckDB's default is 80% of
# RAM, which it fills with cached pages of the tables it merges into). 256MB made a merge
# fail with DuckDB's out-of-memory error at 1M records.
DUCKDB_GLOBAL_CONFIG = json.dumps({"memory_limit": "1GB"})
CHILD_TIMEOUT_S = 4 * 3600.0


class HarnessError(RuntimeError):
    """A measured child failed: the benchmark cannot report a figure for it."""


@dataclass
class Usage:
    """The sandbox's counters for one run (``/_sandbox/usage``)."""

    jobs: int
    records_billed: int
    keys_billed: int
    max_billed_per_key: int
    submit_calls: int
    status_calls: int
    results_calls: int
    rejected_submits: dict[str, int]

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Usage:
        """Read the usage document."""
        billed: dict[str, int] = doc.get("billed_per_key", {})
        return cls(
            jobs=int(doc["jobs_created"]),
            records_billed=int(doc["records_billed"]),
            keys_billed=len(billed),
            max_billed_per_key=max(billed.values(), default=0),
            submit_calls=int(doc.get("submit_calls", 0)),
            status_calls=int(doc.get("status_calls", 0)),
            results_calls=int(doc.get("results_calls", 0)),
            rejected_submits={k: int(v) for k, v in doc.get("rejected_submits", {}).items()},
        )

    def status_calls_per_job(self) -> float | None:
        """Status calls per job created (None without jobs)."""
        return self.status_calls / self.jobs if self.jobs else None

    def billing_problems(self, expected: int) -> list[str]:
        """What is wrong with the billing when ``expected`` keys should be billed once."""
        out: list[str] = []
        if self.records_billed != expected:
            out.append(f"records billed {self.records_billed:,} != {expected:,}")
        if self.keys_billed != expected:
            out.append(f"keys billed {self.keys_billed:,} != {expected:,}")
        if self.max_billed_per_key > 1:
            out.append(f"a key was billed {self.max_billed_per_key} times")
        return out


@dataclass
class ConnectorRun:
    """A run of ``pipelines/enrich.py`` in its own process."""

    run_s: float  # the script itself, after interpreter start-up and imports
    process: ChildRun
    imports_s: float
    write_s: float  # of run_s: dlt's normalize and load steps, the connector's checkpoints
    usage: Usage
    rows: dict[str, int]
    sandbox_cpu_s: float
    workdir: Path
    out_db: Path

    @property
    def outcomes(self) -> int | None:
        """Rows of the outcomes table after the run."""
        return outcome_rows(self.rows)


@dataclass
class BaselineRun:
    """dlt's own fastest load of what a connector run loaded, in its own process."""

    run_s: float
    process: ChildRun
    rows_in: int
    rows: dict[str, int] = field(default_factory=dict)


def connector_env(
    workdir: Path, input_db: Path, out_db: Path, base_url: str, plan: str
) -> dict[str, str]:
    """Settings of ``pipelines/enrich.py``, all through the environment as in production.

    ``plan`` is the sandbox's: the connector runs within the limits it is sold.
    """
    return child_env(
        workdir,
        {
            "PIPELINE_NAME": PIPELINE_NAME,
            "DESTINATION": "duckdb",
            "DATASET": OUTPUT_DATASET,
            "DESTINATION__DUCKDB__CREDENTIALS": str(out_db),
            "DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG": DUCKDB_GLOBAL_CONFIG,
            "SOURCES__APIONE__API_KEY": API_KEY,
            "SOURCES__APIONE__BASE_URL": base_url,
            "SOURCES__APIONE__PLAN": plan,
            "SOURCES__APIONE__ENRICHMENT_TYPE": "company",
            "SOURCES__APIONE__INPUT_DESTINATION": "duckdb",
            "SOURCES__APIONE__INPUT_CREDENTIALS": str(input_db),
            "SOURCES__APIONE__INPUT_DATASET": INPUT_DATASET,
            "SOURCES__APIONE__INPUT_TABLE": INPUT_TABLE,
            "SOURCES__APIONE__PRIMARY_KEY": "id",
            "SOURCES__APIONE__INPUT_COLUMNS": json.dumps({"domain": "domain"}),
            "SOURCES__APIONE__WAIT_BUDGET_SECONDS": "14400",
        },
    )


def run_connector(
    workdir: Path,
    input_db: Path,
    sandbox: SandboxProcess,
    *,
    shared: bool,
    extra_env: dict[str, str] | None = None,
) -> ConnectorRun:
    """Run the production script once against ``sandbox``; output in ``workdir``.

    The same ``workdir`` (its DuckDB file and pipelines dir) serves a later run, e.g.
    the second, nothing-to-send run.

    Args:
        workdir: The run's directory; its ``warehouse.duckdb`` is the destination.
        input_db: The pristine input file (never written).
        sandbox: The running sandbox.
        shared: Input and results in one warehouse: ``input_db`` is copied into
            ``warehouse.duckdb`` (untimed, first run only) and read from there. Else the
            input is read from ``input_db`` itself, a second warehouse.
        extra_env: More settings (webhooks, say).

    Raises:
        HarnessError: The script failed.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out_db = workdir / "warehouse.duckdb"
    if shared and not out_db.exists():
        shutil.copyfile(input_db, out_db)
    timing_path = workdir / "connector-timing.json"
    timing_path.unlink(missing_ok=True)
    env = connector_env(
        workdir, out_db if shared else input_db, out_db, sandbox.base_url, sandbox.spec.plan
    )
    env.update(extra_env or {})
    log = workdir / f"connector-{len(list(workdir.glob('connector-*.log'))) + 1}.log"
    cmd = [PYTHON, str(CONNECTOR_RUNNER), str(timing_path)]
    proc, timing = _run_json_child("connector", cmd, env, workdir, log, timing_path)
    return ConnectorRun(
        run_s=float(timing["run_s"]),
        process=proc,
        imports_s=float(timing["imports_s"]),
        write_s=float(timing["write_s"]),
        usage=Usage.from_doc(sandbox.usage()),
        rows=row_counts(out_db),
        sandbox_cpu_s=0.0,  # known once the sandbox process has exited
        workdir=workdir,
        out_db=out_db,
    )


def _run_json_child(
    what: str, cmd: list[str], env: dict[str, str], workdir: Path, log: Path, result: Path
) -> tuple[ChildRun, dict[str, Any]]:
    """Run a measured child that writes its figures to ``result`` (JSON).

    Raises:
        HarnessError: It failed, or wrote nothing.
    """
    proc = run_child(cmd, env, workdir, log, CHILD_TIMEOUT_S)
    if proc.returncode != 0 or not result.exists():
        raise HarnessError(f"{what} exited {proc.returncode}:\n{proc.log_tail()}")
    return proc, json.loads(result.read_text())


def run_baseline(connector: ConnectorRun, workdir: Path) -> BaselineRun:
    """Load what ``connector`` loaded again, with dlt's fastest path, in a fresh process.

    Raises:
        HarnessError: The baseline failed.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    out_db = workdir / "baseline.duckdb"
    result = workdir / "baseline.json"
    env = child_env(
        workdir,
        {
            "DESTINATION__DUCKDB__CREDENTIALS": str(out_db),
            "DESTINATION__DUCKDB__CREDENTIALS__GLOBAL_CONFIG": DUCKDB_GLOBAL_CONFIG,
        },
    )
    cmd = [
        PYTHON,
        str(BASELINE_RUNNER),
        str(connector.out_db),
        OUTPUT_DATASET,
        str(out_db),
        str(result),
    ]
    proc, body = _run_json_child("baseline", cmd, env, workdir, workdir / "baseline.log", result)
    return BaselineRun(
        run_s=float(body["run_s"]),
        process=proc,
        rows_in=int(body["rows_in"]),
        rows={str(k): int(v) for k, v in body["rows"].items()},
    )


@dataclass
class ApiLimitRun:
    """The minimal client's run: how fast the sandbox lets N records through."""

    run_s: float
    results: int
    usage: Usage
    sandbox_cpu_s: float = 0.0


def run_api_limit(
    input_db: Path, sandbox: SandboxProcess, records_per_job: int, concurrent_jobs: int
) -> ApiLimitRun:
    """Send every input domain through ``sandbox`` with the minimal client (no dlt)."""
    records = [{"domain": d} for d in input_domains(input_db)]
    run_s, results = api_limit.run(
        sandbox.base_url, API_KEY, records, records_per_job, concurrent_jobs
    )
    return ApiLimitRun(run_s=run_s, results=results, usage=Usage.from_doc(sandbox.usage()))


def import_floor(workdir: Path) -> ChildRun:
    """A process that only imports what the connector imports: the RSS every run starts at.

    Raises:
        HarnessError: The imports failed.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    code = "import dlt, duckdb, pyarrow, pyarrow.parquet, apione_source"
    proc = run_child(
        [PYTHON, "-c", code], child_env(workdir, {}), workdir, workdir / "floor.log", 300.0
    )
    if proc.returncode != 0:
        raise HarnessError(f"imports failed:\n{proc.log_tail()}")
    return proc
