"""One enrichment run: reconcile, collect carried-over jobs, read input, submit, collect.

:class:`EnrichmentRun` is the body of the dlt resource. It is a plain (sync) generator
that drives an asyncio loop step by step, so dlt's extract thread owns the generator,
dlt state and the load package, while many jobs are polled concurrently whenever the
loop runs (``_await``).

Order of a run, and why:

1. Reconcile the journal with dlt state and the destination: jobs fetched into a load
   package that completed are forgotten; those whose package never completed are polled
   again; jobs only dlt state knows (the journal was lost) are adopted.
2. Collect every carried-over job before submitting anything new, so no key can be in
   flight twice and every key's last outcome is known before deciding what to send.
   Then resubmit what a crashed run's lost submits carried (counted as ``lost``).
3. Read the input in chunks; reject what cannot be sent; skip keys with a fresh outcome;
   batch the rest by unique key and submit as slots free up, yielding results as they
   come in.
4. Wait for the jobs until the wait budget ends; the rest carry over (journal + state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from typing import Any, TypeVar

import dlt

from apione_source import ledger
from apione_source.client import AsyncApiOneClient
from apione_source.history import (
    KeyState,
    KnownKeys,
    confirmed_loads,
    load_known_keys,
    rejected_pks,
)
from apione_source.journal import FETCHED, IN_FLIGHT, BatchItem, Journal, JournalJob, LostSubmit
from apione_source.models import EnrichmentType, RecordResult
from apione_source.normalize import Normalized, normalize_record
from apione_source.reader import InputReader, InputRow
from apione_source.scheduler import (
    COMPLETED,
    EXPIRED,
    REJECTED,
    Finished,
    JobScheduler,
    SchedulerSettings,
)
from apione_source.tables import FINAL_STATUSES, TableNames, enrichment_row, utc_from_timestamp

logger = logging.getLogger("apione_source")

_T = TypeVar("_T")

NULL_PK = "<NULL>"  # rejected-table key of rows whose primary key is NULL


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs besides the client (resolved from dlt config by the source).

    Attributes:
        enrichment_type: What to enrich.
        resource_name: Name of the dlt resource (names the journal and the state).
        names: Table names.
        scheduler: Limits and timing of jobs.
        ttl_matched: How long a matched (or invalid) outcome stays fresh.
        ttl_not_found: How long a not_found (or error) outcome stays fresh.
        max_records_per_run: Cap on records submitted in one run (None: no cap).
        max_attempts: Attempts per record before it is recorded as ``error``.
        retention_seconds: How long ApiOne keeps results (warns about old carried jobs).
        scd2: The enrichment table keeps history (rows carry a version hash).
    """

    enrichment_type: EnrichmentType
    resource_name: str
    names: TableNames
    scheduler: SchedulerSettings
    ttl_matched: timedelta
    ttl_not_found: timedelta
    max_records_per_run: int | None
    max_attempts: int
    retention_seconds: float
    scd2: bool = False


@dataclass
class RunStats:
    """Counters of one run, logged as progress and at the end."""

    rows_read: int = 0
    rejected: int = 0
    reused: int = 0
    jobs_submitted: int = 0
    records_submitted: int = 0
    jobs_done: int = 0
    records_collected: int = 0
    resubmitted: int = 0
    expired: int = 0
    lost_answers: int = 0

    def line(self, running: int) -> str:
        """One progress line."""
        return (
            f"jobs submitted {self.jobs_submitted} running {running} done {self.jobs_done} | "
            f"records submitted {self.records_submitted} collected {self.records_collected} "
            f"resubmitted {self.resubmitted} | "
            f"rows read {self.rows_read} rejected {self.rejected} already known {self.reused}"
        )


@dataclass
class _Pending:
    """Unique keys waiting to be submitted, in arrival order."""

    items: dict[str, BatchItem] = field(default_factory=dict)

    def add(self, item: BatchItem) -> None:
        known = self.items.get(item.key)
        if known is None:
            self.items[item.key] = item
        else:
            seen = set(known.pks)
            known.pks.extend(p for p in item.pks if p not in seen)

    def take(self, n: int) -> list[BatchItem]:
        return [self.items.pop(k) for k in list(islice(self.items, n))]

    def min_cursor(self) -> Any:
        cursors = [i.cursor for i in self.items.values() if i.cursor is not None]
        return min(cursors) if cursors else None


class EnrichmentRun:
    """The resource body for one pipeline run; iterate it to get table items."""

    def __init__(
        self,
        settings: RunSettings,
        client: AsyncApiOneClient,
        reader: InputReader,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Prepare a run; nothing happens until it is iterated inside a dlt extract."""
        self.s = settings
        self.client = client
        self.reader = reader
        self.clock, self.wall_clock, self.sleep = clock, wall_clock, sleep
        self.stats = RunStats()
        self.known = KnownKeys()
        self.pending = _Pending()
        self.handled: list[str] = []  # job ids whose outcomes went into this package
        self.wrote_outcomes = False
        self.rejected_before: set[str] = set()

    # --- helpers ----------------------------------------------------------------------

    def _await(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def _now(self) -> datetime:
        return utc_from_timestamp(self.wall_clock())

    def _table(self, name: str, rows: list[dict[str, Any]]) -> Any:
        return dlt.mark.with_table_name(rows, name)

    def _progress(self) -> None:
        self._sync_stats()
        logger.info("progress: %s", self.stats.line(len(self.sched.in_flight)))

    def _sync_stats(self) -> None:
        c = self.sched.counters
        self.stats.jobs_submitted = c.submitted_jobs
        self.stats.records_submitted = c.submitted_records
        self.stats.lost_answers = self._lost_from_journal + c.lost_answers

    def _cap_left(self) -> int:
        cap = self.s.max_records_per_run
        if cap is None:
            return 1 << 62
        return max(0, cap - self.sched.counters.submitted_records)

    # --- the run ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        pipeline = dlt.current.pipeline()
        if pipeline.dev_mode:
            logger.warning(
                "dev_mode gives every run a new dataset: nothing loaded before is seen, so "
                "every record is enriched (and paid for) again"
            )
        self.load_id: str = dlt.current.load_package_state()["load_id"]
        self.state: dict[str, Any] = dlt.current.resource_state()
        journal = Journal(
            Journal.path_for(pipeline.pipelines_dir, pipeline.pipeline_name, self.s.resource_name)
        )
        self.loop = asyncio.new_event_loop()
        self.sched = JobScheduler(
            self.client,
            journal,
            self.s.enrichment_type.value,
            self.s.scheduler,
            self.load_id,
            clock=self.clock,
            wall_clock=self.wall_clock,
            sleep=self.sleep,
        )
        self._lost_from_journal = 0
        try:
            yield from self._run(pipeline, journal)
        finally:
            try:
                self._await(self.sched.close())
                self._await(self.client.aclose())
            finally:
                self.loop.close()
                journal.close()

    def _run(self, pipeline: dlt.Pipeline, journal: Journal) -> Iterator[Any]:
        self._reconcile(pipeline, journal)
        # 2. collect carried-over jobs first
        carried = journal.jobs(IN_FLIGHT)
        self._warn_about_old(carried)
        self._await(self.sched.track(carried))
        if carried:
            logger.info("collecting %d job(s) carried over from earlier runs", len(carried))
        yield from self._collect()
        lost = journal.lost_submits()
        yield from self._resubmit_lost(lost)
        if self.sched.in_flight:
            logger.warning(
                "%d carried-over job(s) still running; submitting nothing new this run",
                len(self.sched.in_flight),
            )
        elif self.sched.remaining <= 0:
            logger.warning("the wait budget went on carried-over jobs; nothing new this run")
        elif not self.sched.stop_error:
            # 3. read, submit, collect
            yield from self._read_and_submit(pipeline)
        # 4. wait for everything still running, resubmitting retries while budget lasts
        while True:
            self._submit_pending(self._cap_left())
            fin = self._await(self.sched.next_finished())
            if fin is None:
                break
            yield from self._handle(fin)
        yield from self._finish(journal, lost)

    def _reconcile(self, pipeline: dlt.Pipeline, journal: Journal) -> None:
        self.state.pop("stop_error", None)
        fetched = journal.jobs(FETCHED)
        done = confirmed_loads(pipeline, sorted({j.load_id for j in fetched if j.load_id}))
        journal.forget([j.job_id for j in fetched if j.load_id in done])
        journal.reopen([j.job_id for j in fetched if j.load_id not in done])
        for job_id, meta in self.state.get("jobs", {}).items():
            journal.adopt(
                JournalJob(
                    job_id=job_id,
                    type=meta["type"],
                    state=IN_FLIGHT,
                    attempt=meta["attempt"],
                    record_count=meta["records"],
                    submitted_at=meta["submitted_at"],
                    run_id=meta["load_id"],
                    items=None,
                )
            )

    def _warn_about_old(self, carried: list[JournalJob]) -> None:
        old = [
            j.job_id
            for j in carried
            if self.wall_clock() - j.submitted_at > self.s.retention_seconds / 2
        ]
        if old:
            logger.warning(
                "%d carried-over job(s) are older than half the plan's result retention; "
                "run more often or their results expire and are paid for again",
                len(old),
            )

    def _collect(self) -> Iterator[Any]:
        while (fin := self._await(self.sched.next_finished())) is not None:
            yield from self._handle(fin)

    def _resubmit_lost(self, lost: list[LostSubmit]) -> Iterator[Any]:
        """Report submits a crashed run never heard back from, and resend their records.

        Runs after carried-over jobs are collected: a record whose resend already made it
        into a job (collected or still running) is not sent a third time.
        """
        for submit in lost:
            self._lost_from_journal += 1
            row = ledger.lost_job_row(submit.intent_id, submit.items, submit.type, self.load_id)
            yield self._table(self.s.names.jobs, [row])
            for item in submit.items:
                if item.key not in self.known.keys and item.key not in self.sched.in_flight_items:
                    self.pending.add(item)

    def _submit_pending(self, limit: int) -> bool:
        """Submit up to ``limit`` pending records; False when nothing more can go this run."""
        sched = self.sched
        if sched.remaining <= 0 or sched.stop_error or sched.submits_paused:
            return False
        n = min(limit, self._cap_left())
        if n <= 0:
            return False
        if not self.pending.items:
            return True
        unsent = self._await(sched.submit(self.pending.take(n)))
        for item in unsent:
            self.pending.add(item)
        self._sync_stats()
        return not unsent

    # --- 3. reading and submitting ------------------------------------------------------

    def _read_and_submit(self, pipeline: dlt.Pipeline) -> Iterator[Any]:
        collected_now = dict(self.known.keys)
        self.known = load_known_keys(
            pipeline, self.s.names, must_exist=bool(self.state.get("has_history"))
        )
        self.known.keys.update(collected_now)  # what this run already collected wins
        self.rejected_before = rejected_pks(pipeline, self.s.names)
        now = self._now()
        cursor_mode = self.reader.spec.cursor_column is not None
        last_cursor = self.state.get("cursor") if cursor_mode else None
        stopped = False
        for chunk in self.reader.rows(last_cursor):
            rejected: list[dict[str, Any]] = []
            reused: list[dict[str, Any]] = []
            for row in chunk:
                self.stats.rows_read += 1
                if self._classify(row, now, rejected, reused) == "cap":
                    stopped = True
                    break
                if row.cursor is not None and (last_cursor is None or row.cursor > last_cursor):
                    last_cursor = row.cursor
            if rejected:
                yield self._table(self.s.names.rejected, rejected)
            if reused:
                yield self._table(self.s.names.outcomes, reused)
                self.wrote_outcomes = True
            per_job = self.sched.records_per_job
            while not stopped and len(self.pending.items) >= per_job:
                stopped = not self._submit_pending(per_job)
                for fin in self.sched.drain_ready():
                    yield from self._handle(fin)
            self._progress()
            if stopped or self.sched.remaining <= 0:
                stopped = True
                break
        if cursor_mode and not stopped:
            # With a cursor only changed rows are read: stale keys come from the history.
            for key, ks in self.known.stale(now, self.s.ttl_matched, self.s.ttl_not_found):
                if ks.input and key not in self.sched.in_flight_items:
                    self.pending.add(BatchItem(key, dict(ks.input), sorted(ks.pks), ks.retries + 1))
        if cursor_mode:
            # _finish moves it back to the first row whose key stays unsent.
            self.state["cursor"] = last_cursor

    def _classify(
        self,
        row: InputRow,
        now: datetime,
        rejected: list[dict[str, Any]],
        reused: list[dict[str, Any]],
    ) -> str:
        """Decide what one input row needs. Each primary key is read once per run."""
        if row.pk is None:
            self.stats.rejected += 1
            detail = "the primary key column is NULL: the row cannot be traced"
            rejected.append(
                ledger.rejected_row(NULL_PK, "null_primary_key", detail, now, self.load_id)
            )
            return "rejected"
        norm = normalize_record(self.s.enrichment_type, row.values)
        if not isinstance(norm, Normalized):
            self.stats.rejected += 1
            rejected.append(
                ledger.rejected_row(row.pk, norm.reason, norm.detail, now, self.load_id)
            )
            return "rejected"
        if row.pk in self.rejected_before:
            self.rejected_before.discard(row.pk)
            rejected.append(ledger.fixed_rejection_row(row.pk, now, self.load_id))
        key = norm.key
        if key in self.pending.items:
            self.pending.items[key].pks.append(row.pk)
            return "pending"
        in_flight = self.sched.in_flight_items.get(key)
        if in_flight is not None:
            in_flight.pks.append(row.pk)  # its outcome comes with the job's
            return "in_flight"
        ks = self.known.keys.get(key)
        if ks is not None and self.known.is_fresh(
            key, now, self.s.ttl_matched, self.s.ttl_not_found
        ):
            if row.pk not in ks.pks:
                # A new row for a key already enriched: trace it, pay nothing.
                ks.pks.add(row.pk)
                self.stats.reused += 1
                reused.append(
                    ledger.outcome_row(
                        key,
                        row.pk,
                        ks.job_id,
                        0,
                        ks.status,
                        None,
                        ks.input,
                        ks.finished_at,
                        self.load_id,
                    )
                )
            return "fresh"
        cap = self.s.max_records_per_run
        if (
            cap is not None
            and self.sched.counters.submitted_records + len(self.pending.items) >= cap
        ):
            return "cap"
        attempt = ks.retries + 1 if ks is not None and ks.status not in FINAL_STATUSES else 1
        self.pending.add(BatchItem(key, norm.record, [row.pk], attempt, cursor=row.cursor))
        return "new"

    # --- handling finished jobs --------------------------------------------------------

    def _items_of(self, fin: Finished) -> list[BatchItem]:
        if fin.job.items is not None:
            return fin.job.items
        if fin.results is None:
            logger.warning(
                "job %s (%s) was known only from dlt state, without its records: they "
                "are not resubmitted now; a full input scan finds them again",
                fin.job.job_id,
                fin.kind,
            )
            return []
        # A job adopted from dlt state: rebuild the keys from the echoed inputs.
        items = []
        for r in fin.results.results:
            norm = normalize_record(self.s.enrichment_type, r.input)
            key = (
                norm.key if isinstance(norm, Normalized) else f"invalid:{fin.job.job_id}:{r.index}"
            )
            items.append(BatchItem(key, r.input, [], fin.job.attempt))
        return items

    def _results_match(
        self, job_id: str, items: list[BatchItem], results: list[RecordResult]
    ) -> bool:
        """True if ``results`` answer ``items`` one for one; else say why, loudly."""
        problem = None
        if sorted(r.index for r in results) != list(range(len(items))):
            problem = f"result indexes are not 0..{len(items) - 1}"
        else:
            for item, result in zip(items, _by_index(results), strict=True):
                if result.input == item.record:
                    continue  # the usual case: echoed exactly as sent
                echoed = normalize_record(self.s.enrichment_type, result.input)
                if not isinstance(echoed, Normalized) or echoed.key != item.key:
                    problem = f"result {result.index} echoes another input than was sent"
                    break
        if problem:
            logger.error("job %s: %s; it stays in the ledger for the next run", job_id, problem)
        return problem is None

    def _handle(self, fin: Finished) -> Iterator[Any]:
        job = fin.job
        now = self._now()
        items = self._items_of(fin)
        outcomes: list[dict[str, Any]] = []
        enriched: list[dict[str, Any]] = []
        counts = {"matched": 0, "not_found": 0, "invalid": 0, "error": 0}
        if fin.kind == COMPLETED and fin.results is not None:
            results = fin.results.results
            if not self._results_match(job.job_id, items, results):
                return  # not handled: the journal keeps it in flight
            for item, result in zip(items, _by_index(results), strict=True):
                status = result.status.value
                counts[status] += 1
                err = result.error.message if result.error else None
                outcomes.extend(
                    ledger.outcome_rows(item, job.job_id, status, err, now, self.load_id)
                )
                if status == "matched":
                    enriched.append(
                        enrichment_row(item.key, job.job_id, now, result, version_hash=self.s.scd2)
                    )
                self.known.keys[item.key] = KeyState(
                    status, now, job.job_id, item.record, set(item.pks)
                )
            self.stats.records_collected += len(results)
        else:
            if fin.kind == EXPIRED:
                self.stats.expired += len(items)
                logger.warning(
                    "results of job %s expired before they were collected; resubmitting %d "
                    "records (this costs credits)",
                    job.job_id,
                    len(items),
                )
            for item in items:
                if fin.kind != REJECTED and item.attempt < self.s.max_attempts:
                    status, err = fin.kind, fin.error
                    self.pending.add(BatchItem(item.key, item.record, item.pks, item.attempt + 1))
                    self.stats.resubmitted += 1
                else:
                    status = "error"
                    err = f"{fin.kind} after {item.attempt} attempt(s): {fin.error}"
                    counts["error"] += 1
                    self.known.keys[item.key] = KeyState(
                        status, now, job.job_id, item.record, set(item.pks)
                    )
                outcomes.extend(
                    ledger.outcome_rows(item, job.job_id, status, err, now, self.load_id)
                )
        self.stats.jobs_done += 1
        self.handled.append(job.job_id)
        if enriched:
            yield self._table(self.s.names.enrichment, enriched)
        if outcomes:
            yield self._table(self.s.names.outcomes, outcomes)
            self.wrote_outcomes = True
        yield self._table(self.s.names.jobs, [ledger.finished_job_row(fin, counts, self.load_id)])

    # --- end of run -------------------------------------------------------------------

    def _finish(self, journal: Journal, lost: list[LostSubmit]) -> Iterator[Any]:
        sched = self.sched
        etype = self.s.enrichment_type.value
        for answer in sched.lost:
            row = ledger.lost_job_row(answer.intent_id, answer.items, etype, self.load_id)
            yield self._table(self.s.names.jobs, [row])
        still_running = journal.jobs(IN_FLIGHT)
        if still_running:
            yield self._table(
                self.s.names.jobs,
                [ledger.in_flight_job_row(j, self.load_id) for j in still_running],
            )
        # Everything below commits with this extract (dlt state) or must match it
        # (journal): no yield after this point.
        journal.mark_fetched(self.handled, self.load_id)
        unsent = set(self.pending.items)
        lost_submits = [(s.intent_id, s.items) for s in lost]
        lost_submits += [(a.intent_id, a.items) for a in sched.lost]
        journal.forget(
            intent_ids=[
                intent_id
                for intent_id, items in lost_submits
                if not any(i.key in unsent for i in items)  # else report it again next run
            ]
        )
        for job in sched.polled_jobs():
            if job.job_id not in self.handled:
                journal.update_items(job)  # rows that joined it late must get their outcome
        # dlt state mirrors the in-flight jobs (metadata only): it survives a lost journal
        # because it travels with the load package to the destination.
        self.state["jobs"] = {
            j.job_id: {
                "type": j.type,
                "attempt": j.attempt,
                "records": j.record_count,
                "submitted_at": j.submitted_at,
                "load_id": j.run_id,
            }
            for j in journal.jobs(IN_FLIGHT)
        }
        unsent_cursor = self.pending.min_cursor()
        if unsent_cursor is not None and self.state.get("cursor") is not None:
            self.state["cursor"] = min(self.state["cursor"], unsent_cursor)
        if self.wrote_outcomes:
            self.state["has_history"] = True
        if sched.stop_error is not None:
            # The extract finishes so everything collected is loaded; run_enrichment
            # raises this after the load.
            logger.error("run stopped: %s", sched.stop_error)
            self.state["stop_error"] = {
                "type": type(sched.stop_error).__name__,
                "message": sched.stop_error.message,
            }
        self._sync_stats()
        logger.info("run finished: %s", self.stats.line(len(self.state["jobs"])))
        if self.stats.lost_answers or self.stats.expired:
            # The two ways a record can be paid twice: say so where operators look.
            logger.warning(
                "this run resubmitted %d batch(es) whose submit answer was lost and %d "
                "record(s) whose results expired; see %s (status lost) and %s (status "
                "expired)",
                self.stats.lost_answers,
                self.stats.expired,
                self.s.names.jobs,
                self.s.names.outcomes,
            )


def _by_index(results: list[RecordResult]) -> list[RecordResult]:
    return sorted(results, key=lambda r: r.index)
