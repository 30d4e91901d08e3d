"""The job scheduler against a scripted client: limits, refusals, lost answers, drift."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from apione_source.errors import (
    ApiUnreachableError,
    BadRequestError,
    JobNotFoundError,
    MalformedResponseError,
    RequestRefusedError,
    ShrinkBatchError,
    SubmitOutcomeUnknownError,
    TransportError,
    WaitForCapacityError,
)
from apione_source.journal import IN_FLIGHT, LOST, SENDING, TO_SEND, BatchItem, Journal, MemoryStore
from apione_source.models import Job, JobResults, SubmitResponse
from apione_source.scheduler import COMPLETED, VANISHED, JobScheduler, SchedulerSettings


class ScriptedClient:
    """Answers submits from a script: an exception to raise, or None for success."""

    host = "apione.test"

    def __init__(self, script: list[Exception | None]) -> None:
        self.script = script
        self.sizes: list[int] = []
        self.estimate = 9999
        self.status_script: list[Exception | str] = []
        self.status_calls = 0

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
        self.status_calls += 1
        answer = self.status_script.pop(0) if self.status_script else "processing"
        if isinstance(answer, Exception):
            raise answer
        return Job(job_id=job_id, status=answer, type="company", total_records=1)

    async def get_results(self, job_id: str) -> Any:
        return JobResults(
            job_id=job_id, status="completed", type="company", total_records=0, results=[]
        )


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


def _scheduler(client: ScriptedClient, t: FakeTime, **settings: Any) -> JobScheduler:
    defaults: dict[str, Any] = {
        "records_per_job": 10,
        "concurrent_jobs": 5,
        "wait_budget_seconds": 100.0,
    }
    return JobScheduler(
        client,  # type: ignore[arg-type]
        Journal(MemoryStore(), "outcomes", "p", "load_1", t.clock),
        "company",
        SchedulerSettings(**{**defaults, **settings}),
        clock=t.clock,
        wall_clock=t.clock,
        sleep=t.sleep,
    )


def _run(coro: Any) -> Any:
    return asyncio.new_event_loop().run_until_complete(coro)


def _submit(sched: JobScheduler, n: int) -> tuple[str, Any]:
    entry = sched.journal.new_entry()
    return _run(sched.submit(entry, _items(n))), entry


def test_given_answers_lost_in_a_row_when_submitting_then_submits_pause_for_the_run() -> None:
    lost = SubmitOutcomeUnknownError("read timeout", enrichment_type="company", records=[])
    client, t = ScriptedClient([lost] * 4), FakeTime()
    sched = _scheduler(client, t)

    outcomes = [_submit(sched, 5)[0] for _ in range(4)]

    # three sends at most: each one may be billed
    assert outcomes == ["lost", "lost", "lost", "unsent"]
    assert len(client.sizes) == 3
    assert sched.submits_paused and sched.counters.lost_answers == 3
    assert [f.kind for f in sched.drain_ready()] == [LOST] * 3
    # the journal holds each lost send (spent by the run, or by the next run after a crash)
    assert len(sched.journal.in_phase(SENDING)) == 3


def test_given_a_413_whose_limit_is_not_smaller_when_submitting_then_the_entry_shrinks() -> None:
    client, t = ScriptedClient([ShrinkBatchError("too many", limit=50)]), FakeTime()
    sched = _scheduler(client, t)

    outcome, entry = _submit(sched, 10)

    assert outcome == "shrink" and sched.records_per_job == 9
    assert entry.phase == TO_SEND  # nothing was billed; the run dissolves it


def test_given_a_400_when_submitting_then_the_run_stops_submitting_and_pays_nothing() -> None:
    client, t = ScriptedClient([BadRequestError("records[3] is not an object")]), FakeTime()
    sched = _scheduler(client, t)

    outcome, entry = _submit(sched, 10)

    assert outcome == "unsent" and entry.phase == TO_SEND
    assert isinstance(sched.stop_error, RequestRefusedError) and not sched.can_submit
    assert "apione.test" in str(sched.stop_error) and "base_url" in str(sched.stop_error)
    assert client.sizes == [10]
    assert sched.drain_ready() == []  # no outcome: the records go out on the next run


def test_given_capacity_waits_when_budget_ends_then_the_entry_stays_to_send() -> None:
    busy = WaitForCapacityError("busy", retry_after=30)
    client, t = ScriptedClient([busy] * 10), FakeTime()
    sched = _scheduler(client, t, wait_budget_seconds=100.0)

    outcome, entry = _submit(sched, 15)

    assert outcome == "unsent" and entry.phase == TO_SEND  # nothing lost, nothing sent
    assert t.slept == [30, 30, 30]  # honours Retry-After, stops before the budget ends
    assert sched.counters.capacity_waits == 4


def test_given_the_plan_limit_when_submitting_then_never_more_jobs_in_flight() -> None:
    client, t = ScriptedClient([]), FakeTime()
    sched = _scheduler(client, t, concurrent_jobs=2, wait_budget_seconds=5.0)

    async def go() -> list[str]:
        entries = [sched.journal.new_entry() for _ in range(3)]
        sends = asyncio.gather(*(sched.submit(e, _items(10)) for e in entries))
        return list(await asyncio.wait_for(sends, timeout=10))

    # two jobs run (their estimate is far away); the third waits for a slot until the budget
    assert _run(go()) == ["sent", "sent", "unsent"]
    assert client.sizes == [10, 10]
    assert len(sched.journal.in_phase(IN_FLIGHT)) == 2


def test_given_a_stop_request_when_submitting_then_nothing_more_is_sent() -> None:
    client, t = ScriptedClient([]), FakeTime()
    sched = _scheduler(client, t)
    stop = {"now": False}
    sched.should_stop = lambda: stop["now"]

    assert _submit(sched, 5)[0] == "sent"
    stop["now"] = True
    assert _submit(sched, 5)[0] == "unsent"
    assert client.sizes == [5]


def _polled(client: ScriptedClient, t: FakeTime, **settings: Any) -> Any:
    sched = _scheduler(client, t, **settings)
    client.estimate = 0
    entry = sched.journal.new_entry()

    async def go() -> Any:
        assert await sched.submit(entry, _items(3)) == "sent"
        fin = await sched.next_finished()
        await sched.close()
        return fin

    return sched, entry, _run(go())


def test_given_a_404_on_a_new_job_when_polling_then_it_is_looked_at_again_not_vanished() -> None:
    client, t = ScriptedClient([]), FakeTime()
    client.status_script = [JobNotFoundError("not yet"), JobNotFoundError("not yet"), "completed"]

    _, _, fin = _polled(client, t)

    assert fin is not None and fin.kind == COMPLETED
    assert client.status_calls == 3


def test_given_a_404_that_persists_past_the_grace_when_polling_then_the_job_vanished() -> None:
    client, t = ScriptedClient([]), FakeTime()
    client.status_script = [JobNotFoundError("gone")] * 1000

    _, _, fin = _polled(client, t, vanish_grace_seconds=30.0, wait_budget_seconds=1000.0)

    assert fin is not None and fin.kind == VANISHED
    assert t.now >= 30.0


def test_given_an_unknown_status_when_polling_then_the_slot_is_freed_and_the_job_kept() -> None:
    client, t = ScriptedClient([]), FakeTime()
    client.status_script = [MalformedResponseError("status 'paused' is not a status")]

    sched, entry, fin = _polled(client, t, concurrent_jobs=1)

    assert fin is None  # nothing finished: the job is kept for a later run
    assert entry.phase == IN_FLIGHT and entry.deferrals == 1
    assert sched.counters.deferred == 1
    # its slot is free again: the next submit does not wait (on the free plan, 1 slot)
    assert sched._active == 0
    # and it rests before the next look
    assert not sched.is_due(entry)
    t.now += sched.settings.defer_base_seconds
    assert sched.is_due(entry)


def test_given_one_job_done_when_waiting_for_the_next_then_the_loop_does_not_spin(
    monkeypatch: pytest.MonkeyPatch,
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
        Journal(MemoryStore(), "outcomes", "p", "load_1", time.time),
        "company",
        SchedulerSettings(records_per_job=10, concurrent_jobs=5, wait_budget_seconds=10.0),
    )
    waits = 0
    real_check = sched._raise_poller_crash

    def counted() -> None:
        nonlocal waits
        waits += 1
        real_check()

    monkeypatch.setattr(sched, "_raise_poller_crash", counted)

    async def go() -> list[str]:
        for _ in range(2):
            await sched.submit(sched.journal.new_entry(), _items(10))
        first = await sched.next_finished()
        second = await sched.next_finished()
        await sched.close()
        return [str(f.entry.job_id) for f in (first, second) if f]

    assert _run(go()) == ["job_1", "job_2"]
    # each wake-up is a poll of job_2 (every ~50-100 ms), not a busy loop
    assert waits < 30, f"next_finished looped {waits} times"


def test_given_an_unreachable_host_when_submitting_then_the_run_stops_within_the_bound() -> None:
    down = TransportError("POST /async/enrich failed: ConnectError: connection refused")
    client, t = ScriptedClient([down] * 100), FakeTime()
    sched = _scheduler(client, t, wait_budget_seconds=900.0, unreachable_seconds=60.0)

    outcome, entry = _submit(sched, 5)

    assert outcome == "unsent" and entry.phase == TO_SEND
    assert isinstance(sched.stop_error, ApiUnreachableError)
    message = str(sched.stop_error)
    assert "apione.test" in message and "ConnectError" in message and "base_url" in message
    # within the bound (plus one wait), not the whole wait budget
    assert 60.0 <= t.now <= 60.0 + sched.settings.poll_max_seconds / 4
