"""A local, faithful stand-in for ApiOne's async enrichment API.

>>> from apione_source.sandbox import Sandbox
>>> with Sandbox(plan="free") as sb:  # doctest: +SKIP
...     sb.base_url  # give this to the client
"""

from apione_source.sandbox.server import Sandbox

__all__ = ["Sandbox"]
