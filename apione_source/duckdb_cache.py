"""DuckDB keeps what it wrote or read in memory until told otherwise: let it go.

DuckDB caches every block it writes or reads until its ``memory_limit`` is reached, and
nothing but that limit makes it evict. A run that loads in slices would keep what every
slice wrote (1M records: 400-600 MB of a 1GB limit), though only the merge keys are read
again, and those come back from the file (and the OS's page cache) when needed.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from dlt.destinations.exceptions import DatabaseException

logger = logging.getLogger(__name__)


def release_cached_pages(client: Any) -> None:
    """Evict what DuckDB holds unpinned, keeping the user's ``memory_limit``.

    Lowering the limit for a moment evicts (a temporary table's blocks go to DuckDB's
    temporary files); the limit is set back at once. Call it only where nothing else runs
    on the database: the limit is the whole database's.

    Args:
        client: An open dlt SQL client of a DuckDB database.
    """
    with client.execute_query("SELECT current_setting('memory_limit')") as cur:
        limit = _as_set(str(cur.fetchone()[0]))
    try:
        client.execute_sql("SET memory_limit = '1MB'")
    except DatabaseException as exc:
        # pinned blocks would not fit: it evicted what it could, the limit is unchanged
        logger.debug("cache not fully released: %s", exc)
    finally:
        # a value DuckDB itself printed, as a literal (SET takes no parameters)
        client.execute_sql("SET memory_limit = '{}'".format(limit.replace("'", "''")))


def _as_set(shown: str) -> str:
    """The limit to set for DuckDB to show ``shown`` again (e.g. ``953.6 MiB``).

    DuckDB shows a limit rounded down to a tenth of its unit; set as shown, 1GB would
    come back as ``953.5 MiB``, a little less every release. Half a tenth more stays
    within the shown tenth.
    """
    match = re.fullmatch(r"(\d+\.\d)\s*(\w+)", shown.strip())
    return f"{match[1]}5 {match[2]}" if match else shown
