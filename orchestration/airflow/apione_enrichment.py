"""Airflow: one task runs one enrichment pass with ``run_enrichment``.

Put this file in your DAGs folder. Configuration is dlt's, read by the task when it runs
(never at DAG parse): env vars of the workers (``SOURCES__APIONE__API_KEY``,
``SOURCES__APIONE__INPUT_TABLE``, ``DESTINATION__<TYPE>__CREDENTIALS``...), the Airflow
Variable ``dlt_secrets_toml`` holding a ``secrets.toml`` (dlt reads it inside tasks), or
``.dlt/`` in the worker's working directory; ``PIPELINE_NAME``, ``DESTINATION`` and
``DATASET`` as for ``pipelines/enrich.py``.

No persistent local disk is needed: dlt restores its state from the destination, where
the job journal also lives, so a task on a new worker (or after its local data was wiped)
pays for nothing twice. A run that cannot do its job (a wrong key, no credits, a missing
input table) fails the task with the connector's own error, e.g. ``AuthenticationError:
ApiOne rejected the API key (401)...``; the next run collects whatever was in flight.
"""

import logging
import os
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import dag, task

log = logging.getLogger(__name__)


@dag(
    schedule="@hourly",
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    max_active_runs=1,  # one run at a time per dataset (README, "Orchestrators")
    default_args={"retries": 0},  # a failed run is picked up by the next scheduled one
    tags=["apione", "dlt"],
)
def apione_enrichment() -> None:
    """Enrich the configured warehouse table with ApiOne and load the results."""

    @task
    def enrich() -> dict[str, dict[str, Any]]:
        """Run one enrichment pass; its summary goes to the log and to XCom."""
        # imported here, so parsing the DAG stays fast and reads no config
        import dlt

        from apione_source import apione, run_enrichment, run_summaries, summary_text

        pipeline = dlt.pipeline(
            pipeline_name=os.environ.get("PIPELINE_NAME", "apione_enrichment"),
            destination=os.environ.get("DESTINATION", "duckdb"),
            dataset_name=os.environ.get("DATASET", "enriched"),
        )
        try:
            log.info("%s", run_enrichment(pipeline, apione()))
        finally:  # also after a failed run: what it did before it stopped
            summaries = run_summaries(pipeline)
            for resource, summary in summaries.items():
                log.info("%s: %s", resource, summary_text(summary))
        return summaries

    enrich()


apione_enrichment()
