"""apione-dlt: enrich warehouse rows with ApiOne's async enrichment API, the dlt way.

>>> import dlt
>>> from apione_source import apione, run_enrichment
>>> pipeline = dlt.pipeline("apione_companies", destination="duckdb", dataset_name="enriched")
>>> run_enrichment(pipeline, apione())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apione_source.client import ApiOneClient, AsyncApiOneClient
    from apione_source.run import summary_text
    from apione_source.source import apione, run_enrichment, run_summaries

__all__ = [
    "ApiOneClient",
    "AsyncApiOneClient",
    "apione",
    "run_enrichment",
    "run_summaries",
    "summary_text",
]

_EXPORTS = {
    "ApiOneClient": "apione_source.client",
    "AsyncApiOneClient": "apione_source.client",
    "apione": "apione_source.source",
    "run_enrichment": "apione_source.source",
    "run_summaries": "apione_source.source",
    "summary_text": "apione_source.run",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m apione_source.sandbox` starts without importing dlt.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'apione_source' has no attribute {name!r}")
