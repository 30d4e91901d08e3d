"""Child process: run the production script ``pipelines/enrich.py`` and time it.

Usage: ``python run_connector.py TIMING_JSON``. Every setting comes from the environment
(``SOURCES__APIONE__...``, ``DESTINATION``, ``DATASET``...), exactly as in production.
The heavy imports happen first so that ``run_s`` (written to ``TIMING_JSON``) is the run
itself; the parent measures the whole process as well. ``write_s`` is the part of it spent
writing into the warehouse: dlt's normalize and load steps of every package, and the
connector's checkpoint after each (the script itself is not changed, only timed).
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any

T_START = time.perf_counter()

import dlt  # noqa: E402
import duckdb  # noqa: E402, F401
import pyarrow  # noqa: E402
import pyarrow.parquet  # noqa: E402, F401

import apione_source  # noqa: E402, F401
from apione_source.journal import SqlStore  # noqa: E402

ENRICH = Path(__file__).resolve().parents[2] / "pipelines" / "enrich.py"


WRITE_S = [0.0]


def _timed(cls: Any, name: str) -> None:
    """Add the seconds every call of ``cls.name`` takes to ``WRITE_S``."""
    method = getattr(cls, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            WRITE_S[0] += time.perf_counter() - t0

    setattr(cls, name, timed)


def main() -> None:
    """Run ``pipelines/enrich.py`` as ``__main__`` and write the timings."""
    imports_s = time.perf_counter() - T_START
    for cls, name in (
        (dlt.Pipeline, "normalize"),
        (dlt.Pipeline, "load"),
        (SqlStore, "checkpoint"),
    ):
        _timed(cls, name)
    t0 = time.perf_counter()
    runpy.run_path(str(ENRICH), run_name="__main__")
    run_s = time.perf_counter() - t0
    timing = {"imports_s": imports_s, "run_s": run_s, "write_s": WRITE_S[0]}
    Path(sys.argv[1]).write_text(json.dumps(timing))


if __name__ == "__main__":
    main()
