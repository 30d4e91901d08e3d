"""The job journal's lifecycle as a Hypothesis state machine, against a fake ApiOne that bills.

The machine drives :class:`apione_source.journal.Journal` over one :class:`MemoryStore` the
way a sequence of runs does (``apione_source/run.py``), and any run may crash between any
two transitions. A crash drops every in-memory object (journal, entries, queues); the store
survives, as the journal table in the destination does, and the crashed run's load package
never completes.

The world outside the runs is modelled too: a fake ApiOne that creates jobs and bills
every record of a created job (whether or not the answer reaches the run), the set of
completed loads (``_dlt_loads``), and a tally of every transition the runs made (spent
generations, collections, report loads), kept here because finished entries are deleted
from the store.

Invariants, after every step:

1. billing: every key is billed at most ``1 +`` the number of spent generations that
   held it, and never more than ``MAX_ATTEMPTS`` times;
2. no key is in two open entries at once;
3. a generation is spent once; a spent job is never in flight, polled, collected or spent
   again; an in-flight entry names the job ApiOne created for exactly its keys;
4. ``fold(store rows)`` equals the journal's entries after every transition;
5. ``open()`` deletes an entry only if its results reached a completed load, or it is
   closed, and every spent generation's report reached a completed load;
6. no key is forgotten: a key read from the input is held by an open entry, collected by
   the running run, or has its outcome in the tally;

and at the end (``teardown``: runs without crashes until the journal is empty) every key
has exactly one final outcome: collected once in a completed load, or exhausted with its
report in a completed load.
"""

from __future__ import annotations

import itertools
import sys
import tracemalloc
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from apione_source import journal as journal_module
from apione_source.journal import (
    CLOSED,
    EXPIRED,
    FAILED,
    IN_FLIGHT,
    LOST,
    SENDING,
    TIMED_OUT,
    TO_SEND,
    VANISHED,
    BatchItem,
    Entry,
    Journal,
    MemoryStore,
    SpentGen,
    fold,
)

SCOPE = "company_outcomes"
KEYS = [f"k{i:02d}" for i in range(16)]
MAX_ATTEMPTS = 3
RECORDS_PER_JOB = 4
COMPLETED = "completed"
DEFERRED = "deferred"

# What happens to a submit (weights by repetition):
#   created: ApiOne creates (and bills) the job and the answer arrives;
#   lost: ApiOne creates (and bills) the job, the answer never arrives (the run spends it);
#   refused: ApiOne refuses, no job, nothing billed; shrink: a 413, no job;
#   in_air_billed / in_air_free: the process dies with the request in the air, after or
#   before ApiOne created the job.
SEND_OUTCOMES = (
    "created",
    "created",
    "created",
    "lost",
    "refused",
    "shrink",
    "shrink",
    "in_air_billed",
    "in_air_free",
)
# Crash while settling what earlier runs left, before this transition (None: no crash).
CRASH_AT = st.none() | st.integers(0, 3)
# What a poll finds (ApiOne keeps each job's state consistent, see FakeApiOne.look).
POLL_OUTCOMES = (COMPLETED, COMPLETED, FAILED, EXPIRED, VANISHED, TIMED_OUT, DEFERRED)


@dataclass
class Job:
    keys: tuple[str, ...]
    state: str = "running"  # running, completed, failed, expired, vanished


class FakeApiOne:
    """Creates jobs, bills each record of a created job, answers polls consistently."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.billed: Counter[str] = Counter()
        self._ids = itertools.count(1)

    def create(self, keys: list[str]) -> str:
        job_id = f"job{next(self._ids)}"
        self.jobs[job_id] = Job(tuple(keys))
        self.billed.update(keys)
        return job_id

    def look(self, job_id: str, wanted: str) -> str | None:
        """What a poll reports when the world moves toward ``wanted`` (None: still running)."""
        job = self.jobs[job_id]
        if wanted == DEFERRED:
            return DEFERRED  # an answer outside the contract: nothing changes
        if job.state == "running":
            if wanted in (COMPLETED, FAILED, VANISHED):
                job.state = wanted
                return wanted
            return TIMED_OUT if wanted == TIMED_OUT else None
        if job.state == COMPLETED and wanted in (EXPIRED, VANISHED):
            job.state = wanted
        return job.state


@dataclass
class Run:
    """One run's in-memory objects: all of it is dropped by a crash."""

    journal: Journal
    load_id: str
    limit: int = RECORDS_PER_JOB  # the scheduler's records_per_job (a 413 lowers it)
    unreported: list[tuple[Entry, SpentGen]] = field(default_factory=list)
    lost: list[Entry] = field(default_factory=list)  # lost answers waiting to be spent
    to_send: list[Entry] = field(default_factory=list)
    collected: list[Entry] = field(default_factory=list)  # written at the end of extract


def view(entry: Entry) -> tuple[Any, ...]:
    """What fold must reproduce of an entry."""
    return (
        entry.phase,
        entry.gen,
        [i.to_json() for i in entry.items],
        entry.job_id,
        sorted(entry.collected_in),
        entry.deferrals,
        [
            (s.gen, s.job_id, s.reason, [i.key for i in s.items], sorted(s.resend), sorted(s.loads))
            for s in entry.spent
        ],
    )


def keys_of(entry: Entry) -> list[str]:
    return [i.key for i in entry.items]


def has(entries: list[Entry], entry: Entry) -> bool:
    return any(e is entry for e in entries)


class _CountedIds:
    """``uuid.uuid4`` for the journal under test: ids that are the same every example.

    Random entry ids change the order of sets of them from one example to the next, and
    Hypothesis then sees the same choices draw differently (FlakyStrategyDefinition).
    """

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def uuid4(self) -> uuid.UUID:
        return uuid.UUID(int=next(self._next))


class JournalLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        journal_module.uuid = _CountedIds()  # a stand-in for the module
        # the world: survives crashes
        self.store = MemoryStore()
        self.api = FakeApiOne()
        self.completed: set[str] = set()
        self._loads = itertools.count(1)
        self._ticks = itertools.count(1)
        self.run: Run | None = None
        # the tally of what the runs did
        self.seen: set[str] = set()
        self.spent_count: Counter[str] = Counter()  # key -> spent generations holding it
        self.spent_gens: set[tuple[str, int]] = set()
        self.spent_jobs: set[str] = set()
        self.gen_sent: dict[str, int] = {}  # entry -> last generation sent
        self.closed: set[str] = set()  # entries closed (everything exhausted, or dissolved)
        # entry -> (gen, load, job_id, keys) of every collected row
        self.collections: dict[str, list[tuple[int, str, str, tuple[str, ...]]]] = {}
        self.reports: dict[tuple[str, int], set[str]] = {}  # spent generation -> its loads
        self.exhausted: dict[str, tuple[str, int]] = {}  # key -> the generation that ended it

    def clock(self) -> float:
        return float(next(self._ticks))

    # --- helpers: what run.py does --------------------------------------------------------

    def _spend(self, entry: Entry, reason: str) -> None:
        """run.py's _settle for a spent job: resend what has attempts left."""
        run = self.run
        assert run is not None
        assert entry.phase in (SENDING, IN_FLIGHT), entry.phase
        gen = (entry.entry_id, entry.gen)
        assert gen not in self.spent_gens, f"generation {gen} spent twice"
        if entry.job_id is not None:
            assert entry.job_id not in self.spent_jobs, f"job {entry.job_id} spent twice"
            self.spent_jobs.add(entry.job_id)
        self.spent_gens.add(gen)
        keys = keys_of(entry)
        if entry.collected_in:
            event("spent after its collection into a load that never completed")
        resend = [
            BatchItem(i.key, i.record, list(i.pks), i.attempt + 1)
            for i in entry.items
            if i.attempt < MAX_ATTEMPTS
        ]
        exhausted = [i.key for i in entry.items if i.attempt >= MAX_ATTEMPTS]
        spent = run.journal.spend(entry, reason, f"it {reason}", resend, run.load_id)
        assert (spent.gen, spent.reason, [i.key for i in spent.items]) == (gen[1], reason, keys)
        assert spent.resend == {i.key for i in resend} and spent.loads == {run.load_id}
        assert (entry.phase, entry.gen, keys_of(entry), entry.job_id) == (
            TO_SEND if resend else CLOSED,
            gen[1],
            [i.key for i in resend],
            None,
        )
        self.spent_count.update(keys)
        self.reports[gen] = {run.load_id}
        if exhausted:
            event("records exhausted")
        for key in exhausted:
            self.exhausted[key] = gen
        if resend:
            if not has(run.to_send, entry):
                run.to_send.append(entry)
        else:
            self.closed.add(entry.entry_id)

    def _submit(self, entry: Entry, items: list[BatchItem], outcome: str) -> str:
        """The scheduler's _submit_one; returns sent, lost, unsent or crashed."""
        run = self.run
        assert run is not None
        gen = entry.gen + 1
        run.journal.send(entry, items)
        keys = [i.key for i in items]
        assert (entry.phase, entry.gen, keys_of(entry), entry.job_id) == (SENDING, gen, keys, None)
        self.gen_sent[entry.entry_id] = gen
        if outcome == "created":
            job_id = self.api.create(keys)
            run.journal.job_created(entry, job_id)
            assert (entry.phase, entry.job_id, entry.collected_in) == (IN_FLIGHT, job_id, set())
            return "sent"
        if outcome == "lost":
            self.api.create(keys)
            run.lost.append(entry)
            return "lost"
        if outcome in ("refused", "shrink"):
            run.journal.unsent(entry, outcome)
            assert (entry.phase, entry.gen, keys_of(entry)) == (TO_SEND, gen, keys)
            if outcome == "shrink" and len(items) > 1:
                run.limit = min(run.limit, len(items) // 2)
            return "unsent"
        if outcome == "in_air_billed":
            self.api.create(keys)
        self._restart()  # the process died with the request in the air
        return "crashed"

    def _pollable(self) -> list[Entry]:
        assert self.run is not None
        return [e for e in self.run.journal.in_phase(IN_FLIGHT) if not has(self.run.collected, e)]

    def _final_jobs(self) -> set[str]:
        return {
            job_id
            for rows in self.collections.values()
            for _, load, job_id, _ in rows
            if load in self.completed
        }

    def _check_deleted(self, entry_id: str) -> None:
        gen = self.gen_sent.get(entry_id, 0)
        results_loaded = any(
            g == gen and load in self.completed
            for g, load, _, _ in self.collections.get(entry_id, [])
        )
        assert results_loaded or entry_id in self.closed, (
            f"entry {entry_id} deleted without its results in a completed load"
        )
        for (eid, g), loads in self.reports.items():
            if eid == entry_id:
                assert loads & self.completed, (
                    f"entry {entry_id} deleted before the report of generation {g} was loaded"
                )

    # --- runs: start (settle what earlier runs left), finish, crash ------------------------

    def _open(self) -> None:
        """A run starts: a new Journal over the same store, opened on the completed loads."""
        load_id = f"load{next(self._loads)}"
        journal = Journal(self.store, SCOPE, "pipeline", load_id, self.clock)
        before = set(fold(self.store.read(SCOPE)))
        journal.open(lambda loads: loads & self.completed)
        after = fold(self.store.read(SCOPE))
        assert set(journal.entries) == set(after)
        for entry_id in before - set(after):
            self._check_deleted(entry_id)
        run = self.run = Run(journal, load_id)
        run.unreported = [(e, s) for e in journal.entries.values() for s in e.unreported]
        run.lost = journal.in_phase(SENDING)
        # what this start found (see --hypothesis-show-statistics)
        if before - set(after):
            event("start: finished entries deleted")
        if run.unreported:
            event("start: spent generations to report again")
        if any(e.done for e in journal.entries.values()):
            event("start: a collected entry kept until its reports are loaded")
        if run.lost:
            event("start: lost answers")
        if any(e.collected_in for e in journal.in_phase(IN_FLIGHT)):
            event("start: a job collected into a load that never completed")
        self._check()

    def _settle_carried(self, crash_at: int | None) -> bool:
        """run.py's first steps: report again, spend lost answers, queue records to send.

        Crashes before transition ``crash_at``; returns False if it did.
        """
        run = self.run
        assert run is not None
        step = 0
        while run.unreported:
            if step == crash_at:
                return False
            entry, spent = run.unreported.pop(0)
            run.journal.reported(entry, spent, run.load_id)
            assert run.load_id in spent.loads
            self.reports[(entry.entry_id, spent.gen)].add(run.load_id)
            self._check()
            step += 1
        while run.lost:
            if step == crash_at:
                return False
            self._spend(run.lost.pop(0), LOST)
            self._check()
            step += 1
        # carried jobs in flight are polled by `poll`; records to send join the queue
        run.to_send.extend(e for e in run.journal.in_phase(TO_SEND) if not has(run.to_send, e))
        return True

    def _restart(self, crash_at: int | None = None) -> None:
        """The next run starts (and may crash while settling, then another one starts)."""
        self.run = None
        while True:
            self._open()
            if self._settle_carried(crash_at):
                return
            self.run = None
            crash_at = None

    @initialize(crash_at=CRASH_AT)
    def first_run(self, crash_at: int | None) -> None:
        self._restart(crash_at)

    @rule(crash_at=CRASH_AT)
    def crash(self, crash_at: int | None) -> None:
        """The process dies: every in-memory object is gone, the load never completes."""
        self._restart(crash_at)

    @precondition(lambda self: self.run is not None)
    @rule(load_completes=st.booleans(), crash_at=CRASH_AT)
    def finish_run(self, load_completes: bool, crash_at: int | None) -> None:
        """The end of extract (collected jobs point at this run's load), then the load."""
        run = self.run
        assert run is not None
        while run.lost:  # the run waits for every finished job, lost answers included
            self._spend(run.lost.pop(0), LOST)
            self._check()
        run.journal.collected(run.collected, run.load_id)
        for e in run.collected:
            assert e.job_id is not None and e.phase == IN_FLIGHT and run.load_id in e.collected_in
            rows = self.collections.setdefault(e.entry_id, [])
            rows.append((e.gen, run.load_id, e.job_id, tuple(keys_of(e))))
        self._check()
        if load_completes:
            self.completed.add(run.load_id)
        self._restart(crash_at)

    @precondition(lambda self: self.run is not None and self.run.lost)
    @rule()
    def settle_lost(self) -> None:
        """A submit answer lost in this run is spent."""
        assert self.run is not None
        self._spend(self.run.lost.pop(0), LOST)

    # --- rules: inside a run -----------------------------------------------------------

    @precondition(lambda self: self.run is not None)
    @rule(
        keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=6, unique=True),
        outcome=st.sampled_from(SEND_OUTCOMES),
    )
    def new_keys(self, keys: list[str], outcome: str) -> None:
        """Input rows arrive: keys never seen go out as a new entry (seen ones are known)."""
        run = self.run
        assert run is not None
        new = [k for k in keys if k not in self.seen][: run.limit]
        if not new:
            return
        self.seen.update(new)
        items = [BatchItem(k, {"domain": f"{k}.com"}, [f"pk-{k}"], 1) for k in new]
        entry = run.journal.new_entry()
        if self._submit(entry, items, outcome) == "unsent":
            run.to_send.append(entry)

    @precondition(lambda self: self.run is not None and self.run.to_send)
    @rule(outcome=st.sampled_from(SEND_OUTCOMES))
    def send_again(self, outcome: str) -> None:
        """run.py's _send_entries: the head of the queue goes, dissolved if too large."""
        run = self.run
        assert run is not None
        entry = run.to_send[0]
        assert entry.phase == TO_SEND and not entry.done, entry.phase
        if len(entry.items) > run.limit:
            size = run.limit
            pieces = [entry.items[i : i + size] for i in range(0, len(entry.items), size)]
            new = run.journal.dissolve(entry, pieces)
            assert (entry.phase, entry.items) == (CLOSED, [])
            assert [(e.phase, keys_of(e)) for e in new] == [
                (TO_SEND, [i.key for i in piece]) for piece in pieces
            ]
            run.to_send[:1] = new
            event("dissolved")
            self.closed.add(entry.entry_id)
            return
        if self._submit(entry, entry.items, outcome) in ("sent", "lost"):
            run.to_send.pop(0)

    @precondition(lambda self: self.run is not None and self._pollable())
    @rule(pick=st.integers(0, 15), wanted=st.sampled_from(POLL_OUTCOMES))
    def poll(self, pick: int, wanted: str) -> None:
        """A job in flight (this run's or carried over) is looked at."""
        run = self.run
        assert run is not None
        pollable = self._pollable()
        entry = pollable[pick % len(pollable)]
        job_id = entry.job_id
        assert job_id is not None
        assert job_id not in self.spent_jobs, f"spent job {job_id} polled again"
        assert job_id not in self._final_jobs(), f"job {job_id} polled after it was loaded"
        said = self.api.look(job_id, wanted)
        if said is None:
            return
        if said == DEFERRED:
            deferrals = entry.deferrals
            run.journal.deferred(entry, "status 'paused' is not in the contract")
            assert (entry.phase, entry.job_id, entry.deferrals) == (
                IN_FLIGHT,
                job_id,
                deferrals + 1,
            )
        elif said == COMPLETED:
            run.collected.append(entry)
        else:
            self._spend(entry, said)

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def billed_only_for_spent_generations(self) -> None:
        for key, billed in self.api.billed.items():
            assert billed <= 1 + self.spent_count[key], (
                f"{key} billed {billed} times with {self.spent_count[key]} spent generation(s)"
            )
            assert billed <= MAX_ATTEMPTS, f"{key} billed {billed} times"

    @invariant()
    def store_folds_to_the_journal(self) -> None:
        if self.run is None:
            return
        folded = fold(self.store.read(SCOPE))
        assert set(folded) == set(self.run.journal.entries)
        for entry_id, entry in self.run.journal.entries.items():
            assert view(folded[entry_id]) == view(entry), entry_id

    @invariant()
    def open_entries_hold_distinct_keys_and_live_jobs(self) -> None:
        if self.run is None:
            return
        holder: dict[str, str] = {}
        for key, entry in self.run.journal.reserved_keys():
            assert holder.setdefault(key, entry.entry_id) == entry.entry_id and (
                keys_of(entry).count(key) == 1
            ), f"{key} is in two open entries"
        final = self._final_jobs()
        for entry in self.run.journal.in_phase(TO_SEND, SENDING, IN_FLIGHT, CLOSED):
            assert entry.job_id not in final, f"job {entry.job_id} is open after it was loaded"
        for entry in self.run.journal.entries.values():
            if entry.phase == IN_FLIGHT:
                assert entry.job_id not in self.spent_jobs, f"spent job {entry.job_id} in flight"
                job = self.api.jobs[str(entry.job_id)]
                assert job.keys == tuple(keys_of(entry)), (entry.job_id, job.keys, keys_of(entry))

    @invariant()
    def no_key_is_forgotten(self) -> None:
        if self.run is None:
            return
        held = {key for key, _ in self.run.journal.reserved_keys()}
        held |= {key for e in self.run.collected for key in keys_of(e)}
        final = {key for e in self._final_jobs() for key in self.api.jobs[e].keys}
        for key in self.seen - held - final:
            assert key in self.exhausted, f"{key} is neither open, collected nor exhausted"

    def _check(self) -> None:
        """Every invariant, between the transitions of one rule."""
        self.billed_only_for_spent_generations()
        self.store_folds_to_the_journal()
        self.open_entries_hold_distinct_keys_and_live_jobs()
        self.no_key_is_forgotten()

    # --- the end: runs without crashes until nothing is open ---------------------------

    def teardown(self) -> None:
        """Runs that never crash, where every submit is answered and every job completes."""
        try:
            self._finish_every_run()
        finally:
            journal_module.uuid = uuid

    def _finish_every_run(self) -> None:
        if self.run is None or sys.exc_info()[0] is not None:
            return  # a step failed: that failure is the report, not what follows it
        for _ in range(6):
            run = self.run
            while run.to_send or run.lost or self._pollable():
                if run.lost:
                    self.settle_lost()
                elif run.to_send:
                    self.send_again("created")
                else:
                    self.poll(0, COMPLETED)
                self._check()
            self.finish_run(load_completes=True, crash_at=None)
            if not self.store.rows:
                break
        assert not self.store.rows, "the journal did not empty in runs without crashes"

        finals: Counter[str] = Counter()
        for rows in self.collections.values():
            for _, load, job_id, keys in rows:
                if load in self.completed:
                    assert self.api.jobs[job_id].keys == keys
                    finals.update(keys)
        for key in sorted(self.seen):
            ended = self.exhausted.get(key)
            if ended is None:
                assert finals[key] == 1, f"{key} collected {finals[key]} times"
            else:
                assert finals[key] == 0, f"{key} exhausted and collected"
                assert self.reports[ended] & self.completed, f"{key}'s report never loaded"


JournalLifecycle.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestJournalLifecycle = JournalLifecycle.TestCase


def test_a_running_jobs_records_wait_as_json_and_come_back_whole() -> None:
    """Once sent, an entry's records are one string until they are used, not a thousand
    objects (1M records: 100k wait at once). Read again they are what was sent, and a
    row that joins a key afterwards stays with it."""
    journal = Journal(MemoryStore(), SCOPE, "p", "load_1", lambda: 0.0)
    entries = [journal.new_entry() for _ in range(20)]

    def items() -> list[BatchItem]:
        return [
            BatchItem(f"company-{i:07d}.example.com", {"domain": f"c{i}"}, [str(i)])
            for i in range(1000)
        ]

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, entry in enumerate(entries):
            journal.send(entry, items())
            journal.job_created(entry, f"job_{n}")
        per_record = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    finally:
        tracemalloc.stop()
    # as objects about 500 bytes; as JSON about 70, and the memory store's copy as much
    assert per_record < 250, f"{per_record:.0f} bytes per record in flight"
    parsed = entries[3].items
    assert [(i.key, i.record, i.pks, i.attempt) for i in parsed] == [
        (i.key, i.record, i.pks, i.attempt) for i in items()
    ]
    parsed[7].add_pks(["joined"])
    assert entries[3].items[7].pks == ["7", "joined"]
