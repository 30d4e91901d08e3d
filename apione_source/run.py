"""One enrichment run: settle the journal, collect carried jobs, read input, submit, collect.

:class:`EnrichmentRun` is the body of the dlt resource. It is a plain (sync) generator
that drives an asyncio loop step by step, so dlt's extract thread owns the generator,
dlt state and the load package, while many jobs are polled concurrently whenever the
loop runs (``_await``).

Order of a run, and why:

1. Open the journal (:mod:`apione_source.journal`, a table in the destination dataset):
   entries whose results reached a completed load are forgotten; a submit whose answer
   never came is spent as ``lost``; a spent job whose report never reached a completed
   load is reported again. Nothing here needs the local disk.
2. Poll the carried-over jobs and send what earlier runs left to send. Every key of an
   open entry is *reserved*: an input row carrying it joins that entry instead of being
   sent again, whichever pipeline wrote it.
3. Read the input in chunks; reject what cannot be sent; skip keys with a fresh outcome;
   batch the rest by unique key and submit as slots free up, collecting as jobs finish.
4. Wait for the jobs until the wait budget ends; the rest carry over in the journal.

With ``run_enrichment`` the run spans several extracts (slices, one load package each):
the body is one generator that yields a marker where a package may end; results are
loaded while the next jobs run, and the journal and dlt state commit with every package.

SIGTERM and SIGINT stop the run at the next safe point (a submit in the air is answered
and journaled first); the run then fails, and the next run picks everything up.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import dlt
from dlt.common.runtime import signals
from dlt.common.schema.utils import has_table_seen_data

from apione_source import ledger
from apione_source.client import AsyncApiOneClient
from apione_source.deliveries import DeliveryInbox
from apione_source.errors import ConcurrentRunError
from apione_source.history import (
    KeyState,
    KnownKeys,
    Ttls,
    confirmed_loads,
    load_known_keys,
    rejected_pks,
)
from apione_source.journal import (
    EXPIRED,
    IN_FLIGHT,
    LOST,
    SENDING,
    TO_SEND,
    BatchItem,
    Entry,
    Journal,
    SpentGen,
    SqlStore,
)
from apione_source.models import EnrichmentType, RecordResult
from apione_source.normalize import Normalized, normalize_record
from apione_source.output import Output
from apione_source.payloads import PayloadTables
from apione_source.reader import (
    Freshness,
    InputReader,
    InputRow,
    decode_cursor,
    encode_cursor,
)
from apione_source.scheduler import COMPLETED, Finished, JobScheduler, SchedulerSettings
from apione_source.settle import appended_tables, appends, renewed_tables, settle
from apione_source.tables import (
    FINAL_STATUSES,
    MERGE,
    TableNames,
    table_columns,
    utc_from_timestamp,
)

logger = logging.getLogger("apione_source")
# Each run's summary goes through dlt's own log handler (a child of its logger) at INFO,
# shown even where dlt's own level is WARNING, the shipped default.
summary_logger = logging.getLogger("dlt.apione")
summary_logger.setLevel(logging.INFO)

_T = TypeVar("_T")

NULL_PK = "<NULL>"  # rejected-table key of rows whose primary key is NULL
_CUT = object()  # yielded by the run body where a load package may end
# CPython runs its cyclic garbage collector every 700 net new container objects, and a full
# collection every so often rescans every object alive. A run allocates millions (parsed
# results, rows) while holding many (known keys, journal entries): with the default, full
# collections took a fifth of a 100k-record run. Rows hold no reference cycles, so the
# collector can run less often without holding more memory (measured: peak RSS lower too).
# A young collection also costs more as the process grows (1M records: ~70 ms each once
# DuckDB holds its tables; 5.4 s of young and 1.3 s of middle collections at 50,000 against
# 2.1 s in all at 200,000, same peak RSS): more rows die before one looks at them.
_GC_YOUNG_THRESHOLD = 200_000
# Event-loop rounds a poller woken by free room needs to put its request on the wire.
_STEPS_TO_SEND = 8
# What the first load of a run is taken to cost (seconds) before one is measured, and the
# margin a load must fit in before the next job should end, to end a slice early for it.
_FIRST_LOAD_GUESS_S = 1.0
_MIN_LOOK_WINDOW_S, _MAX_LOOK_WINDOW_S = 0.05, 0.5  # see EnrichmentRun._looks_first
_LOAD_MARGIN = 1.5


@dataclass(frozen=True)
class RunSettings:
    """Everything a run needs besides the client (resolved from dlt config by the source).

    Attributes:
        enrichment_type: What to enrich.
        resource_name: Name of the dlt resource (names the state).
        names: Table names.
        scheduler: Limits and timing of jobs.
        ttls: How long final outcomes stay fresh.
        max_records_per_run: Cap on records submitted in one run (None: no cap).
        max_credits_per_run: The credit guardrail, also a cap on what the run submits
            (None: none).
        max_attempts: Attempts per record before it is recorded as ``error``.
        retention_seconds: How long ApiOne keeps results (warns about old carried jobs).
        scd2: The enrichment table keeps history (rows carry a version hash).
        inbox: With webhooks on, where the receiver keeps deliveries: jobs delivered
            are collected from them without polling.
    """

    enrichment_type: EnrichmentType
    resource_name: str
    names: TableNames
    scheduler: SchedulerSettings
    ttls: Ttls
    max_records_per_run: int | None
    max_credits_per_run: int | None
    max_attempts: int
    retention_seconds: float
    scd2: bool = False
    inbox: DeliveryInbox | None = None


def _bump(counts: dict[str, int], reason: str, n: int = 1) -> None:
    counts[reason] = counts.get(reason, 0) + n


@dataclass
class RunStats:
    """What one run did: logged as progress, and at the end as its summary.

    The summary goes to the log (dlt's logger), to dlt's trace (the resource's custom
    metrics) and to the ``<prefix>runs`` table.
    """

    rows_read: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> input rows
    already_fresh: int = 0  # rows whose key has a fresh outcome: nothing sent
    reused: int = 0  # of those, rows new to their key: outcome written, nothing paid
    jobs_submitted: int = 0
    records_submitted: int = 0  # billed, at most (plus the records of lost submits)
    jobs_done: int = 0
    records_collected: int = 0
    resubmitted: dict[str, int] = field(default_factory=dict)  # reason -> records resent
    spent: dict[str, int] = field(default_factory=dict)  # reason -> jobs (incl. lost)
    mismatched: int = 0  # jobs whose results did not line up with what was sent
    deferred: int = 0  # jobs that answered outside the contract (kept for later)
    carried_over: int = 0  # jobs still running at the end

    def line(self, running: int) -> str:
        """One progress line."""
        return (
            f"jobs submitted {self.jobs_submitted} running {running} done {self.jobs_done} | "
            f"records submitted {self.records_submitted} collected {self.records_collected} "
            f"resubmitted {sum(self.resubmitted.values())} | rows read {self.rows_read} "
            f"rejected {sum(self.rejected.values())} already fresh {self.already_fresh}"
        )

    def summary(self) -> dict[str, Any]:
        """Every counter, JSON-safe (``*_by_reason`` are dicts)."""
        return {
            "rows_read": self.rows_read,
            "rows_rejected": sum(self.rejected.values()),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "rows_already_fresh": self.already_fresh,
            "jobs_submitted": self.jobs_submitted,
            "records_submitted": self.records_submitted,
            "records_collected": self.records_collected,
            "records_resubmitted": sum(self.resubmitted.values()),
            "resubmitted_by_reason": dict(sorted(self.resubmitted.items())),
            "jobs_spent_by_reason": dict(sorted(self.spent.items())),
            "jobs_mismatched": self.mismatched,
            "jobs_deferred": self.deferred,
            "jobs_carried_over": self.carried_over,
        }


def summary_text(summary: dict[str, Any]) -> str:
    """A run's :meth:`RunStats.summary` as one line for people."""
    parts = [
        f"rows read {summary['rows_read']}",
        f"rejected {_with_reasons(summary['rejected_by_reason'])}",
        f"already fresh {summary['rows_already_fresh']}",
        f"submitted {summary['records_submitted']} records in {summary['jobs_submitted']} jobs",
        f"collected {summary['records_collected']}",
        f"resubmitted {_with_reasons(summary['resubmitted_by_reason'])}",
        f"jobs carried over {summary['jobs_carried_over']}",
    ]
    if summary["jobs_mismatched"] or summary["jobs_deferred"]:
        parts.append(
            f"jobs mismatched {summary['jobs_mismatched']} deferred {summary['jobs_deferred']}"
        )
    return ", ".join(parts)


def _with_reasons(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} ({', '.join(f'{r} {n}' for r, n in sorted(counts.items()))})"


@dataclass
class _Pending:
    """Unique keys read from the input, waiting to be submitted, in arrival order."""

    items: dict[str, BatchItem] = field(default_factory=dict)

    def add(self, item: BatchItem) -> None:
        known = self.items.get(item.key)
        if known is None:
            self.items[item.key] = item
        else:
            known.add_pks(item.pks)

    def take(self, n: int) -> list[BatchItem]:
        return [self.items.pop(k) for k in list(islice(self.items, n))]

    def min_cursor(self) -> Any:
        cursors = [i.cursor for i in self.items.values() if i.cursor is not None]
        return min(cursors) if cursors else None


async def _steps(n: int) -> None:
    """Let the event loop run ``n`` rounds (tasks that were woken take their next steps)."""
    for _ in range(n):
        await asyncio.sleep(0)


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Run CPython's cyclic garbage collector less often inside the block."""
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, _GC_YOUNG_THRESHOLD), *older)
    try:
        yield
    finally:
        gc.set_threshold(young, *older)


class RunLock:
    """One run at a time per destination dataset and outcomes table, on this machine.

    An OS file lock: released by the kernel when the process dies, so SIGKILL never
    leaves a stale lock. (Across machines, an orchestrator runs one task at a time.)
    """

    def __init__(self, pipelines_dir: str, dataset: str, scope: str) -> None:
        """Take the lock or raise :class:`ConcurrentRunError`."""
        digest = hashlib.sha1(f"{dataset}\x1f{scope}".encode()).hexdigest()[:16]
        path = Path(pipelines_dir) / f".apione-{digest}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise ConcurrentRunError(
                f"another run enriching into {dataset}.{scope} is in progress on this "
                "machine: run one at a time"
            ) from None

    def release(self) -> None:
        """Let the next run in."""
        self._file.close()


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
        self.to_send: list[Entry] = []  # journal entries with records to send
        # entry id -> entry whose results go into this slice's package
        self.collected: dict[str, Entry] = {}
        self.reserved: dict[str, Entry] = {}  # key -> the open entry that carries it
        self.joins: dict[str, tuple[Entry, dict[str, BatchItem]]] = {}
        self.wrote_outcomes = False
        self.rejected_before: set[str] = set()
        self.out = Output(table_columns(settings.names), load_id="")
        self.payload_tables = PayloadTables(settings.names, self.out)
        # Results per load package; None: the whole run is one package (pipeline.run).
        self.records_per_load: int | None = None
        self.loads: set[str] = set()  # this run's load packages
        self.read_cursor: Any = None  # cursor of the last input row read (cursor mode)
        self.collected_in_slice = 0
        self.load_s = _FIRST_LOAD_GUESS_S  # how long the last slice took dlt to load
        self.settle_s = 0.0  # how long the last job's results took to become rows
        self.chunk_s = 0.0  # how long the last input chunk took to read and classify
        self._cut_at: float | None = None  # when the last slice ended (scheduler clock)
        self.collected_ids: set[str] = set()  # entries collected this run, in any slice
        self.new_entries: set[str] = set()  # entries made from rows this run read
        # Keys are looked up in the warehouse as rows come (not all held in memory).
        self.in_warehouse = False
        self._stack = ExitStack()
        # The journal's connection: held through the run's last load when run_enrichment
        # loads it (see after_last_load), else closed with the rest.
        self._store_stack = ExitStack()
        self.store: SqlStore | None = None
        self.dialect = ""
        self.schema_name = ""
        self._body: Generator[Any, None, None] | None = None
        self._closed = False

    # --- helpers ----------------------------------------------------------------------

    def _await(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def _now(self) -> datetime:
        return utc_from_timestamp(self.wall_clock())

    def _emit(self, table: str, rows: list[dict[str, Any]]) -> Iterator[Any]:
        """Buffer rows of ``table``; yield the arrow tables that are full."""
        self.out.add(table, rows)
        yield from self.out.ready()

    def _progress(self) -> None:
        self._sync_stats()
        logger.info("progress: %s", self.stats.line(len(self.sched.in_flight)))

    def _sync_stats(self) -> None:
        c = self.sched.counters
        self.stats.jobs_submitted = c.submitted_jobs
        self.stats.records_submitted = c.submitted_records
        self.stats.deferred = c.deferred

    def _cap(self) -> int | None:
        """Records this run may submit at most (None: no limit)."""
        caps = [c for c in (self.s.max_records_per_run, self.s.max_credits_per_run) if c]
        return min(caps, default=None)

    def _cap_left(self) -> int:
        cap = self._cap()
        if cap is None:
            return 1 << 62
        return max(0, cap - self._maybe_billed())

    def _maybe_billed(self) -> int:
        """Records this run may have had billed: submitted, and sent with answers lost."""
        counters = self.sched.counters
        return counters.submitted_records + counters.lost_records

    # --- the run ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        """One extract: the whole run, or (:attr:`records_per_load` set) its next slice.

        A slice ends at a safe point once ``records_per_load`` results are in it and
        nothing is to do but wait for jobs (:meth:`_cut`), so dlt loads it while those jobs
        run; the next ``pipeline.run`` of the same source goes on with the run
        (``run_enrichment``).
        """
        try:
            if self._body is None:
                self._start()
            self._begin_slice()
            assert self._body is not None
            # SIGTERM/SIGINT set a flag instead of killing us mid-submit; a second one of
            # the same kind kills as usual.
            with signals.intercepted_signals():
                for item in self._body:
                    if item is _CUT:
                        yield from self._end_slice()
                        self._cut_at = self.clock()
                        return
                    yield item
            # run_enrichment loads the last slice, then calls after_last_load
            self.close(keep_store=self.records_per_load is not None)
            # A run that could not do its job fails (so every orchestrator shows it red).
            # Its package is dropped; the journal holds everything the next run needs.
            signals.raise_if_signalled()
            if self.sched.stop_error is not None:
                raise self.sched.stop_error
        except BaseException:
            self.close()
            raise

    @property
    def finished(self) -> bool:
        """True once the run ended (or failed): nothing more to extract."""
        return self._closed

    def close(self, *, keep_store: bool = False) -> None:
        """Release what the run holds (lock, event loop, connections); idempotent.

        Args:
            keep_store: Keep the journal's connection until :meth:`after_last_load` (or
                a later ``close``).
        """
        if not self._closed:
            self._closed = True
            if self._body is not None:
                self._body.close()  # a run stopped between slices: nothing more to do
            self._stack.close()
        if not keep_store:
            self._store_stack.close()

    def after_last_load(self, pipeline: dlt.Pipeline) -> None:
        """The run's last package loaded: checkpoint as after every slice, then close.

        Held open through that load, the journal's connection keeps its end from
        checkpointing (DuckDB writes everything when its last connection closes), so
        the last package too reaches the file without dlt's staging copies.
        """
        if self._closed:
            self._settle_loads()
            self._checkpoint(pipeline)
        self.close()

    def _settle_loads(self, unfinished: bool = False) -> None:
        """Take out what loads wrote twice into the appended tables (settle.py).

        ``unfinished``: also what loads that never completed left (at the run's start).
        """
        if self.store is not None and appends(self.dialect):
            settle(
                self.store.client,
                self.dialect,
                self.s.names,
                self.schema_name,
                scd2=self.s.scd2,
                unfinished=unfinished,
            )

    def _checkpoint(self, pipeline: dlt.Pipeline) -> None:
        """Write the loaded rows into the DuckDB file, minus dlt's staging copies.

        Those are dead once their package loaded; one that has not (a load that failed
        midway) still needs them when it is resumed, so they stay while one is pending.
        """
        if self.store is None:
            return
        dead = not pipeline.list_normalized_load_packages()
        self.store.checkpoint(staging_tables=table_columns(self.s.names) if dead else ())

    def _start(self) -> None:
        pipeline = dlt.current.pipeline()
        if pipeline.dev_mode:
            logger.warning(
                "dev_mode gives every run a new dataset: nothing loaded before is seen, so "
                "every record is enriched (and paid for) again"
            )
        self.started_at = self._now()
        names = self.s.names
        self.reader.check()  # here, not when the source is built: that touches nothing
        stack = self._stack
        stack.enter_context(_fewer_collections())
        lock = RunLock(pipeline.pipelines_dir, str(pipeline.dataset_name), names.outcomes)
        stack.callback(lock.release)
        dialect = self.dialect = pipeline.destination.destination_type.rsplit(".", 1)[-1]
        self.schema_name = dlt.current.source_schema().name
        store = self.store = self._store_stack.enter_context(
            SqlStore(pipeline.sql_client, names.journal, dialect)
        )
        load_id = dlt.current.load_package_state()["load_id"]
        self.journal = Journal(
            store, names.outcomes, pipeline.pipeline_name, load_id, self.wall_clock
        )
        self.journal.open(lambda loads: confirmed_loads(pipeline, sorted(loads)))
        # before any key is looked up in the appended tables: a package that a plain
        # pipeline.run() (or another worker) loaded since the last run may hold rows twice
        self._settle_loads(unfinished=True)
        self.loop = asyncio.new_event_loop()
        stack.callback(self.loop.close)
        self.sched = JobScheduler(
            self.client,
            self.journal,
            self.s.enrichment_type.value,
            self.s.scheduler,
            clock=self.clock,
            wall_clock=self.wall_clock,
            sleep=self.sleep,
            should_stop=signals.was_signal_received,
            delivered=self.s.inbox.event if self.s.inbox else None,
        )
        stack.callback(lambda: self._await(self.client.aclose()))
        stack.callback(lambda: self._await(self.sched.close()))
        self._body = self._run(pipeline)

    def _begin_slice(self) -> None:
        """Point everything that names a load package at this extract's package."""
        self.load_id = dlt.current.load_package_state()["load_id"]
        self.loads.add(self.load_id)
        self.out.load_id = self.journal.run_id = self.load_id
        self.state = dlt.current.resource_state()
        self.collected_in_slice = 0
        if self._cut_at is not None:  # dlt loaded the last slice meanwhile
            self._settle_loads()
            self._checkpoint(dlt.current.pipeline())
            self.load_s = self.clock() - self._cut_at

    def _cut(self) -> Iterator[Any]:
        """End the slice here when dlt can load it while the jobs run.

        That is when nothing is to do (no finished job waiting, no free slot to fill or
        nothing to fill it with) and either the slice holds ``records_per_load`` results,
        or the next job should end (by its estimate) later than the last load took, with a
        margin: results reach the warehouse while jobs run, and a run's last load holds
        only its last jobs' results. A slice twice ``records_per_load`` ends anyway, which
        bounds a package when jobs finish faster than rows are written. No slice ends when
        nothing is left to wait for: the run ends with it.
        """
        n, limit = self.collected_in_slice, self.records_per_load
        if limit is None or n == 0:
            return
        sched = self.sched
        if not (sched.waiting or self.to_send or self.pending.items):
            return
        to_submit = bool(self.to_send) or len(self.pending.items) >= sched.records_per_job
        idle = not sched.has_ready and not (sched.has_free_slot and to_submit)
        if n >= 2 * limit or (
            idle and (n >= limit or sched.quiet_for() >= _LOAD_MARGIN * self.load_s)
        ):
            yield _CUT

    def _end_slice(self) -> Iterator[Any]:
        """The rest of this package's rows, then what commits with it."""
        yield from self.out.flush()
        # Everything below commits with this extract (dlt state) or points at this load
        # package (journal): no yield after this point.
        self.journal.collected(list(self.collected.values()), self.load_id)
        self.journal.joined(
            [
                (entry, list(items.values()))
                for entry, items in self.joins.values()
                if entry.phase in (IN_FLIGHT, TO_SEND, SENDING)
                and entry.entry_id not in self.collected_ids
            ]
        )
        self.collected.clear()
        self.joins.clear()
        if self.in_warehouse:
            # This package is loaded before the next slice reads on, and keys are looked
            # up in the warehouse: what this run collected need not stay in memory.
            self.known.keys.clear()
        if self.read_cursor is not None:
            # never past a row that was read but not sent yet
            unsent = self.pending.min_cursor()
            cursor = self.read_cursor if unsent is None else min(self.read_cursor, unsent)
            self.state["cursor"] = encode_cursor(cursor)
        if self.wrote_outcomes:
            self.state["has_history"] = True

    def _run(self, pipeline: dlt.Pipeline) -> Generator[Any, None, None]:
        for legacy in ("stop_error", "jobs"):  # kept in state before the journal existed
            self.state.pop(legacy, None)
        yield from self._create_tables()
        journal = self.journal
        for entry in journal.in_phase(TO_SEND, SENDING, IN_FLIGHT):
            for item in entry.items:
                self.reserved[item.key] = entry
        # 1. settle what earlier runs left: reports that never reached a completed load,
        #    then submits whose answer never came
        for entry in list(journal.entries.values()):
            for spent in entry.unreported:
                journal.reported(entry, spent, self.load_id)
                self._keep_given_up(spent)
                yield from self._report(entry, spent)
        for entry in journal.in_phase(SENDING):
            yield from self._settle(Finished(entry, LOST, error="submit answer lost (crash)"))
        # 2. carried-over jobs and records
        carried = journal.in_phase(IN_FLIGHT)
        self._warn_about_old(carried)
        due = [e for e in carried if self.sched.is_due(e)]
        if len(due) < len(carried):
            logger.warning(
                "%d carried-over job(s) answered outside ApiOne's contract before; their "
                "records stay reserved and they are looked at again later",
                len(carried) - len(due),
            )
        self._await(self.sched.track(due))
        if due:
            logger.info("collecting %d job(s) carried over from earlier runs", len(due))
        # (lost submits settled above are queued already: never twice)
        self.to_send.extend(e for e in journal.in_phase(TO_SEND) if e not in self.to_send)
        yield from self._collect_ready()
        self._send_entries()
        if not self.sched.can_submit:
            if self.sched.remaining <= 0 and not signals.was_signal_received():
                logger.warning("the wait budget went on carried-over jobs; nothing new this run")
        else:
            # 3. read, submit, collect
            yield from self._read_and_submit(pipeline)
        # 4. wait for everything still running, resending while the budget lasts
        sched = self.sched
        while True:
            self._fill_free_slots()
            yield from self._cut()
            if (
                self.pending.items
                and not (self.to_send or sched.has_free_slot or sched.has_ready)
                and sched.can_submit
                and self._cap_left() > 0
            ):
                self._await(sched.wait_for_work())  # a slot for the rest, or rows to build
                continue
            fin = self._await(sched.next_finished())
            if fin is None:
                break
            if fin.kind == COMPLETED and self._looks_first():
                self._fill_free_slots()
            yield from self._settle(fin)
        yield from self._finish()

    def _looks_first(self, busy_s: float | None = None) -> bool:
        """Before work that holds the event loop: the looks due meanwhile happen first.

        The work last took ``busy_s`` (default: turning a job's results into rows); a
        look due meanwhile would come late, and with it the submit into the slot it
        frees. Looks coming within twice that (the work now and then also writes dlt's
        buffers), 50 ms to 0.5 s, are let in. Only worth it with records to submit.

        Returns:
            True when a slot is free now.
        """
        if not (self.pending.items or self.to_send):
            return False
        busy = self.settle_s if busy_s is None else busy_s
        window = min(max(2.0 * busy, _MIN_LOOK_WINDOW_S), _MAX_LOOK_WINDOW_S)
        if self.sched.looks_coming(window):  # else no turn of the event loop for nothing
            self._await(self.sched.let_looks_in(window))
        return self.sched.has_free_slot

    def _fill_free_slots(self) -> None:
        """Every free slot first: a job's turn must not wait for other jobs' rows."""
        self._send_entries()
        while self.pending.items and self.sched.has_free_slot and not self.to_send:
            if not self._submit_pending(self._cap_left()):
                break

    def _keep_given_up(self, spent: SpentGen) -> None:
        """Keys that gave up in ``spent`` stay given up, though its report is not loaded yet.

        (As in :meth:`_settle`: never sent again.)
        """
        at = utc_from_timestamp(spent.at)
        for item in spent.items:
            if item.key not in spent.resend:
                self.known.keys[item.key] = KeyState(
                    "error", at, spent.job_id, item.record, set(item.pks), submitted_at=at
                )

    def _create_tables(self) -> Iterator[Any]:
        """Create this type's tables that do not exist yet, rows or not.

        So every table the dbt package reads exists after the first run (a run that
        rejected nothing has no rejections to write). Never the enrichment table under
        scd2: an empty scd2 load would retire every row already in it. The tables
        appended on this destination get their disposition here too; the renewed ones
        only in a run that settles after each of its loads (``run_enrichment``): a plain
        ``pipeline.run`` merges them, as it leaves its one load to the next run's settle.
        """
        schema = dlt.current.source_schema()
        names = self.s.names
        sliced = self.records_per_load is not None
        appended = appended_tables(names, self.dialect, self.s.scd2)
        renewed = renewed_tables(names)
        for table in table_columns(names):
            if self.s.scd2 and table == names.enrichment:
                continue
            if table in appended:
                # appended on this destination (merged elsewhere): switched for this run's
                # packages before any of its rows, and created if need be; a renewed table
                # only in a sliced run, and switched back to merge for a plain one (the
                # resource keeps the switch)
                disposition: Any = "append" if sliced or table not in renewed else MERGE
                hints = dlt.mark.make_hints(table_name=table, write_disposition=disposition)
                yield dlt.mark.with_hints(
                    dlt.mark.materialize_table_schema(), hints, create_table_variant=True
                )
            elif table not in schema.tables or not has_table_seen_data(schema.tables[table]):
                yield dlt.mark.with_table_name(dlt.mark.materialize_table_schema(), table)

    def _warn_about_old(self, carried: list[Entry]) -> None:
        old = [
            e for e in carried if self.wall_clock() - e.submitted_at > self.s.retention_seconds / 2
        ]
        if old:
            logger.warning(
                "%d carried-over job(s) are older than half the plan's result retention; "
                "run more often or their results expire and are paid for again",
                len(old),
            )

    def _collect_ready(self) -> Iterator[Any]:
        for fin in self.sched.drain_ready():
            yield from self._settle(fin)

    # --- submitting -------------------------------------------------------------------

    def _send_entries(self) -> None:
        """Send journal entries with records to send (resends, carried, dissolved)."""
        while self.to_send and self.sched.can_submit:
            entry = self.to_send[0]
            per_job = self._piece_size()
            if len(entry.items) > per_job:
                pieces = [entry.items[i : i + per_job] for i in range(0, len(entry.items), per_job)]
                self.to_send[:1] = self.journal.dissolve(entry, pieces)
                if entry.entry_id in self.new_entries:
                    self.new_entries.update(p.entry_id for p in self.to_send[: len(pieces)])
                for piece in self.to_send[: len(pieces)]:
                    for item in piece.items:
                        self.reserved[item.key] = piece
                continue
            if len(entry.items) > self._cap_left():
                return
            outcome = self._await(self.sched.submit(entry, entry.items))
            if outcome == "unsent":
                return
            if outcome != "shrink":
                self.to_send.pop(0)
        self._sync_stats()

    def _piece_size(self) -> int:
        """Records per job of a resend: a job's worth, or the run's cap if that is less.

        So a carried entry larger than the cap goes out in pieces instead of waiting for
        a run with room for all of it (which never comes).
        """
        cap = self._cap()
        per_job = self.sched.records_per_job
        return per_job if cap is None else max(1, min(per_job, cap))

    def _submit_pending(self, limit: int) -> bool:
        """Submit up to ``limit`` pending records; False when nothing more can go this run."""
        self._send_entries()  # records sent before (resends) go first
        if not self.sched.can_submit or self.to_send:
            return False
        n = min(limit, self._cap_left(), self.sched.records_per_job)
        if n <= 0:
            return False
        if not self.pending.items:
            return True
        items = self.pending.take(n)
        entry = self.journal.new_entry()
        self.new_entries.add(entry.entry_id)
        for item in items:
            self.reserved[item.key] = entry
        outcome = self._await(self.sched.submit(entry, items))
        self._sync_stats()
        if outcome in ("sent", "lost"):
            return True
        if entry.seq == 0:
            # Nothing was written for it: the records simply wait (cursor protects them).
            del self.journal.entries[entry.entry_id]
            for item in items:
                self.reserved.pop(item.key, None)
                self.pending.add(item)
            return False
        # Sent and refused, or told to shrink: the journal holds the entry now.
        entry.items = items
        self.to_send.append(entry)
        self._send_entries()
        return not self.to_send

    # --- 3. reading and submitting ------------------------------------------------------

    def _read_and_submit(self, pipeline: dlt.Pipeline) -> Iterator[Any]:
        names = self.s.names
        must_exist = bool(self.state.get("has_history"))
        with pipeline.sql_client() as client:
            in_warehouse = self.in_warehouse = self.reader.same_warehouse(client)
        if not in_warehouse:
            # Freshness decided here: every key's history in memory.
            collected_now = dict(self.known.keys)
            self.known = load_known_keys(pipeline, names, must_exist=must_exist)
            self.known.keys.update(collected_now)  # what this run already collected wins
        self.rejected_before = rejected_pks(pipeline, names)
        now = self._now()
        cursor_mode = self.reader.spec.cursor_column is not None
        last_cursor = decode_cursor(self.state.get("cursor")) if cursor_mode else None
        self.read_cursor = last_cursor
        stopped = False
        chunks = (
            self.reader.candidates(
                Freshness(
                    str(pipeline.dataset_name), names.outcomes, names.inputs, self._cutoffs(now)
                )
            )
            if in_warehouse
            else self.reader.rows(last_cursor)
        )
        # one client for every chunk's lookups, open until the run ends (it spans slices)
        lookups: Any = None
        if in_warehouse:
            lookups = self._stack.enter_context(
                cast(AbstractContextManager[Any], pipeline.sql_client())
            )
        last_pk: str | None = None
        for chunk in chunks:
            chunk_started = self.clock()
            rejected: list[dict[str, Any]] = []
            reused: list[dict[str, Any]] = []
            inputs: list[dict[str, Any]] = []
            norms = [
                None if row.pk is None else normalize_record(self.s.enrichment_type, row.values)
                for row in chunk
            ]
            looked_up = self._look_up(pipeline, lookups, norms, must_exist) if in_warehouse else {}
            for row, norm in zip(chunk, norms, strict=True):
                self.stats.rows_read += 1
                if row.pk is not None and row.fp is not None and row.pk != last_pk:
                    # Rows come ordered by primary key: one the input holds twice comes
                    # twice in a row, and its first row is the one kept (a load holds
                    # each input_pk once, what the merge or the settle relies on).
                    last_pk = row.pk
                    # a rejected row gets key '' (never fresh): it comes back every run, so
                    # a row fixed back to its old value has its rejection removed
                    key = norm.key if isinstance(norm, Normalized) else ""
                    inputs.append(ledger.input_row(row.pk, key, row.fp, now, self.load_id))
                if self._classify(row, norm, now, rejected, reused) == "cap":
                    stopped = True
                    break
                if row.cursor is not None and (last_cursor is None or row.cursor > last_cursor):
                    last_cursor = self.read_cursor = row.cursor
            for key, state in looked_up.items():
                if self.known.keys.get(key) is state:  # not collected meanwhile: forget it
                    del self.known.keys[key]
            if inputs:
                yield from self._emit(names.inputs, inputs)
            if rejected:
                yield from self._emit(self.s.names.rejected, rejected)
            if reused:
                yield from self._emit(self.s.names.outcomes, reused)
                self.wrote_outcomes = True
            per_job = self.sched.records_per_job
            self.chunk_s = self.clock() - chunk_started
            while not stopped and len(self.pending.items) >= per_job:
                # Free slots first, finished jobs after: a slot left idle while results
                # are turned into rows is wall time lost (every job of a round ends at once).
                # Unless finished jobs pile up (ApiOne is faster than rows are written):
                # more submits would then only hold their records in memory.
                sched, backlogged = self.sched, self._backlogged()
                if sched.has_free_slot and not backlogged:
                    stopped = not self._submit_pending(per_job)
                elif sched.has_ready:
                    fin = sched.take_ready()
                    if not backlogged and fin.kind == COMPLETED and self._looks_first():
                        while len(self.pending.items) >= per_job and sched.has_free_slot:
                            if not self._submit_pending(per_job):
                                stopped = True
                                break
                    if backlogged:
                        # Taking these results made room for the next job's: let its
                        # poller ask for them now, so ApiOne prepares them while this
                        # job's rows are built.
                        self._await(_steps(_STEPS_TO_SEND))
                    yield from self._settle(fin)
                    self._await(asyncio.sleep(0))  # let pollers hand back their slots
                elif backlogged:
                    finished = self._await(sched.next_finished())
                    if finished is None:  # the run must stop (a stop error): no spinning
                        stopped = True
                    else:
                        self._await(_steps(_STEPS_TO_SEND))  # as above
                        yield from self._settle(finished)
                elif len(self.pending.items) < sched.settings.concurrent_jobs * per_job:
                    # Read on while waiting: a round's records ready when slots free. The
                    # looks due while the next chunk is read come first (as for results).
                    if self._looks_first(self.chunk_s):
                        continue  # a slot came free: submit into it first
                    break
                else:
                    # Nothing to do but wait: for a slot, or for a job's results (rows
                    # built meanwhile), whichever comes first. Cannot submit: stop reading.
                    self._await(sched.wait_for_work())
                    if not sched.can_submit:
                        stopped = True
                yield from self._cut()
            self._progress()
            if stopped or not self.sched.can_submit:
                stopped = True
                break
        if in_warehouse and not stopped:
            # The rows the warehouse left out had nothing to send: count them as fresh.
            left_out = self.reader.count() - self.stats.rows_read
            self.stats.rows_read += left_out
            self.stats.already_fresh += left_out
        if cursor_mode and not stopped:
            # With a cursor only changed rows are read: stale keys come from the history.
            for key, ks in self.known.stale(now, self.s.ttls):
                if ks.input and key not in self.reserved:
                    self.pending.add(BatchItem(key, dict(ks.input), sorted(ks.pks), ks.retries + 1))

    def _backlogged(self) -> bool:
        """True when the jobs waiting for this run hold two load packages' worth of records.

        (Or twice the plan's jobs, if more.) When ApiOne finishes jobs faster than their
        results become rows, more submits would only hold their records in memory, and
        bill nothing sooner: memory stays bounded by ``records_per_load``, not the table.
        """
        sched = self.sched
        per_load = 2 * (self.records_per_load or 0) // max(1, sched.records_per_job)
        return sched.waiting >= max(2 * sched.settings.concurrent_jobs, per_load)

    def _cutoffs(self, now: datetime) -> dict[str, datetime]:
        """Final status -> outcomes finished before this are stale."""
        ttls = self.s.ttls
        return {s: now - ttls.for_status(s) for s in FINAL_STATUSES}

    def _look_up(
        self,
        pipeline: dlt.Pipeline,
        client: Any,
        norms: list[Normalized | Any],
        must_exist: bool,
    ) -> dict[str, KeyState]:
        """Load the history of the keys of one chunk that this run does not know yet."""
        keys = {n.key for n in norms if isinstance(n, Normalized)} - self.known.keys.keys()
        found = load_known_keys(
            pipeline, self.s.names, must_exist=must_exist, keys=sorted(keys), client=client
        )
        self.known.keys.update(found.keys)
        return found.keys

    def _classify(
        self,
        row: InputRow,
        norm: Normalized | Any,
        now: datetime,
        rejected: list[dict[str, Any]],
        reused: list[dict[str, Any]],
    ) -> str:
        """Decide what one input row needs. Each primary key is read once per run."""
        if row.pk is None:
            _bump(self.stats.rejected, "null_primary_key")
            detail = "the primary key column is NULL: the row cannot be traced"
            rejected.append(
                ledger.rejected_row(NULL_PK, "null_primary_key", detail, now, self.load_id)
            )
            return "rejected"
        if not isinstance(norm, Normalized):
            _bump(self.stats.rejected, norm.reason)
            rejected.append(
                ledger.rejected_row(row.pk, norm.reason, norm.detail, now, self.load_id)
            )
            return "rejected"
        if row.pk in self.rejected_before:
            self.rejected_before.discard(row.pk)
            rejected.append(ledger.fixed_rejection_row(row.pk, now, self.load_id))
        key = norm.key
        if key in self.pending.items:
            self.pending.items[key].add_pks([row.pk])
            return "pending"
        entry = self.reserved.get(key)
        if entry is not None:
            # In flight (or to be resent), perhaps by another pipeline: its outcome comes
            # with that entry's job, so the row joins it instead of paying again.
            self._join(entry, key, row.pk)
            return "in_flight"
        ks = self.known.keys.get(key)
        if ks is not None and self.known.is_fresh(key, now, self.s.ttls):
            self.stats.already_fresh += 1
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
                        # ordered as of now for this row: it may have carried another
                        # key, whose outcome must not stay its latest
                        now,
                    )
                )
            return "fresh"
        cap = self._cap()
        if cap is not None and self._maybe_billed() + len(self.pending.items) >= cap:
            return "cap"
        attempt = ks.retries + 1 if ks is not None and ks.status not in FINAL_STATUSES else 1
        self.pending.add(BatchItem(key, norm.record, [row.pk], attempt, cursor=row.cursor))
        return "new"

    def _join(self, entry: Entry, key: str, pk: str) -> None:
        for item in entry.items:
            if item.key == key and item.add_pks([pk]):
                _, joined = self.joins.setdefault(entry.entry_id, (entry, {}))
                joined.setdefault(key, BatchItem(key, item.record, [], item.attempt)).pks.append(pk)

    # --- settling finished jobs ---------------------------------------------------------

    def _settle(self, fin: Finished) -> Iterator[Any]:
        """Write what a finished job means: its results, or its spending and resend."""
        self.stats.jobs_done += 1
        if fin.kind == COMPLETED and fin.results is not None:
            started = self.clock()
            yield from self._collect(fin)
            self.settle_s = self.clock() - started
            return
        entry = fin.entry
        resend, exhausted = [], []
        for item in entry.items:
            if item.attempt < self.s.max_attempts:
                resend.append(BatchItem(item.key, item.record, list(item.pks), item.attempt + 1))
            else:
                exhausted.append(item)
        spent = self.journal.spend(entry, fin.kind, fin.error or fin.kind, resend, self.load_id)
        _bump(self.stats.spent, fin.kind)
        if resend:
            _bump(self.stats.resubmitted, fin.kind, len(resend))
        what = (  # from `spent`: spending reset the entry's job and items
            f"job {spent.job_id} {fin.kind}"
            if spent.job_id
            else f"a submit of {len(spent.items)} records got no answer ({LOST})"
        )
        logger.warning(
            "%s: %s; resending %d record(s) (ApiOne may bill them again), %d given up",
            what,
            fin.error,
            len(resend),
            len(exhausted),
        )
        if resend:
            self.to_send.append(entry)
        now = self._now()
        for item in exhausted:
            self.reserved.pop(item.key, None)
            self.known.keys[item.key] = KeyState(
                "error", now, spent.job_id, item.record, set(item.pks), submitted_at=now
            )
        yield from self._report(entry, spent, fin)

    def _report(self, entry: Entry, spent: SpentGen, fin: Finished | None = None) -> Iterator[Any]:
        """The ledger row and outcome rows of a spent generation (again, if need be)."""
        job_id = spent.job_id or f"lost_{entry.entry_id}_{spent.gen}"
        finished_at = utc_from_timestamp(spent.at)
        submitted_at = utc_from_timestamp(spent.submitted_at)
        outcomes = []
        for item in spent.items:
            if item.key in spent.resend:
                status, err = spent.reason, spent.error
            else:
                status = "error"
                err = f"{spent.reason} after {item.attempt} attempt(s): {spent.error}"
            outcomes.extend(
                ledger.outcome_rows(
                    item, job_id, status, err, finished_at, self.load_id, submitted_at
                )
            )
        errors = sum(1 for i in spent.items if i.key not in spent.resend)
        row = ledger.spent_job_row(
            job_id, self.s.enrichment_type.value, spent, errors, self.load_id, fin
        )
        if outcomes:
            yield from self._emit(self.s.names.outcomes, outcomes)
            self.wrote_outcomes = True
        yield from self._emit(self.s.names.jobs, [row])

    def _collect(self, fin: Finished) -> Iterator[Any]:
        entry = fin.entry
        assert fin.results is not None
        now = self._now()
        submitted_at = utc_from_timestamp(entry.submitted_at)
        outcomes: list[dict[str, Any]] = []
        enriched: list[tuple[str, RecordResult]] = []
        counts = {"matched": 0, "not_found": 0, "invalid": 0, "error": 0}
        matched, problem = self._match(entry.items, fin.results.results)
        if problem:
            self.stats.mismatched += 1
            logger.warning(
                "job %s: %s; %d record(s) without a usable result end as error (not resent)",
                entry.job_id,
                problem,
                sum(1 for r in matched if r is None),
            )
        job_id = str(entry.job_id)
        for item, result in zip(entry.items, matched, strict=True):
            err: str | None
            if result is None:
                status, err = "error", f"result mismatched: {problem}"
            else:
                status = result.status.value
                err = result.error.message if result.error else None
                if status == "matched":
                    enriched.append((item.key, result))
            counts[status] += 1
            outcomes.extend(
                ledger.outcome_rows(item, job_id, status, err, now, self.load_id, submitted_at)
            )
            # The rows of an entry made from this run's reads were read already (once per
            # run): a later row of the key is another row. Leaving them out keeps memory
            # small. (A resent entry of an earlier run still has rows to come.)
            pks = set() if entry.entry_id in self.new_entries else set(item.pks)
            self.known.keys[item.key] = KeyState(
                status, now, job_id, item.record, pks, submitted_at=submitted_at
            )
            self.reserved.pop(item.key, None)
        self.stats.records_collected += len(entry.items)
        self.collected[entry.entry_id] = entry
        self.collected_ids.add(entry.entry_id)
        self.collected_in_slice += len(entry.items)
        self.joins.pop(entry.entry_id, None)  # its joined rows are in these outcomes
        if enriched:
            self.payload_tables.add(enriched, job_id, now, version_hash=self.s.scd2)
            yield from self.out.ready()
        if outcomes:
            yield from self._emit(self.s.names.outcomes, outcomes)
            self.wrote_outcomes = True
        status = "mismatched" if problem else COMPLETED
        yield from self._emit(
            self.s.names.jobs,
            [
                ledger.finished_job_row(
                    fin, self.s.enrichment_type.value, status, counts, self.load_id
                )
            ],
        )
        entry.items = []  # in the rows above now: memory stays flat over a long run

    def _match(
        self, items: list[BatchItem], results: list[RecordResult]
    ) -> tuple[list[RecordResult | None], str | None]:
        """Each item's result, or None where ApiOne's answer does not line up with it."""
        by_index: dict[int, RecordResult] = {}
        problems = []
        for r in results:
            if r.index in by_index or not 0 <= r.index < len(items):
                problems.append(f"result index {r.index} is duplicated or out of range")
            else:
                by_index[r.index] = r
        out: list[RecordResult | None] = []
        for i, item in enumerate(items):
            result = by_index.get(i)
            if result is None:
                problems.append(f"no result for record {i}")
            elif result.input != item.record:
                echoed = normalize_record(self.s.enrichment_type, result.input)
                if not isinstance(echoed, Normalized) or echoed.key != item.key:
                    problems.append(f"result {i} echoes another input than was sent")
                    result = None
            out.append(result)
        if len(problems) > 3:
            problems = [*problems[:3], f"and {len(problems) - 3} more"]
        return out, "; ".join(problems) or None

    # --- end of run -------------------------------------------------------------------

    def _finish(self) -> Iterator[Any]:
        journal = self.journal
        still_running = [
            e for e in journal.in_phase(IN_FLIGHT) if e.entry_id not in self.collected_ids
        ]
        if still_running:
            yield from self._emit(
                self.s.names.jobs,
                [
                    ledger.in_flight_job_row(e, self.s.enrichment_type.value, self.load_id)
                    for e in still_running
                ],
            )
        self._sync_stats()
        self.stats.carried_over = len(still_running)
        summary = self.stats.summary()
        yield from self._emit(
            self.s.names.runs,
            [
                ledger.run_row(
                    self.load_id,
                    dlt.current.pipeline().pipeline_name,
                    self.s.enrichment_type.value,
                    self.started_at,
                    self._now(),
                    summary,
                )
            ],
        )
        yield from self._end_slice()
        dlt.current.resource_metrics().update(summary)  # shows in dlt's trace
        summary_logger.info("%s: %s", self.s.resource_name, summary_text(summary))
        if self.stats.spent:
            # Every way a record can be paid twice: say so where operators look.
            logger.warning(
                "this run spent %s job(s) whose records were sent again (see %s and %s)",
                ", ".join(f"{n} {reason}" for reason, n in sorted(self.stats.spent.items())),
                self.s.names.jobs,
                self.s.names.outcomes,
            )
        if self.stats.spent.get(EXPIRED):
            logger.warning("results expired before collection: run more often")
