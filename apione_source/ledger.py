"""Rows of the job ledger, the outcomes table and the rejected-inputs table.

Pure functions: given what happened, the row that records it. Every row carries the
``load_id`` of the run that wrote it, so analysts can join to ``_dlt_loads``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from apione_source.journal import IN_FLIGHT, BatchItem, JournalJob
from apione_source.scheduler import Finished
from apione_source.tables import outcome_id, utc_from_timestamp

# The ledger's status of a submit whose answer was lost (next to the scheduler's
# Finished.kind values and the journal's in_flight).
LOST = "lost"


def outcome_row(
    key: str,
    pk: str | None,
    job_id: str | None,
    attempt: int,
    status: str,
    error: str | None,
    record: Any,
    finished_at: datetime,
    load_id: str,
) -> dict[str, Any]:
    """One outcome: what happened to input row ``pk`` (key ``key``) in job ``job_id``."""
    return {
        "outcome_id": outcome_id(job_id, pk, key),
        "input_pk": pk,
        "key": key,
        "job_id": job_id,
        "attempt": attempt,
        "status": status,
        "error": error,
        "input": record,
        "finished_at": finished_at,
        "load_id": load_id,
    }


def outcome_rows(
    item: BatchItem, job_id: str, status: str, error: str | None, now: datetime, load_id: str
) -> list[dict[str, Any]]:
    """One outcome per input row behind ``item`` (one with no ``input_pk`` if none known)."""
    pks: list[str | None] = list(item.pks) or [None]
    return [
        outcome_row(item.key, pk, job_id, item.attempt, status, error, item.record, now, load_id)
        for pk in pks
    ]


def rejected_row(pk: str, reason: str, detail: str, now: datetime, load_id: str) -> dict[str, Any]:
    """An input row that could not be sent, and why."""
    return {
        "input_pk": pk,
        "reason": reason,
        "detail": detail,
        "rejected_at": now,
        "load_id": load_id,
    }


def fixed_rejection_row(pk: str, now: datetime, load_id: str) -> dict[str, Any]:
    """Removes an earlier rejection of input row ``pk``: it can be sent now."""
    return {
        "input_pk": pk,
        "reason": "fixed",
        "rejected_at": now,
        "load_id": load_id,
        "fixed": True,
    }


def finished_job_row(fin: Finished, counts: dict[str, int], load_id: str) -> dict[str, Any]:
    """Ledger row of a job that reached an end this run."""
    st = fin.status
    return {
        "job_id": fin.job.job_id,
        "type": fin.job.type,
        "status": fin.kind,
        "record_count": fin.job.record_count,
        "attempt": fin.job.attempt,
        "submitted_at": utc_from_timestamp(fin.job.submitted_at),
        "completed_at": st.completed_at if st else None,
        "expires_at": st.expires_at if st else None,
        "error": fin.error,
        "submitted_in_load": fin.job.run_id,
        "updated_in_load": load_id,
        "matched": counts["matched"],
        "not_found": counts["not_found"],
        "invalid": counts["invalid"],
        "errors": counts["error"],
    }


def in_flight_job_row(job: JournalJob, load_id: str) -> dict[str, Any]:
    """Ledger row of a job still running at the end of a run (carried over)."""
    return {
        "job_id": job.job_id,
        "type": job.type,
        "status": IN_FLIGHT,
        "record_count": job.record_count,
        "attempt": job.attempt,
        "submitted_at": utc_from_timestamp(job.submitted_at),
        "submitted_in_load": job.run_id,
        "updated_in_load": load_id,
    }


def lost_job_row(
    intent_id: str, items: list[BatchItem], type_: str, load_id: str
) -> dict[str, Any]:
    """Ledger row of a submit whose answer was lost: it may have created a billed job."""
    return {
        "job_id": f"lost_{intent_id}",
        "type": type_,
        "status": LOST,
        "record_count": len(items),
        "attempt": max((i.attempt for i in items), default=1),
        "error": "submit answer lost: the job may exist and be billed; records resubmitted",
        "updated_in_load": load_id,
    }
