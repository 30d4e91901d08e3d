"""The job scheduler against a scripted client: limits, refusals, lost answers, drift."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from datetime import datetime, timezone
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
from apione_source.models import Job, JobResults, JobStatus, SubmitResponse, parse_model
from apione_source.sandbox import Sandbox
from apione_source.sandbox.engine import Engine
from apione_source.scheduler import (
    COMPLETED,
    TIMED_OUT,
    VANISHED,
    JobScheduler,
    SchedulerSettings,
    _Pacer,
)


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


def test_given_jobs_done_faster_than_the_run_takes_them_then_few_results_are_held() -> None:
    """Results wait on ApiOne, not in memory, until the run has room for them."""
    client, t = ScriptedClient([]), FakeTime()
    client.estimate = 0  # instant jobs
    client.status_script = ["completed"] * 12
    fetched: list[str] = []
    results = client.get_results

    async def counted(job_id: str) -> Any:
        fetched.append(job_id)
        return await results(job_id)

    client.get_results = counted  # type: ignore[method-assign]
    sched = _scheduler(client, t, concurrent_jobs=12)

    async def go() -> list[str]:
        for _ in range(12):
            assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
        for _ in range(50):  # let every poller run as far as it can
            await asyncio.sleep(0)
        held = len(fetched)
        taken = []
        while (fin := await sched.next_finished()) is not None:
            assert fin.kind == COMPLETED
            taken.append(str(fin.entry.job_id))
        await sched.close()
        assert held == 4  # the bound, though all 12 jobs were done
        return taken

    assert sorted(_run(go())) == sorted(f"job_{i}" for i in range(1, 13))  # none lost
    assert len(fetched) == 12


def test_given_jobs_done_faster_than_the_run_takes_them_then_they_count_as_waiting() -> None:
    """Jobs running or done count as waiting until the run takes them."""
    client, t = ScriptedClient([]), FakeTime()
    client.estimate = 0
    client.status_script = ["completed"] * 6
    sched = _scheduler(client, t, concurrent_jobs=3)

    async def go() -> list[int]:
        seen = []
        for _ in range(6):
            assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
            seen.append(sched.waiting)
        for _ in range(50):
            await asyncio.sleep(0)
        seen.append(sched.waiting)  # 6 done, 4 fetched: all wait for the run
        while await sched.next_finished() is not None:
            seen.append(sched.waiting)
        await sched.close()
        return seen

    assert _run(go()) == [1, 2, 3, 4, 5, 6, 6, 5, 4, 3, 2, 1, 0]


def test_given_many_jobs_done_when_the_run_goes_on_then_it_keeps_nothing_per_finished_job() -> None:
    """What the scheduler keeps is bounded by the jobs in flight, not the jobs ever run
    (a 100M-row run has 100,000 jobs); a poller that crashed is kept, and raises."""
    client, t = ScriptedClient([]), FakeTime()
    client.estimate = 0
    client.status_script = ["completed"] * 40
    sched = _scheduler(client, t, concurrent_jobs=4)

    async def go() -> None:
        for _ in range(10):  # ten rounds of four jobs, each taken before the next round
            for _ in range(4):
                assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
            for _ in range(4):
                fin = await sched.next_finished()
                assert fin is not None and fin.kind == COMPLETED
            await asyncio.sleep(0)  # the last poller's own end
            assert sched._pollers == {} and sched._slot_freed_for == set()
        client.get_job = None  # type: ignore[assignment,method-assign]  # a bug: not callable
        assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
        with pytest.raises(TypeError):
            await sched.next_finished()
        await sched.close()

    _run(go())


def test_quiet_for_is_the_time_to_the_soonest_estimated_end_and_zero_once_one_is_due() -> None:
    """What the run plans a load around: no job should end before ``quiet_for``."""
    client, t = ScriptedClient([]), FakeTime()
    sched = _scheduler(client, t, concurrent_jobs=3)

    async def asleep(seconds: float) -> None:  # pollers stay in their first nap
        await asyncio.Event().wait()

    sched.sleep = asleep

    async def go() -> list[float]:
        seen = [sched.quiet_for()]  # nothing polled
        client.estimate = 30
        assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
        t.now = 4.0
        client.estimate = 10
        assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
        seen.append(sched.quiet_for())  # the second should end first: at 14
        t.now = 20.0
        seen.append(sched.quiet_for())  # it is due
        await sched.close()
        return seen

    assert _run(go()) == [math.inf, 10.0, 0.0]


def test_wait_for_work_ends_at_a_free_slot_or_a_finished_job_not_only_at_a_slot() -> None:
    client, t = ScriptedClient([]), FakeTime()
    client.estimate = 5
    client.status_script = ["completed"]
    sched = _scheduler(client, t, concurrent_jobs=1)

    async def go() -> tuple[bool, bool]:
        assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
        assert not sched.has_free_slot
        await asyncio.wait_for(sched.wait_for_work(), timeout=5)
        ready_or_free = sched.has_ready or sched.has_free_slot
        sched.submits_paused = True  # nothing more may be sent: returns at once
        await asyncio.wait_for(sched.wait_for_work(), timeout=1)
        await sched.close()
        return ready_or_free, sched.can_submit

    assert _run(go()) == (True, False)


def test_let_looks_in_waits_for_a_look_due_within_the_window_and_not_for_a_later_one() -> None:
    """The run lets due looks (and the submits into the slots they free) come before rows."""
    client, t = ScriptedClient([]), FakeTime()
    client.estimate = 10  # the first look comes at 5 s
    client.status_script = ["completed"]
    sched = _scheduler(client, t, concurrent_jobs=1)
    go_on = asyncio.Event()

    async def nap(seconds: float) -> None:  # pollers nap until the test lets them go
        await go_on.wait()
        t.now += seconds

    sched.sleep = nap

    async def go() -> tuple[int, bool, bool, bool]:
        assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
        await asyncio.wait_for(sched.let_looks_in(1.0), timeout=1)  # due in 5 s: not waited
        early = (client.status_calls, sched.has_free_slot)
        waiting = asyncio.ensure_future(sched.let_looks_in(6.0))
        await asyncio.sleep(0.01)
        blocked = not waiting.done()
        go_on.set()  # the look happens, sees the job completed and frees its slot
        await asyncio.wait_for(waiting, timeout=1)
        freed = sched.has_free_slot
        await sched.close()
        return *early, blocked, freed

    assert _run(go()) == (0, False, True, True)


def test_a_stop_request_ends_let_looks_in_within_half_a_second() -> None:
    client, t = ScriptedClient([]), FakeTime()
    client.estimate = 10  # the first look comes at 5 s, and never does: pollers stay asleep
    sched = _scheduler(client, t, concurrent_jobs=1)
    stop = [False]
    sched.should_stop = lambda: stop[0]

    async def asleep(seconds: float) -> None:
        await asyncio.Event().wait()

    sched.sleep = asleep

    async def go() -> float:
        assert await sched.submit(sched.journal.new_entry(), _items(1)) == "sent"
        waiting = asyncio.ensure_future(sched.let_looks_in(6.0))
        await asyncio.sleep(0.05)
        stop[0] = True
        started = time.monotonic()
        await asyncio.wait_for(waiting, timeout=2)
        await sched.close()
        return time.monotonic() - started

    assert _run(go()) <= 0.6


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
    # at the bound (each call's own retries aside: none here), not a wait after it, and
    # not the whole wait budget
    assert t.now == pytest.approx(60.0)


# --- pacing: how often a job is looked at, and how late its end is seen -------------------

T0 = 1_700_000_000.0
KEY = "sk_test_pacing"


class EngineClient:
    """The sandbox's engine as the scheduler's client, in-process: no HTTP, no sleeping.

    Counts status calls per job, and notes for each job how long after its end (its
    ``completed_at``, by the server's clock) the first status answer saying so came.
    """

    host = "sandbox.test"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: dict[str, int] = {}
        self.overshoot: dict[str, float] = {}  # seconds
        self.duration: dict[str, float] = {}  # completed_at - created_at

    async def submit_job(self, type_: str, records: list[dict[str, Any]], webhook: Any) -> Any:
        reply = self.engine.submit(KEY, json.dumps({"type": type_, "records": records}).encode())
        assert reply.status == 200, reply.body
        return parse_model(SubmitResponse, reply.body)

    async def get_job(self, job_id: str) -> Job:
        self.calls[job_id] = self.calls.get(job_id, 0) + 1
        reply = self.engine.status(KEY, job_id)
        if reply.status == 404:
            raise JobNotFoundError("job_not_found")
        job = parse_model(Job, reply.body, job_id)
        if job.status is JobStatus.COMPLETED and job_id not in self.overshoot:
            assert job.completed_at is not None and job.created_at is not None
            end = job.completed_at.timestamp()
            self.overshoot[job_id] = self.engine.now() - end
            self.duration[job_id] = end - job.created_at.timestamp()
        return job

    async def get_results(self, job_id: str) -> JobResults:
        return parse_model(JobResults, self.engine.results(KEY, job_id).body, job_id)

    def calls_per_job(self) -> float:
        return sum(self.calls.values()) / len(self.calls)

    def worst_overshoot(self) -> float:
        """The largest overshoot as a share of its job's duration."""
        return max(self.overshoot[j] / max(self.duration[j], 1e-9) for j in self.overshoot)


def _engine(t: FakeTime, skew: float = 0.0, **knobs: Any) -> Engine:
    t.now = T0
    return Sandbox("scale", KEY, clock=lambda: t.now + skew, **knobs).engine


def _one_by_one(client: EngineClient, t: FakeTime, sizes: list[int], **settings: Any) -> list[Any]:
    """Submit a job of each size and poll it to its end, one at a time; the Finished."""

    async def go() -> list[Any]:
        out = []
        for i, n in enumerate(sizes):
            sched = _scheduler(
                client,  # type: ignore[arg-type]
                t,
                **{"records_per_job": 1000, "wait_budget_seconds": 3600.0, **settings},
            )
            sched.rng = random.Random(i)
            assert await sched.submit(sched.journal.new_entry(), _items(n)) == "sent"
            out.append(await sched.next_finished())
            await sched.close()
        return out

    return list(_run(go()))


SIZES = [20, 50, 100, 200, 350, 500, 700, 850, 1000]  # 3 s to 52 s of work


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"queue_seconds": 8.0},  # the estimate counts the queue, progress does not
        {"skew": 3600.0},  # the server's clock an hour off ours
        {"job_seconds_base": 0.5, "job_seconds_per_record": 0.005},  # short: 0.6-5.5 s
    ],
    ids=["plain", "queued", "skewed", "short"],
)
def test_given_honest_estimates_when_polling_then_about_two_looks_and_the_end_seen_soon(
    knobs: dict[str, Any],
) -> None:
    t = FakeTime()
    settings = {"job_seconds_base": 2.0, "job_seconds_per_record": 0.05, **knobs}
    client = EngineClient(_engine(t, **settings))

    finished = _one_by_one(client, t, SIZES)

    assert [f.kind for f in finished] == [COMPLETED] * len(SIZES)
    assert client.calls_per_job() <= 2.2, client.calls
    assert client.worst_overshoot() <= 0.10, client.overshoot


@pytest.mark.parametrize("queue_seconds", [0.0, 8.0])
def test_given_estimates_3x_too_low_when_polling_then_at_most_4_looks_a_job(
    queue_seconds: float,
) -> None:
    t = FakeTime()
    engine = _engine(
        t,
        job_seconds_base=2.0,
        job_seconds_per_record=0.05,
        queue_seconds=queue_seconds,
        estimate_factor=1 / 3,
    )
    client = EngineClient(engine)

    finished = _one_by_one(client, t, SIZES)

    assert [f.kind for f in finished] == [COMPLETED] * len(SIZES)
    assert client.calls_per_job() <= 4, client.calls
    if not queue_seconds:  # (queued past the estimate, a job tells nothing for a while)
        assert max(client.calls.values()) <= 4, client.calls
    assert client.worst_overshoot() <= 0.10, client.overshoot


def test_given_sub_second_jobs_when_polling_then_their_end_is_seen_within_half_a_second() -> None:
    # an estimate of 1 s (whole seconds, rounded up) tells nothing below a second
    t = FakeTime()
    client = EngineClient(_engine(t, job_seconds_base=0.2, job_seconds_per_record=0.0005))

    _one_by_one(client, t, SIZES)

    assert client.calls_per_job() <= 2.2, client.calls
    assert max(client.overshoot.values()) <= 0.5, client.overshoot


def test_given_estimates_3x_too_high_when_polling_then_the_end_is_seen_in_two_looks() -> None:
    t = FakeTime()
    engine = _engine(t, job_seconds_base=2.0, job_seconds_per_record=0.05, estimate_factor=3.0)
    client = EngineClient(engine)

    _one_by_one(client, t, SIZES)

    # the first look (halfway through the estimate) is past the end: seen late, but once
    assert client.calls_per_job() <= 2.0
    assert max(client.overshoot.values()) <= 52 * 0.6  # half the estimate past the end


def test_given_a_first_look_just_after_the_job_started_when_polling_then_not_seen_late() -> None:
    # queued 4.95 s, then 190 records in 5 s; the first look (5 s) reads 1 record done of
    # what may be 1.99: the latest end consistent with it is 9.5 s off, the true one 5
    t = FakeTime()
    client = EngineClient(_engine(t, queue_seconds=4.95, job_seconds_per_record=5 / 190))

    _one_by_one(client, t, [190])

    assert list(client.calls.values()) == [2]
    assert client.worst_overshoot() <= 0.10, client.overshoot


def test_given_instant_jobs_when_polling_then_one_look_each() -> None:
    t = FakeTime()
    client = EngineClient(_engine(t))  # no work: estimate 0, completed when created

    finished = _one_by_one(client, t, [1, 10, 1000])

    assert [f.kind for f in finished] == [COMPLETED] * 3
    assert list(client.calls.values()) == [1, 1, 1]
    assert t.now == T0  # not a moment waited


def test_given_a_first_look_404_when_polling_then_one_more_look_soon() -> None:
    t = FakeTime()
    client = EngineClient(_engine(t, status_404_first_rate=1.0))

    finished = _one_by_one(client, t, [10])

    assert finished[0].kind == COMPLETED
    assert list(client.calls.values()) == [2]
    assert t.now - T0 <= 4 * _scheduler(client, t).settings.poll_min_seconds  # type: ignore[arg-type]


def _carried(client: EngineClient, t: FakeTime, records: int, age: float) -> tuple[Any, Any]:
    """A job a previous run submitted ``age`` seconds ago; (its Finished, scheduler)."""
    previous = _scheduler(client, t)  # type: ignore[arg-type]
    entry = previous.journal.new_entry()
    previous.journal.send(entry, _items(records))
    answer = _run(client.submit_job("company", [i.record for i in _items(records)], None))
    previous.journal.job_created(entry, answer.job_id)
    t.now += age  # the previous run ended here; this one picks the job up
    sched = _scheduler(client, t)  # type: ignore[arg-type]
    sched.journal = previous.journal

    async def go() -> Any:
        await sched.track([entry])
        fin = await sched.next_finished()
        await sched.close()
        return fin

    return _run(go()), sched


def test_given_a_carried_over_job_when_polling_then_its_progress_paces_the_looks() -> None:
    t = FakeTime()
    client = EngineClient(_engine(t, job_seconds_per_record=0.04))  # 1,000 records: 40 s

    fin, sched = _carried(client, t, 1000, age=10.0)

    assert fin is not None and fin.kind == COMPLETED
    # at once (a quarter done), then twice its age at most, then the predicted end
    assert sum(client.calls.values()) <= 3, client.calls
    assert client.worst_overshoot() <= 0.10, client.overshoot
    assert sched._active == 0


def test_given_a_carried_over_job_already_done_when_polling_then_one_look() -> None:
    t = FakeTime()
    client = EngineClient(_engine(t, job_seconds_per_record=0.04))

    fin, _ = _carried(client, t, 100, age=3600.0)

    assert fin is not None and fin.kind == COMPLETED
    assert list(client.calls.values()) == [1]


class Looks(ScriptedClient):
    """Answers status from a function of the time; notes when each look came."""

    def __init__(self, t: FakeTime, answer: Any) -> None:
        super().__init__([])
        self.t, self.answer, self.looks = t, answer, []

    async def get_job(self, job_id: str) -> Job:
        self.looks.append(self.t.now)
        return Job(job_id=job_id, type="company", **self.answer(self.t.now))


def _looks(client: Looks, t: FakeTime, estimate: int, **settings: Any) -> Any:
    sched = _scheduler(client, t, **settings)
    client.estimate = estimate
    entry = sched.journal.new_entry()

    async def go() -> Any:
        assert await sched.submit(entry, _items(3)) == "sent"
        fin = await sched.next_finished()
        await sched.close()
        return fin

    return _run(go())


def test_given_no_progress_reported_when_polling_then_looks_spread_with_the_jobs_age() -> None:
    # processed_records is not in the documented page: a job may report none at all
    t = FakeTime()
    client = Looks(
        t,
        lambda now: {
            "status": "completed" if now >= 1000 else "processing",
            "total_records": 3,
        },
    )

    fin = _looks(client, t, estimate=10, wait_budget_seconds=2000.0)

    assert fin is not None and fin.kind == COMPLETED
    gaps = [b - a for a, b in zip(client.looks, client.looks[1:], strict=False)]
    # halfway through the estimate, then its end (jitter: waits up to 2% longer)
    assert client.looks[0] == pytest.approx(5.0, rel=0.02)
    assert client.looks[1] == pytest.approx(10.0, rel=0.02)
    assert all(0.05 <= g <= 60 * 1.02 for g in gaps), gaps  # poll_min .. poll_max
    assert gaps[1:5] == sorted(gaps[1:5])  # growing with the job's age
    assert len(client.looks) <= 25  # (the old backoff: ~30)
    assert client.looks[-1] - 1000 <= 60 * 1.02


def test_given_a_job_stuck_at_all_records_processed_when_polling_then_no_spinning() -> None:
    # every record processed, still "processing" (results being written) for 20 s
    t = FakeTime()
    client = Looks(
        t,
        lambda now: {
            "status": "completed" if now >= 30 else "processing",
            "total_records": 100,
            "processed_records": 100 if now >= 10 else int(10 * now),
            "created_at": datetime.fromtimestamp(0, timezone.utc),
            "started_at": datetime.fromtimestamp(0, timezone.utc),
        },
    )

    fin = _looks(client, t, estimate=10)

    assert fin is not None and fin.kind == COMPLETED
    # 5 s, 10 s, then at least 5% of the job's age apart
    assert len(client.looks) <= 25, client.looks
    assert client.looks[-1] - 30 <= 0.06 * 30


def test_given_a_job_predicted_past_its_timeout_when_polling_then_it_times_out_on_time() -> None:
    t = FakeTime()
    client = EngineClient(_engine(t, job_seconds_per_record=1.0))  # 1,000 s

    finished = _one_by_one(client, t, [1000], job_timeout_seconds=100.0)

    assert finished[0].kind == TIMED_OUT
    assert 100.0 < t.now - T0 <= 100.0 + 0.2
    assert client.calls_per_job() <= 4


def test_a_look_by_progress_comes_at_least_a_round_trip_after_the_predicted_end() -> None:
    """0.2% of a short job's remaining time is less than a round trip: a look then would
    come before the end the server sees, and cost one more status call."""
    pacer = _Pacer(SchedulerSettings(10, 1, 100.0), random.Random(1), 0.0, 4.0, 1e9)
    created = datetime(2026, 1, 1, tzinfo=timezone.utc)
    job = Job(
        job_id="job_1",
        status="processing",
        type="company",
        total_records=1000,
        processed_records=500,
        created_at=created,
        started_at=created,
    )

    wait = pacer.next_wait(job, seen_at=2.0, now=2.0, wall_offset=0.0)

    # half done in 2 s: it ends 2 s from now, and the look comes 10 ms after, not 4 ms
    assert 2.0 + 0.01 <= wait <= (2.0 + 0.01) * 1.01
