"""Run one enrichment in this process and SIGKILL it at a chosen journal step.

Test code: ``python tests/warehouses/kill_runner.py '<json>'`` with the pipeline's name,
dataset, pipelines dir, destination (type and credentials), the ``apione(...)`` arguments
and ``kill_at`` = ``"<Journal method>:<n>[:before]"`` (or ``load``: dlt's load step): the
process kills itself with SIGKILL (no cleanup) at the n-th call of that method, after it
returned, or before it ran with ``:before``; ``"load_committed:<table>"``: once the
warehouse committed that table's load job, before dlt noted it; no ``kill_at``: a plain
run. The warehouse scenarios use it to prove that a worker killed anywhere, followed by
one on an empty disk, loses nothing and pays nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dlt
from dlt.common.destination import Destination

from apione_source import apione, run_enrichment
from apione_source.journal import Journal
from tests.crash_runner import install_crash


def _install(kill_at: str) -> None:
    method, n, *when = kill_at.split(":")
    if method == "load_committed":  # the crash matrix's hook, for this one table
        install_crash("load_committed", 1, signal.SIGKILL, table=n)
        return
    # "load": dlt's load step (its package extracted and normalized, nothing loaded)
    owner: Any = dlt.Pipeline if method == "load" else Journal
    original = getattr(owner, method)
    calls = {"n": 0}

    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        hit = calls["n"] == int(n)
        if hit and when == ["before"]:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(self, *args, **kwargs)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, method, wrapped)


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("kill_at"):
        _install(spec["kill_at"])
    pipeline = dlt.pipeline(
        pipeline_name=spec["pipeline"],
        destination=Destination.from_reference(
            spec["destination"], credentials=spec["credentials"]
        ),
        dataset_name=spec["dataset"],
        pipelines_dir=spec["pipelines_dir"],
    )
    run_enrichment(pipeline, apione(**spec["source"]))
    print("finished without being killed")


if __name__ == "__main__":
    main()
