"""One enrichment run: reconcile, collect carried-over jobs, read input, submit, collect.

:class:`EnrichmentRun` is the body of the dlt resource. It is a plain (sync) generator
that drives an asyncio loop step by step, so dlt's extract thread owns the generator,
dlt state and the load package, while many jobs are polled concurrently whenever the
loop runs (``_await``).

Order of a run, and why:

1. Reconcile the journal with dlt state and the destination: jobs fetched into a load
   package that completed are forgotten; those whose package never completed are polled
   again; jobs only dlt state knows (the working dir was wiped) are adopted.
2. Collect every carried-over job before submitting anything new, so no key can be in
   flight twice and every key's last outcome is known before deciding what to send.
3. Read the input in chunks; reject what cannot be sent; skip keys with a fresh outcome;
   batch the rest by unique key and submit as slots free up, yielding results as they
   come in.
4. Wait for the jobs until the wait budget ends; the rest carry over (journal + state).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

import dlt

from apione_source import ledger
from apione_source.client import AsyncApiOneClient
from apione_source.journal import FETCHED, IN_FLIGHT, BatchItem, Journal, JournalJob
from apione_source.models import EnrichmentType, RecordResult
from apione_source.normalize import Normalized, normalize_record
from apione_source.reader import (
    InputReader,
    InputRow,
    KeyState,
    KnownKeys,
    confirmed_loads,
    load_known_keys,
)
from apione_source.scheduler import (
    COMPLETED,
    EXPIRED,
    Finished,
    JobScheduler,
    SchedulerSettings,
)
from apione_source.tables import (
    FINAL_STATUSES,
    TableNames,
    enrichment_row,
    utc_from_timestamp,
)

logger = logging.getLogger("apione_source")

_T = TypeVar("_T")


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs besides the client (resolved from dlt config by the source).

    Attributes:
        enrichment_type: What to enrich.
        names: Table names.
        scheduler: Limits and timing of jobs.
        ttl_matched: How long a matched (or invalid) outcome stays fresh.
        ttl_not_found: How long a not_found (or error) outcome stays fresh.
        max_records_per_run: Cap on records submitted in one run (None: no cap).
        max_attempts: Attempts per record before it is recorded as ``error``.
    """

    enrichment_type: EnrichmentType
    names: TableNames
    scheduler: SchedulerSettings
    ttl_matched: timedelta
    ttl_not_found: timedelta
    max_records_per_run: int | None
    max_attempts: int


@dataclass
class RunStats:
    """Counters of one run, logged as progress and at the end."""

    rows_read: int = 0
    rejected: int = 0
    reused: int = 0
    jobs_submitted: int = 0
    records_submitted: int = 0
    jobs_done: int = 0
    jobs_carried_over: int = 0
    records_collected: int = 0
    resubmitted: int = 0
    expired: int = 0
    lost_answers: int = 0

    def line(self, running: int) -> str:
        """One progress line."""
        return (
            f"jobs submitted {self.jobs_submitted} running {running} done {self.jobs_done} | "
            f"records submitted {self.records_submitted} collected {self.records_collected} | "
            f"rows read {self.rows_read} rejected {self.rejected}"
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
            known.pks.extend(p for p in item.pks if p not in known.pks)

    def take(self, n: int) -> list[BatchItem]:
        keys = list(self.items)[:n]
        return [self.items.pop(k) for k in keys]

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
        clock: Any = time.monotonic,
        wall_clock: Any = time.time,
        sleep: Any = asyncio.sleep,
    ) -> None:
        """Prepare a run; nothing happens until it is iterated inside a dlt extract."""
        self.s = settings
        self.client = client
        self.reader = reader
        self.clock, self.wall_clock, self.sleep = clock, wall_clock, sleep
        self.stats = RunStats()
        self._lost_from_journal = 0
        self.loop = asyncio.new_event_loop()

    # --- helpers ----------------------------------------------------------------------

    def _await(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def _now(self) -> datetime:
        return utc_from_timestamp(self.wall_clock())

    def _progress(self, sched: JobScheduler) -> None:
        logger.info("progress: %s", self.stats.line(len(sched.in_flight)))

    def _table(self, name: str, rows: list[dict[str, Any]]) -> Any:
        return dlt.mark.with_table_name(rows, name)

    # --- the run ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        pipeline = dlt.current.pipeline()
        self.load_id: str = dlt.current.load_package_state()["load_id"]
        state = dlt.current.resource_state()
        journal = Journal(Journal.path_for(pipeline.pipelines_dir, pipeline.pipeline_name))
        try:
            yield from self._run(pipeline, state, journal)
        finally:
            journal.close()
            self._await(self.client.aclose())
            self.loop.close()

    def _reconcile(self, pipeline: dlt.Pipeline, state: dict[str, Any], journal: Journal) -> None:
        state.pop("stop_error", None)
        fetched = journal.jobs(FETCHED)
        done = confirmed_loads(pipeline, sorted({j.load_id for j in fetched if j.load_id}))
        journal.forget([j.job_id for j in fetched if j.load_id in done])
        journal.reopen([j.job_id for j in fetched if j.load_id not in done])
        for job_id, meta in state.get("jobs", {}).items():
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

    def _run(
        self, pipeline: dlt.Pipeline, state: dict[str, Any], journal: Journal
    ) -> Iterator[Any]:
        self._reconcile(pipeline, state, journal)
        etype = self.s.enrichment_type.value
        sched = JobScheduler(
            self.client,
            journal,
            etype,
            self.s.scheduler,
            self.load_id,
            clock=self.clock,
            wall_clock=self.wall_clock,
            sleep=self.sleep,
        )
        # Keys of jobs being polled: a late duplicate row joins its job instead of a batch.
        self._in_flight_items = sched.in_flight_items
        known = KnownKeys()
        pending = _Pending()
        handled: list[str] = []
        lost_reported: list[str] = []

        for lost in journal.lost_submits():
            # A previous process died with a submit in the air: it may have been billed.
            self._lost_from_journal += 1
            lost_reported.append(lost.intent_id)
            yield self._table(
                self.s.names.jobs,
                [ledger.lost_job_row(lost.intent_id, lost.items, lost.type, self.load_id)],
            )
            for item in lost.items:
                pending.add(item)

        carried = journal.jobs(IN_FLIGHT)
        self._await(sched.track(carried))
        if carried:
            logger.info("collecting %d job(s) carried over from earlier runs", len(carried))

        # 2. collect carried-over jobs first
        while (fin := self._await(sched.next_finished())) is not None:
            yield from self._handle(fin, known, pending, handled)
        if sched.in_flight or sched.remaining <= 0 or sched.stop_error:
            logger.warning(
                "%d carried-over job(s) still running; submitting nothing new this run",
                len(sched.in_flight),
            )
        else:
            yield from self._read_and_submit(pipeline, state, sched, known, pending, handled)

        # 4. wait for everything still running, resubmitting retries while budget lasts
        while True:
            if (
                pending.items
                and sched.remaining > 0
                and self._cap_left(sched) > 0
                and not sched.stop_error
            ):
                unsent = self._await(sched.submit(pending.take(self._cap_left(sched))))
                for item in unsent:
                    pending.add(item)
            fin = self._await(sched.next_finished())
            if fin is None:
                break
            yield from self._handle(fin, known, pending, handled)

        lost_rows = [
            ledger.lost_job_row(lost.intent_id, lost.items, etype, self.load_id)
            for lost in sched.lost
        ]
        if lost_rows:
            yield self._table(self.s.names.jobs, lost_rows)
        self._finish(state, journal, sched, handled, lost_reported)
        unsent_cursor = pending.min_cursor()
        if unsent_cursor is not None and state.get("cursor") is not None:
            state["cursor"] = min(state["cursor"], unsent_cursor)
        if sched.stop_error is not None:
            # Finish the extract so everything collected is loaded; run_enrichment raises
            # this after the load.
            logger.error("run stopped: %s", sched.stop_error)
            state["stop_error"] = {
                "type": type(sched.stop_error).__name__,
                "message": sched.stop_error.message,
            }
        in_flight_rows = [
            ledger.in_flight_job_row(j, self.load_id) for j in journal.jobs(IN_FLIGHT)
        ]
        if in_flight_rows:
            yield self._table(self.s.names.jobs, in_flight_rows)
        self.stats.jobs_carried_over = len(in_flight_rows)
        logger.info("run finished: %s", self.stats.line(len(in_flight_rows)))
        if self.stats.lost_answers or self.stats.expired:
            # The two ways a record can be paid twice: say so where operators look.
            logger.warning(
                "this run resubmitted %d batch(es) whose submit answer was lost and %d "
                "record(s) whose results expired; see the %s ledger (status lost) and "
                "outcomes (status expired)",
                self.stats.lost_answers,
                self.stats.expired,
                self.s.names.jobs,
            )
        self._await(sched.__aexit__(None, None, None))

    def _cap_left(self, sched: JobScheduler) -> int:
        cap = self.s.max_records_per_run
        if cap is None:
            return 1 << 62
        return max(0, cap - sched.counters.submitted_records)

    # --- 3. reading and submitting ------------------------------------------------------

    def _read_and_submit(
        self,
        pipeline: dlt.Pipeline,
        state: dict[str, Any],
        sched: JobScheduler,
        known: KnownKeys,
        pending: _Pending,
        handled: list[str],
    ) -> Iterator[Any]:
        collected_now = dict(known.keys)
        known.keys = load_known_keys(pipeline, self.s.names).keys
        known.keys.update(collected_now)  # what this run already collected wins
        now = self._now()
        cursor_mode = self.reader.spec.cursor_column is not None
        cursor_from = state.get("cursor") if cursor_mode else None
        last_cursor = cursor_from
        stopped_early = False

        for chunk in self.reader.rows(cursor_from):
            rejected: list[dict[str, Any]] = []
            reused: list[dict[str, Any]] = []
            for row in chunk:
                self.stats.rows_read += 1
                outcome = self._classify(row, known, now, pending, rejected, reused)
                if outcome == "cap":
                    stopped_early = True
                    break
                last_cursor = row.cursor if cursor_mode else last_cursor
            if rejected:
                yield self._table(self.s.names.rejected, rejected)
            if reused:
                yield self._table(self.s.names.outcomes, reused)
            while len(pending.items) >= sched.records_per_job:
                unsent = self._await(sched.submit(pending.take(sched.records_per_job)))
                for item in unsent:
                    pending.add(item)
                if unsent:
                    stopped_early = True
                    break
                self._sync_stats(sched)
                for fin in sched.drain_ready():
                    yield from self._handle(fin, known, pending, handled)
            self._progress(sched)
            if stopped_early or sched.remaining <= 0:
                stopped_early = True
                break

        if cursor_mode and not stopped_early:
            # With a cursor only changed rows are read: stale keys come from the history.
            for key, ks in known.stale(now, self.s.ttl_matched, self.s.ttl_not_found):
                if ks.input and key not in sched.in_flight_items:
                    pending.add(BatchItem(key, dict(ks.input), sorted(ks.pks), ks.retries + 1))
        if cursor_mode:
            # Never move the cursor past a row whose key was read but not yet submitted;
            # the end of the run (_finish) moves it back if keys stay unsent.
            state["cursor"] = last_cursor
        self._sync_stats(sched)

    def _classify(
        self,
        row: InputRow,
        known: KnownKeys,
        now: datetime,
        pending: _Pending,
        rejected: list[dict[str, Any]],
        reused: list[dict[str, Any]],
    ) -> str:
        norm = normalize_record(self.s.enrichment_type, row.values)
        if not isinstance(norm, Normalized):
            self.stats.rejected += 1
            rejected.append(
                ledger.rejected_row(row.pk, norm.reason, norm.detail, now, self.load_id)
            )
            return "rejected"
        key = norm.key
        if key in pending.items:
            if row.pk not in pending.items[key].pks:
                pending.items[key].pks.append(row.pk)
            return "pending"
        in_flight = self._in_flight_items.get(key)
        if in_flight is not None:
            if row.pk not in in_flight.pks:
                in_flight.pks.append(row.pk)
            return "in_flight"
        ks = known.keys.get(key)
        if ks is not None and known.is_fresh(key, now, self.s.ttl_matched, self.s.ttl_not_found):
            if row.pk not in ks.pks:
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
        if cap is not None and self.stats.records_submitted + len(pending.items) >= cap:
            return "cap"
        attempt = ks.retries + 1 if ks is not None and ks.status not in FINAL_STATUSES else 1
        pending.add(BatchItem(key, norm.record, [row.pk], attempt, cursor=row.cursor))
        return "new"

    def _sync_stats(self, sched: JobScheduler) -> None:
        c = sched.counters
        self.stats.jobs_submitted = c.submitted_jobs
        self.stats.records_submitted = c.submitted_records
        self.stats.lost_answers = self._lost_from_journal + c.lost_answers

    # --- handling finished jobs --------------------------------------------------------

    def _items_of(self, fin: Finished) -> list[BatchItem]:
        if fin.job.items is not None:
            return fin.job.items
        if fin.results is None:
            return []
        # A job adopted from dlt state: rebuild the keys from the echoed inputs.
        items = []
        for r in fin.results.results:
            norm = normalize_record(self.s.enrichment_type, r.input)
            key = norm.key if isinstance(norm, Normalized) else f"invalid:{r.index}"
            items.append(BatchItem(key, r.input, [], fin.job.attempt))
        return items

    def _handle(
        self, fin: Finished, known: KnownKeys, pending: _Pending, handled: list[str]
    ) -> Iterator[Any]:
        job = fin.job
        now = self._now()
        items = self._items_of(fin)
        outcomes: list[dict[str, Any]] = []
        enriched: list[dict[str, Any]] = []
        counts = {"matched": 0, "not_found": 0, "invalid": 0, "error": 0}
        if fin.kind == COMPLETED and fin.results is not None:
            results = fin.results.results
            if len(results) != len(items):
                # Not ours to guess: leave the job in flight for the next run to look at.
                logger.error(
                    "job %s returned %d results for %d records; it stays in the ledger",
                    job.job_id,
                    len(results),
                    len(items),
                )
                return
            for item, result in zip(items, _by_index(results), strict=True):
                status = result.status.value
                counts[status] += 1
                err = result.error.message if result.error else None
                outcomes.extend(
                    ledger.outcome_rows(item, job.job_id, status, err, now, self.load_id)
                )
                if status == "matched":
                    enriched.append(enrichment_row(item.key, job.job_id, now, result))
                known.keys[item.key] = KeyState(status, now, job.job_id, item.record, set(item.pks))
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
                if item.attempt < self.s.max_attempts:
                    status, err = fin.kind, fin.error
                    pending.add(BatchItem(item.key, item.record, item.pks, item.attempt + 1))
                    self.stats.resubmitted += 1
                else:
                    status, err = "error", f"gave up after {item.attempt} attempts: {fin.error}"
                    counts["error"] += 1
                    known.keys[item.key] = KeyState(
                        status, now, job.job_id, item.record, set(item.pks)
                    )
                outcomes.extend(
                    ledger.outcome_rows(item, job.job_id, status, err, now, self.load_id)
                )
        self.stats.jobs_done += 1
        handled.append(job.job_id)
        if enriched:
            yield self._table(self.s.names.enrichment, enriched)
        if outcomes:
            yield self._table(self.s.names.outcomes, outcomes)
        yield self._table(self.s.names.jobs, [ledger.finished_job_row(fin, counts, self.load_id)])

    # --- end of run -------------------------------------------------------------------

    def _finish(
        self,
        state: dict[str, Any],
        journal: Journal,
        sched: JobScheduler,
        handled: list[str],
        lost_reported: list[str],
    ) -> None:
        journal.mark_fetched(handled, self.load_id)
        lost_now = [lost.intent_id for lost in sched.lost]
        journal.forget(intent_ids=[*lost_reported, *lost_now])
        # dlt state mirrors the in-flight jobs (metadata only): it survives a wiped working
        # dir because it travels with the load package to the destination.
        state["jobs"] = {
            j.job_id: {
                "type": j.type,
                "attempt": j.attempt,
                "records": j.record_count,
                "submitted_at": j.submitted_at,
                "load_id": j.run_id,
            }
            for j in journal.jobs(IN_FLIGHT)
        }
        self._sync_stats(sched)


def _by_index(results: list[RecordResult]) -> list[RecordResult]:
    return sorted(results, key=lambda r: r.index)
