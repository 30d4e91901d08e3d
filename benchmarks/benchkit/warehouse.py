"""The DuckDB files of a benchmark: the input table, and what a run loaded.

Nothing here knows the connector's table shapes: tables are discovered in the dataset,
and the outcomes table is the one whose name ends in ``_outcomes``.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

INPUT_DATASET = "crm"
INPUT_TABLE = "companies"
OUTPUT_DATASET = "enriched"
#: The connector's own bookkeeping (written through the SQL client, not by dlt).
# The connector's own bookkeeping (its job journal, its settled loads): not data.
BOOKKEEPING_PREFIX = "_apione_"


def domain_sql(column: str) -> str:
    """SQL building the ``i``-th benchmark domain from integer ``column``.

    The domains are already normalized, so the record the connector sends is exactly
    ``{"domain": <value>}`` (the API-limit client sends the same).
    """
    return f"'company-' || lpad(CAST({column} AS VARCHAR), 7, '0') || '.example.com'"


def make_input(path: Path, n: int) -> None:
    """Create ``crm.companies(id, domain)`` with ``n`` unique domains in a DuckDB file.

    Args:
        path: The DuckDB file (created).
        n: Row count.
    """
    con = duckdb.connect(str(path))
    try:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {INPUT_DATASET}")
        con.execute(
            f"CREATE OR REPLACE TABLE {INPUT_DATASET}.{INPUT_TABLE} AS "
            f"SELECT i AS id, {domain_sql('i')} AS domain FROM range(1, ?) t(i)",
            [n + 1],
        )
    finally:
        con.close()


def input_domains(path: Path) -> list[str]:
    """Every domain of the input table, in id order."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            f"SELECT domain FROM {INPUT_DATASET}.{INPUT_TABLE} ORDER BY id"
        ).fetchall()
    finally:
        con.close()
    return [str(r[0]) for r in rows]


def data_tables(con: duckdb.DuckDBPyConnection, dataset: str) -> list[str]:
    """Tables of ``dataset`` holding data: not dlt's ``_dlt_*`` ones, not bookkeeping."""
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ? "
        "ORDER BY table_name",
        [dataset],
    ).fetchall()
    names = [str(r[0]) for r in rows]
    return [t for t in names if not t.startswith(("_dlt_", BOOKKEEPING_PREFIX))]


def row_counts(path: Path, dataset: str = OUTPUT_DATASET) -> dict[str, int]:
    """Row count of every data table of ``dataset`` (empty if the file does not exist)."""
    if not path.exists():
        return {}
    con = duckdb.connect(str(path), read_only=True)
    try:
        counts: dict[str, int] = {}
        for table in data_tables(con, dataset):
            row = con.execute(f'SELECT count(*) FROM "{dataset}"."{table}"').fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts
    finally:
        con.close()


def outcome_rows(counts: dict[str, int]) -> int | None:
    """Rows of the outcomes table (the one table named ``*_outcomes``), or None."""
    found = [n for t, n in counts.items() if t.endswith("_outcomes")]
    return found[0] if len(found) == 1 else None
