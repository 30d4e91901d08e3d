"""A local write-ahead journal of submits and jobs, durable across SIGKILL.

dlt commits resource state only after a successful extract and restores it only from
completed loads, so a job id that exists only in dlt state is lost if the process dies
between the submit answer and the end of extract. The journal closes that window: an
*intent* (what is about to be sent) is committed before the request leaves, and the job
id is committed in the same transaction that removes the intent, the moment the answer
arrives. SQLite in WAL mode with ``synchronous=FULL`` makes each commit durable.

What remains after a crash:

* an intent without a job: the submit was in flight, its answer was lost. The server may
  have created (and billed) the job; the records are resubmitted and the event is
  counted (the one accepted double payment);
* a job ``in_flight``: collected by the next run;
* a job ``fetched`` into load package ``load_id``: done if that load completed, otherwise
  the package was lost and the results are fetched again.

The file lives beside the pipeline's working directory (see :meth:`Journal.path_for`);
if the pipelines directory itself is lost, dlt state restored from the destination still
holds the job ids that were in flight at the end of the last completed load.
"""

from __future__ import annotations

import fcntl
import json
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apione_source.errors import ConcurrentRunError

IN_FLIGHT = "in_flight"
FETCHED = "fetched"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS intents (
    intent_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    created_at REAL NOT NULL,
    items TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    record_count INTEGER NOT NULL,
    submitted_at REAL NOT NULL,
    run_id TEXT NOT NULL,
    items TEXT,
    load_id TEXT
);
"""


@dataclass
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


@dataclass
class JournalJob:
    """A job the journal knows about."""

    job_id: str
    type: str
    state: str
    attempt: int
    record_count: int
    submitted_at: float
    run_id: str
    items: list[BatchItem] | None
    load_id: str | None = None


@dataclass
class LostSubmit:
    """A submit whose answer never arrived (crash or lost answer)."""

    intent_id: str
    type: str
    attempt: int
    created_at: float
    items: list[BatchItem]


def _dump_items(items: list[BatchItem] | None) -> str | None:
    if items is None:
        return None
    return json.dumps([i.to_json() for i in items], separators=(",", ":"))


def _load_items(raw: str | None) -> list[BatchItem] | None:
    if raw is None:
        return None
    return [BatchItem.from_json(r) for r in json.loads(raw)]


class Journal:
    """SQLite-backed journal; every method commits before it returns."""

    @staticmethod
    def path_for(pipelines_dir: str | Path, pipeline_name: str, resource_name: str) -> Path:
        """Where a resource's journal lives: beside its pipeline's working dir, not in it.

        dlt wipes the working dir when it finds local data but no dataset at the
        destination (a first run killed before its first load): a journal inside would
        be wiped with it, and every job it knew paid for again. One journal per resource,
        so two enrichments in one pipeline never see each other's jobs.
        """
        return Path(pipelines_dir) / f"{pipeline_name}.{resource_name}.apione_journal.sqlite"

    def __init__(self, path: str | Path) -> None:
        """Open (creating if needed) the journal at ``path``, locking it for this run.

        Raises:
            ConcurrentRunError: Another process holds the journal (a run of the same
                pipeline is in progress): two runs would submit the same records.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The lock is released by the OS when the process dies, so a SIGKILL never
        # leaves a stale lock behind.
        self._lock = open(self.path.with_suffix(".lock"), "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ConcurrentRunError(
                f"another run of this pipeline holds {self.path}: run one at a time per "
                "pipeline name and working directory"
            ) from None
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one short transaction each.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database and release the run lock."""
        self._db.close()
        self._lock.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- submits ---------------------------------------------------------------------

    def begin_submit(self, type_: str, attempt: int, items: list[BatchItem], now: float) -> str:
        """Record what is about to be sent; call before the request leaves.

        Returns:
            The intent id, to pass to :meth:`submitted` or :meth:`abandon`.
        """
        intent_id = uuid.uuid4().hex
        with self._tx() as db:
            db.execute(
                "INSERT INTO intents VALUES (?, ?, ?, ?, ?)",
                (intent_id, type_, attempt, now, _dump_items(items)),
            )
        return intent_id

    def submitted(self, intent_id: str, job_id: str, run_id: str, now: float) -> JournalJob:
        """Turn an intent into an in-flight job, atomically, as soon as the answer arrives."""
        with self._tx() as db:
            row = db.execute(
                "SELECT type, attempt, items FROM intents WHERE intent_id = ?", (intent_id,)
            ).fetchone()
            if row is None:
                raise KeyError(f"unknown submit intent {intent_id}")
            type_, attempt, items_raw = row
            items = _load_items(items_raw) or []
            db.execute("DELETE FROM intents WHERE intent_id = ?", (intent_id,))
            db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (job_id, type_, IN_FLIGHT, attempt, len(items), now, run_id, items_raw),
            )
        return JournalJob(job_id, type_, IN_FLIGHT, attempt, len(items), now, run_id, items)

    def abandon(self, intent_id: str) -> None:
        """Drop an intent that certainly created no job (e.g. answered 413 or 429)."""
        with self._tx() as db:
            db.execute("DELETE FROM intents WHERE intent_id = ?", (intent_id,))

    def lost_submits(self) -> list[LostSubmit]:
        """Intents left by a previous process: their answers were lost."""
        rows = self._db.execute(
            "SELECT intent_id, type, attempt, created_at, items FROM intents"
        ).fetchall()
        return [LostSubmit(r[0], r[1], r[2], r[3], _load_items(r[4]) or []) for r in rows]

    # --- jobs ------------------------------------------------------------------------

    def adopt(self, job: JournalJob) -> None:
        """Insert a job known from elsewhere (dlt state) if the journal lacks it."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.job_id,
                    job.type,
                    job.state,
                    job.attempt,
                    job.record_count,
                    job.submitted_at,
                    job.run_id,
                    _dump_items(job.items),
                    job.load_id,
                ),
            )

    def jobs(self, state: str | None = None) -> list[JournalJob]:
        """Jobs in the journal, optionally only those in ``state``, oldest first."""
        sql = (
            "SELECT * FROM jobs" + (" WHERE state = ?" if state else "") + " ORDER BY submitted_at"
        )
        rows = self._db.execute(sql, (state,) if state else ()).fetchall()
        return [
            JournalJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], _load_items(r[7]), r[8])
            for r in rows
        ]

    def mark_fetched(self, job_ids: list[str], load_id: str) -> None:
        """Record that these jobs' outcomes went into load package ``load_id``."""
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state = ?, load_id = ? WHERE job_id = ?",
                [(FETCHED, load_id, j) for j in job_ids],
            )

    def reopen(self, job_ids: list[str]) -> None:
        """Put fetched jobs back in flight: their load package never completed."""
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state = ?, load_id = NULL WHERE job_id = ?",
                [(IN_FLIGHT, j) for j in job_ids],
            )

    def update_items(self, job: JournalJob) -> None:
        """Persist input rows that joined a running job after it was submitted."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET items = ? WHERE job_id = ?", (_dump_items(job.items), job.job_id)
            )

    def forget(self, job_ids: Sequence[str] = (), intent_ids: Sequence[str] = ()) -> None:
        """Delete jobs whose outcomes are loaded, and intents already accounted for."""
        with self._tx() as db:
            db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids])
            db.executemany("DELETE FROM intents WHERE intent_id = ?", [(i,) for i in intent_ids])
