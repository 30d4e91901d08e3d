"""The scenarios of issue 10: throughput, nothing to send, wall time, polling."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from apione_source.settings import PLANS
from benchkit.procs import (
    API_KEY,
    WEBHOOK_SECRET,
    ReceiverProcess,
    SandboxProcess,
    SandboxSpec,
    sandbox_supports,
)
from benchkit.report import Report, median
from benchkit.runs import (
    ApiLimitRun,
    BaselineRun,
    ConnectorRun,
    import_floor,
    run_api_limit,
    run_baseline,
    run_connector,
)
from benchkit.warehouse import make_input

Log = Callable[[str], None]

THROUGHPUT_RPS = 10_000.0
BASELINE_RATIO = 0.8
PEAK_RSS_MB_100K = 600.0
RSS_GROWTH_1M = 1.2
NOTHING_S = 5.0
NOTHING_RSS_MB = 400.0
WALL_RATIO = 1.10
LOW_ESTIMATE_FACTOR = 1 / 3


@dataclass
class Bench:
    """Shared state of one invocation: where files go, how often to repeat, the report."""

    root: Path
    repeat: int
    report: Report
    log: Log
    #: input and results in one DuckDB file (True) or in two
    shared: bool = True
    #: connector workdirs left by throughput runs, by (plan, N): reused by nothing_to_send
    seeded: dict[tuple[str, int], Path] = field(default_factory=dict)
    #: peak RSS (MB) of the throughput runs, by N
    peaks: dict[int, float] = field(default_factory=dict)
    _floor_mb: float | None = None

    def input_db(self, n: int) -> Path:
        """The input file with ``n`` rows (created once)."""
        path = self.root / f"input-{n}.duckdb"
        if not path.exists():
            make_input(path, n)
        return path

    def floor_mb(self) -> float:
        """Peak RSS of a process that only imports the connector's modules (measured once)."""
        if self._floor_mb is None:
            self._floor_mb = import_floor(self.root / "floor").peak_rss_mb
        return self._floor_mb

    def sandbox(self, spec: SandboxSpec, name: str) -> SandboxProcess:
        """A sandbox process (not started) logging to ``name``.log."""
        return SandboxProcess(spec, self.root / f"{name}.sandbox.log")


# --- single runs --------------------------------------------------------------------------


def connector_once(
    bench: Bench,
    spec: SandboxSpec,
    n: int,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
) -> ConnectorRun:
    """One connector run against a fresh sandbox process."""
    with bench.sandbox(spec, workdir.name) as sandbox:
        run = run_connector(
            workdir, bench.input_db(n), sandbox, shared=bench.shared, extra_env=extra_env
        )
    run.sandbox_cpu_s = sandbox.cpu_s
    bench.log(
        f"  connector {run.run_s:.2f}s ({n / run.run_s:,.0f} rec/s; process "
        f"{run.process.wall_s:.2f}s, peak {run.process.peak_rss_mb:,.0f} MB, "
        f"sandbox cpu {run.sandbox_cpu_s:.1f}s), jobs {run.usage.jobs}, "
        f"billed {run.usage.records_billed:,}, status calls {run.usage.status_calls:,}"
    )
    return run


def api_limit_once(bench: Bench, spec: SandboxSpec, n: int, name: str) -> ApiLimitRun:
    """One API-limit client run against a fresh sandbox process."""
    plan = PLANS[spec.plan]
    with bench.sandbox(spec, name) as sandbox:
        run = run_api_limit(bench.input_db(n), sandbox, plan.records_per_job, plan.concurrent_jobs)
    run.sandbox_cpu_s = sandbox.cpu_s
    bench.log(f"  API limit {run.run_s:.2f}s ({n / run.run_s:,.0f} rec/s)")
    return run


def check_connector(bench: Bench, scenario: str, run: ConnectorRun, n: int) -> None:
    """Billing (every record once) and outcomes (one row per input row)."""
    bench.report.check(scenario, "every record billed exactly once", run.usage.billing_problems(n))
    outcomes = run.outcomes
    problems = [] if outcomes == n else [f"outcome rows {outcomes} != {n:,} ({run.rows})"]
    bench.report.check(scenario, "one outcome row per input row", problems)


def check_api_limit(bench: Bench, scenario: str, run: ApiLimitRun, n: int) -> None:
    """The minimal client got every result, each record billed once."""
    problems = run.usage.billing_problems(n)
    if run.results != n:
        problems.append(f"results {run.results:,} != {n:,}")
    bench.report.check(scenario, "API-limit client: every record once", problems)


def check_baseline(bench: Bench, scenario: str, base: BaselineRun, run: ConnectorRun) -> None:
    """The baseline loaded exactly the rows the connector's tables hold."""
    expected = {t: c for t, c in run.rows.items() if c > 0}
    problems = [] if base.rows == expected else [f"baseline {base.rows} != connector {expected}"]
    bench.report.check(scenario, "baseline loaded the same rows", problems)


def _record(bench: Bench, scenario: str, **runs: Any) -> None:
    """Keep the raw measurements of a scenario in the report's details."""
    bench.report.details.setdefault(scenario, []).append({k: _plain(v) for k, v in runs.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return value


# --- throughput ---------------------------------------------------------------------------


def throughput(bench: Bench, n: int, plan: str) -> None:
    """End to end records/s with instant jobs, against dlt's fastest path and the API."""
    scenario = f"throughput N={n:,}"
    spec = SandboxSpec(plan=plan)
    bench.log(f"{scenario} (plan {plan}, instant jobs, repeat {bench.repeat})")
    conns: list[ConnectorRun] = []
    bases: list[BaselineRun] = []
    apis: list[ApiLimitRun] = []
    for k in range(1, bench.repeat + 1):
        workdir = bench.root / f"throughput-{plan}-{n}-{k}"
        conn = connector_once(bench, spec, n, workdir)
        check_connector(bench, scenario, conn, n)
        base = run_baseline(conn, bench.root / f"baseline-{n}-{k}")
        bench.log(
            f"  dlt baseline {base.run_s:.2f}s ({n / base.run_s:,.0f} rec/s, "
            f"{base.rows_in:,} rows in {len(base.rows)} tables)"
        )
        check_baseline(bench, scenario, base, conn)
        shutil.rmtree(bench.root / f"baseline-{n}-{k}", ignore_errors=True)
        api = api_limit_once(bench, spec, n, f"api-{n}-{k}")
        check_api_limit(bench, scenario, api, n)
        previous = bench.seeded.get((plan, n))
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        bench.seeded[(plan, n)] = workdir
        conns.append(conn)
        bases.append(base)
        apis.append(api)
    _record(bench, scenario, connector=conns, baseline=bases, api_limit=apis)
    throughput_figures(bench, scenario, n, conns, bases, apis)


def throughput_figures(
    bench: Bench,
    scenario: str,
    n: int,
    conns: list[ConnectorRun],
    bases: list[BaselineRun],
    apis: list[ApiLimitRun],
) -> None:
    """Median seconds and ratios over the repeats; the highest peak RSS."""
    rep = bench.report
    conn_s = median([c.run_s for c in conns])
    rep.at_least(
        scenario,
        "connector records/s",
        n / conn_s,
        "rec/s",
        THROUGHPUT_RPS,
        f">= {THROUGHPUT_RPS:,.0f}",
    )
    rep.info(scenario, "connector seconds (run)", conn_s, "s")
    rep.info(
        scenario, "connector seconds (process)", median([c.process.wall_s for c in conns]), "s"
    )
    rep.info(
        scenario, "connector CPU seconds (process)", median([c.process.cpu_s for c in conns]), "s"
    )
    rep.info(scenario, "sandbox CPU seconds", median([c.sandbox_cpu_s for c in conns]), "s")
    rep.info(scenario, "dlt baseline records/s", n / median([b.run_s for b in bases]), "rec/s")
    ratio = median([b.run_s / c.run_s for b, c in zip(bases, conns, strict=True)])
    rep.at_least(
        scenario, "speed vs dlt arrow+parquet", ratio, "x", BASELINE_RATIO, f">= {BASELINE_RATIO}x"
    )
    # The write path alone: what the connector spends in dlt's normalize and load steps
    # and its checkpoints, against dlt's whole fastest path (which also writes the files).
    rep.info(scenario, "connector write seconds", median([c.write_s for c in conns]), "s")
    rep.info(
        scenario,
        "write path vs dlt arrow+parquet",
        median([b.run_s / max(c.write_s, 1e-9) for b, c in zip(bases, conns, strict=True)]),
        "x",
    )
    rep.info(scenario, "API-limit records/s", n / median([a.run_s for a in apis]), "rec/s")
    api_ratio = median([a.run_s / c.run_s for a, c in zip(apis, conns, strict=True)])
    rep.at_most(
        scenario, "speed vs API limit", api_ratio, "x", 1.0, "<= 1x (sandbox not the limit)"
    )
    peak = max(c.process.peak_rss_mb for c in conns)
    bench.peaks[n] = peak
    for figure, bound, target in _rss_targets(bench, n):
        rep.at_most(scenario, figure, peak, "MB", bound, target)
    rep.info(scenario, "RSS floor (imports only)", bench.floor_mb(), "MB")
    rep.info(scenario, "dlt baseline peak RSS", max(b.process.peak_rss_mb for b in bases), "MB")
    rep.info(scenario, "status calls/job", conns[-1].usage.status_calls_per_job(), "calls/job")
    rep.info(scenario, "jobs", float(conns[-1].usage.jobs), "")
    rep.info(scenario, "records billed", float(conns[-1].usage.records_billed), "")


def _rss_targets(bench: Bench, n: int) -> list[tuple[str, float, str]]:
    """Peak RSS targets: 600 MB up to 100k; at 1M, 1.2x the 100k figure of this run.

    Issue 10's "at N = 1M at most 1.2x that" may also mean 1.2x the 600 MB limit: until
    it says which, a 1M run is held to both, the stricter first.
    """
    limit = PEAK_RSS_MB_100K * RSS_GROWTH_1M
    if n <= 100_000:
        return [("connector peak RSS", PEAK_RSS_MB_100K, f"<= {PEAK_RSS_MB_100K:,.0f} MB")]
    base = bench.peaks.get(100_000)
    if base is None:
        return [("connector peak RSS", limit, f"<= {limit:,.0f} MB (1.2x 600; no 100k run)")]
    return [
        (
            "connector peak RSS",
            base * RSS_GROWTH_1M,
            f"<= 1.2x 100k = {base * RSS_GROWTH_1M:,.0f} MB",
        ),
        ("connector peak RSS (other reading)", limit, f"<= 1.2x 600 MB = {limit:,.0f} MB"),
    ]


# --- nothing to send ------------------------------------------------------------------------


def nothing_to_send(bench: Bench, n: int, plan: str) -> None:
    """A second run over ``n`` known keys with nothing new: time and peak RSS."""
    scenario = f"nothing to send, {n:,} known keys"
    spec = SandboxSpec(plan=plan)
    workdir = bench.seeded.get((plan, n))
    if workdir is None:
        bench.log(f"{scenario}: seeding with a first run")
        workdir = bench.root / f"seed-{plan}-{n}"
        seed = connector_once(bench, spec, n, workdir)
        check_connector(bench, f"{scenario} (seed run)", seed, n)
        bench.seeded[(plan, n)] = workdir
    else:
        bench.log(f"{scenario}: after the throughput run")
    runs = [nothing_once(bench, scenario, spec, n, workdir, k) for k in range(1, bench.repeat + 1)]
    _record(bench, scenario, connector=runs)
    rep = bench.report
    rep.at_most(
        scenario,
        "seconds (run)",
        median([r.run_s for r in runs]),
        "s",
        NOTHING_S,
        f"<= {NOTHING_S:.0f} s",
    )
    rep.info(scenario, "seconds (process)", median([r.process.wall_s for r in runs]), "s")
    rep.at_most(
        scenario,
        "peak RSS",
        max(r.process.peak_rss_mb for r in runs),
        "MB",
        NOTHING_RSS_MB,
        f"<= {NOTHING_RSS_MB:,.0f} MB",
    )
    rep.info(scenario, "RSS floor (imports only)", bench.floor_mb(), "MB")


def nothing_once(
    bench: Bench, scenario: str, spec: SandboxSpec, n: int, seeded: Path, k: int
) -> ConnectorRun:
    """The second run, on a copy of ``seeded``: nothing may be submitted, outcomes kept.

    Each repeat runs on its own copy of the state the first run left (warehouse file,
    pipelines dir), so every repeat is a true second run, not a third or fourth.
    """
    bench.log(f"  second run ({k}/{bench.repeat})")
    workdir = bench.root / f"{seeded.name}-second-{k}"
    shutil.copytree(seeded, workdir)
    try:
        run = connector_once(bench, spec, n, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    problems = []
    if run.usage.records_billed or run.usage.submit_calls:
        problems.append(
            f"submitted {run.usage.submit_calls} jobs, billed {run.usage.records_billed:,} records"
        )
    bench.report.check(scenario, "nothing submitted, nothing billed", problems)
    kept = [] if run.outcomes == n else [f"outcome rows {run.outcomes} != {n:,}"]
    bench.report.check(scenario, "outcomes kept", kept)
    return run


# --- wall time ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WallCase:
    """A wall-time case: a plan, N, and the sandbox's job duration."""

    plan: str
    n: int
    job_seconds: float
    time_scale: float = 1.0

    @property
    def spec(self) -> SandboxSpec:
        """The sandbox knobs: every job takes ``job_seconds * time_scale``."""
        return SandboxSpec(
            plan=self.plan, job_seconds_base=self.job_seconds, time_scale=self.time_scale
        )

    def limit_s(self) -> float:
        """The API's own limit ``ceil(N / (C*R)) * T``."""
        plan = PLANS[self.plan]
        per_round = plan.concurrent_jobs * plan.records_per_job
        return math.ceil(self.n / per_round) * self.spec.job_seconds(plan.records_per_job)

    @property
    def name(self) -> str:
        """How the case is shown."""
        scale = f", time_scale {self.time_scale:g}" if self.time_scale != 1 else ""
        return f"wall time {self.plan} N={self.n:,} T={self.job_seconds:g}s{scale}"


def wall_time(bench: Bench, case: WallCase) -> None:
    """Connector wall time against the API's own limit; the minimal client as a check."""
    scenario = case.name
    limit = case.limit_s()
    bench.log(f"{scenario}: API limit ceil(N/(C*R))*T = {limit:.1f}s")
    conns: list[ConnectorRun] = []
    apis: list[ApiLimitRun] = []
    for k in range(1, bench.repeat + 1):
        workdir = bench.root / f"wall-{case.plan}-{case.n}-{k}"
        conn = connector_once(bench, case.spec, case.n, workdir)
        check_connector(bench, scenario, conn, case.n)
        shutil.rmtree(workdir, ignore_errors=True)
        api = api_limit_once(bench, case.spec, case.n, f"wall-api-{case.plan}-{k}")
        check_api_limit(bench, scenario, api, case.n)
        conns.append(conn)
        apis.append(api)
    _record(bench, scenario, limit_s=limit, connector=conns, api_limit=apis)
    rep = bench.report
    conn_s = median([c.run_s for c in conns])
    rep.info(scenario, "API limit ceil(N/(C*R))*T", limit, "s")
    rep.at_most(
        scenario, "connector / API limit", conn_s / limit, "x", WALL_RATIO, f"<= {WALL_RATIO:.2f}x"
    )
    rep.info(scenario, "connector seconds (run)", conn_s, "s")
    rep.info(scenario, "minimal client / API limit", median([a.run_s for a in apis]) / limit, "x")
    rep.info(scenario, "status calls/job", conns[-1].usage.status_calls_per_job(), "calls/job")


# --- polling ------------------------------------------------------------------------------


def polling(bench: Bench, n: int, job_seconds: float) -> None:
    """Status calls per job with honest estimates and with estimates 3x low."""
    cases: list[tuple[str, float | None]] = [("honest estimates", None)]
    if sandbox_supports("--estimate-factor"):
        cases.append(("estimates 3x low", LOW_ESTIMATE_FACTOR))
    else:
        bench.report.notes.append(
            "polling with estimates 3x low skipped: the sandbox has no --estimate-factor knob yet"
        )
    cases.append(("webhooks", None))  # deliveries to `apione-dlt webhooks serve`
    for label, factor in cases:
        spec = SandboxSpec(plan="growth", job_seconds_base=job_seconds, estimate_factor=factor)
        scenario = f"polling, {label} (growth N={n:,} T={job_seconds:g}s)"
        estimate = probe_estimate(bench, spec)
        bench.log(f"{scenario}: the sandbox estimates {estimate:g}s for a {job_seconds:g}s job")
        runs: list[ConnectorRun] = []
        for k in range(1, bench.repeat + 1):
            workdir = bench.root / f"polling-{label.replace(' ', '-')}-{k}"
            if label == "webhooks":
                workdir.mkdir(parents=True, exist_ok=True)
                store = workdir / "deliveries"
                with ReceiverProcess(store, workdir / "receiver.log") as receiver:
                    run = connector_once(bench, spec, n, workdir, webhook_env(receiver, store))
            else:
                run = connector_once(bench, spec, n, workdir)
            check_connector(bench, scenario, run, n)
            shutil.rmtree(workdir, ignore_errors=True)
            runs.append(run)
        _record(bench, scenario, estimate_s=estimate, connector=runs)
        per_job = [r.usage.status_calls_per_job() or 0.0 for r in runs]
        bench.report.info(scenario, "advertised estimate", estimate, "s")
        # issue 10: at most 2.2 calls per job with honest estimates, 4 when 3x low; issue
        # 12: jobs delivered by webhook are collected without status calls
        limit = 0.1 if label == "webhooks" else 2.2 if factor is None else 4.0
        bench.report.at_most(
            scenario, "status calls/job", median(per_job), "calls/job", limit, f"<= {limit:g}"
        )
        if label == "webhooks":
            results = [r.usage.results_calls / max(1, r.usage.jobs) for r in runs]
            bench.report.info(scenario, "results calls/job", median(results), "calls/job")
        bench.report.info(scenario, "connector seconds (run)", median([r.run_s for r in runs]), "s")


def webhook_env(receiver: ReceiverProcess, store: Path) -> dict[str, str]:
    """The connector's webhook settings: deliveries to ``receiver``, read from ``store``."""
    return {
        "SOURCES__APIONE__WEBHOOK_URL": receiver.url,
        "SOURCES__APIONE__WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SOURCES__APIONE__WEBHOOK_STORE": str(store),
    }


def probe_estimate(bench: Bench, spec: SandboxSpec) -> float:
    """``estimated_completion_seconds`` of a full job in a throwaway sandbox with ``spec``."""
    per_job = PLANS[spec.plan].records_per_job
    records = [{"domain": f"probe-{i}.example.com"} for i in range(per_job)]
    with bench.sandbox(spec, "probe") as sandbox:
        reply = httpx.post(
            f"{sandbox.base_url}/async/enrich",
            json={"type": "company", "records": records},
            headers={"X-API-Key": API_KEY},
            timeout=30.0,
        )
        reply.raise_for_status()
        return float(reply.json()["estimated_completion_seconds"])
