"""The job journal: every paid submit's lifecycle, one durable row per transition.

ApiOne bills a record when a job is created, so the journal must know about a submit
*before* the request leaves, and must never let two runs act on the same spent job.
It is a state machine over *entries*. An entry is a batch of unique records that stays
together across resends; each resend is a new generation ``g`` of the same entry::

    send(g) ──► job(g) ──► collected(g, L) ──► done once load L completed
      │           │
      │           └──► spent(g, reason, resend, L) ──► send(g+1) ──► ...
      │                 (failed, expired, timed_out, vanished)
      ├──► unsent(g)    the request certainly created no job: send again, free
      └──► (nothing)    a later run finds it: the answer was lost -> spent(g, lost)

    planned ──► send(1)          a piece of an entry dissolved after a 413
    job(g) ──► deferred          a status answer ApiOne's contract does not know:
                                 keep the job (and its keys) and look again later
    job(g) ──► joined            input rows that arrived later for a key in flight

Why it is safe under a kill anywhere:

* Every transition is **one INSERT statement** (one or several rows), atomic on every SQL
  warehouse, written through the destination's own SQL client the moment it happens. A
  spent job and its replacement are the same row, so a job can neither be replaced twice
  nor handled again once replaced.
* ``collected``/``spent`` rows name the load package that carries their rows; they count
  only once dlt marked that load completed (``_dlt_loads``). Until then a collected job is
  fetched again and a spent job's report is written again (both merge idempotently).
* The table lives in the destination dataset, beside dlt's own state, so a run on an
  empty disk (a new container, a wiped pipelines dir) knows every paid job.
* The journal is keyed by *scope* (the outcomes table), not by pipeline: two pipeline
  names over the same tables and dataset see, and never pay for, each other's jobs.

The pure part (:func:`fold`) turns rows into entries; :class:`Journal` writes the
transitions through a :class:`JournalStore`. Both are small enough to test exhaustively
(``tests/test_journal_state_machine.py``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
from dlt.common.json import json as fast_json
from dlt.destinations.exceptions import DatabaseException

from apione_source.duckdb_cache import release_cached_pages
from apione_source.errors import JournalCorruptError

# Entry phases (derived, never stored).
TO_SEND = "to_send"  # records to send: nothing in flight, nothing paid for this generation
SENDING = "sending"  # send(g) written, no answer yet; found at a run's start: lost answer
IN_FLIGHT = "in_flight"  # a job exists (possibly collected into a load not yet completed)
CLOSED = "closed"  # nothing more to send or collect (reports may still be unconfirmed)

# Reasons a job is spent; each may mean the records were paid once more.
FAILED = "failed"
EXPIRED = "expired"
TIMED_OUT = "timed_out"
VANISHED = "vanished"
LOST = "lost"
SPENT_REASONS = (FAILED, EXPIRED, TIMED_OUT, VANISHED, LOST)

# Every value is non-NULL ('' when unset): typed NULL parameters trip some drivers.
COLUMNS = (
    "entry_id",  # one batch of unique records, across its resends
    "seq",  # order of the entry's rows
    "gen",  # which send of the entry
    "event",  # the transition
    "scope",  # the outcomes table: every pipeline loading into it shares the entries
    "pipeline",  # the pipeline that wrote the row (for people reading the table)
    "job_id",
    "reason",  # why a job was spent
    "error",
    "items",  # JSON: [key, record, input pks, attempt] per record
    "load_id",  # the load package a row's results or report travel in
    "written_at",  # unix seconds
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchItem:
    """One unique record of a batch, with the input rows (primary keys) it stands for.

    Attributes:
        key: The normalized key.
        record: The record sent to ApiOne.
        pks: Primary keys of the input rows carrying this key (JSON-safe strings).
        attempt: Which attempt this is for the key (1 = first submit).
        cursor: Cursor value of the first input row with this key (not journaled: only
            used to keep the input cursor from passing an unsent key).
    """

    key: str
    record: dict[str, Any]
    pks: list[str] = field(default_factory=list)
    attempt: int = 1
    cursor: Any = None

    def to_json(self) -> list[Any]:
        """Compact JSON form for the journal."""
        return [self.key, self.record, self.pks, self.attempt]

    @classmethod
    def from_json(cls, raw: list[Any]) -> BatchItem:
        """Inverse of :meth:`to_json`."""
        key, record, pks, attempt = raw
        return cls(key, record, list(pks), int(attempt))

    def add_pks(self, pks: Iterable[str]) -> list[str]:
        """Add input rows to this key; returns those that were new."""
        seen = set(self.pks)
        new = [p for p in pks if p not in seen and not seen.add(p)]  # type: ignore[func-returns-value]
        self.pks.extend(new)
        return new


@dataclass
class SpentGen:
    """A generation of an entry whose job ended without usable results.

    Attributes:
        gen: The generation.
        job_id: The job, or None when the submit answer was lost.
        reason: One of :data:`SPENT_REASONS`.
        error: What ApiOne (or the run) said.
        items: The records of that generation (with their input rows).
        resend: Keys sent again in the next generation (the rest ended ``error``).
        submitted_at: When that generation was sent (unix seconds).
        at: When it was found spent.
        sent_in_load: The load id of the run that sent it.
        loads: Load packages that carry its report.
    """

    gen: int
    job_id: str | None
    reason: str
    error: str
    items: list[BatchItem]
    resend: set[str]
    submitted_at: float
    at: float
    sent_in_load: str = ""
    loads: set[str] = field(default_factory=set)


@dataclass
class Entry:
    """An entry folded from its journal rows (see the module docstring)."""

    entry_id: str
    scope: str
    pipeline: str
    gen: int = 0
    phase: str = TO_SEND
    _items: list[BatchItem] = field(default_factory=list, repr=False)
    # The journal's JSON of the items, parsed when first used: a run never parses the
    # records it has just written (every send), only what it reads back of open entries.
    _raw_items: str | None = field(default=None, repr=False)
    job_id: str | None = None
    sent_at: float = 0.0
    sent_in_load: str = ""
    submitted_at: float = 0.0
    collected_in: set[str] = field(default_factory=set)
    spent: list[SpentGen] = field(default_factory=list)
    deferrals: int = 0
    last_deferred_at: float = 0.0
    seq: int = 0  # last row's sequence number: rows of one entry are ordered by it
    # Filled in by Journal.open from the completed loads:
    done: bool = False
    unreported: list[SpentGen] = field(default_factory=list)

    @property
    def items(self) -> list[BatchItem]:
        """The records of the current generation, with their input rows."""
        if self._raw_items is not None:
            self._items, self._raw_items = _items(self._raw_items), None
        return self._items

    @items.setter
    def items(self, items: list[BatchItem]) -> None:
        self._items, self._raw_items = items, None

    def set_items_json(self, raw: str) -> None:
        """Items as the journal wrote them, parsed when first used."""
        self._items, self._raw_items = [], raw or None

    @property
    def attempt(self) -> int:
        """The highest attempt among the records of the current generation."""
        return max((i.attempt for i in self.items), default=1)


class JournalStore(Protocol):
    """Where journal rows live: append (one atomic statement), read, delete."""

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert ``rows`` in one atomic statement."""

    def read(
        self, scope: str, entry_ids: Sequence[str] | None = None, lean: bool = False
    ) -> list[dict[str, Any]]:
        """Every row of ``scope`` (of ``entry_ids`` only, when given).

        ``lean``: the ``items`` of ``planned`` and ``send`` rows (every record sent) read as
        ``''``: enough to tell which entries are finished.
        """

    def delete(self, scope: str, entry_ids: Sequence[str]) -> None:
        """Forget finished entries."""


class MemoryStore:
    """A :class:`JournalStore` in a list, for tests and for reasoning."""

    def __init__(self) -> None:
        """An empty store."""
        self.rows: list[dict[str, Any]] = []

    def append(self, rows: Sequence[dict[str, Any]]) -> None:  # noqa: D102
        self.rows.extend(dict(r) for r in rows)

    def read(  # noqa: D102
        self, scope: str, entry_ids: Sequence[str] | None = None, lean: bool = False
    ) -> list[dict[str, Any]]:
        wanted = None if entry_ids is None else set(entry_ids)
        rows = [
            dict(r)
            for r in self.rows
            if r["scope"] == scope and (wanted is None or r["entry_id"] in wanted)
        ]
        for row in rows if lean else ():
            if row["event"] in _SENT_EVENTS:
                row["items"] = ""
        return rows

    def delete(self, scope: str, entry_ids: Sequence[str]) -> None:  # noqa: D102
        gone = set(entry_ids)
        self.rows = [r for r in self.rows if not (r["scope"] == scope and r["entry_id"] in gone)]


# Events whose items are every record sent: a lean read leaves them out.
_SENT_EVENTS = ("planned", "send")


def _items_json(items: Iterable[BatchItem]) -> str:
    # dlt's orjson-backed encoder: a job's thousand records in a tenth of json.dumps's time
    return fast_json.dumps([i.to_json() for i in items])


def _items(raw: str) -> list[BatchItem]:
    return [BatchItem.from_json(r) for r in json.loads(raw)] if raw else []


def fold(rows: Iterable[dict[str, Any]]) -> dict[str, Entry]:
    """Entries from journal rows (pure). Rows of one entry are applied in ``seq`` order.

    Raises:
        JournalCorruptError: A row cannot be read (edited by hand, or truncated).
    """
    by_entry: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_entry.setdefault(row["entry_id"], []).append(row)
    entries = {}
    for entry_id, entry_rows in by_entry.items():
        try:
            entry_rows.sort(key=lambda r: int(r["seq"]))
            first = entry_rows[0]
            entry = Entry(entry_id, first["scope"], first["pipeline"])
            for row in entry_rows:
                _apply(entry, row)
        except (ValueError, TypeError, KeyError) as exc:
            raise _corrupt(entry_id, exc) from None
        entries[entry_id] = entry
    return entries


def _settle(entry: Entry, done_loads: set[str]) -> bool:
    """Mark what completed loads mean for ``entry``; True when it can be forgotten."""
    entry.unreported = [s for s in entry.spent if not s.loads & done_loads]
    entry.done = entry.phase == CLOSED or (
        entry.phase == IN_FLIGHT and bool(entry.collected_in & done_loads)
    )
    return entry.done and not entry.unreported


def open_entries(
    rows: Iterable[dict[str, Any]], completed: Callable[[set[str]], set[str]]
) -> list[Entry]:
    """The entries of journal ``rows`` a run would still act on; writes nothing.

    The read-only twin of :meth:`Journal.open` (``apione-dlt status``).
    """
    entries = fold(rows)
    loads: set[str] = set()
    for e in entries.values():
        loads |= e.collected_in
        for s in e.spent:
            loads |= s.loads
    done = completed(loads) if loads else set()
    return [e for e in entries.values() if not _settle(e, done)]


def _read_items(entry: Entry) -> None:
    try:
        entry.items  # noqa: B018 (parses them)
    except (ValueError, TypeError, KeyError) as exc:
        raise _corrupt(entry.entry_id, exc) from None


def _corrupt(entry_id: str, exc: Exception) -> JournalCorruptError:
    return JournalCorruptError(
        f"the job journal has an unreadable row for entry {entry_id!r} "
        f"({type(exc).__name__}: {exc}). Its records may be in flight and paid for: "
        "restore the row, or, once you know the job's results are loaded, delete the "
        "entry's rows (DELETE FROM <dataset>._apione_journal WHERE entry_id = ...)"
    )


def _apply(entry: Entry, row: dict[str, Any]) -> None:
    """Apply one row. A row that does not fit the entry's phase is ignored.

    Never raise here: one odd row must not stop every later run.
    """
    event, gen, at = row["event"], int(row["gen"]), float(row["written_at"])
    entry.seq = int(row["seq"])
    if event == "planned":
        entry.gen, entry.phase = gen, TO_SEND
        entry.set_items_json(row["items"])
    elif event == "send":
        entry.gen, entry.phase = gen, SENDING
        entry.set_items_json(row["items"])
        entry.sent_at, entry.job_id, entry.collected_in = at, None, set()
        entry.sent_in_load = row["load_id"]
        entry.deferrals = 0
    elif event == "unsent" and entry.phase == SENDING and gen == entry.gen:
        entry.phase = TO_SEND
    elif event == "job" and entry.phase == SENDING and gen == entry.gen:
        entry.job_id, entry.submitted_at, entry.phase = row["job_id"], at, IN_FLIGHT
    elif event == "collected" and entry.phase == IN_FLIGHT and gen == entry.gen:
        entry.collected_in.add(row["load_id"])
    elif event == "spent" and entry.phase in (SENDING, IN_FLIGHT) and gen == entry.gen:
        resend = _items(row["items"])
        entry.spent.append(
            SpentGen(
                gen=gen,
                job_id=entry.job_id,
                reason=row["reason"],
                error=row["error"],
                items=entry.items,
                resend={i.key for i in resend},
                submitted_at=entry.submitted_at or entry.sent_at,
                at=at,
                sent_in_load=entry.sent_in_load,
                loads={row["load_id"]},
            )
        )
        entry.job_id, entry.collected_in = None, set()
        if resend:
            entry.items, entry.phase = resend, TO_SEND
        else:
            entry.items, entry.phase = [], CLOSED
    elif event == "reported":
        for spent in entry.spent:
            if spent.gen == gen:
                spent.loads.add(row["load_id"])
    elif event == "joined":
        by_key = {i.key: i for i in entry.items}
        for joined in _items(row["items"]):
            if joined.key in by_key:
                by_key[joined.key].add_pks(joined.pks)
    elif event == "deferred" and entry.phase == IN_FLIGHT and gen == entry.gen:
        entry.deferrals += 1
        entry.last_deferred_at = at
    elif event == "dissolved" and entry.phase == TO_SEND:
        entry.items, entry.phase = [], CLOSED


class Journal:
    """Writes an entry's transitions, one atomic append each, and keeps entries folded.

    One :class:`Journal` serves one run of one scope. Call :meth:`open` first.
    """

    def __init__(
        self,
        store: JournalStore,
        scope: str,
        pipeline: str,
        run_id: str,
        clock: Callable[[], float],
    ) -> None:
        """Bind the journal to ``scope`` (the outcomes table) for one run of ``pipeline``.

        ``run_id`` (the run's load id) is recorded on every submit.
        """
        self.store = store
        self.scope = scope
        self.pipeline = pipeline
        self.run_id = run_id
        self.clock = clock
        self.entries: dict[str, Entry] = {}

    def open(self, completed: Callable[[set[str]], set[str]]) -> None:
        """Read the scope's entries, settle them against completed loads, forget finished ones.

        Args:
            completed: Given load ids, returns those whose load completed at the
                destination.
        """
        # Lean first: most entries are finished (their results are loaded), and their
        # records, most of the journal's bytes, need not be read at all.
        lean = fold(self.store.read(self.scope, lean=True))
        loads = set()
        for e in lean.values():
            loads |= e.collected_in
            for s in e.spent:
                loads |= s.loads
        done_loads = completed(loads) if loads else set()
        finished = {e.entry_id for e in lean.values() if _settle(e, done_loads)}
        if finished:
            self.store.delete(self.scope, sorted(finished))
        kept = [entry_id for entry_id in lean if entry_id not in finished]
        self.entries = fold(self.store.read(self.scope, entry_ids=kept)) if kept else {}
        for e in self.entries.values():
            _settle(e, done_loads)
            _read_items(e)  # the open entries' records are needed: unreadable ones fail here

    # --- reading ------------------------------------------------------------------------

    def in_phase(self, *phases: str) -> list[Entry]:
        """Open entries in one of ``phases``, oldest first."""
        found = [e for e in self.entries.values() if e.phase in phases and not e.done]
        return sorted(found, key=lambda e: (e.sent_at, e.entry_id))

    def reserved_keys(self) -> Iterator[tuple[str, Entry]]:
        """Every key an open entry may still pay for or collect, with its entry."""
        for e in self.entries.values():
            if not e.done:
                for item in e.items:
                    yield item.key, e

    # --- transitions --------------------------------------------------------------------

    def _row(self, entry: Entry, event: str, **values: Any) -> dict[str, Any]:
        entry.seq += 1
        row: dict[str, Any] = dict.fromkeys(COLUMNS, "")
        row.update(
            entry_id=entry.entry_id,
            seq=entry.seq,
            gen=entry.gen,
            event=event,
            scope=self.scope,
            pipeline=self.pipeline,
            written_at=self.clock(),
        )
        row.update(values)
        return row

    def _write(self, entry: Entry, rows: list[dict[str, Any]]) -> None:
        self.store.append(rows)  # durable first: memory follows what the store holds
        for row in rows:
            _apply(entry, row)

    def new_entry(self) -> Entry:
        """A fresh entry (nothing is written until :meth:`send`)."""
        entry = Entry(uuid.uuid4().hex, self.scope, self.pipeline)
        self.entries[entry.entry_id] = entry
        return entry

    def send(self, entry: Entry, items: list[BatchItem]) -> None:
        """Before the request leaves: what is about to be sent (the intent)."""
        if entry.phase != TO_SEND:
            raise RuntimeError(f"entry {entry.entry_id} is {entry.phase}, not to_send")
        row = self._row(entry, "send", items=_items_json(items), gen=entry.gen + 1)
        row["load_id"] = self.run_id
        # The entry keeps the row's JSON (``_apply``), parsed when its items are used
        # again: a job's thousand records wait while it runs and until its results are
        # collected, as objects about 500 bytes a record (100k wait at 1M), as JSON under
        # 100. The caller's objects, with their input cursors, go with the request: a
        # cursor only matters until the send is journaled.
        self._write(entry, [row])

    def job_created(self, entry: Entry, job_id: str) -> None:
        """The submit answer arrived: the job exists (and is billed)."""
        self._write(entry, [self._row(entry, "job", job_id=job_id)])

    def unsent(self, entry: Entry, error: str) -> None:
        """The request certainly created no job (refused before processing)."""
        self._write(entry, [self._row(entry, "unsent", error=error[:2000])])

    def spend(
        self, entry: Entry, reason: str, error: str, resend: list[BatchItem], load_id: str
    ) -> SpentGen:
        """The job ended without usable results; ``resend`` goes out as the next generation.

        ``load_id`` is the package that carries the report (ledger and outcome rows).
        """
        if reason not in SPENT_REASONS:
            raise ValueError(f"unknown spent reason {reason!r}")
        row = self._row(
            entry,
            "spent",
            reason=reason,
            error=error[:2000],
            items=_items_json(resend),
            load_id=load_id,
        )
        self._write(entry, [row])
        return entry.spent[-1]

    def collected(self, entries: Sequence[Entry], load_id: str) -> None:
        """These jobs' results go into load package ``load_id``."""
        rows = [self._row(e, "collected", load_id=load_id) for e in entries]
        if rows:
            self.store.append(rows)
            for e, row in zip(entries, rows, strict=True):
                _apply(e, row)

    def reported(self, entry: Entry, spent: SpentGen, load_id: str) -> None:
        """A spent generation's report goes (again) into load package ``load_id``."""
        row = self._row(entry, "reported", load_id=load_id)
        row["gen"] = spent.gen
        self._write(entry, [row])

    def deferred(self, entry: Entry, error: str) -> None:
        """ApiOne answered something the contract does not know; look again later."""
        self._write(entry, [self._row(entry, "deferred", error=error[:2000])])

    def joined(self, joins: Sequence[tuple[Entry, list[BatchItem]]]) -> None:
        """Input rows that joined open entries after they were written."""
        rows = [self._row(e, "joined", items=_items_json(items)) for e, items in joins if items]
        if rows:
            self.store.append(rows)

    def dissolve(self, entry: Entry, pieces: list[list[BatchItem]]) -> list[Entry]:
        """Split a to-send entry into smaller planned entries, in one statement (after a 413)."""
        new = [Entry(uuid.uuid4().hex, self.scope, self.pipeline) for _ in pieces]
        rows = [self._row(entry, "dissolved")]
        for piece_entry, items in zip(new, pieces, strict=True):
            rows.append(self._row(piece_entry, "planned", items=_items_json(items)))
        self.store.append(rows)
        _apply(entry, rows[0])
        for piece_entry, row in zip(new, rows[1:], strict=True):
            _apply(piece_entry, row)
            self.entries[piece_entry.entry_id] = piece_entry
        return new


# --- the destination store ----------------------------------------------------------------

# Column types per destination dialect; anything else gets the SQL standard names.
_TYPES = {
    "bigquery": ("STRING", "INT64", "FLOAT64"),
    "snowflake": ("VARCHAR", "BIGINT", "FLOAT"),
    "duckdb": ("VARCHAR", "BIGINT", "DOUBLE"),
    "motherduck": ("VARCHAR", "BIGINT", "DOUBLE"),
    "mssql": ("NVARCHAR(MAX)", "BIGINT", "FLOAT"),
    "synapse": ("NVARCHAR(4000)", "BIGINT", "FLOAT"),
    "clickhouse": ("String", "Int64", "Float64"),
}
_DEFAULT_TYPES = ("TEXT", "BIGINT", "DOUBLE PRECISION")
_INT_COLUMNS = ("seq", "gen")
_FLOAT_COLUMNS = ("written_at",)
_INSERT_CHUNK = 100  # rows per INSERT: one statement, so still atomic per transition
_ARROW_SCHEMA = pa.schema(
    (c, pa.int64() if c in _INT_COLUMNS else pa.float64() if c in _FLOAT_COLUMNS else pa.string())
    for c in COLUMNS
)
_ARROW_VIEW = "_apione_journal_rows"


class SqlStore:
    """A :class:`JournalStore` in a table of the destination dataset.

    Written through the destination's own SQL client (autocommit: every INSERT is its own
    transaction), so it needs nothing but the warehouse the results go to.
    """

    def __init__(
        self,
        client_factory: Callable[[], Any],
        table: str,
        dialect: str,
    ) -> None:
        """Prepare the store; the table is created on first use.

        Args:
            client_factory: Opens a dlt SQL client of the destination (e.g.
                ``pipeline.sql_client``).
            table: Table name in the pipeline's dataset.
            dialect: The destination type, e.g. ``duckdb``.
        """
        self._factory = client_factory
        self._table = table
        self._types = _TYPES.get(dialect, _DEFAULT_TYPES)
        self._dialect = dialect
        self._client: Any = None
        self._ctx: AbstractContextManager[Any] | None = None

    def __enter__(self) -> SqlStore:
        self._ctx = self._factory()
        self._client = self._ctx.__enter__()
        if not self._client.has_dataset():
            self._client.create_dataset()
        text, integer, double = self._types
        cols = ", ".join(
            f"{self._client.escape_column_name(c)} "
            f"{integer if c in _INT_COLUMNS else double if c in _FLOAT_COLUMNS else text}"
            for c in COLUMNS
        )
        self._client.execute_sql(f"CREATE TABLE IF NOT EXISTS {self._qualified} ({cols})")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = self._client = None

    def checkpoint(self, staging_tables: Iterable[str] = ()) -> None:
        """DuckDB: write what loads appended into the database file, if nothing is open.

        dlt leaves that to when the last connection closes (its ``checkpoint_threshold``
        is 1 GB of log), and until then DuckDB holds the appended rows in memory: a run
        that loads in slices would hold every slice's. Skipped (the close does it) while
        another transaction is open on the database; the input is read from a temporary
        table for that reason (:func:`apione_source.reader._chunks`). DuckDB evicts what
        it holds before the ``CHECKPOINT`` (even one then skipped) and after it
        (:func:`apione_source.duckdb_cache.release_cached_pages`).

        Args:
            staging_tables: Tables whose staging copies are emptied first: what dlt's
                merge staged for a package that has loaded is dead, and written into the
                file it would cost the checkpoint as much again, only for the next load to
                delete it (dlt's ``truncate_staging_dataset``, a setting of the user's
                pipeline, does the same after every load).
        """
        if self._dialect != "duckdb" or self._client is None:
            return
        try:
            self._empty_staging(set(staging_tables))
        except DatabaseException as exc:
            self._no_checkpoint(exc)
            return
        # Evicted first (rows not yet in the file go to DuckDB's temporary files, pages
        # read from it are dropped): left resident, they were held while the checkpoint
        # added every block it wrote, which made a 1M run's peak (up to 130 MB above its
        # loads'). Between packages nothing else runs on the database, as the eviction
        # needs, whether the CHECKPOINT is then refused or not.
        release_cached_pages(self._client)
        try:
            self._client.execute_sql("CHECKPOINT")
        except DatabaseException as exc:
            self._no_checkpoint(exc)
            return
        release_cached_pages(self._client)  # what the checkpoint wrote

    @staticmethod
    def _no_checkpoint(exc: DatabaseException) -> None:
        # another transaction open: expected; anything else (a full disk, say) is worth
        # seeing, though the next journal write would fail on it anyway
        busy = "Cannot CHECKPOINT" in str(exc)
        logger.log(logging.DEBUG if busy else logging.WARNING, "no checkpoint: %s", exc)

    def _empty_staging(self, tables: set[str]) -> None:
        """Empty the staging copies of ``tables`` that exist."""
        if not tables:
            return
        with self._client.with_staging_dataset():
            with self._client.execute_query(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_catalog = current_database() AND table_schema = %s",
                self._client.dataset_name,
            ) as cur:
                present = sorted(tables.intersection(row[0] for row in cur.fetchall()))
            if present:
                self._client.truncate_tables(*present)

    @property
    def client(self) -> Any:
        """The open dlt SQL client the store writes through."""
        return self._client

    @property
    def _qualified(self) -> str:
        return str(self._client.make_qualified_table_name(self._table))

    def _col(self, name: str) -> str:
        return str(self._client.escape_column_name(name))

    def append(self, rows: Sequence[dict[str, Any]]) -> None:  # noqa: D102
        cols = ", ".join(self._col(c) for c in COLUMNS)
        if self._dialect == "duckdb":
            # One arrow table, not parameters: DuckDB binds each parameter through a
            # lookup of pandas, which costs a failed import (~60 us a value) where pandas
            # is not installed, as in a plain DuckDB deployment: 10x the INSERT itself.
            data = pa.table({c: [row[c] for row in rows] for c in COLUMNS}, _ARROW_SCHEMA)
            conn = self._client.native_connection
            conn.register(_ARROW_VIEW, data)
            try:
                self._client.execute_sql(
                    f"INSERT INTO {self._qualified} ({cols}) SELECT {cols} FROM {_ARROW_VIEW}"
                )
            finally:
                conn.unregister(_ARROW_VIEW)
            return
        one = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[start : start + _INSERT_CHUNK]
            args = [row[c] for row in chunk for c in COLUMNS]
            sql = f"INSERT INTO {self._qualified} ({cols}) VALUES " + ", ".join([one] * len(chunk))
            self._client.execute_sql(sql, *args)

    def read(  # noqa: D102
        self, scope: str, entry_ids: Sequence[str] | None = None, lean: bool = False
    ) -> list[dict[str, Any]]:
        cols = ", ".join(self._col(c) for c in COLUMNS)
        chunks: list[list[str]] = [[]]
        if entry_ids is not None:
            ids = list(entry_ids)
            chunks = [ids[i : i + _INSERT_CHUNK] for i in range(0, len(ids), _INSERT_CHUNK)]
        rows = []
        for chunk in chunks:
            where = f"{self._col('scope')} = %s"
            if chunk:
                where += f" AND {self._col('entry_id')} IN ({', '.join(['%s'] * len(chunk))})"
            sql, args = f"SELECT {cols} FROM {self._qualified} WHERE {where}", [scope, *chunk]
            if lean:
                # Two selects, not a CASE on the event: with a CASE DuckDB still reads
                # every record of every batch sent (1M keys: 90 MB held, 0.2 s).
                sent = ", ".join(f"'{e}'" for e in _SENT_EVENTS)
                event = self._col("event")
                blank = cols.replace(self._col("items"), "''")
                sql = (
                    f"SELECT {blank} FROM {self._qualified} WHERE {where} AND {event} IN "
                    f"({sent}) UNION ALL {sql} AND ({event} IS NULL OR {event} NOT IN ({sent}))"
                )
                args += args
            with self._client.execute_query(sql, *args) as cur:
                rows += [dict(zip(COLUMNS, r, strict=True)) for r in cur.fetchall()]
        return rows

    def delete(self, scope: str, entry_ids: Sequence[str]) -> None:  # noqa: D102
        for start in range(0, len(entry_ids), _INSERT_CHUNK):
            chunk = list(entry_ids[start : start + _INSERT_CHUNK])
            marks = ", ".join(["%s"] * len(chunk))
            self._client.execute_sql(
                f"DELETE FROM {self._qualified} WHERE {self._col('scope')} = %s "
                f"AND {self._col('entry_id')} IN ({marks})",
                scope,
                *chunk,
            )
