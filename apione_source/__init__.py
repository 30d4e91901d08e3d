"""apione-dlt: enrich warehouse rows with ApiOne's async enrichment API, the dlt way.

>>> import dlt
>>> from apione_source import apione, run_enrichment
>>> pipeline = dlt.pipeline("apione_companies", destination="duckdb", dataset_name="enriched")
>>> run_enrichment(pipeline, apione())  # doctest: +SKIP
"""

from apione_source.client import ApiOneClient, AsyncApiOneClient
from apione_source.source import apione, run_enrichment

__all__ = ["ApiOneClient", "AsyncApiOneClient", "apione", "run_enrichment"]
