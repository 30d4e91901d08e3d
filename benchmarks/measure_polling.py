"""Measure how the scheduler polls jobs: status calls per job and overshoot.

Drives the real :class:`~apione_source.scheduler.JobScheduler` against a fake ApiOne of
its own (not the sandbox), on a fake clock, one job at a time: each job takes a duration
drawn from a range, reports ``processed_records`` growing linearly (rounded down) while
processing, and answers its submit with an estimate of ``ceil(nominal x factor)``. With
``--noise`` the true duration is the nominal one times a uniform draw in ``1 +- noise``
(an estimate right on average only). Overshoot is the time from the job's end to the
status call that first sees it completed, as a share of the job's duration.

Usage::

    uv run python benchmarks/measure_polling.py                  # the standard scenarios
    uv run python benchmarks/measure_polling.py --jobs 500 --seed 3
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from apione_source.journal import BatchItem, Journal, MemoryStore
from apione_source.models import EnrichmentType, Job, JobResults, JobStatus, SubmitResponse
from apione_source.scheduler import JobScheduler, SchedulerSettings

T0 = 1_700_000_000.0


@dataclass
class Scenario:
    """One kind of job population."""

    name: str
    factor: float = 1.0  # estimate = ceil(nominal duration x factor)
    noise: float = 0.0  # true duration = nominal x U(1 - noise, 1 + noise)
    queue_share: float = 0.0  # share of the duration spent queued
    min_seconds: float = 5.0
    max_seconds: float = 120.0
    records: int = 1000
    chunk: int = 1  # processed_records moves in steps of this many records
    curve: float = 0.0  # progress share = time share ** g, g drawn in 1 +- curve per job
    latency: float = 0.0  # seconds each call takes, answered halfway


@dataclass
class FakeJob:
    """One job: when it was created, started and finished (fake clock), and its looks."""

    created: float
    started: float
    finished: float
    total: int
    power: float = 1.0  # progress share = time share ** power
    seen_done_at: float | None = None
    status_calls: int = 0


@dataclass
class FakeApi:
    """A fake ApiOne: one job at a time, state computed from the fake clock."""

    scenario: Scenario
    rng: random.Random
    now: float = T0
    jobs: dict[str, FakeJob] = field(default_factory=dict)

    host = "fake.test"

    def clock(self) -> float:
        """The fake clock (unix seconds)."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Move the fake clock on."""
        self.now += seconds

    async def submit_job(self, type_: str, records: list[Any], webhook: Any) -> SubmitResponse:
        """Create a job of the scenario's kind; answer its (maybe wrong) estimate."""
        sc = self.scenario
        await self.sleep(sc.latency / 2)
        nominal = self.rng.uniform(sc.min_seconds, sc.max_seconds)
        true = nominal * self.rng.uniform(1 - sc.noise, 1 + sc.noise)
        job_id = f"job_{len(self.jobs) + 1}"
        started = self.now + sc.queue_share * true
        power = self.rng.uniform(1 - sc.curve, 1 + sc.curve)
        self.jobs[job_id] = FakeJob(self.now, started, self.now + true, sc.records, power)
        estimate = math.ceil(round(nominal * sc.factor, 9))
        await self.sleep(sc.latency / 2)
        return SubmitResponse(
            job_id=job_id, estimated_completion_seconds=estimate, total_records=sc.records
        )

    async def get_job(self, job_id: str) -> Job:
        """The job's status now; notes the first look that sees it completed."""
        await self.sleep(self.scenario.latency / 2)
        job, now = self.jobs[job_id], self.now
        await self.sleep(self.scenario.latency / 2)
        job.status_calls += 1
        if now >= job.finished:
            status, done = JobStatus.COMPLETED, job.total
            if job.seen_done_at is None:
                job.seen_done_at = now
        elif now >= job.started:
            status = JobStatus.PROCESSING
            share = ((now - job.started) / (job.finished - job.started)) ** job.power
            done = min(job.total - 1, int(job.total * share))
            done -= done % self.scenario.chunk
        else:
            status, done = JobStatus.QUEUED, 0
        return Job(
            job_id=job_id,
            status=status,
            type=EnrichmentType.COMPANY,
            total_records=job.total,
            processed_records=done,
            created_at=_iso(job.created),
            started_at=_iso(job.started) if now >= job.started else None,
        )

    async def get_results(self, job_id: str) -> JobResults:
        """Empty results (the scheduler only needs the call to succeed)."""
        job = self.jobs[job_id]
        return JobResults(
            job_id=job_id,
            status=JobStatus.COMPLETED,
            type=EnrichmentType.COMPANY,
            total_records=job.total,
            results=[],
        )


def _iso(ts: float) -> datetime:
    # Millisecond precision, as the API's timestamps.
    return datetime.fromtimestamp(round(ts, 3), tz=timezone.utc)


def run(scenario: Scenario, jobs: int, seed: int) -> dict[str, float]:
    """Poll ``jobs`` jobs of ``scenario``; return calls per job and overshoot shares."""
    api = FakeApi(scenario, random.Random(seed))
    items = [BatchItem("k.com", {"domain": "k.com"}, ["1"])]

    async def one(n: int) -> None:
        sched = JobScheduler(
            api,  # type: ignore[arg-type]
            Journal(MemoryStore(), "outcomes", "p", f"load_{n}", api.clock),
            "company",
            SchedulerSettings(records_per_job=1000, concurrent_jobs=1, wait_budget_seconds=1e6),
            clock=api.clock,
            wall_clock=api.clock,
            sleep=api.sleep,
            rng=random.Random(seed + n),
        )
        assert await sched.submit(sched.journal.new_entry(), items) == "sent"
        finished = await sched.next_finished()
        assert finished is not None and finished.kind == "completed"
        await sched.close()

    async def all_jobs() -> None:
        for n in range(jobs):
            await one(n)

    asyncio.run(all_jobs())
    calls = [j.status_calls for j in api.jobs.values()]
    over = [
        (j.seen_done_at - j.finished) / (j.finished - j.created)
        for j in api.jobs.values()
        if j.seen_done_at is not None
    ]
    over_s = [j.seen_done_at - j.finished for j in api.jobs.values() if j.seen_done_at]
    return {
        "calls_per_job": statistics.fmean(calls),
        "max_calls": max(calls),
        "overshoot_mean": statistics.fmean(over),
        "overshoot_p95": sorted(over)[int(0.95 * (len(over) - 1))],
        "overshoot_max": max(over),
        "overshoot_mean_s": statistics.fmean(over_s),
    }


SCENARIOS = [
    Scenario("honest"),
    Scenario("3x low", factor=1 / 3),
    Scenario("honest, short jobs (1-10 s)", min_seconds=1, max_seconds=10),
    Scenario("3x low, short jobs (1-10 s)", factor=1 / 3, min_seconds=1, max_seconds=10),
    Scenario("2x high", factor=2.0),
    Scenario("honest +-30% noise", noise=0.3),
    Scenario("3x low +-30% noise", factor=1 / 3, noise=0.3),
    Scenario("honest, 30% queued", queue_share=0.3),
    Scenario("3x low, 30% queued", factor=1 / 3, queue_share=0.3),
    Scenario("honest, 50 records", records=50),
    Scenario("honest, progress in 100s", chunk=100),
    Scenario("3x low, progress in 100s", factor=1 / 3, chunk=100),
    Scenario("3x low, 0.2 s per call", factor=1 / 3, latency=0.2),
    Scenario("honest, progress not linear", curve=0.15),
    Scenario("3x low, progress not linear", factor=1 / 3, curve=0.15),
    Scenario("honest, long jobs (5-30 min)", min_seconds=300, max_seconds=1800),
    Scenario("3x low, long jobs (5-30 min)", factor=1 / 3, min_seconds=300, max_seconds=1800),
]


def main() -> None:
    """Print one line per scenario."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    print(
        f"{'scenario':32} {'calls/job':>9} {'max':>4} {'over mean':>9} {'p95':>6} "
        f"{'max':>6} {'mean s':>7}"
    )
    for sc in SCENARIOS:
        r = run(sc, args.jobs, args.seed)
        print(
            f"{sc.name:32} {r['calls_per_job']:9.2f} {r['max_calls']:4.0f} "
            f"{r['overshoot_mean']:9.1%} {r['overshoot_p95']:6.1%} {r['overshoot_max']:6.1%} "
            f"{r['overshoot_mean_s']:7.2f}"
        )


if __name__ == "__main__":
    main()
