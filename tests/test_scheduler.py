"""The job scheduler against a scripted client: limits, refusals and lost answers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from apione_source.errors import (
    BadRequestError,
    ShrinkBatchError,
    SubmitOutcomeUnknownError,
    WaitForCapacityError,
)
from apione_source.journal import IN_FLIGHT, BatchItem, Journal
from apione_source.models import Job, SubmitResponse
from apione_source.scheduler import REJECTED, JobScheduler, SchedulerSettings


class ScriptedClient:
    """Answers submits from a script: an exception to raise, or None for success."""

    def __init__(self, script: list[Exception | None]) -> None:
        self.script = script
        self.sizes: list[int] = []
        self.estimate = 9999

    async def submit_job(self, type_: str, records: list[dict[str, Any]], webhook: Any) -> Any:
        self.sizes.append(len(records))
        answer = self.script.pop(0) if self.script else None
        if answer is not None:
            raise answer
        return SubmitResponse(
            job_id=f"job_{len(self.sizes)}",
            estimated_completion_seconds=self.estimate,
            total_records=len(records),
        )

    async def get_job(self, job_id: str) -> Job:
        return Job(job_id=job_id, status="processing", type="company", total_records=1)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _items(n: int) -> list[BatchItem]:
    return [BatchItem(f"k{i}.com", {"domain": f"k{i}.com"}, [str(i)]) for i in range(n)]


def _scheduler(
    tmp_path: Path, client: ScriptedClient, t: FakeTime, **settings: Any
) -> JobScheduler:
    defaults: dict[str, Any] = {
        "records_per_job": 10,
        "concurrent_jobs": 5,
        "wait_budget_seconds": 100.0,
    }
    return JobScheduler(
        client,  # type: ignore[arg-type]
        Journal(tmp_path / "journal.sqlite"),
        "company",
        SchedulerSettings(**{**defaults, **settings}),
        run_id="load_1",
        clock=t.clock,
        wall_clock=t.clock,
        sleep=t.sleep,
    )


def _run(coro: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coro)


def test_given_answers_lost_in_a_row_when_submitting_then_submits_pause_for_the_run(
    tmp_path: Path,
) -> None:
    lost = SubmitOutcomeUnknownError("read timeout", enrichment_type="company", records=[])
    client, t = ScriptedClient([lost, lost, lost, lost]), FakeTime()
    sched = _scheduler(tmp_path, client, t)

    unsent = _run(sched.submit(_items(25)))

    # three resends at most: each one may be billed
    assert len(client.sizes) == 3
    assert sched.submits_paused and sched.counters.lost_answers == 3
    assert len(unsent) == 25 and [a.items[0].key for a in sched.lost] == ["k0.com"] * 3
    # the intents stay in the journal until the run reports them
    assert len(sched.journal.lost_submits()) == 3


def test_given_a_413_whose_limit_is_not_smaller_when_submitting_then_the_batch_still_shrinks(
    tmp_path: Path,
) -> None:
    client, t = ScriptedClient([ShrinkBatchError("too many", limit=50)]), FakeTime()
    sched = _scheduler(tmp_path, client, t)

    assert _run(sched.submit(_items(10))) == []
    assert client.sizes[0] == 10 and max(client.sizes[1:]) <= 9
    assert sum(client.sizes[1:]) == 10


def test_given_a_400_when_submitting_then_the_batch_is_recorded_as_rejected_not_retried(
    tmp_path: Path,
) -> None:
    client, t = ScriptedClient([BadRequestError("records[3] is not an object")]), FakeTime()
    sched = _scheduler(tmp_path, client, t)

    assert _run(sched.submit(_items(10))) == []
    fin = sched.drain_ready()
    assert [f.kind for f in fin] == [REJECTED]
    assert "records[3]" in (fin[0].error or "")
    assert client.sizes == [10]
    assert sched.journal.jobs() == [] and sched.journal.lost_submits() == []


def test_given_capacity_waits_when_budget_ends_then_unsent_items_are_returned(
    tmp_path: Path,
) -> None:
    busy = WaitForCapacityError("busy", retry_after=30)
    client, t = ScriptedClient([busy] * 10), FakeTime()
    sched = _scheduler(tmp_path, client, t, wait_budget_seconds=100.0)

    unsent = _run(sched.submit(_items(15)))

    assert len(unsent) == 15  # nothing lost, nothing sent
    assert t.slept == [30, 30, 30]  # honours Retry-After, stops before the budget ends
    assert sched.counters.capacity_waits == 4


def test_given_the_plan_limit_when_submitting_then_never_more_jobs_in_flight(
    tmp_path: Path,
) -> None:
    client, t = ScriptedClient([]), FakeTime()
    sched = _scheduler(tmp_path, client, t, concurrent_jobs=2, wait_budget_seconds=5.0)

    async def go() -> list[BatchItem]:
        return await asyncio.wait_for(sched.submit(_items(50)), timeout=5)

    unsent = _run(go())
    # two jobs run (their estimate is far away); the rest waits for a slot until the budget
    assert client.sizes == [10, 10]
    assert len(unsent) == 30
    assert [j.state for j in sched.journal.jobs()] == [IN_FLIGHT, IN_FLIGHT]


@pytest.mark.parametrize("kind", ["lost", "capacity"])
def test_no_submit_is_forgotten_by_the_journal(tmp_path: Path, kind: str) -> None:
    error: Exception = (
        SubmitOutcomeUnknownError("5xx", enrichment_type="company", records=[])
        if kind == "lost"
        else WaitForCapacityError("busy", retry_after=1)
    )
    client, t = ScriptedClient([error]), FakeTime()
    sched = _scheduler(tmp_path, client, t)
    assert _run(sched.submit(_items(5))) == []
    # one job in flight; a lost answer's intent stays until reported, a 429 leaves none
    assert len(sched.journal.jobs(IN_FLIGHT)) == 1
    assert len(sched.journal.lost_submits()) == (1 if kind == "lost" else 0)


def test_given_one_job_done_when_waiting_for_the_next_then_the_loop_does_not_spin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = time.monotonic()

    class TwoJobs(ScriptedClient):
        async def get_job(self, job_id: str) -> Job:
            # job_1 fails at once, job_2 a moment later
            done = job_id == "job_1" or time.monotonic() - started > 0.3
            status = "failed" if done else "processing"
            return Job(job_id=job_id, status=status, type="company", total_records=1)

    client = TwoJobs([])
    client.estimate = 0
    sched = JobScheduler(
        client,  # type: ignore[arg-type]
        Journal(tmp_path / "journal.sqlite"),
        "company",
        SchedulerSettings(records_per_job=10, concurrent_jobs=5, wait_budget_seconds=10.0),
        run_id="load_1",
    )
    waits = 0
    real_check = sched._raise_poller_crash

    def counted() -> None:
        nonlocal waits
        waits += 1
        real_check()

    monkeypatch.setattr(sched, "_raise_poller_crash", counted)

    async def go() -> list[str]:
        await sched.submit(_items(20))
        first = await sched.next_finished()
        second = await sched.next_finished()
        await sched.close()
        return [f.job.job_id for f in (first, second) if f]

    assert _run(go()) == ["job_1", "job_2"]
    # each wake-up is a poll of job_2 (every ~50-100 ms), not a busy loop
    assert waits < 30, f"next_finished looped {waits} times"
