"""Production pipeline: enrich the configured warehouse table with ApiOne.

Every setting comes from .dlt/config.toml, .dlt/secrets.toml or environment variables
(see the README). Schedule it (cron, Airflow, GitHub Actions...) with a persistent
pipelines directory and one run at a time per pipeline name.

    uv run python pipelines/enrich.py
    DESTINATION=postgres DATASET=enriched uv run python pipelines/enrich.py
"""

from __future__ import annotations

import os

import dlt

from apione_source import apione, run_enrichment, run_summaries, summary_text


def main() -> None:
    """Run one enrichment pass and print what was loaded."""
    pipeline = dlt.pipeline(
        pipeline_name=os.environ.get("PIPELINE_NAME", "apione_enrichment"),
        destination=os.environ.get("DESTINATION", "duckdb"),
        dataset_name=os.environ.get("DATASET", "enriched"),
        # system stats need psutil, and without it dlt warns on every run
        progress=dlt.progress.log(dump_system_stats=False),
    )
    info = run_enrichment(pipeline, apione())
    print(info)
    for resource, summary in run_summaries(pipeline).items():
        print(f"{resource}: {summary_text(summary)}")


if __name__ == "__main__":
    main()
