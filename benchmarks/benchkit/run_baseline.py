"""Child process: dlt's fastest load of the information a connector run loaded.

Usage: ``python run_baseline.py SOURCE_DB DATASET OUT_DB RESULT_JSON``.

Reads every data table of ``DATASET`` in ``SOURCE_DB`` (not dlt's ``_dlt_*`` tables, not
the connector's journal; dlt's own ``_dlt_*`` columns dropped) as arrow tables, untimed.
Then, timed: a fresh ``dlt.pipeline`` loads them, one resource per table, as parquet with
``write_disposition="append"`` into a fresh DuckDB file: the fastest path dlt has, fed
from memory. ``RESULT_JSON`` gets ``run_s`` and the rows loaded per table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pyarrow as pa
import pyarrow.parquet

BOOKKEEPING_PREFIX = "_apione_"  # the connector's journal and settled loads: not data


def read_tables(db: Path, dataset: str) -> dict[str, pa.Table]:
    """Every data table of ``dataset`` as arrow, without dlt's ``_dlt_*`` columns."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [
            str(r[0])
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ? "
                "ORDER BY table_name",
                [dataset],
            ).fetchall()
        ]
        tables: dict[str, pa.Table] = {}
        for name in names:
            if name.startswith(("_dlt_", BOOKKEEPING_PREFIX)):
                continue
            cols = [
                str(r[0])
                for r in con.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                    [dataset, name],
                ).fetchall()
                if not str(r[0]).startswith("_dlt_")
            ]
            select = ", ".join(f'"{c}"' for c in cols)
            query = f'SELECT {select} FROM "{dataset}"."{name}"'
            tables[name] = con.execute(query).fetch_arrow_table()
        return tables
    finally:
        con.close()


def load(tables: dict[str, pa.Table], dataset: str) -> Any:
    """Load ``tables`` with dlt: arrow resources, parquet, append (the timed section)."""
    pipeline = dlt.pipeline(
        pipeline_name="bench_baseline",
        # the file (OUT_DB) and its settings come from the environment, as the connector's
        destination="duckdb",
        dataset_name=dataset,
    )
    resources = [
        dlt.resource(table, name=name, write_disposition="append") for name, table in tables.items()
    ]
    return pipeline.run(resources, loader_file_format="parquet")


def loaded_rows(out_db: Path, dataset: str, names: list[str]) -> dict[str, int]:
    """Rows per table in the baseline's destination."""
    con = duckdb.connect(str(out_db), read_only=True)
    try:
        counts: dict[str, int] = {}
        for name in names:
            row = con.execute(f'SELECT count(*) FROM "{dataset}"."{name}"').fetchone()
            counts[name] = int(row[0]) if row else 0
        return counts
    finally:
        con.close()


def main() -> None:
    """Read, load (timed), count, and write the result JSON."""
    source_db, dataset, out_db, result = sys.argv[1:5]
    tables = read_tables(Path(source_db), dataset)
    rows_in = sum(t.num_rows for t in tables.values())
    t0 = time.perf_counter()
    load(tables, dataset)
    run_s = time.perf_counter() - t0
    names = [n for n, t in tables.items() if t.num_rows > 0]
    del tables
    body = {
        "run_s": run_s,
        "rows_in": rows_in,
        "rows": loaded_rows(Path(out_db), dataset, names),
    }
    Path(result).write_text(json.dumps(body))


if __name__ == "__main__":
    main()
