"""Start bqemulator offline: run by the bqemulator venv's python, not the project's.

bqemulator's engine installs DuckDB's ``spatial`` extension at start-up, which downloads
it and fails without internet. This launcher replaces that step with a no-op (GEOGRAPHY
then does not work, which apione-dlt never uses) and hands over to bqemulator's CLI.
All settings come from ``BQEMU_*`` environment variables set by the test fixture.
"""

from __future__ import annotations

import sys

from bqemulator.cli import main
from bqemulator.storage.engine import DuckDBEngine


def _skip_spatial(self: DuckDBEngine) -> None:
    """No spatial extension offline (GEOGRAPHY unsupported on this stand-in)."""


DuckDBEngine._load_spatial = _skip_spatial  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv = ["bqemulator", "start", *sys.argv[1:]]
    sys.exit(main())
