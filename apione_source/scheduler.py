"""Packs records into ApiOne jobs within the plan's limits and polls them to completion.

One :class:`JobScheduler` serves one run. It never has more jobs in flight than the plan
allows (a slot count, plus waiting out 429 ``concurrent_job_limit`` when another process
shares the key), shrinks batches on 413, polls every job concurrently through the async
client (first look at about the server's estimate, then capped exponential backoff with
jitter), and stops at the run's wait budget: jobs still running then are left to the next
run, which finds them in the journal. Every submit goes through the journal first, see
:mod:`apione_source.journal`.

Clock, sleep and randomness are injected so the hard cases are testable without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from apione_source.client import AsyncApiOneClient
from apione_source.errors import (
    ApiOneError,
    BadRequestError,
    JobNotFoundError,
    NotReadyError,
    ResultsExpiredError,
    RetryableError,
    ShrinkBatchError,
    StopRunError,
    SubmitOutcomeUnknownError,
    WaitForCapacityError,
)
from apione_source.journal import IN_FLIGHT, BatchItem, Journal, JournalJob
from apione_source.models import Job, JobResults, JobStatus

logger = logging.getLogger(__name__)

# Finished.kind values
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
TIMED_OUT = "timed_out"
VANISHED = "vanished"
REJECTED = "rejected"  # ApiOne refused the batch (e.g. 400): recorded, not retried

_MAX_LOST_STREAK = 3


@dataclass(frozen=True)
class SchedulerSettings:
    """Limits and timing of one run.

    Attributes:
        records_per_job: Most records in one job (the plan's, or lower).
        concurrent_jobs: Most jobs queued or processing at once.
        wait_budget_seconds: How long the run may wait for jobs; the rest carry over.
        job_timeout_seconds: A job older than this is given up and its records resubmitted.
        poll_min_seconds: Shortest pause between two looks at one job.
        poll_max_seconds: Longest pause between two looks at one job.
        webhook_url: Passed to ApiOne with every submit, if set.
    """

    records_per_job: int
    concurrent_jobs: int
    wait_budget_seconds: float
    job_timeout_seconds: float = 6 * 3600
    poll_min_seconds: float = 0.05
    poll_max_seconds: float = 60.0
    webhook_url: str | None = None


@dataclass
class Finished:
    """A job that reached an end this run.

    Attributes:
        job: The journal's record of the job.
        kind: completed, failed, expired, timed_out or vanished.
        results: The results, when completed.
        status: The last status seen, when any.
        error: Why it did not complete, when it did not.
    """

    job: JournalJob
    kind: str
    results: JobResults | None = None
    status: Job | None = None
    error: str | None = None


@dataclass
class LostAnswer:
    """A submit that may have created a job we will never hear of (counted, resubmitted)."""

    intent_id: str
    items: list[BatchItem]
    error: str


@dataclass
class _Counters:
    submitted_jobs: int = 0
    submitted_records: int = 0
    lost_answers: int = 0
    capacity_waits: int = 0


@dataclass
class JobScheduler:
    """Submits batches and polls jobs for one run; :meth:`close` when done."""

    client: AsyncApiOneClient
    journal: Journal
    enrichment_type: str
    settings: SchedulerSettings
    run_id: str
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.deadline = self.clock() + self.settings.wait_budget_seconds
        self.records_per_job = self.settings.records_per_job
        self.finished: asyncio.Queue[Finished] = asyncio.Queue()
        self.lost: list[LostAnswer] = []
        self._lost_streak = 0
        self.submits_paused = False
        # Set when ApiOne answers 401/402: nothing more is sent or polled this run.
        self.stop_error: StopRunError | None = None
        self.counters = _Counters()
        # Jobs of ours queued or processing on the server. Carried-over jobs count too,
        # so a condition, not a semaphore: there may briefly be more than the limit.
        self._active = 0
        self._slot_freed = asyncio.Condition()
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._jobs: dict[str, JournalJob] = {}
        # key -> item of every job being polled, so a late duplicate row joins its job
        self.in_flight_items: dict[str, BatchItem] = {}

    async def close(self) -> None:
        """Stop polling (jobs still running are carried over by the journal)."""
        for task in self._pollers.values():
            task.cancel()
        await asyncio.gather(*self._pollers.values(), return_exceptions=True)

    # --- budget ------------------------------------------------------------------------

    @property
    def remaining(self) -> float:
        """Seconds left of the wait budget."""
        return self.deadline - self.clock()

    @property
    def in_flight(self) -> list[str]:
        """Ids of jobs still being polled."""
        return [j for j, t in self._pollers.items() if not t.done()]

    # --- submitting ----------------------------------------------------------------------

    async def submit(self, items: list[BatchItem]) -> list[BatchItem]:
        """Submit ``items`` as one or more jobs, waiting for free slots.

        Returns:
            The items not submitted because the wait budget ran out, submits were paused
            after lost answers, or the run must stop (empty when everything was sent).
        """
        unsent = list(items)
        while unsent and not self.submits_paused:
            batch = unsent[: self.records_per_job]  # re-read: a 413 may shrink it
            if not await self._acquire_slot():
                return unsent
            try:
                outcome, wait = await self._submit_one(batch)
            except StopRunError as exc:
                await self._release_slot()
                self.stop_error = exc
                return unsent
            if outcome in ("sent", "rejected"):
                del unsent[: len(batch)]
                if outcome == "rejected":
                    await self._release_slot()
                continue
            # shrink, lost (resubmitted: the one accepted double payment) or wait
            await self._release_slot()
            if wait and not await self._wait(wait):
                return unsent
        return unsent

    async def _acquire_slot(self) -> bool:
        remaining = self.remaining
        if remaining <= 0 or self.stop_error is not None:
            return False
        limit = self.settings.concurrent_jobs
        try:
            async with self._slot_freed:
                await asyncio.wait_for(
                    self._slot_freed.wait_for(lambda: self._active < limit), timeout=remaining
                )
                self._active += 1
        except asyncio.TimeoutError:
            return False
        return True

    async def _release_slot(self) -> None:
        async with self._slot_freed:
            self._active -= 1
            self._slot_freed.notify()

    async def _wait(self, seconds: float) -> bool:
        if seconds >= self.remaining:
            return False
        await self.sleep(seconds)
        return True

    async def _submit_one(self, batch: list[BatchItem]) -> tuple[str, float]:
        """Send one batch. Returns what happened and how long to wait before going on."""
        attempt = max(i.attempt for i in batch)
        intent = self.journal.begin_submit(self.enrichment_type, attempt, batch, self.wall_clock())
        try:
            answer = await self.client.submit_job(
                self.enrichment_type, [i.record for i in batch], self.settings.webhook_url
            )
        except SubmitOutcomeUnknownError as exc:
            return self._lost_answer(intent, batch, exc)
        except ApiOneError as exc:
            # ApiOne answered, or the request never left: no job exists.
            self.journal.abandon(intent)
            return self._refused(batch, exc)
        # Anything else (cancellation, KeyboardInterrupt, a bug) may have struck while the
        # request was in the air: the intent stays and the next run reports it as lost.
        job = self.journal.submitted(intent, answer.job_id, self.run_id, self.wall_clock())
        self._lost_streak = 0
        self.counters.submitted_jobs += 1
        self.counters.submitted_records += len(batch)
        self._start_polling(job, first_look=float(answer.estimated_completion_seconds))
        return "sent", 0.0

    def _lost_answer(
        self, intent: str, batch: list[BatchItem], exc: SubmitOutcomeUnknownError
    ) -> tuple[str, float]:
        # The job may exist and be billed; the intent stays in the journal until the
        # ledger row that reports it is written.
        self.counters.lost_answers += 1
        self.lost.append(LostAnswer(intent, batch, str(exc)))
        self._lost_streak += 1
        if self._lost_streak >= _MAX_LOST_STREAK:
            # Every resend may be billed: stop submitting until the next run.
            logger.error(
                "%d submit answers lost in a row; no more submits this run", self._lost_streak
            )
            self.submits_paused = True
            return "lost", 0.0
        logger.warning("submit outcome unknown, resubmitting %d records: %s", len(batch), exc)
        return "lost", self._backoff(self._lost_streak + 3)

    def _refused(self, batch: list[BatchItem], exc: ApiOneError) -> tuple[str, float]:
        if isinstance(exc, StopRunError):
            raise exc
        if isinstance(exc, ShrinkBatchError):
            limit = min(exc.limit or len(batch) // 2, len(batch) - 1)
            if limit < 1:
                return self._reject(batch, exc)
            logger.warning("ApiOne allows %d records per job; shrinking batches", limit)
            self.records_per_job = min(self.records_per_job, limit)
            return "shrink", 0.0
        if isinstance(exc, WaitForCapacityError):
            self.counters.capacity_waits += 1
            return "wait", exc.retry_after or 1.0
        if isinstance(exc, RetryableError):  # the client's own retries ran out
            return "wait", exc.retry_after or self.settings.poll_max_seconds / 4
        return self._reject(batch, exc)

    def _reject(self, batch: list[BatchItem], exc: ApiOneError) -> tuple[str, float]:
        # A 400 (or another refusal) will not go away by retrying: record it per record
        # instead of failing every run on the same batch.
        logger.error("ApiOne refused a batch of %d records: %s", len(batch), exc)
        job = JournalJob(
            job_id=f"rejected_{uuid.uuid4().hex}",
            type=self.enrichment_type,
            state=IN_FLIGHT,
            attempt=max(i.attempt for i in batch),
            record_count=len(batch),
            submitted_at=self.wall_clock(),
            run_id=self.run_id,
            items=batch,
        )
        self.finished.put_nowait(Finished(job, REJECTED, error=str(exc)))
        return "rejected", 0.0

    # --- polling ---------------------------------------------------------------------------

    async def track(self, jobs: list[JournalJob]) -> None:
        """Poll jobs submitted by earlier runs; each occupies a slot until it ends."""
        for job in jobs:
            self._active += 1
            self._start_polling(job, first_look=0.0)

    def polled_jobs(self) -> list[JournalJob]:
        """Every job polled this run, finished or not."""
        return list(self._jobs.values())

    def _start_polling(self, job: JournalJob, first_look: float) -> None:
        self._jobs[job.job_id] = job
        for item in job.items or ():
            self.in_flight_items[item.key] = item
        self._pollers[job.job_id] = asyncio.create_task(self._poll(job, first_look))

    def _backoff(self, looks: int) -> float:
        base = self.settings.poll_min_seconds * 2.0**looks
        capped = min(self.settings.poll_max_seconds, max(self.settings.poll_min_seconds, base))
        return float(capped * self.rng.uniform(0.8, 1.2))

    async def _poll(self, job: JournalJob, first_look: float) -> None:
        delay, looks = first_look, 0
        while True:
            remaining = self.remaining
            if remaining <= 0 or self.stop_error is not None:
                # Carried over. Its slot stays taken: the job still runs on the server.
                return
            if delay > 0:
                await self.sleep(min(delay, remaining))
            looks += 1
            delay = self._backoff(looks)
            try:
                end = await self._look(job)
            except RetryableError as exc:
                logger.info("job %s: status unavailable (%s); looking again later", job.job_id, exc)
                continue
            except StopRunError as exc:
                self.stop_error = exc
                return
            except ApiOneError as exc:
                # A malformed answer or an unexpected refusal: keep the job for the next
                # run, and say so loudly; a human should look at it.
                logger.error("job %s: %s; it stays in the ledger for the next run", job.job_id, exc)
                return
            if end is not None:
                await self._release_slot()
                for item in job.items or ():
                    self.in_flight_items.pop(item.key, None)
                await self.finished.put(end)
                return

    async def _look(self, job: JournalJob) -> Finished | None:
        try:
            status = await self.client.get_job(job.job_id)
        except (JobNotFoundError, BadRequestError) as exc:
            # ApiOne does not know the job (or its id is not one): resubmit its records.
            return Finished(job, VANISHED, error=str(exc))
        if status.status is JobStatus.FAILED:
            reason = status.error.message if status.error else "failed"
            return Finished(job, FAILED, status=status, error=reason)
        if status.status is JobStatus.COMPLETED:
            try:
                results = await self.client.get_results(job.job_id)
            except NotReadyError:
                return None
            except JobNotFoundError as exc:
                return Finished(job, VANISHED, status=status, error=str(exc))
            except ResultsExpiredError as exc:
                return Finished(job, EXPIRED, status=status, error=str(exc))
            return Finished(job, COMPLETED, results=results, status=status)
        if self.wall_clock() - job.submitted_at > self.settings.job_timeout_seconds:
            return Finished(job, TIMED_OUT, status=status, error="job did not finish in time")
        return None

    async def next_finished(self) -> Finished | None:
        """Wait for the next finished job; None once nothing more can finish this run."""
        while True:
            if not self.finished.empty():
                return self.finished.get_nowait()
            self._raise_poller_crash()
            if not self.in_flight or self.stop_error is not None:
                return None
            getter = asyncio.ensure_future(self.finished.get())
            # Only pollers still running: a finished one would end the wait at once, and
            # the loop would spin until the next job finishes.
            running = {t for t in self._pollers.values() if not t.done()}
            done, _ = await asyncio.wait({getter, *running}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            getter.cancel()

    def _raise_poller_crash(self) -> None:
        """Re-raise a bug in a poll task instead of silently carrying its job over."""
        for task in self._pollers.values():
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def drain_ready(self) -> list[Finished]:
        """Finished jobs already waiting, without blocking."""
        ready = []
        while not self.finished.empty():
            ready.append(self.finished.get_nowait())
        return ready
