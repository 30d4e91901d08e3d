"""Dagster: every table apione-dlt loads is an asset, all materialized by one enrichment run.

    uv run --group dagster dagster asset list -f orchestration/dagster/definitions.py
    uv run --group dagster --with dagster-webserver \
        dagster dev -f orchestration/dagster/definitions.py

The enrichment resource loads several tables in one run (the enriched rows, their nested
lists, outcomes, rejections, jobs, runs), so dagster-dlt's ``@dlt_assets``, which makes one
asset per dlt resource, would show one asset that is no table. Here one ``@multi_asset``
declares an asset per table, keyed ``[<dataset>, <table>]`` (a dbt source named after the
dataset maps onto the same keys, so dbt models downstream depend on the right table), runs
``run_enrichment`` and reports each table with its columns from the dlt schema, its row
count and the rows this run loaded. The run's summary is logged and attached to the
``<prefix>runs`` table's materialization. A run that cannot do its job (a wrong key, no
credits, a missing input table) fails the Dagster run with the connector's own error.

Configuration is dlt's: ``.dlt/config.toml`` / ``.dlt/secrets.toml`` in the working
directory of the code server, or env vars (``SOURCES__APIONE__API_KEY``,
``DESTINATION__<TYPE>__CREDENTIALS``...); ``PIPELINE_NAME``, ``DESTINATION`` and
``DATASET`` as for ``pipelines/enrich.py``. Loading these definitions needs no dlt config
and touches neither the warehouse nor the API. No persistent local disk is needed: dlt
restores its state from the destination, where the job journal also lives.
"""

import os
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
import dlt

from apione_source import apione, run_enrichment, run_summaries, summary_text
from apione_source.descriptions import TABLES
from apione_source.models import EnrichmentType
from apione_source.tables import TableNames, table_kinds

PIPELINE_NAME = os.environ.get("PIPELINE_NAME", "apione_enrichment")
DESTINATION = os.environ.get("DESTINATION", "duckdb")
DATASET = os.environ.get("DATASET", "enriched")

# dlt column hints worth showing as constraints
_CONSTRAINTS = ("primary_key", "merge_key", "unique", "row_key", "parent_key", "hard_delete")


def _column_schema(columns: Mapping[str, Any]) -> dg.TableSchema:
    """A Dagster column schema from a dlt table's columns."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=name,
                type=str(column.get("data_type", "unknown")),
                description=column.get("description"),
                constraints=dg.TableColumnConstraints(
                    nullable=bool(column.get("nullable", True)),
                    unique=bool(column.get("unique", False)),
                    other=[hint for hint in _CONSTRAINTS if column.get(hint)],
                ),
            )
            for name, column in columns.items()
        ]
    )


def _row_counts(pipeline: dlt.Pipeline, tables: list[str]) -> dict[str, int]:
    counts = {}
    with pipeline.sql_client() as client:
        for table in tables:
            name = client.make_qualified_table_name(table)
            counts[table] = int(client.execute_sql(f"SELECT count(*) FROM {name}")[0][0])
    return counts


def _log_summaries(context: dg.AssetExecutionContext, pipeline: dlt.Pipeline) -> dict[str, Any]:
    summaries = run_summaries(pipeline)
    for resource, summary in summaries.items():
        context.log.info(f"{resource}: {summary_text(summary)}")
    return summaries


def apione_assets(
    enrichment_type: str = "company",
    table_prefix: str = "apione_",
    *,
    dataset_name: str = DATASET,
    pipeline_name: str = PIPELINE_NAME,
    destination: str = DESTINATION,
    group_name: str = "apione",
) -> dg.AssetsDefinition:
    """One asset per table of ``enrichment_type``, all materialized by one enrichment run.

    ``enrichment_type`` and ``table_prefix`` shape the asset graph, so they are set here
    and passed to ``apione()``; every other setting comes from dlt's config.
    """
    # the tables a run of this type loads, described as in the dlt schema
    names = TableNames(table_prefix, EnrichmentType(enrichment_type))
    tables = {table: TABLES[kind] for table, kind in table_kinds(names).items()}
    specs = [
        dg.AssetSpec(
            key=dg.AssetKey([dataset_name, table]),
            description=description,
            group_name=group_name,
            kinds={"dlt", destination},
            # every table exists after the first run; before it, none does
            skippable=True,
            metadata={"dagster/table_name": f"{dataset_name}.{table}"},
        )
        for table, description in tables.items()
    ]

    @dg.multi_asset(
        name=f"{table_prefix}{enrichment_type}_enrichment",
        specs=specs,
        can_subset=False,  # one run loads every table; a subset would make no sense
        pool="apione",  # one run at a time: `dagster instance concurrency set apione 1`
    )
    def enrichment(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        pipeline = dlt.pipeline(
            pipeline_name=pipeline_name, destination=destination, dataset_name=dataset_name
        )
        try:
            run_enrichment(
                pipeline, apione(enrichment_type=enrichment_type, table_prefix=table_prefix)
            )
        except Exception:
            _log_summaries(context, pipeline)  # what the run did before it stopped
            raise
        summaries = _log_summaries(context, pipeline)

        schema = pipeline.default_schema
        normalized = pipeline.last_trace.last_normalize_info
        loaded = normalized.row_counts if normalized else {}
        present = set(schema.data_table_names(seen_data_only=True))
        unknown = sorted(present - set(tables))
        if unknown:
            context.log.warning(f"tables loaded but not declared as assets: {unknown}")
        # a table that does not exist yet (no run created it) is not materialized
        written = [table for table in tables if table in present]
        counts = _row_counts(pipeline, written)
        for table in written:
            # Dagster's standard table metadata (the catalog and dagster-dbt read these)
            metadata: dict[str, Any] = {
                "dagster/table_name": f"{dataset_name}.{table}",
                "dagster/column_schema": _column_schema(schema.get_table_columns(table)),
                "dagster/row_count": counts[table],
                "rows_loaded": int(loaded.get(table, 0)),
            }
            if table == f"{table_prefix}runs":
                for resource, summary in summaries.items():
                    metadata["summary"] = f"{resource}: {summary_text(summary)}"
                    metadata.update({k: v for k, v in summary.items() if type(v) is int})
            yield dg.MaterializeResult(
                asset_key=dg.AssetKey([dataset_name, table]), metadata=metadata
            )

    return enrichment


company_enrichment = apione_assets("company")
enrichment_job = dg.define_asset_job("apione_enrichment", selection=[company_enrichment])

defs = dg.Definitions(
    assets=[company_enrichment],
    jobs=[enrichment_job],
    schedules=[dg.ScheduleDefinition(job=enrichment_job, cron_schedule="0 * * * *")],
)
