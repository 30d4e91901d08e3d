"""Rows of the job ledger, the outcomes table and the rejected-inputs table.

Pure functions: given what happened, the row that records it. Every row carries the
``load_id`` of the run that wrote it, so analysts can join to ``_dlt_loads``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from dlt.common.json import json as fast_json

from apione_source.journal import IN_FLIGHT, BatchItem, Entry, SpentGen
from apione_source.scheduler import Finished
from apione_source.tables import outcome_id, utc_from_timestamp


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
    submitted_at: datetime | None,
) -> dict[str, Any]:
    """One outcome: what happened to input row ``pk`` (key ``key``) in job ``job_id``.

    ``submitted_at`` (when that job was sent) orders a key's outcomes: the latest is the
    one of the latest job, whatever order the rows were written in.
    """
    return {
        "outcome_id": outcome_id(job_id, pk, key),
        "input_pk": pk,
        "key": key,
        "job_id": job_id,
        "attempt": attempt,
        "status": status,
        "error": error,
        # JSON text; dlt's orjson-backed encoder: a tenth of json.dumps's time per row
        "input": None if record is None else fast_json.dumps(record),
        "finished_at": finished_at,
        "submitted_at": submitted_at,
        "load_id": load_id,
    }


def outcome_rows(
    item: BatchItem,
    job_id: str,
    status: str,
    error: str | None,
    now: datetime,
    load_id: str,
    submitted_at: datetime,
) -> list[dict[str, Any]]:
    """One outcome per input row behind ``item`` (one with no ``input_pk`` if none known)."""
    pks: list[str | None] = list(item.pks) or [None]
    return [
        outcome_row(
            item.key,
            pk,
            job_id,
            item.attempt,
            status,
            error,
            item.record,
            now,
            load_id,
            submitted_at,
        )
        for pk in pks
    ]


def input_row(pk: str, key: str, fp: str, now: datetime, load_id: str) -> dict[str, Any]:
    """An input row as read: the key it normalizes to and the fingerprint of its values."""
    return {"input_pk": pk, "key": key, "fp": fp, "read_at": now, "load_id": load_id}


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


def finished_job_row(
    fin: Finished, type_: str, status: str, counts: dict[str, int], load_id: str
) -> dict[str, Any]:
    """Ledger row of a job whose results were collected this run."""
    st = fin.status
    entry = fin.entry
    return {
        "job_id": entry.job_id,
        "type": type_,
        "status": status,
        "record_count": len(entry.items),
        "attempt": entry.attempt,
        "submitted_at": utc_from_timestamp(entry.submitted_at),
        "completed_at": st.completed_at if st else None,
        "expires_at": st.expires_at if st else None,
        "error": fin.error,
        "submitted_in_load": entry.sent_in_load,
        "updated_in_load": load_id,
        "matched": counts["matched"],
        "not_found": counts["not_found"],
        "invalid": counts["invalid"],
        "errors": counts["error"],
    }


def spent_job_row(
    job_id: str,
    type_: str,
    spent: SpentGen,
    errors: int,
    load_id: str,
    fin: Finished | None = None,
) -> dict[str, Any]:
    """Ledger row of a job (or lost submit) that ended without usable results.

    Its status is the reason (failed, expired, timed_out, vanished, lost): each such row
    means its records may have been paid once more.
    """
    st = fin.status if fin else None
    return {
        "job_id": job_id,
        "type": type_,
        "status": spent.reason,
        "record_count": len(spent.items),
        "attempt": max((i.attempt for i in spent.items), default=1),
        "submitted_at": utc_from_timestamp(spent.submitted_at),
        "completed_at": st.completed_at if st else None,
        "expires_at": st.expires_at if st else None,
        "error": spent.error,
        "submitted_in_load": spent.sent_in_load,
        "updated_in_load": load_id,
        "matched": 0,
        "not_found": 0,
        "invalid": 0,
        "errors": errors,
    }


def in_flight_job_row(entry: Entry, type_: str, load_id: str) -> dict[str, Any]:
    """Ledger row of a job still running at the end of a run (carried over)."""
    return {
        "job_id": entry.job_id,
        "type": type_,
        "status": IN_FLIGHT,
        "record_count": len(entry.items),
        "attempt": entry.attempt,
        "submitted_at": utc_from_timestamp(entry.submitted_at),
        "submitted_in_load": entry.sent_in_load,
        "updated_in_load": load_id,
    }


def run_row(
    load_id: str,
    pipeline_name: str,
    type_: str,
    started_at: datetime,
    finished_at: datetime,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """The ``<prefix>runs`` row of one run: its summary, for dashboards and alerts."""
    return {
        "load_id": load_id,
        "pipeline_name": pipeline_name,
        "type": type_,
        "started_at": started_at,
        "finished_at": finished_at,
        # the *_by_reason dicts as JSON text
        **{k: json.dumps(v) if isinstance(v, dict) else v for k, v in summary.items()},
    }
