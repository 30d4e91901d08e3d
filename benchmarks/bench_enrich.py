"""Benchmark of issue 10: the connector end to end against the ApiOne sandbox.

Every figure is measured on separate processes: the sandbox (``python -m
apione_source.sandbox``, as ApiOne would be), the production script
``pipelines/enrich.py`` (configured through ``SOURCES__APIONE__*`` env vars, reading a
DuckDB input file the harness creates), and, in the same invocation, its baselines:

* dlt's fastest load of the same information (arrow tables, parquet, append) into the
  same destination, read back from what the connector loaded;
* the "API limit": a minimal concurrent httpx client pushing the same N records through
  the same sandbox, no dlt.

Scenarios: ``throughput``, ``nothing_to_send``, ``wall_time``, ``polling``
(docs/BENCHMARKS.md explains each). The exit status is non-zero only when a correctness
check fails (billing: every record billed exactly once; one outcome row per input row;
nothing billed by a run with nothing to send); a figure missing its target prints MISS
but does not fail the run, unless ``--strict``.

Usage::

    uv run python benchmarks/bench_enrich.py --quick          # CI: small sizes, < 90 s
    uv run python benchmarks/bench_enrich.py                  # the issue's sizes
    uv run python benchmarks/bench_enrich.py --scenario throughput --sizes 100000 --json
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from benchkit.procs import REPO, ForeignCpu
from benchkit.report import Report
from benchkit.runs import HarnessError
from benchkit.scenarios import (
    Bench,
    WallCase,
    nothing_to_send,
    polling,
    throughput,
    wall_time,
)

from apione_source.settings import PLANS

#: Share of the machine's CPU used by other processes above which the report warns.
FOREIGN_CPU_WARN = 0.05
SCENARIOS = ("throughput", "nothing_to_send", "wall_time", "polling")


@dataclass(frozen=True)
class Sizes:
    """The sizes of one mode."""

    throughput: tuple[int, ...]
    nothing_to_send: int
    wall: tuple[WallCase, ...]
    polling_n: int
    polling_job_s: float
    repeat: int


QUICK = Sizes(
    throughput=(10_000,),
    nothing_to_send=20_000,
    wall=(WallCase("starter", 10_000, job_seconds=2.0, time_scale=0.5),),
    polling_n=5_000,
    polling_job_s=3.0,
    repeat=1,
)
FULL = Sizes(
    throughput=(100_000, 1_000_000),
    nothing_to_send=1_000_000,
    wall=(WallCase("starter", 50_000, job_seconds=2.0), WallCase("growth", 100_000, 5.0)),
    polling_n=20_000,
    polling_job_s=6.0,
    repeat=3,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes for CI (< 90 s)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    p.add_argument("--sizes", type=int, nargs="+", help="throughput N list")
    p.add_argument("--nothing-keys", type=int, help="known keys of the nothing-to-send run")
    p.add_argument("--repeat", type=int, help="runs per figure, median kept (1 quick, 3 full)")
    p.add_argument(
        "--plan", default="scale", choices=sorted(PLANS), help="plan of the throughput runs"
    )
    p.add_argument(
        "--layout",
        default="shared",
        choices=("shared", "separate"),
        help="input and results in one DuckDB file (shared, default) or in two",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="also exit 1 when a target is missed")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, DuckDB files)")
    p.add_argument("--label", help="what was measured (default: the git commit of the tree)")
    # The old command line (README): --records N = --scenario throughput --sizes N.
    p.add_argument("--records", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.records is not None:
        args.scenario = args.scenario or ["throughput"]
        args.sizes = [args.records]
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def plan_steps(args: argparse.Namespace, bench: Bench) -> list[tuple[str, Callable[[], None]]]:
    """The scenario runs this invocation makes, in order."""
    sizes = QUICK if args.quick else FULL
    chosen = args.scenario or list(SCENARIOS)
    steps: list[tuple[str, Callable[[], None]]] = []
    if "throughput" in chosen:
        for n in args.sizes or sizes.throughput:
            steps.append((f"throughput {n}", partial(throughput, bench, n, args.plan)))
    if "nothing_to_send" in chosen:
        keys = args.nothing_keys or sizes.nothing_to_send
        steps.append(("nothing_to_send", partial(nothing_to_send, bench, keys, args.plan)))
    if "wall_time" in chosen:
        steps += [(case.name, partial(wall_time, bench, case)) for case in sizes.wall]
    if "polling" in chosen:
        steps.append(("polling", partial(polling, bench, sizes.polling_n, sizes.polling_job_s)))
    return steps


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()


def git_commit() -> str:
    """Short commit of the tree, ``-dirty`` when apione_source/ or pipelines/ have changes."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "apione_source", "pipelines")
    return f"{commit}{'-dirty' if dirty else ''}"


def code_fingerprint() -> str:
    """Digest of the measured code (HEAD plus uncommitted changes), to notice edits mid-run."""
    state = _git("rev-parse", "HEAD") + _git("diff", "HEAD", "--", "apione_source", "pipelines")
    return hashlib.sha256(state.encode()).hexdigest()


def new_report(args: argparse.Namespace) -> Report:
    """An empty report labelled with mode, commit, date and machine."""
    return Report(
        mode=f"{'quick' if args.quick else 'full'}, layout {args.layout}",
        commit=args.label or git_commit(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
    )


def note_foreign_cpu(report: Report, step: str, meter: ForeignCpu) -> None:
    """Record how much CPU other processes took; warn when it can have moved the figures."""
    share = meter.share()
    report.details.setdefault("foreign_cpu_share", {})[step] = share
    if share is not None and share > FOREIGN_CPU_WARN:
        report.notes.append(
            f"{step}: other processes used {share:.0%} of the machine's CPU "
            f"({os.cpu_count()} cores): its timings are slower than on an idle machine"
        )


def run_steps(steps: list[tuple[str, Callable[[], None]]], bench: Bench) -> None:
    """Run each step; a step that breaks is a failed check, the others still run."""
    for name, step in steps:
        meter = ForeignCpu()
        try:
            step()
        except Exception as exc:  # a broken step must not hide the other scenarios
            known = isinstance(exc, (HarnessError, RuntimeError, OSError))
            detail = str(exc) if known else traceback.format_exc()
            bench.report.check(name, "ran to the end", [detail])
            bench.log(f"{name} FAILED: {detail}")
        note_foreign_cpu(bench.report, name, meter)


def compile_bytecode(log: Callable[[str], None]) -> None:
    """Compile the environment's packages to bytecode once, untimed.

    An installed environment has it (``uv sync --compile-bytecode``, or Python writes it
    at the first import). Where ``PYTHONDONTWRITEBYTECODE`` is set (CI images often do),
    every child would compile what it imports inside its timed run: pandas, which DuckDB
    imports at a run's first query, alone took 0.7 s of every connector run.
    """
    if sys.flags.dont_write_bytecode:
        log("compiling site-packages to bytecode (untimed; once per environment)")
        for path in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
            compileall.compile_dir(path, quiet=2, workers=0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the report.

    Returns:
        1 if a correctness check failed (or, with ``--strict``, a target was missed).
    """
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="apione-bench-"))
    sizes = QUICK if args.quick else FULL
    bench = Bench(
        root=root,
        repeat=args.repeat or sizes.repeat,
        report=new_report(args),
        log=log,
        shared=args.layout == "shared",
    )
    compile_bytecode(log)
    t0 = time.perf_counter()
    fingerprint = code_fingerprint()
    try:
        run_steps(plan_steps(args, bench), bench)
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if code_fingerprint() != fingerprint:
        bench.report.notes.append(
            f"apione_source/ or pipelines/ changed during the run (now {git_commit()}): "
            "the figures mix code versions"
        )
    bench.report.details["total_seconds"] = round(time.perf_counter() - t0, 1)
    log(f"total {time.perf_counter() - t0:.0f}s")
    if args.json:
        print(bench.report.to_json())
    else:
        bench.report.print_text(sys.stdout)
    failed = not bench.report.correct or (args.strict and bool(bench.report.missed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
