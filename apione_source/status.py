"""What is going on: jobs in flight and how long their results last, recent runs, billing.

``apione-dlt status`` reads the job journal, the run summaries and the job ledger in the
destination, and asks ApiOne (when reachable) how each job in flight is doing. It writes
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import dlt
from dlt.destinations.exceptions import DatabaseUndefinedRelation

from apione_source.client import ApiOneClient
from apione_source.errors import ApiOneError
from apione_source.history import confirmed_loads
from apione_source.journal import COLUMNS, IN_FLIGHT, SENDING, TO_SEND, open_entries
from apione_source.run import RunSettings

# A job whose results expire sooner than this is highlighted (or within a quarter of the
# plan's retention, if that is shorter: the free plan keeps results one day).
CLOSE_SECONDS = 24 * 3600.0


@dataclass
class JobInFlight:
    """A job the journal still has to collect (or records it still has to send)."""

    job_id: str | None  # None: records waiting to be sent (or a lost submit's answer)
    phase: str
    records: int
    submitted_at: float | None
    api_status: str | None = None  # ApiOne's, when it answered
    expires_at: float | None = None  # ApiOne's, or the soonest possible from retention
    expiry_known: bool = False

    def seconds_left(self, now: float) -> float | None:
        """Seconds until ApiOne deletes the results (None: not submitted yet)."""
        return None if self.expires_at is None else self.expires_at - now


@dataclass
class Status:
    """The state of one enrichment type's pipeline."""

    jobs: list[JobInFlight] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    billed_per_day: list[tuple[str, int]] = field(default_factory=list)
    api_reachable: bool | None = None  # None: not asked
    retention_seconds: float = 0.0
    now: float = 0.0

    def close_to_expiry(self, job: JobInFlight) -> bool:
        """True when ``job``'s results are deleted soon: collect them now."""
        left = job.seconds_left(self.now)
        return left is not None and left < min(CLOSE_SECONDS, self.retention_seconds / 4)

    def text(self) -> str:
        """A screenful for an operator."""
        lines = [f"jobs in flight: {len(self.jobs)}"]
        if self.api_reachable is False:
            lines.append("  (ApiOne unreachable: expiry is the soonest the plan allows)")
        for job in self.jobs:
            age = "-" if job.submitted_at is None else _duration(self.now - job.submitted_at)
            left = job.seconds_left(self.now)
            expires = "-" if left is None else _duration(left) + ("" if job.expiry_known else "?")
            flag = "  << results expire soon: run now" if self.close_to_expiry(job) else ""
            lines.append(
                f"  {job.job_id or '(not sent)':32} {job.phase:9} {job.api_status or '-':10} "
                f"{job.records:>6} records  age {age:>7}  expires in {expires:>8}{flag}"
            )
        lines.append("last runs:")
        for run in self.runs or [{}]:
            if run:
                lines.append(
                    f"  {run['finished_at']}  read {run['rows_read']}  sent "
                    f"{run['records_submitted']}  collected {run['records_collected']}  "
                    f"carried over {run['jobs_carried_over']} job(s)"
                )
            else:
                lines.append("  none yet")
        lines.append("records billed per day (UTC):")
        lines += [f"  {day}  {n}" for day, n in self.billed_per_day] or ["  none yet"]
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 3600:
        return f"{sign}{s / 60:.0f}m"
    if s < 2 * 86400:
        return f"{sign}{s / 3600:.1f}h"
    return f"{sign}{s / 86400:.1f}d"


def _rows(pipeline: dlt.Pipeline, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``{t}`` -> qualified table names), or none when a table is missing."""
    try:
        with pipeline.sql_client() as client, client.execute_query(sql, *args) as cur:
            return [tuple(r) for r in cur.fetchall()]
    except DatabaseUndefinedRelation:
        return []


def _unix(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()


def pipeline_status(
    pipeline: dlt.Pipeline,
    settings: RunSettings,
    connect: Callable[[], ApiOneClient] | None,
    *,
    clock: Callable[[], float] = time.time,
    runs: int = 5,
    days: int = 7,
) -> Status:
    """The status of ``settings``' enrichment type in ``pipeline``'s dataset.

    Args:
        pipeline: The pipeline the runs use.
        settings: The run's settings (table names, retention).
        connect: Opens an ApiOne client to ask about jobs in flight (None: do not ask).
        clock: Unix time.
        runs: How many of the last runs to show.
        days: How many days of billing to show.
    """
    names = settings.names
    status = Status(retention_seconds=settings.retention_seconds, now=clock())
    with pipeline.sql_client() as client:
        q = client.make_qualified_table_name
        journal, runs_t, jobs_t = q(names.journal), q(names.runs), q(names.jobs)
    cols = ", ".join(COLUMNS)
    rows = _rows(pipeline, f"SELECT {cols} FROM {journal} WHERE scope = %s", names.outcomes)
    entries = open_entries(
        [dict(zip(COLUMNS, r, strict=True)) for r in rows],
        lambda loads: confirmed_loads(pipeline, sorted(loads)),
    )
    for e in sorted(entries, key=lambda e: e.submitted_at or 0):
        if e.phase in (IN_FLIGHT, SENDING, TO_SEND) and not e.done:
            submitted = e.submitted_at or None
            expires = None if submitted is None else submitted + settings.retention_seconds
            status.jobs.append(
                JobInFlight(e.job_id, e.phase, len(e.items), submitted, expires_at=expires)
            )
    asking = [j for j in status.jobs if j.job_id and j.phase == IN_FLIGHT]
    if connect is not None and asking:
        status.api_reachable = True
        try:
            with connect() as api:
                for job in asking:
                    answer = api.get_job(str(job.job_id))
                    job.api_status = answer.status.value
                    if answer.expires_at is not None:
                        job.expires_at, job.expiry_known = _unix(answer.expires_at), True
        except ApiOneError:
            status.api_reachable = False
    type_ = settings.enrichment_type.value
    found = _rows(
        pipeline,
        f"SELECT finished_at, rows_read, records_submitted, records_collected, "
        f"jobs_carried_over FROM {runs_t} WHERE type = %s ORDER BY finished_at DESC",
        type_,
    )
    keys = ("finished_at", "rows_read", "records_submitted", "records_collected")
    status.runs = [dict(zip((*keys, "jobs_carried_over"), r, strict=True)) for r in found[:runs]]
    billed: dict[str, int] = {}
    for submitted_at, count in _rows(
        pipeline, f"SELECT submitted_at, record_count FROM {jobs_t} WHERE type = %s", type_
    ):
        at = _unix(submitted_at)
        if at is not None:
            day = datetime.fromtimestamp(at, tz=timezone.utc).date().isoformat()
            billed[day] = billed.get(day, 0) + int(count or 0)
    status.billed_per_day = sorted(billed.items(), reverse=True)[:days]
    return status
