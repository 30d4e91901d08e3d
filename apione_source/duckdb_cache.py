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

# How DuckDB shows a limit: a tenth of a 1024^i unit. Bigger units (an unlimited limit
# shows as PiB) it does not take back, and leaving no limit is the user's choice.
_SHOWN = re.compile(r"(\d+\.\d) (KiB|MiB|GiB|TiB)")


def release_cached_pages(client: Any) -> None:
    """Evict what DuckDB holds unpinned, keeping the user's ``memory_limit``. Best effort.

    Lowering the limit for a moment evicts (a temporary table's blocks, and rows appended
    but not yet checkpointed, go to DuckDB's temporary files); the limit is set back at
    once. Skipped for an in-memory database (evicting would write all of it to temporary
    files) and without a limit. Call it only where nothing else runs on the database:
    the limit is the whole database's.

    Args:
        client: An open dlt SQL client of a DuckDB database.
    """
    try:
        with client.execute_query(
            "SELECT current_setting('memory_limit'), (SELECT path FROM duckdb_databases()"
            " WHERE database_name = current_database())"
        ) as cur:
            shown, path = cur.fetchone()
    except DatabaseException as exc:
        logger.debug("cache not released: %s", exc)
        return
    match = _SHOWN.fullmatch(str(shown))
    if not path or match is None:
        return
    try:
        client.execute_sql("SET memory_limit = '1MB'")
    except DatabaseException as exc:
        # some blocks are pinned (a read under way): the rest is evicted all the same
        logger.debug("cache not fully released: %s", exc)
    finally:
        # Shown rounded down to a tenth, so set as shown 1GB would come back as
        # 953.5 MiB; half a tenth more shows as before. Failing here would leave the
        # database at 1MB: that must not pass quietly.
        client.execute_sql(f"SET memory_limit = '{match[1]}5 {match[2]}'")
