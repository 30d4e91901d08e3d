"""The apione-dlt demo (``apione_source.demo``), with ``demo_data/`` in the repository.

Run it as the README shows:

    uv run python pipelines/demo.py           # run the demo
    uv run python pipelines/demo.py --show    # look at the loaded data
    uv run python pipelines/demo.py --reset   # start over
    uv run --group dbt python pipelines/demo.py --dbt   # build the dbt package over it
"""

from __future__ import annotations

import sys
from pathlib import Path

from apione_source.demo import main

if __name__ == "__main__":
    sys.exit(main(root=Path(__file__).resolve().parent.parent))
