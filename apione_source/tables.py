"""The tables apione-dlt loads: names, dlt hints, and the rows that go into them.

=====================  =========================  ========================================
table                  merge key                  one row per
=====================  =========================  ========================================
``<p><t>``             ``key``                    enriched key: company, person or email
``<p><t>_outcomes``    ``outcome_id``             input row per attempt (job)
``<p><t>_rejected``    ``input_pk``               input row that could not be sent
``<p>jobs``            ``job_id``                 ApiOne job (the job ledger, all types)
``<p>runs``            ``load_id``, ``type``      run of a resource: its summary
=====================  =========================  ========================================

``<p>`` is the configurable prefix (default ``apione_``) and ``<t>`` is ``companies``,
``people`` or ``email_checks``: outcomes and rejections are per type because the input
tables' primary keys of different types may collide. Nested lists of the enrichment
(tags, technologies, employment history) become dlt child tables, e.g.
``apione_companies__tags``.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, get_args, get_origin

from dlt.common.libs.pydantic import pydantic_to_table_schema_columns
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.extract.resource import DltResource
from pydantic import BaseModel

from apione_source.models import PAYLOAD_MODELS, EnrichmentType, RecordResult

ENRICHMENT_TABLES = {
    EnrichmentType.COMPANY: "companies",
    EnrichmentType.PEOPLE: "people",
    EnrichmentType.EMAIL: "email_checks",
}

# Final outcome statuses (from ApiOne). Any other status (failed, expired, timed_out,
# vanished, lost) means the record is, or will be, resubmitted.
FINAL_STATUSES = ("matched", "not_found", "invalid", "error")


class TableNames:
    """Names of the tables for one prefix and enrichment type."""

    def __init__(self, prefix: str, enrichment_type: EnrichmentType) -> None:
        """Build the names from ``prefix`` (e.g. ``apione_``)."""
        self.enrichment = f"{prefix}{ENRICHMENT_TABLES[enrichment_type]}"
        self.jobs = f"{prefix}jobs"
        self.runs = f"{prefix}runs"
        self.outcomes = f"{self.enrichment}_outcomes"
        self.rejected = f"{self.enrichment}_rejected"
        # Not a dlt table: the job journal, written through the SQL client (journal.py).
        self.journal = f"_{prefix}journal"


def utc_from_timestamp(ts: float) -> datetime:
    """A timezone-aware UTC datetime from a unix timestamp."""
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _columns(spec: str) -> TTableSchemaColumns:
    """Columns from ``"name:type name:type! ..."`` (``!`` marks NOT NULL)."""
    columns: TTableSchemaColumns = {}
    for part in spec.split():
        name, data_type = part.split(":")
        required = data_type.endswith("!")
        columns[name] = {
            "name": name,
            "data_type": data_type.rstrip("!"),  # type: ignore[typeddict-item]
            "nullable": not required,
        }
    return columns


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model | None``, if that is what ``annotation`` is."""
    if get_origin(annotation) is list:
        return None  # lists become child tables, not columns
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def enrichment_columns(enrichment_type: EnrichmentType) -> TTableSchemaColumns:
    """Typed columns of an enrichment table, from the pydantic payload model.

    Nested objects and lists are left out on purpose: typed as ``json`` they would land
    as JSON blobs, while left to dlt they become flat columns (``location__city``) and
    child tables (``<table>__tags``) that dbt can join without JSON functions.
    """
    model = PAYLOAD_MODELS[enrichment_type]
    columns: TTableSchemaColumns = {}
    for name, col in pydantic_to_table_schema_columns(model).items():
        nested = _nested_model(model.model_fields[name].annotation)
        if nested is not None:
            # type the flattened columns too, so all-null ones still materialize
            for sub, sub_col in pydantic_to_table_schema_columns(nested).items():
                if sub_col.get("data_type") != "json":
                    columns[f"{name}__{sub}"] = {
                        **sub_col,
                        "name": f"{name}__{sub}",
                        "nullable": True,
                    }
        elif col.get("data_type") != "json":
            columns[name] = col
    columns.update(_columns("key:text! job_id:text! enriched_at:timestamp! data_hash:text"))
    return columns


JOB_COLUMNS = _columns(
    "job_id:text! type:text status:text record_count:bigint attempt:bigint "
    "submitted_at:timestamp completed_at:timestamp expires_at:timestamp error:text "
    "submitted_in_load:text updated_in_load:text "
    "matched:bigint not_found:bigint invalid:bigint errors:bigint"
)
OUTCOME_COLUMNS = _columns(
    "outcome_id:text! input_pk:text key:text! job_id:text attempt:bigint status:text! "
    "error:text input:json finished_at:timestamp! submitted_at:timestamp load_id:text"
)
RUN_COLUMNS = _columns(
    "load_id:text! pipeline_name:text type:text started_at:timestamp finished_at:timestamp "
    "rows_read:bigint rows_rejected:bigint rejected_by_reason:json rows_already_fresh:bigint "
    "jobs_submitted:bigint records_submitted:bigint records_collected:bigint "
    "records_resubmitted:bigint resubmitted_by_reason:json jobs_spent_by_reason:json "
    "jobs_mismatched:bigint jobs_deferred:bigint jobs_carried_over:bigint"
)
REJECTED_COLUMNS = _columns(
    "input_pk:text! reason:text! detail:text rejected_at:timestamp! load_id:text"
)
# A row that was rejected and has since been fixed is removed (dlt's hard_delete).
REJECTED_COLUMNS["fixed"] = {"name": "fixed", "data_type": "bool", "hard_delete": True}


def outcome_id(job_id: str | None, input_pk: str | None, key: str) -> str:
    """Stable id of one outcome row, so a re-fetched job merges instead of duplicating."""
    raw = f"{job_id or ''}\x1f{input_pk if input_pk is not None else ''}\x1f{key}"
    return hashlib.sha1(raw.encode()).hexdigest()


def enrichment_row(
    key: str, job_id: str, enriched_at: datetime, result: RecordResult, *, version_hash: bool
) -> dict[str, Any]:
    """The enrichment-table row of one matched result.

    Args:
        key: The normalized key.
        job_id: The job that produced it.
        enriched_at: When it was collected.
        result: The matched result.
        version_hash: Add ``data_hash``, the row version SCD2 compares (skipped
            otherwise: hashing every payload costs time for nothing).
    """
    data = dict(result.data or {})
    if version_hash:
        # Hash the payload without its own timestamp, so SCD2 opens a new version only
        # when the enrichment really changed.
        stable = {k: v for k, v in data.items() if k != "updated_at"}
        blob = json.dumps(stable, sort_keys=True, default=str).encode()
        data["data_hash"] = hashlib.sha1(blob).hexdigest()
    data.update(key=key, job_id=job_id, enriched_at=enriched_at)
    return data


def apply_table_hints(
    resource: DltResource, names: TableNames, etype: EnrichmentType, scd2: bool
) -> None:
    """Give each table the resource yields to its own merge key, columns and disposition."""
    merge: Any = {"disposition": "merge", "strategy": "delete-insert"}
    enrichment_disposition: Any = (
        {"disposition": "merge", "strategy": "scd2", "row_version_column_name": "data_hash"}
        if scd2
        else merge
    )
    variants: list[tuple[str, Any, Any, Any]] = [
        (names.enrichment, enrichment_disposition, enrichment_columns(etype), "key"),
        (names.jobs, merge, JOB_COLUMNS, "job_id"),
        (names.runs, merge, RUN_COLUMNS, ["load_id", "type"]),
        (names.outcomes, merge, OUTCOME_COLUMNS, "outcome_id"),
        (names.rejected, merge, REJECTED_COLUMNS, "input_pk"),
    ]
    for table, disposition, columns, key in variants:
        resource.apply_hints(
            table_name=table,
            write_disposition=disposition,
            columns=columns,
            primary_key=None if scd2 and table == names.enrichment else key,
            merge_key=key if scd2 and table == names.enrichment else None,
            create_table_variant=True,
        )
