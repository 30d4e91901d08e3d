"""The tables apione-dlt loads: names, dlt hints, and the rows that go into them.

=====================  =========================  ========================================
table                  key                        one row per
=====================  =========================  ========================================
``<p><t>``             ``key``                    enriched key: company, person or email
``<p><t>_outcomes``    ``outcome_id``             input row per attempt (job)
``<p><t>_rejected``    ``input_pk``               input row that could not be sent
``<p><t>_inputs``      ``input_pk``               input row as last read: its key, fingerprint
``<p>jobs``            ``job_id``                 ApiOne job (the job ledger, all types)
``<p>runs``            ``load_id``, ``type``      run of a resource: its summary
=====================  =========================  ========================================

``<p>`` is the configurable prefix (default ``apione_``) and ``<t>`` is ``companies``,
``people`` or ``email_checks``: outcomes and rejections are per type because the input
tables' primary keys of different types may collide. Nested objects of the enrichment
become flat columns (``location__city``); its lists (tags, technologies, employment
history) become list tables, one row per element, e.g. ``apione_companies_tags``
(``key``, ``job_id``, ``idx``, ``value``): join them to the enrichment on ``key`` *and*
``job_id``, so a re-enriched key shows the lists of its current enrichment only.

Every table reaches dlt as arrow tables typed by these hints (:mod:`apione_source.output`),
which dlt writes as parquet where the destination takes it: its fastest load path.
Tables are merged ``delete-insert`` on their keys, the one strategy that also drops a
duplicate inside a load package (a job collected again after a crash, or a load job
dlt runs twice). On DuckDB and PostgreSQL the outcome and list tables, which only gain
rows, are appended instead and such duplicates are taken out once the package has
loaded (:mod:`apione_source.settle`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, get_args, get_origin

from dlt.common.libs.pydantic import pydantic_to_table_schema_columns
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.extract.resource import DltResource
from pydantic import BaseModel

from apione_source.descriptions import TABLES, describe, dlt_columns
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
        self.enrichment_type = enrichment_type
        self.enrichment = f"{prefix}{ENRICHMENT_TABLES[enrichment_type]}"
        # list field -> its list table, e.g. tags -> apione_companies_tags
        self.lists = {f: f"{self.enrichment}_{f}" for f in list_fields(enrichment_type)}
        self.jobs = f"{prefix}jobs"
        self.runs = f"{prefix}runs"
        self.outcomes = f"{self.enrichment}_outcomes"
        self.rejected = f"{self.enrichment}_rejected"
        self.inputs = f"{self.enrichment}_inputs"
        # Not a dlt table: the job journal, written through the SQL client (journal.py).
        self.journal = f"_{prefix}journal"
        # Not a dlt table: the loads whose appended rows were settled (settle.py).
        self.settled = f"_{prefix}settled"


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


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``Model | None``, if that is what ``annotation`` is."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def list_element(annotation: Any) -> Any:
    """The element type of ``list[X]`` (or ``list[X] | None``), else None."""
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) is list:
            return get_args(candidate)[0]
    return None


def list_fields(enrichment_type: EnrichmentType) -> list[str]:
    """The payload fields that are lists: each becomes a list table ``<table>__<field>``."""
    model = PAYLOAD_MODELS[enrichment_type]
    return [n for n, f in model.model_fields.items() if list_element(f.annotation) is not None]


def _flat_columns(model: type[BaseModel], prefix: str = "", about: str = "") -> TTableSchemaColumns:
    """Typed, described columns of ``model``, nested objects flattened (``location__city``).

    A nested field's description follows its parent's (``about``): "Where the company is
    headquartered: city."
    """
    columns: TTableSchemaColumns = {}
    typed = pydantic_to_table_schema_columns(model)
    for name, field in model.model_fields.items():
        if list_element(field.annotation) is not None:
            continue  # a list table, not a column
        text = field.description or ""
        described = f"{about}{text[:1].lower()}{text[1:]}" if about else text
        nested = nested_model(field.annotation)
        if nested is not None:
            columns.update(_flat_columns(nested, f"{prefix}{name}__", f"{described[:-1]}: "))
        elif name in typed and typed[name].get("data_type") not in (None, "json"):
            columns[f"{prefix}{name}"] = {
                **typed[name],
                "name": f"{prefix}{name}",
                "nullable": True,  # the API may leave out anything but the key
                "description": described,
            }
    return columns


def enrichment_columns(enrichment_type: EnrichmentType) -> TTableSchemaColumns:
    """Typed columns of an enrichment table, from the pydantic payload model.

    Nested objects become flat columns (``location__city``) and lists become list tables
    (:func:`list_table_columns`), so dbt joins them without JSON functions.
    """
    columns = _flat_columns(PAYLOAD_MODELS[enrichment_type])
    columns.update(_columns("key:text! job_id:text! enriched_at:timestamp! data_hash:text"))
    return columns


def list_table_columns(enrichment_type: EnrichmentType, field: str) -> TTableSchemaColumns:
    """Columns of the list table of ``field``.

    The key and job it belongs to and the element's position, then the element: ``value``
    for a list of scalars, flat columns for a list of objects.
    """
    columns = _columns("key:text! job_id:text! idx:bigint!")
    info = PAYLOAD_MODELS[enrichment_type].model_fields[field]
    model = nested_model(list_element(info.annotation))
    if model is not None:
        columns.update(_flat_columns(model))
    else:
        columns.update(_columns("value:text"))
        text = info.description or ""
        columns["value"]["description"] = f"One element of: {text[:1].lower()}{text[1:]}"
    return columns


JOB_COLUMNS = _columns(
    "job_id:text! type:text status:text record_count:bigint attempt:bigint "
    "submitted_at:timestamp completed_at:timestamp expires_at:timestamp error:text "
    "submitted_in_load:text updated_in_load:text "
    "matched:bigint not_found:bigint invalid:bigint errors:bigint"
)
OUTCOME_COLUMNS = _columns(
    "outcome_id:text! input_pk:text key:text! job_id:text attempt:bigint status:text! "
    "error:text input:text finished_at:timestamp! submitted_at:timestamp load_id:text"
)
RUN_COLUMNS = _columns(
    "load_id:text! pipeline_name:text type:text started_at:timestamp finished_at:timestamp "
    "rows_read:bigint rows_rejected:bigint rejected_by_reason:text rows_already_fresh:bigint "
    "jobs_submitted:bigint records_submitted:bigint records_collected:bigint "
    "records_resubmitted:bigint resubmitted_by_reason:text jobs_spent_by_reason:text "
    "jobs_mismatched:bigint jobs_deferred:bigint jobs_carried_over:bigint"
)
INPUT_COLUMNS = _columns("input_pk:text! key:text! fp:text! read_at:timestamp! load_id:text")
REJECTED_COLUMNS = _columns(
    "input_pk:text! reason:text! detail:text rejected_at:timestamp! load_id:text"
)
# A row that was rejected and has since been fixed is removed (dlt's hard_delete).
REJECTED_COLUMNS["fixed"] = {"name": "fixed", "data_type": "bool", "hard_delete": True}


def outcome_id(job_id: str | None, input_pk: str | None, key: str) -> str:
    """Stable id of one outcome row, so a re-fetched job merges instead of duplicating."""
    raw = f"{job_id or ''}\x1f{input_pk if input_pk is not None else ''}\x1f{key}"
    return hashlib.sha1(raw.encode()).hexdigest()


def _flatten(data: dict[str, Any], prefix: str, into: dict[str, Any]) -> None:
    for name, value in data.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{name}__", into)
        else:
            into[f"{prefix}{name}"] = value


def enrichment_rows(
    key: str,
    job_id: str,
    enriched_at: datetime,
    result: RecordResult,
    lists: Iterable[str],
    *,
    version_hash: bool,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The enrichment-table row of one matched result, and its list-table rows.

    Args:
        key: The normalized key.
        job_id: The job that produced it.
        enriched_at: When it was collected.
        result: The matched result.
        lists: The payload fields that go to list tables (:func:`list_fields`).
        version_hash: Add ``data_hash``, the row version SCD2 compares (skipped
            otherwise: hashing every payload costs time for nothing).

    Returns:
        The flat row, and list field -> its elements (for :meth:`ListRows.add`). A list the
        API sent as something else than a list is kept as a column (it lands as JSON)
        rather than dropped.
    """
    data = dict(result.data or {})
    row: dict[str, Any] = {}
    elements: dict[str, list[Any]] = {}
    for name in lists:
        values = data.get(name)
        if isinstance(values, list):
            del data[name]
            elements[name] = values
    if version_hash:
        # Hash the payload without its own timestamp, so SCD2 opens a new version only
        # when the enrichment really changed.
        stable = {k: v for k, v in (result.data or {}).items() if k != "updated_at"}
        blob = json.dumps(stable, sort_keys=True, default=str).encode()
        row["data_hash"] = hashlib.sha1(blob).hexdigest()
    _flatten(data, "", row)
    row.update(key=key, job_id=job_id, enriched_at=enriched_at)
    return row, elements


class ListRows:
    """The rows of one list table (``key``, ``job_id``, ``idx``, then the element).

    Lists of scalars (tags, technologies: most of a company's rows) are gathered column by
    column, in bulk: a dict per element cost more than everything else of a result. An
    element that is an object becomes a row of its flat columns.

    Attributes:
        columns: ``key``, ``job_id``, ``idx`` and ``value`` of scalar elements.
        rows: Rows of object elements.
    """

    def __init__(self) -> None:
        """Nothing gathered yet."""
        self.columns: dict[str, list[Any]] = {"key": [], "job_id": [], "idx": [], "value": []}
        self.rows: list[dict[str, Any]] = []

    def add(self, key: str, job_id: str, values: list[Any]) -> None:
        """The elements of one enrichment's list."""
        if any(isinstance(v, dict) for v in values):
            self.rows.extend(_element(key, job_id, i, v) for i, v in enumerate(values))
            return
        n, columns = len(values), self.columns
        columns["key"].extend([key] * n)
        columns["job_id"].extend([job_id] * n)
        columns["idx"].extend(range(n))
        columns["value"].extend(values)


def _element(key: str, job_id: str, idx: int, value: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "job_id": job_id, "idx": idx}
    if isinstance(value, dict):
        _flatten(value, "", row)
    else:
        row["value"] = value
    return row


def table_columns(names: TableNames) -> dict[str, TTableSchemaColumns]:
    """The hinted columns of every table, by table name (the arrow schemas follow them)."""
    etype = names.enrichment_type
    columns = {
        names.enrichment: describe("enrichment", enrichment_columns(etype)),
        names.jobs: describe("jobs", JOB_COLUMNS),
        names.runs: describe("runs", RUN_COLUMNS),
        names.outcomes: describe("outcomes", OUTCOME_COLUMNS),
        names.rejected: describe("rejected", REJECTED_COLUMNS),
        names.inputs: describe("inputs", INPUT_COLUMNS),
    }
    for field, table in names.lists.items():
        columns[table] = describe("list", list_table_columns(etype, field))
    return columns


def table_kinds(names: TableNames) -> dict[str, str]:
    """Table name -> its kind in :data:`apione_source.descriptions.TABLES`."""
    kinds = {
        names.enrichment: "enrichment",
        names.jobs: "jobs",
        names.runs: "runs",
        names.outcomes: "outcomes",
        names.rejected: "rejected",
        names.inputs: "inputs",
    }
    return {**kinds, **dict.fromkeys(names.lists.values(), "list")}


DLT_COLUMN_HINTS: TTableSchemaColumns = {
    name: {"name": name, "description": text} for name, text in dlt_columns().items()
}
# Not UNIQUE (dlt's default for a table it creates with no rows yet, which PostgreSQL turns
# into a constraint): a load job that dlt runs again after a kill between the warehouse's
# commit and its own note of it puts the same rows in once more, which the merge drops; a
# constraint would fail that job on every later run instead.
DLT_COLUMN_HINTS["_dlt_id"]["unique"] = False


#: How the tables are merged (where they are not appended): on their keys, dropping
#: duplicates inside a package.
MERGE: Any = {"disposition": "merge", "strategy": "delete-insert"}


def apply_table_hints(resource: DltResource, names: TableNames, scd2: bool) -> None:
    """Give each table the resource yields to its own merge key, columns and disposition."""
    enrichment: Any = (
        {"disposition": "merge", "strategy": "scd2", "row_version_column_name": "data_hash"}
        if scd2
        else MERGE
    )
    keys: dict[str, tuple[Any, Any]] = {
        names.enrichment: (enrichment, "key"),
        names.jobs: (MERGE, "job_id"),
        # one row per load and type: merged all the same, as a load job dlt runs twice
        # (killed between the warehouse's commit and dlt's note of it) writes it twice
        names.runs: (MERGE, ["load_id", "type"]),
        names.outcomes: (MERGE, "outcome_id"),
        names.rejected: (MERGE, "input_pk"),
        names.inputs: (MERGE, "input_pk"),
        **{table: (MERGE, ["key", "job_id", "idx"]) for table in names.lists.values()},
    }
    kinds = table_kinds(names)
    for table, columns in table_columns(names).items():
        disposition, key = keys[table]
        scd2_table = scd2 and table == names.enrichment
        resource.apply_hints(
            table_name=table,
            write_disposition=disposition,
            # dlt adds its own columns; describing them here too shows them in the schema
            columns={**columns, **DLT_COLUMN_HINTS},
            primary_key=None if scd2_table else key,
            merge_key=key if scd2_table else None,
            create_table_variant=True,
            additional_table_hints={"description": TABLES[kinds[table]]},
        )
