"""Packs records into ApiOne jobs within the plan's limits and polls them to completion.

One :class:`JobScheduler` serves one run. It never has more jobs in flight than the plan
allows (a slot count, plus waiting out 429 ``concurrent_job_limit`` when another process
shares the key), shrinks batches on 413, polls every job concurrently through the async
client, paced by :class:`_Pacer` (a first look halfway through the server's estimate, then
at the end the job's own progress predicts), and stops at the run's wait budget: jobs still
running then are left to the next run, which finds them in the journal. Every submit goes
through the journal first, see :mod:`apione_source.journal`; the scheduler writes only
``send``, ``job``, ``unsent`` and ``deferred``: how a finished job is settled is the run's
business.

Clock, sleep and randomness are injected so the hard cases are testable without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from apione_source.client import AsyncApiOneClient
from apione_source.errors import (
    ApiOneError,
    ApiUnreachableError,
    JobNotFoundError,
    NotReadyError,
    RequestRefusedError,
    ResultsExpiredError,
    RetryableError,
    ShrinkBatchError,
    StopRunError,
    SubmitOutcomeUnknownError,
    TransportError,
    WaitForCapacityError,
)
from apione_source.journal import (
    EXPIRED,
    FAILED,
    LOST,
    TIMED_OUT,
    VANISHED,
    BatchItem,
    Entry,
    Journal,
)
from apione_source.models import Job, JobResults, JobStatus, WebhookEvent

logger = logging.getLogger(__name__)

# Finished.kind values: completed, or one of the journal's spent reasons.
COMPLETED = "completed"
__all__ = ["COMPLETED", "EXPIRED", "FAILED", "LOST", "TIMED_OUT", "VANISHED"]

_MAX_LOST_STREAK = 3
# Completed jobs whose results are fetched but not yet taken by the run, at most. The run
# turns results into rows slower than ApiOne serves them: without a bound, every
# completed job's results would wait in memory (about 4 KB a record, parsed).
_HELD_RESULTS = 4
# How long polling may be interrupted by a stop request (SIGTERM/SIGINT) at most.
_STOP_CHECK_SECONDS = 0.5

# Pacing of the looks at one job (see _Pacer). Shares of the estimate, of the time a
# prediction leaves, or of the job's age.
_FIRST_LOOK_SHARE = 0.5  # first look this far into the estimate: early enough to see
# progress even when the estimate is too high or the job fast, late enough to measure it
_LATE_SHARE = 0.002  # look this much after the predicted end, so the look sees it done
_LATE_MIN_SECONDS = 0.01  # and at least this much (a round trip, the clocks' grain)
_SPREAD_SHARE = 0.08  # but no later than this much after the earliest end progress allows
_MIN_AGE_SHARE = 0.05  # no two looks closer than this share of the job's age
_AGE_SHARE = 0.5  # without progress to go by, wait this share of the job's age
_JITTER = 0.002  # waits are stretched by up to this share (never shortened)
_LOOK_ROUND_TRIP = 0.05  # how long let_looks_in gives a due look to be answered


@dataclass(frozen=True)
class SchedulerSettings:
    """Limits and timing of one run.

    Attributes:
        records_per_job: Most records in one job (the plan's, or lower).
        concurrent_jobs: Most jobs queued or processing at once.
        wait_budget_seconds: How long the run may wait for jobs; the rest carry over.
        job_timeout_seconds: A job older than this is given up and its records resubmitted.
        poll_min_seconds: Shortest pause between two looks at one job.
        poll_max_seconds: Longest pause between two looks at one job while nothing
            predicts its end (a job reporting progress is looked at when it should end).
        webhook_url: Passed to ApiOne with every submit, if set.
        vanish_grace_seconds: A job ApiOne does not know (404) is taken as vanished only
            once it is this old and two looks in a row said so: a new job may not have
            reached every replica yet.
        defer_base_seconds: After an answer the contract does not know, the job is looked
            at again no sooner than this (doubling per such answer, up to 6 hours).
        unreachable_seconds: The run fails once ApiOne's host has given no answer at all
            (after the client's own retries) for this long.
        webhook_grace_seconds: With webhooks on, how long after a job should have ended
            the run waits for its delivery before it asks ApiOne itself (once).
    """

    records_per_job: int
    concurrent_jobs: int
    wait_budget_seconds: float
    job_timeout_seconds: float = 6 * 3600
    poll_min_seconds: float = 0.05
    poll_max_seconds: float = 60.0
    webhook_url: str | None = None
    vanish_grace_seconds: float = 300.0
    defer_base_seconds: float = 60.0
    unreachable_seconds: float = 60.0
    webhook_grace_seconds: float = 5.0


_INBOX_CHECK_SECONDS = 0.2  # how often a job's deliveries are looked for during the grace


@dataclass
class Finished:
    """A job (or a submit) that reached an end this run.

    Attributes:
        entry: The journal entry.
        kind: ``completed``, or a spent reason (failed, expired, timed_out, vanished, lost).
        results: The results, when completed.
        status: The last status seen, when any.
        error: Why it did not complete, when it did not.
    """

    entry: Entry
    kind: str
    results: JobResults | None = None
    status: Job | None = None
    error: str | None = None


@dataclass
class _Counters:
    submitted_jobs: int = 0
    submitted_records: int = 0
    lost_answers: int = 0
    lost_records: int = 0  # records of lost answers: maybe billed, so they count against caps
    capacity_waits: int = 0
    deferred: int = 0


@dataclass
class JobScheduler:
    """Submits entries and polls their jobs for one run; :meth:`close` when done.

    Attributes:
        should_stop: Polled at every safe point; True (a SIGTERM, say) ends submitting and
            polling at once, leaving every job to the journal.
    """

    client: AsyncApiOneClient
    journal: Journal
    enrichment_type: str
    settings: SchedulerSettings
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)
    should_stop: Callable[[], bool] = lambda: False
    # With webhooks on: a job's delivered, trusted event, if one came (blocking; file I/O).
    delivered: Callable[[str], WebhookEvent | None] | None = None

    def __post_init__(self) -> None:
        self.deadline = self.clock() + self.settings.wait_budget_seconds
        self.records_per_job = self.settings.records_per_job
        self.finished: asyncio.Queue[Finished] = asyncio.Queue()
        self._lost_streak = 0
        self.submits_paused = False
        # Set when nothing will succeed until a human acts (401, 402, 403, a refused
        # request, an unreachable host): nothing more is sent or polled; the run fails.
        self.stop_error: StopRunError | None = None
        self.counters = _Counters()
        self._silent_since: float | None = None  # first failure without any answer
        # Jobs of ours queued or processing on the server. Carried-over jobs count too,
        # so a condition, not a semaphore: there may briefly be more than the limit.
        self._active = 0
        self._slot_freed = asyncio.Condition()
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._pacers: dict[str, _Pacer] = {}  # of the jobs being polled
        self._slot_freed_for: set[str] = set()  # entries whose poller gave its slot back
        self._polling = 0  # pollers still running
        self._results_room = asyncio.Semaphore(_HELD_RESULTS)
        self._news = asyncio.Event()  # set when a slot is freed or a finished job queued
        self._look_at: dict[str, float] = {}  # entry id -> when its poller looks next

    async def close(self) -> None:
        """Stop polling (jobs still running are carried over by the journal)."""
        for task in self._pollers.values():
            task.cancel()
        await asyncio.gather(*self._pollers.values(), return_exceptions=True)

    # --- budget ------------------------------------------------------------------------

    @property
    def remaining(self) -> float:
        """Seconds left of the wait budget (none once a stop was requested)."""
        if self.should_stop():
            return 0.0
        return self.deadline - self.clock()

    @property
    def in_flight(self) -> list[str]:
        """Entry ids of jobs still being polled."""
        return [e for e, t in self._pollers.items() if not t.done()]

    @property
    def can_submit(self) -> bool:
        """False once nothing more may be sent this run."""
        return self.remaining > 0 and self.stop_error is None and not self.submits_paused

    # --- submitting ----------------------------------------------------------------------

    async def submit(self, entry: Entry, items: list[BatchItem]) -> str:
        """Send ``items`` as generation ``entry.gen + 1`` of ``entry``, waiting for a slot.

        Returns:
            ``sent`` (polling started), ``lost`` (the answer was lost: a ``lost`` Finished
            is queued), ``shrink`` (ApiOne allows fewer records per job: split the entry
            to :attr:`records_per_job` and submit the pieces) or ``unsent`` (the budget
            ran out, or the run must stop: the entry stays to send).
        """
        while self.can_submit:
            if not await self._acquire_slot():
                return "unsent"
            try:
                outcome, wait = await self._submit_one(entry, items)
            except StopRunError as exc:
                await self._release_slot()
                self.stop_error = exc
                return "unsent"
            if outcome in ("sent", "lost"):
                if outcome == "lost":
                    await self._release_slot()
                return outcome
            await self._release_slot()
            if outcome == "shrink":
                return outcome
            if wait and not await self._wait(wait):
                return "unsent"
        return "unsent"

    async def _acquire_slot(self) -> bool:
        limit = self.settings.concurrent_jobs
        while self.can_submit:
            try:
                async with self._slot_freed:
                    await asyncio.wait_for(
                        self._slot_freed.wait_for(lambda: self._active < limit),
                        timeout=min(self.remaining, _STOP_CHECK_SECONDS),
                    )
                    self._active += 1
                    return True
            except asyncio.TimeoutError:
                continue
        return False

    async def _release_slot(self) -> None:
        async with self._slot_freed:
            self._active -= 1
            self._slot_freed.notify()
        self._news.set()

    async def _wait(self, seconds: float) -> bool:
        if seconds >= self.remaining:
            return False
        await self.sleep(seconds)
        return self.remaining > 0

    async def _submit_one(self, entry: Entry, items: list[BatchItem]) -> tuple[str, float]:
        """Send one batch. Returns what happened and how long to wait before going on."""
        self.journal.send(entry, items)
        sent_at = self.clock()
        try:
            answer = await self.client.submit_job(
                self.enrichment_type, [i.record for i in items], self.settings.webhook_url
            )
        except SubmitOutcomeUnknownError as exc:
            return self._lost_answer(entry, exc)
        except ApiOneError as exc:
            # ApiOne answered, or the request never left: no job exists.
            self.journal.unsent(entry, str(exc))
            return self._refused(items, exc)
        # Anything else (cancellation, a bug) may have struck while the request was in the
        # air: the entry stays `sending` and the next run counts it as a lost answer.
        self.journal.job_created(entry, answer.job_id)
        self._silent_since = None
        self._lost_streak = 0
        self.counters.submitted_jobs += 1
        self.counters.submitted_records += len(items)
        # The job was created while the request was in the air: halfway is the best guess.
        born = (sent_at + self.clock()) / 2
        self._start_polling(entry, born, float(answer.estimated_completion_seconds))
        return "sent", 0.0

    def _lost_answer(self, entry: Entry, exc: SubmitOutcomeUnknownError) -> tuple[str, float]:
        # The job may exist and be billed; the run spends the entry (counted, resent).
        self.counters.lost_answers += 1
        self.counters.lost_records += len(entry.items)
        self._hand_over(Finished(entry, LOST, error=str(exc)))
        self._lost_streak += 1
        if self._lost_streak >= _MAX_LOST_STREAK:
            # Every resend may be billed: stop submitting until the next run.
            logger.error(
                "%d submit answers lost in a row; no more submits this run", self._lost_streak
            )
            self.submits_paused = True
        else:
            logger.warning("submit outcome unknown (%s); its records will be resent", exc)
        return "lost", 0.0

    def _refused(self, items: list[BatchItem], exc: ApiOneError) -> tuple[str, float]:
        if isinstance(exc, StopRunError):
            raise exc
        if isinstance(exc, ShrinkBatchError):
            limit = min(exc.limit or len(items) // 2, len(items) - 1)
            if limit >= 1:
                logger.warning("ApiOne allows %d records per job; shrinking batches", limit)
                self.records_per_job = min(self.records_per_job, limit)
                return "shrink", 0.0
        if isinstance(exc, WaitForCapacityError):
            self.counters.capacity_waits += 1
            return "wait", exc.retry_after or 1.0
        if isinstance(exc, RetryableError):  # the client's own retries ran out
            self._note_silence(exc)
            wait = exc.retry_after or self.settings.poll_max_seconds / 4
            if self._silent_since is not None:
                # look once more when the silence reaches the bound, not a wait after it
                deadline = self._silent_since + self.settings.unreachable_seconds
                wait = min(wait, max(0.0, deadline - self.clock()))
            return "wait", wait
        # A 400 (or 404 on the route) is about the request, not the records: the next
        # batch would be refused the same way, and the records go out on a later run.
        raise RequestRefusedError(
            f"ApiOne at {self.client.host} refused a submit of {len(items)} records: "
            f"{exc.message}. This is about the request, not the records: check "
            "sources.apione.base_url (it ends with /api/v1) and that apione-dlt is up to "
            "date; nothing was billed, the records are sent on the next run",
            status_code=exc.status_code,
            code=exc.code,
        )

    def _note_silence(self, exc: ApiOneError) -> None:
        """Fail the run once the host has given no answer at all for too long."""
        if not isinstance(exc, TransportError):
            self._silent_since = None  # an answer, if an unhappy one
            return
        now = self.clock()
        if self._silent_since is None:
            self._silent_since = now
        elif now - self._silent_since >= self.settings.unreachable_seconds:
            self.stop_error = ApiUnreachableError(
                f"ApiOne at {self.client.host} gave no answer for "
                f"{now - self._silent_since:.0f}s ({exc.message}): check "
                "sources.apione.base_url and the network; jobs in flight are collected by "
                "the next run"
            )

    # --- polling ---------------------------------------------------------------------------

    async def track(self, entries: list[Entry]) -> None:
        """Poll jobs submitted by earlier runs; each occupies a slot until it ends."""
        for entry in entries:
            self._active += 1
            # No estimate; its age is known from the journal (when its answer came).
            self._start_polling(entry, self._answered(entry), None)

    def _answered(self, entry: Entry) -> float:
        """When the answer creating the entry's job came (journaled), on the clock."""
        return self.clock() - max(0.0, self.wall_clock() - entry.submitted_at)

    def _start_polling(self, entry: Entry, born: float, estimate: float | None) -> None:
        self._slot_freed_for.discard(entry.entry_id)  # a resent entry holds a new slot
        # The job times out by the journal's time of its answer (see _look).
        timeout_at = self._answered(entry) + self.settings.job_timeout_seconds
        pacer = _Pacer(self.settings, self.rng, born, estimate, timeout_at)
        self._pacers[entry.entry_id] = pacer
        self._polling += 1
        task = asyncio.create_task(self._poll(entry, pacer))
        self._pollers[entry.entry_id] = task
        task.add_done_callback(functools.partial(self._forget_poller, entry.entry_id))

    def _forget_poller(self, entry_id: str, task: asyncio.Task[None]) -> None:
        """Drop a poller that ended without raising (one that raised stays, to be raised).

        What a run keeps stays bounded by its jobs in flight, not by every job it ever
        polled: a 100M-row run has 100,000 jobs, and each wait looks at every poller.
        """
        if self._pollers.get(entry_id) is task and (task.cancelled() or task.exception() is None):
            del self._pollers[entry_id]

    async def _nap(self, seconds: float) -> None:
        """Sleep, waking early when a stop is requested."""
        end = self.clock() + seconds
        while (left := min(end - self.clock(), self.remaining)) > 0:
            await self.sleep(min(left, _STOP_CHECK_SECONDS))

    async def _poll(self, entry: Entry, pacer: _Pacer) -> None:
        delay, not_found = pacer.first_wait(self.clock()), 0
        grace_until: float | None = None  # webhooks: when to stop waiting for a delivery
        try:
            while True:
                if self.remaining <= 0 or self.stop_error is not None:
                    return  # carried over: the job still runs on the server
                self._look_at[entry.entry_id] = self.clock() + max(delay, 0.0)
                self._news.set()  # a look was answered: let_looks_in sees the next one
                if delay > 0:
                    await self._nap(delay)
                    if self.remaining <= 0:
                        return
                if self.delivered is not None:
                    # A delivery makes status and results calls unneeded. None yet: wait
                    # for it until the job should have ended, plus a grace (once), before
                    # asking ApiOne.
                    by_webhook = await self._delivered(entry)
                    if by_webhook is not None:
                        self._hand_over(by_webhook)
                        return
                    if grace_until is None:
                        grace_until = pacer.expected_end(self.clock()) + (
                            self.settings.webhook_grace_seconds
                        )
                    now = self.clock()
                    if now < grace_until:
                        # one nap to when the job should end, then a look every fraction
                        # of a second: a few store listings a job, not one per 0.2 s
                        delay = max(_INBOX_CHECK_SECONDS, pacer.expected_end(now) - now)
                        continue
                asked = self.clock()
                try:
                    seen = await self._look(entry, not_found)
                except JobNotFoundError:
                    not_found += 1
                    delay = pacer.retry_wait()
                    continue
                except RetryableError as exc:
                    logger.info(
                        "job %s: status unavailable (%s); looking again later", entry.job_id, exc
                    )
                    self._note_silence(exc)
                    delay = pacer.retry_wait()
                    continue
                except StopRunError as exc:
                    self.stop_error = exc
                    return
                except ApiOneError as exc:
                    # An answer the contract does not know (a new status, a missing field):
                    # keep the job and its keys, free the slot, look again in a later run.
                    self.journal.deferred(entry, str(exc))
                    self.counters.deferred += 1
                    logger.warning(
                        "job %s: %s; kept, looked at again in a later run", entry.job_id, exc
                    )
                    return
                not_found = 0
                self._silent_since = None
                if isinstance(seen, Finished):
                    self._hand_over(seen)
                    return
                # The server answered somewhere between asking and now: halfway.
                now = self.clock()
                delay = pacer.next_wait(seen, (asked + now) / 2, now, self.wall_clock() - now)
        finally:
            self._polling -= 1
            self._pacers.pop(entry.entry_id, None)
            self._look_at.pop(entry.entry_id, None)
            await self._free_slot_of(entry)
            if self._pollers.get(entry.entry_id) is asyncio.current_task():
                # no poller of it is left to ask (unless it was resent meanwhile)
                self._slot_freed_for.discard(entry.entry_id)

    async def _delivered(self, entry: Entry) -> Finished | None:
        """The job's results from its delivery; None: poll it instead.

        Only a ``job.completed`` delivery whose results line up with what was sent is
        used. A ``job.failed`` one is confirmed by polling (spending the job resends, and
        bills, its records); a store that cannot be read is polled around.
        """
        assert self.delivered is not None
        self._look_at.pop(entry.entry_id, None)  # not a look the run should wait for
        if not await self._room_for_results():  # as polling waits before fetching results
            return None
        try:
            event = await asyncio.to_thread(self.delivered, str(entry.job_id))
        except Exception as exc:  # the store, whatever it is: never the run's end
            logger.warning("job %s: deliveries unreadable (%s); polling it", entry.job_id, exc)
            event = None
        indexes = sorted(r.index for r in event.results) if event is not None else []
        if (
            event is None
            or event.event != "job.completed"
            or indexes != list(range(len(entry.items)))
        ):
            self._results_room.release()
            return None
        await self._free_slot_of(entry)
        return Finished(entry, COMPLETED, results=event, status=event)

    async def _free_slot_of(self, entry: Entry) -> None:
        """Give back the slot of ``entry``'s job, once."""
        self._look_at.pop(entry.entry_id, None)  # its looks are over
        if entry.entry_id not in self._slot_freed_for:
            self._slot_freed_for.add(entry.entry_id)
            await self._release_slot()

    async def _look(self, entry: Entry, not_found: int) -> Finished | Job:
        """Look at a job once: how it ended, or the status it is in."""
        job_id = str(entry.job_id)
        try:
            status = await self.client.get_job(job_id)
        except JobNotFoundError as exc:
            age = self.wall_clock() - entry.submitted_at
            if not_found >= 1 and age >= self.settings.vanish_grace_seconds:
                return Finished(entry, VANISHED, error=str(exc))
            raise
        if status.status is JobStatus.FAILED:
            reason = status.error.message if status.error else "failed"
            return Finished(entry, FAILED, status=status, error=reason)
        if status.status is JobStatus.COMPLETED:
            # A completed job no longer counts against the plan's concurrent jobs: its
            # slot goes to the next submit while the results are fetched.
            await self._free_slot_of(entry)
            return await self._fetch_results(entry, status)
        if self.wall_clock() - entry.submitted_at > self.settings.job_timeout_seconds:
            return Finished(entry, TIMED_OUT, status=status, error="job did not finish in time")
        return status

    async def _fetch_results(self, entry: Entry, status: Job) -> Finished | Job:
        """A completed job's results, fetched once the run has room for them."""
        if not await self._room_for_results():
            return status  # the run is ending: the job is carried over
        kept = False
        try:
            results = await self.client.get_results(str(entry.job_id))
            kept = True  # held until the run takes it (see _taken)
            return Finished(entry, COMPLETED, results=results, status=status)
        except NotReadyError:
            return status  # completed, results not served yet: look again soon
        except JobNotFoundError as exc:
            return Finished(entry, VANISHED, status=status, error=str(exc))
        except ResultsExpiredError as exc:
            return Finished(entry, EXPIRED, status=status, error=str(exc))
        finally:
            if not kept:
                self._results_room.release()

    async def _room_for_results(self) -> bool:
        while self.remaining > 0 and self.stop_error is None:
            try:
                await asyncio.wait_for(
                    self._results_room.acquire(), min(self.remaining, _STOP_CHECK_SECONDS)
                )
                return True
            except asyncio.TimeoutError:
                continue
        return False

    def _taken(self, fin: Finished) -> Finished:
        """``fin`` handed to the run: its results no longer count as held here."""
        if fin.results is not None:
            self._results_room.release()
        return fin

    def is_due(self, entry: Entry) -> bool:
        """False while a job is resting after answers the contract does not know."""
        if not entry.deferrals:
            return True
        rest = min(6 * 3600.0, self.settings.defer_base_seconds * 2.0 ** (entry.deferrals - 1))
        return self.wall_clock() >= entry.last_deferred_at + rest

    async def next_finished(self) -> Finished | None:
        """Wait for the next finished job; None once nothing more can finish this run."""
        while True:
            if not self.finished.empty():
                return self._taken(self.finished.get_nowait())
            self._raise_poller_crash()
            if not self.in_flight or self.stop_error is not None:
                return None
            getter = asyncio.ensure_future(self.finished.get())
            # Only pollers still running: a finished one would end the wait at once, and
            # the loop would spin until the next job finishes.
            running = {t for t in self._pollers.values() if not t.done()}
            done, _ = await asyncio.wait({getter, *running}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return self._taken(getter.result())
            getter.cancel()

    def _hand_over(self, fin: Finished) -> None:
        self.finished.put_nowait(fin)
        self._news.set()

    async def wait_for_work(self) -> None:
        """Wait until a slot is free or a finished job waits (or nothing more may be sent).

        Waiting for one of them, not for a slot alone: a job whose results arrive while
        the run waits for a slot is turned into rows meanwhile.
        """
        while self.can_submit and not (self.has_ready or self.has_free_slot):
            self._raise_poller_crash()
            self._news.clear()
            try:
                await asyncio.wait_for(
                    self._news.wait(), timeout=min(self.remaining, _STOP_CHECK_SECONDS)
                )
            except asyncio.TimeoutError:
                continue

    def looks_coming(self, seconds: float) -> bool:
        """True when a poller waits for its time to look, and that is within ``seconds``."""
        now = self.clock()
        return any(now < at <= now + seconds for at in self._look_at.values())

    async def let_looks_in(self, seconds: float) -> None:
        """Let the looks coming within ``seconds`` happen first, until one frees a slot.

        For a run about to do work that holds the event loop for ``seconds`` (turning
        results into rows, reading input): a look due meanwhile would come late, and so
        would the submit into the slot it frees. A round's jobs end together, so its
        last slots would start a little later every round. Only pollers waiting for
        their time count: a look already due is under way. Waits ``seconds`` (and a
        round trip) at most, in real time; a stop request ends it within half a second.
        """
        if not self.looks_coming(seconds):
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds + _LOOK_ROUND_TRIP
        while self.can_submit and not self.has_free_slot and (left := end - loop.time()) > 0:
            self._news.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._news.wait(), timeout=min(left, _STOP_CHECK_SECONDS))
            now = self.clock()
            if not any(at <= now + seconds for at in self._look_at.values()):
                return  # the looks came and freed nothing: their jobs still run

    def _raise_poller_crash(self) -> None:
        """Re-raise a bug in a poll task instead of silently carrying its job over."""
        for task in self._pollers.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    @property
    def has_free_slot(self) -> bool:
        """True when a submit would not wait for a slot."""
        return self.can_submit and self._active < self.settings.concurrent_jobs

    @property
    def waiting(self) -> int:
        """Jobs not yet handed to the run: running, or done with results to fetch or take."""
        return self._polling + self.finished.qsize()

    def quiet_for(self) -> float:
        """Seconds until the next job should end, by its estimate: nothing comes before.

        0 when a job is due, has no estimate (carried over: it may end any moment), or
        has ended with its results still to fetch. Infinite when no job is polled.
        """
        now, soonest = self.clock(), math.inf
        for entry_id, pacer in self._pacers.items():
            if entry_id in self._slot_freed_for:
                return 0.0
            soonest = min(soonest, pacer.expected_end(now) - now)
        return soonest

    @property
    def has_ready(self) -> bool:
        """True when a finished job waits to be settled."""
        return not self.finished.empty()

    def take_ready(self) -> Finished:
        """The next finished job (only when :attr:`has_ready`)."""
        return self._taken(self.finished.get_nowait())

    def drain_ready(self) -> list[Finished]:
        """Finished jobs already waiting, without blocking."""
        ready = []
        while not self.finished.empty():
            ready.append(self._taken(self.finished.get_nowait()))
        return ready


def _unix(moment: datetime) -> float:
    """Unix seconds of an API timestamp (one without a zone is UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@dataclass
class _Pacer:
    """When to look at one job next: from its estimate, its progress and its age.

    All times are the scheduler's ``clock``. The first look comes halfway through the
    submit answer's estimate (at once for a carried-over job, which has none, and for an
    estimate of 0): a job whose estimate is right is seen processing there, and its
    progress tells when it ends. A job reporting progress (``processed_records`` while
    ``processing``) is looked at next when that progress, extrapolated linearly from
    ``started_at``, says it ends, a little after (see :meth:`_time_left`); a prediction is
    trusted up to twice the job's age at a time, so a rate read early (or an API counting
    in big steps) is read again before it can make the look late. Without progress, the
    next look is at the estimate's end if still ahead, else after half the job's age
    (never more than ``poll_max_seconds``). No two looks are closer than
    ``poll_min_seconds`` or 5% of the job's age, so a job whose progress stalls (or that
    stays ``processing`` at ``total_records``) costs few calls.

    The sandbox and a fake with noisy, queued or wrong estimates (``benchmarks/
    measure_polling.py``) show 2 looks a job when the estimate is right, 3 when it is 3x
    too low, and the end seen within ~1% of the job's duration.

    Attributes:
        settings: The run's settings.
        rng: Randomness of the jitter.
        born: When the job was created, as best known.
        estimate: Seconds from ``born`` to its end per the submit answer, or None.
        timeout_at: When the job times out: it is looked at then, whatever the prediction.
    """

    settings: SchedulerSettings
    rng: random.Random
    born: float
    estimate: float | None
    timeout_at: float
    _first_progress: tuple[float, int] | None = None
    _retries: int = 0

    def expected_end(self, now: float) -> float:
        """When the job should end per its estimate (``now`` for a carried-over job)."""
        return now if self.estimate is None else max(now, self.born + self.estimate)

    def first_wait(self, now: float) -> float:
        """How long to wait before the first look.

        An estimate of 0 (an instant job) means looking at once: one call. A job that
        times out sooner is looked at when it does.
        """
        if self.estimate is None:
            return 0.0
        first = min(self.born + _FIRST_LOOK_SHARE * self.estimate, self.timeout_at)
        return max(0.0, first - now)

    def retry_wait(self) -> float:
        """How long to wait after a look that told nothing (404, no answer, no results yet).

        Doubles from ``poll_min_seconds`` per such look in a row, up to ``poll_max_seconds``.
        """
        self._retries += 1
        base = self.settings.poll_min_seconds * 2.0**self._retries
        return self._jitter(min(self.settings.poll_max_seconds, base))

    def next_wait(self, job: Job, seen_at: float, now: float, wall_offset: float) -> float:
        """How long to wait after seeing ``job`` unfinished.

        Args:
            job: The status seen (``completed`` when its results were not served yet).
            seen_at: When the server answered (between asking and the answer).
            now: The clock now.
            wall_offset: ``wall_clock() - clock()``: maps the clock to unix seconds.

        Returns:
            Seconds to wait.
        """
        if job.status is JobStatus.COMPLETED:
            return self.retry_wait()
        self._retries = 0
        settings = self.settings
        age = max(0.0, now - self.born)
        left = self._time_left(job, seen_at, wall_offset)
        if left is not None:
            wait = min(left - (now - seen_at), 2.0 * age)
        elif self.estimate is not None and now < self.born + self.estimate:
            wait = self.born + self.estimate - now
        else:
            wait = min(settings.poll_max_seconds, _AGE_SHARE * age)
        wait = max(wait, settings.poll_min_seconds, _MIN_AGE_SHARE * age)
        # Never look later than when the job times out (plus a hair: then it has).
        wait = min(wait, max(0.0, self.timeout_at - now) + settings.poll_min_seconds)
        return self._jitter(wait)

    def _time_left(self, job: Job, seen_at: float, wall_offset: float) -> float | None:
        """Seconds from ``seen_at`` to when to look again, by the job's progress; or None.

        ``processed_records`` is taken as a whole count rounded down: with linear progress
        the job ends between ``elapsed * total / (processed + 1)`` and ``elapsed * total /
        processed`` (processing time). The look comes a little after the latest end, so
        it sees the job done, but no later than 8% after the earliest: when the count is
        too small to tell (just started), a look sooner reads a better one.
        """
        total, done = job.total_records, job.processed_records
        if job.status is not JobStatus.PROCESSING or done is None or not 0 < done <= total:
            return None
        if self._first_progress is None:
            self._first_progress = (seen_at, done)
        started = self._started(job, wall_offset)
        if started is not None and seen_at > started:
            elapsed = seen_at - started
            latest_left = elapsed * (total - done) / done
            earliest_end = elapsed * total / (done + 1)  # processing time, from started
            soonest = earliest_end * (1.0 + _SPREAD_SHARE) - elapsed
            late = max(latest_left * _LATE_SHARE, _LATE_MIN_SECONDS)
            return max(0.0, min(latest_left + late, soonest))
        # No start time: the rate between the first look that saw progress and this one.
        first_at, first_done = self._first_progress
        if done > first_done and seen_at > first_at:
            latest_left = (seen_at - first_at) * (total - done) / (done - first_done)
            return latest_left + max(latest_left * _LATE_SHARE, _LATE_MIN_SECONDS)
        return None

    def _started(self, job: Job, wall_offset: float) -> float | None:
        """When processing started, on the clock."""
        if job.started_at is None:
            return None
        started = _unix(job.started_at)
        if job.created_at is not None:
            # Two server times against each other, the job's birth on our clock: this
            # holds whatever the skew between the server's clock and ours.
            return self.born + (started - _unix(job.created_at))
        return started - wall_offset

    def _jitter(self, wait: float) -> float:
        return wait * self.rng.uniform(1.0, 1.0 + _JITTER)
