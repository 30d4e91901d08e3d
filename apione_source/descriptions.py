"""What every table and column the connector loads means, in one place.

The same text reaches the dlt schema (``dlt pipeline <name> schema`` shows it) through
:func:`apione_source.tables.apply_table_hints`, and the dbt package in ``dbt/apione_dlt``
through its generated ``sources.yml`` and docs blocks (``dbt/generate.py``). The
enrichment payload's columns are described on the pydantic models
(:mod:`apione_source.models`), where the API contract is written down.
"""

from __future__ import annotations

from typing import Final

from dlt.common.schema.typing import TTableSchemaColumns

# Table kind -> what one row is. Kinds: the enrichment table and its list tables are
# per enrichment type; jobs and runs are shared by every type.
TABLES: Final[dict[str, str]] = {
    "enrichment": (
        "One row per enriched key (company domain, person or email): ApiOne's latest match "
        "for it, nested objects as flat columns (location__city)."
    ),
    "list": (
        "One row per element of a list of an enrichment (tags, technologies, employment "
        "history). Join to the enrichment on key and job_id: a re-enriched key shows the "
        "lists of its current enrichment only."
    ),
    "outcomes": (
        "One row per input row and attempt: what happened to the row's key in one ApiOne "
        "job. The latest by submitted_at (then attempt) is the row's current outcome."
    ),
    "rejected": (
        "One row per input row that could not be sent (bad or missing values), with the "
        "reason. Removed once the row is fixed."
    ),
    "inputs": (
        "One row per input row as last read: the key it normalizes to and a fingerprint of "
        "its values. Rejected rows carry an empty key."
    ),
    "jobs": (
        "The job ledger: one row per ApiOne job (and per submit whose answer was lost) of "
        "every enrichment type, with its status and counts. Each job bills its records."
    ),
    "runs": "One row per pipeline run of one enrichment type: the run's summary counters.",
}

_DLT: Final[dict[str, str]] = {
    "_dlt_load_id": "The dlt load package that wrote this row (see _dlt_loads).",
    "_dlt_id": "dlt's unique id of this row.",
}
_LOAD_ID = "The load package of the run that wrote this row (the run's _dlt_load_id)."
_JOB_ID = "ApiOne's job id (lost_<entry> for a submit whose answer never came)."
_KEY = (
    "The normalized key sent to ApiOne: a lower-case domain (companies), a lower-case email, "
    "LinkedIn URL or name and domain (people), a lower-case email (email checks)."
)
_INPUT_PK = "The input row's primary key, as text (<NULL> for rows with a NULL primary key)."

COLUMNS: Final[dict[str, dict[str, str]]] = {
    "enrichment": {
        "key": _KEY,
        "job_id": "The ApiOne job whose result this row is.",
        "enriched_at": "When the connector collected this result (UTC).",
        "data_hash": "Hash of the enrichment's values: the row version with scd2 = true.",
        "_dlt_valid_from": "With scd2 = true: when this version of the row became current.",
        "_dlt_valid_to": "With scd2 = true: when this version was replaced (NULL: current).",
    },
    "list": {
        "key": "The enriched key this element belongs to.",
        "job_id": "The ApiOne job of the enrichment this element belongs to.",
        "idx": "The element's position in the list, from 0.",
        "value": "The element.",
    },
    "outcomes": {
        "outcome_id": "Stable id of this outcome: a hash of job_id, input_pk and key.",
        "input_pk": _INPUT_PK,
        "key": _KEY,
        "job_id": (
            "The ApiOne job that decided this outcome (for a row reusing a fresh result: the "
            "job that produced it)."
        ),
        "attempt": (
            "How many times the key was sent for this outcome: 1 on first send (or refresh), "
            "2+ when resent after a failed, expired or lost job, 0 when a fresh result was "
            "reused and nothing was sent."
        ),
        "status": (
            "Final: matched, not_found, invalid, error. Resent: failed, expired, timed_out, "
            "vanished (ApiOne no longer knew the job), lost (the submit's answer never came)."
        ),
        "error": "ApiOne's error message, or why the connector gave up on the record.",
        "input": "The record sent to ApiOne, as JSON text.",
        "submitted_at": (
            "When the job was sent (when a reused result was assigned to this row): orders a "
            "row's outcomes."
        ),
        "finished_at": "When this outcome was decided (UTC): how old the result is.",
        "load_id": _LOAD_ID,
    },
    "rejected": {
        "input_pk": _INPUT_PK,
        "reason": (
            "Why the row could not be sent: null, empty, not_a_string, too_long, "
            "control_characters, invalid_domain, invalid_email, invalid_linkedin_url, "
            "missing_fields, null_primary_key."
        ),
        "detail": "What exactly was wrong, for a person fixing the input.",
        "rejected_at": "When the row was last read and rejected (UTC).",
        "load_id": _LOAD_ID,
        "fixed": "Internal: marks a rejection to remove (dlt hard delete); never stored true.",
    },
    "inputs": {
        "input_pk": _INPUT_PK,
        "key": "The key the row normalizes to (empty when the row is rejected).",
        "fp": "MD5 fingerprint of the row's input columns: a changed row is sent again.",
        "read_at": "When the row was last read (UTC).",
        "load_id": _LOAD_ID,
    },
    "jobs": {
        "job_id": _JOB_ID,
        "type": "Enrichment type: company, people or email.",
        "status": (
            "in_flight, completed, mismatched (results did not line up: records end error), or "
            "why the job was spent: failed, expired, timed_out, vanished, lost."
        ),
        "record_count": "Records sent in the job: what ApiOne bills.",
        "attempt": "The highest attempt among the job's records (1: none was a resend).",
        "submitted_at": "When the job was sent (UTC).",
        "completed_at": "When ApiOne finished the job (UTC).",
        "expires_at": "When ApiOne deletes the job's results (UTC), per the plan's retention.",
        "error": "Why the job failed or was spent.",
        "submitted_in_load": "The load package of the run that sent the job.",
        "updated_in_load": "The load package of the run that last changed this row.",
        "matched": "Records matched.",
        "not_found": "Records ApiOne found nothing for.",
        "invalid": "Records ApiOne refused as invalid input.",
        "errors": "Records that ended in error (ApiOne's or the connector's giving up).",
    },
    "runs": {
        "load_id": "The run's last load package (its _dlt_load_id).",
        "pipeline_name": "The dlt pipeline that ran.",
        "type": "Enrichment type: company, people or email.",
        "started_at": "When the run started (UTC).",
        "finished_at": "When the run finished (UTC).",
        "rows_read": "Input rows read (or, when the warehouse decides freshness, considered).",
        "rows_rejected": "Input rows rejected.",
        "rejected_by_reason": "Rejected rows per reason, as JSON text.",
        "rows_already_fresh": "Input rows whose key had a fresh outcome: nothing sent.",
        "jobs_submitted": "Jobs sent.",
        "records_submitted": "Records sent: billed (plus those of lost submits, if billed).",
        "records_collected": "Records whose results were loaded.",
        "records_resubmitted": "Records sent again after a failed, expired or lost job.",
        "resubmitted_by_reason": "Records resent per reason, as JSON text.",
        "jobs_spent_by_reason": "Jobs spent (their records resent) per reason, as JSON text.",
        "jobs_mismatched": "Jobs whose results did not line up with what was sent.",
        "jobs_deferred": "Jobs that answered outside the contract, kept for a later look.",
        "jobs_carried_over": "Jobs still running at the end, collected by a later run.",
    },
}


def describe(kind: str, columns: TTableSchemaColumns) -> TTableSchemaColumns:
    """``columns`` with a ``description`` on each column of table kind ``kind``.

    A column described already (the payload's, from its pydantic model) keeps its own.

    Raises:
        KeyError: A column has no description: every loaded column must have one.
    """
    known = {**COLUMNS[kind], **_DLT}
    return {
        name: {**col, "description": col.get("description") or known[name]}
        for name, col in columns.items()
    }


def dlt_columns() -> dict[str, str]:
    """Descriptions of the columns dlt adds to every table."""
    return dict(_DLT)
