"""Kill fuzzer: random faults, runs killed anywhere, then runs until nothing is left to do.

Each trial is drawn from one seed (``APIONE_FUZZ_SEED`` + trial index) and does this:

1. start the sandbox as its own process (``python -m apione_source.sandbox --port 0``)
   with random faults: failing jobs, transient 500/503/429 answers (half of the 500s on
   submits create and bill the job: lost answers), results that expire before they are
   collected (a short retention, and results expired by hand between runs), jobs that
   outlive the run's wait budget or its job timeout, record errors, and whatever drift
   knobs ``--help`` offers (see ``DRIFT_KNOBS``);
2. fill an input DuckDB table with a few hundred companies (duplicate domains in other
   spellings, invalid rows);
3. run ``tests/crash_runner.py`` a few times, each run signalled (SIGKILL or SIGTERM)
   either by itself at a random phase hook (the n-th call) or by this process after a
   random delay; between runs rows are inserted and changed (another domain, broken,
   fixed), some runs start on a deleted pipelines dir, and some trials read the input
   through a cursor column (``updated_at``, kept in dlt's state in the destination);
4. run it without kills until the journal has nothing open, nothing is in flight and
   every valid row has a final outcome (at most ``MAX_CONVERGE`` runs, else the trial
   fails), then once more: that run must pay nothing and leave the journal empty.

Invariants, against the sandbox's own billing per key (``GET /_sandbox/usage``):

(a) every key is billed at most 1 + the number of its spent jobs (distinct ``job_id`` in
    the outcomes table with a status in failed, expired, timed_out, vanished, lost), and
    each such job has a row with that status in ``apione_jobs``;
(b) every valid input row has exactly one latest outcome (by ``submitted_at``, then
    ``attempt``) and it is final, and it has a final outcome for the key it carries now;
    no merge key twice in any table; the rejected table holds exactly the invalid rows;
(c) a key whose latest outcome was ``matched`` at some point never ends ``error`` or
    ``expired`` because of that job or an older one (checked after every run).

A killed run must end by its signal, or fail with dlt's ``SignalReceivedException``
(SIGTERM), or succeed (it finished first): any other failure fails the trial. Rows whose
latest outcome is for a key they no longer carry (``OLD_KEY``) are warnings unless
``APIONE_FUZZ_STRICT=1``.

Trials run ``APIONE_FUZZ_WORKERS`` (2) at a time; the default 12 take about 100 s on 2
cores. Each trial's plan, runs and logs are in its tmp dir (``seed<N>-0/trial.log``).
Replay a failing trial with the seed it prints (timing still varies: kills at a random
time, job durations), and keep only some of its killed runs to shrink it::

    APIONE_FUZZ_SEED=1007 APIONE_FUZZ_TRIALS=1 \\
        uv run pytest -m fuzz tests/test_kill_fuzzer.py --run-slow
    APIONE_FUZZ_SEED=1007 APIONE_FUZZ_TRIALS=1 APIONE_FUZZ_STEPS=0,2 \\
        uv run pytest -m fuzz tests/test_kill_fuzzer.py --run-slow

Soak (about 9 s a trial with 2 workers)::

    APIONE_FUZZ_TRIALS=300 uv run pytest -m fuzz tests/test_kill_fuzzer.py --run-slow
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path
from typing import IO, Any

import duckdb
import pytest

from apione_source.models import EnrichmentType
from apione_source.normalize import Normalized, normalize_record
from tests.crash_runner import (
    FINAL,
    PHASES,
    PYCACHE,
    ROOT,
    Dest,
    billed_key,
    billing_problems,
    latest_outcomes,
    outcome_problems,
    runner_command,
    runner_env,
)
from tests.e2e import COMPANY, MERGE_KEYS, TEN_KB

pytestmark = [pytest.mark.slow, pytest.mark.fuzz]

BASE_SEED = int(os.environ.get("APIONE_FUZZ_SEED", "1000"))
TRIALS = int(os.environ.get("APIONE_FUZZ_TRIALS", "12"))
KEEP_STEPS = os.environ.get("APIONE_FUZZ_STEPS")  # e.g. "0,2": only these killed runs
# Known questions (OLD_KEY) are warnings unless APIONE_FUZZ_STRICT=1.
STRICT = os.environ.get("APIONE_FUZZ_STRICT") == "1"
# Trials run side by side (each mostly waits on its subprocesses and on job durations).
WORKERS = int(os.environ.get("APIONE_FUZZ_WORKERS", "2"))
MAX_CONVERGE = 8  # runs without kills before a trial is declared not converging
CONVERGE_BUDGET = 15.0  # wait budget of those runs (jobs last at most ~2.5 s)
RUN_TIMEOUT = 120.0  # any single run
TERM_GRACE = 60.0  # a SIGTERMed run must have stopped by then
# Not a billing or lifecycle defect, a question of what "latest outcome of a row" means: a
# row whose domain changes while its old key is in flight gets that key's outcome too, and
# that job may be the newer one, so the row's latest outcome by job order is for a key it
# no longer carries. Each row does have a final outcome for its current key (checked).
OLD_KEY = "latest outcome by job order is for a key the row no longer carries"
CURSOR_START = datetime(2024, 1, 1)
BAD_DOMAINS = (None, "", "   ", "not a domain", TEN_KB, "127.0.0.1", "x\x00evil.com", "localhost")
# Knobs another engineer is adding to the sandbox CLI: used when ``--help`` lists them.
# (flag, how to draw a value, chance of drawing it at all)
DRIFT_KNOBS: tuple[tuple[str, Any, float], ...] = (
    ("--short-results-rate", lambda r: round(r.uniform(0.02, 0.1), 3), 0.3),
    ("--bad-index-rate", lambda r: round(r.uniform(0.02, 0.1), 3), 0.3),
    ("--wrong-echo-rate", lambda r: round(r.uniform(0.02, 0.1), 3), 0.3),
    ("--status-404-first-rate", lambda r: round(r.uniform(0.1, 0.3), 3), 0.3),
    ("--job-id-style", lambda r: "odd", 0.3),
    # submits are sequential: every job of the trial waits this long
    ("--submit-answer-delay-seconds", lambda r: round(r.uniform(0.05, 0.3), 2), 0.3),
    # An unknown status defers a job for 60 s (doubling): trials would not converge in
    # their budget. Enable by hand for a soak with a larger MAX_CONVERGE.
    ("--unknown-status-rate", lambda r: round(r.uniform(0.02, 0.1), 3), 0.0),
)


# --- the plan of a trial: everything random, drawn up front from its seed -------------------


@dataclass(frozen=True)
class Step:
    """One killed run."""

    how: str  # "hook": the runner signals itself; "timer": this process signals it
    sig: str  # KILL or TERM
    phase: str | None  # hook: where
    after: int  # hook: at the n-th call
    delay: float  # timer: seconds after the start
    fresh: bool  # start on an empty pipelines dir
    wait_budget: float
    insert: list[tuple[int, str | None]]  # rows inserted before the run
    update: list[tuple[int, str | None]]  # rows changed before the run (pk, new domain)
    expire: float  # share of the journaled in-flight jobs whose results expire before it


@dataclass(frozen=True)
class Plan:
    seed: int
    sandbox: list[str]
    runner: dict[str, Any]
    rows: list[tuple[int, str | None]]
    steps: list[Step]
    converge_fresh: list[bool]

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: sandbox {' '.join(self.sandbox)}",
            f"  runner {self.runner}",
            f"  input {len(self.rows)} rows",
        ]
        for i, s in enumerate(self.steps):
            what = (
                f"{s.sig} at hook {s.phase} #{s.after}"
                if s.how == "hook"
                else f"{s.sig} after {s.delay:.2f}s"
            )
            extras = [f"budget {s.wait_budget:.1f}s"]
            if s.fresh:
                extras.append("fresh dir")
            if s.insert:
                extras.append(f"+{len(s.insert)} rows")
            if s.update:
                extras.append(f"{len(s.update)} rows changed")
            if s.expire:
                extras.append(f"expire {s.expire:.0%} of in-flight")
            lines.append(f"  step {i}: {what} ({', '.join(extras)})")
        return "\n".join(lines)


def _domain(rng: random.Random, n: int) -> str:
    base = f"fz{n}.com"
    return rng.choice(
        [base, f"https://www.FZ{n}.com/about", f"{base}.", f"  FZ{n}.COM:443  ", base.upper()]
    )


class _Rows:
    """Input rows: new domains, other spellings of known ones, invalid values."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.next_pk = 1
        self.next_domain = 0
        self.values: dict[int, str | None] = {}

    def _new(self) -> str:
        self.next_domain += 1
        return f"fz{self.next_domain - 1}.com"

    def draw(self, n: int) -> list[tuple[int, str | None]]:
        out: list[tuple[int, str | None]] = []
        for _ in range(n):
            roll = self.rng.random()
            if roll < 0.05:
                value: str | None = self.rng.choice(BAD_DOMAINS)
            elif roll < 0.17 and self.next_domain:
                value = _domain(self.rng, self.rng.randrange(self.next_domain))
            else:
                value = self._new()
            out.append((self.next_pk, value))
            self.values[self.next_pk] = value
            self.next_pk += 1
        return out

    def updates(self, rng: random.Random, n: int) -> list[tuple[int, str | None]]:
        """Change ``n`` rows: fix invalid ones, move valid ones to another domain (new or
        known) or break them."""
        out: list[tuple[int, str | None]] = []
        for pk in rng.sample(sorted(self.values), min(n, len(self.values))):
            roll = rng.random()
            if self.values[pk] in BAD_DOMAINS:
                value = self._new() if roll < 0.7 else rng.choice(BAD_DOMAINS)
            elif roll < 0.5:
                value = self._new()
            elif roll < 0.8:
                value = _domain(rng, rng.randrange(self.next_domain))
            else:
                value = rng.choice(BAD_DOMAINS)
            self.values[pk] = value
            out.append((pk, value))
        return out


@cache
def sandbox_flags() -> frozenset[str]:
    """The flags the sandbox CLI has right now."""
    out = subprocess.run(
        [sys.executable, "-m", "apione_source.sandbox", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return frozenset(re.findall(r"--[a-z0-9-]+", out))


def make_plan(seed: int, available: frozenset[str]) -> Plan:
    rng = random.Random(seed)
    sandbox = [
        "--seed",
        str(seed),
        "--retry-after-seconds",
        "0",
        "--plan",
        rng.choice(["growth", "growth", "starter"]),
        "--job-seconds-base",
        f"{rng.uniform(0.1, 1.2):.2f}",
        "--job-seconds-per-record",
        rng.choice(["0", "0.01"]),
        "--queue-seconds",
        rng.choice(["0", "0", "0.3"]),
    ]
    if rng.random() < 0.6:
        sandbox += ["--failure-rate", f"{rng.uniform(0.1, 0.3):.3f}"]
    if rng.random() < 0.6:
        sandbox += ["--transient-error-rate", f"{rng.uniform(0.05, 0.1):.3f}"]
    if rng.random() < 0.5:
        sandbox += ["--retention-seconds", f"{rng.uniform(0.5, 3.0):.2f}"]
    if rng.random() < 0.3:
        sandbox += ["--record-error-rate", "0.05"]
    for flag, value, chance in DRIFT_KNOBS:
        draw = rng.random()  # always drawn: the plan stays the same when knobs appear
        picked = value(rng)
        if flag in available and draw < chance:
            sandbox += [flag, str(picked)]
    runner = {
        "records_per_job": rng.choice([15, 25, 40]),
        "concurrent_jobs": rng.choice([None, 2, 4]),
        "max_attempts": rng.choice([2, 3, 3]),
        "chunk_size": rng.choice([50, 120, 10_000]),
        "job_timeout": rng.choice([None, None, round(rng.uniform(1.0, 2.5), 2)]),
    }
    # Drawn from a second stream, so the draws above stay what they were for each seed.
    rng2 = random.Random(f"{seed}/2")
    runner["cursor_column"] = rng2.choice([None, "updated_at"])
    # results loaded in several packages per run (kills between and within them)
    runner["records_per_load"] = rng2.choice([None, 30, 70])
    rows = _Rows(rng)
    initial = rows.draw(rng.randint(150, 300))
    steps = []
    for _ in range(rng.randint(2, 5)):
        update = rows.updates(rng2, rng2.randint(1, 8)) if rng2.random() < 0.4 else []
        how = "hook" if rng.random() < 0.6 else "timer"
        steps.append(
            Step(
                how=how,
                sig="KILL" if rng.random() < 0.65 else "TERM",
                phase=rng.choice(PHASES) if how == "hook" else None,
                after=rng.choice([1, 1, 2, 3, 5]) if how == "hook" else 0,
                delay=round(rng.uniform(0.8, 5.0), 2) if how == "timer" else 0.0,
                fresh=rng.random() < 0.3,
                wait_budget=round(rng.uniform(0.5, 4.0), 1),
                insert=rows.draw(rng.randint(5, 30)) if rng.random() < 0.5 else [],
                update=update,
                expire=rng.choice([0.0, 0.0, 0.5, 1.0]),
            )
        )
    if KEEP_STEPS is not None:
        keep = {int(i) for i in KEEP_STEPS.split(",") if i.strip()}
        steps = [s for i, s in enumerate(steps) if i in keep]
    converge_fresh = [rng.random() < 0.3 for _ in range(MAX_CONVERGE + 1)]
    return Plan(seed, sandbox, runner, initial, steps, converge_fresh)


# --- the sandbox process ------------------------------------------------------------------------


class SandboxProcess:
    def __init__(self, flags: list[str], log: Path) -> None:
        self._log: IO[str] = open(log, "w")  # noqa: SIM115
        cli = [sys.executable, "-m", "apione_source.sandbox", "--host", "127.0.0.1", "--port", "0"]
        self.proc = subprocess.Popen(
            [*cli, *flags],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env=runner_env(log.parent, PYCACHE),
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"sandbox did not start: {log.read_text()[-2000:]}")
        self.root = self.base_url.rsplit("/api/", 1)[0]

    def _call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(self.root + path, method=method)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def usage(self) -> dict[str, Any]:
        return dict(self._call("GET", "/_sandbox/usage"))

    def expire(self, job_id: str) -> None:
        try:
            self._call("POST", f"/_sandbox/expire/{urllib.parse.quote(job_id, safe='')}")
        except urllib.error.HTTPError as exc:  # not a job of this sandbox (a lost id)
            if exc.code != 404:
                raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --- one trial --------------------------------------------------------------------------------


@dataclass
class RunRecord:
    label: str
    rc: int
    seconds: float
    stderr_tail: str


@dataclass
class Trial:
    plan: Plan
    tmp: Path
    sandbox: SandboxProcess
    warehouse: Path = field(init=False)
    workdir: Path = field(init=False)
    dest: Dest = field(init=False)
    runs: list[RunRecord] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    invalid: set[str] = field(default_factory=set)
    current: dict[str, str | None] = field(default_factory=dict)  # pk -> domain now
    tick: int = 0
    # (c): key -> (order, job_id) of the newest job whose outcome was seen latest and matched
    matched_seen: dict[str, tuple[Any, str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)  # seen, but warnings (OLD_KEY)

    def __post_init__(self) -> None:
        self.warehouse = self.tmp / "warehouse.duckdb"
        self.workdir = self.tmp / "work"
        self.dest = Dest(self.workdir / "destination.duckdb")
        self.rt = random.Random(self.plan.seed * 7919 + 1)  # choices made while running
        con = duckdb.connect(str(self.warehouse))
        try:
            con.execute("CREATE SCHEMA crm")
            con.execute("CREATE TABLE crm.companies(id INT, domain VARCHAR, updated_at TIMESTAMP)")
        finally:
            con.close()
        self.insert(self.plan.rows)

    # --- input -----------------------------------------------------------------------

    def _stamped(self, rows: list[tuple[int, str | None]]) -> list[tuple[Any, ...]]:
        """Rows with a growing ``updated_at`` (the cursor, when the plan uses one)."""
        out = []
        for pk, value in rows:
            self.tick += 1
            out.append((pk, value, CURSOR_START + timedelta(seconds=self.tick)))
            self.current[str(pk)] = value
            self.valid.discard(str(pk))
            self.invalid.discard(str(pk))
            (self.invalid if value in BAD_DOMAINS else self.valid).add(str(pk))
        return out

    def insert(self, rows: list[tuple[int, str | None]]) -> None:
        if rows:
            self._sql("INSERT INTO crm.companies VALUES (?, ?, ?)", self._stamped(rows))

    def update(self, rows: list[tuple[int, str | None]]) -> None:
        if rows:
            changes = [(v, ts, pk) for pk, v, ts in self._stamped(rows)]
            self._sql("UPDATE crm.companies SET domain = ?, updated_at = ? WHERE id = ?", changes)

    def _sql(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        con = duckdb.connect(str(self.warehouse))
        try:
            con.executemany(sql, rows)
        finally:
            con.close()

    def current_key(self, pk: str) -> str:
        """The key the pipeline makes of input row ``pk`` now (its own normalizer)."""
        norm = normalize_record(EnrichmentType.COMPANY, {"domain": self.current[pk]})
        assert isinstance(norm, Normalized), (pk, self.current[pk])
        return norm.key

    # --- running ---------------------------------------------------------------------

    def run(self, label: str, step: Step | None, *, fresh: bool, wait_budget: float) -> int:
        kw: dict[str, Any] = dict(self.plan.runner)
        if step is not None and step.how == "hook":
            kw.update(crash_at=step.phase, crash_after=step.after, sig=step.sig)
        cmd = runner_command(
            self.workdir,
            self.sandbox.base_url,
            self.warehouse,
            fast_retries=True,
            fresh_dir=fresh,
            wait_budget=wait_budget,
            **kw,
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.tmp / f"run{len(self.runs):02d}.log"
        started = time.monotonic()
        with open(log, "w") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=runner_env(self.workdir, PYCACHE),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            try:
                rc = self._wait(proc, step)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        tail = log.read_text(errors="replace")[-4000:]
        self.runs.append(RunRecord(label, rc, time.monotonic() - started, tail))
        return rc

    def _wait(self, proc: subprocess.Popen[bytes], step: Step | None) -> int:
        if step is not None and step.how == "timer":
            try:
                return proc.wait(timeout=step.delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL if step.sig == "KILL" else signal.SIGTERM)
            try:
                return proc.wait(timeout=TERM_GRACE)
            except subprocess.TimeoutExpired:
                self.problems.append(f"run did not stop within {TERM_GRACE}s of SIGTERM")
                proc.kill()
                return proc.wait()
        try:
            return proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.problems.append(f"run did not finish within {RUN_TIMEOUT}s")
            proc.kill()
            return proc.wait()

    def expire_some(self, share: float) -> None:
        if not share:
            return
        jobs = sorted(e.job_id for e in self.dest.entries().values() if e.job_id and not e.done)
        for job_id in jobs:
            if self.rt.random() < share:
                self.sandbox.expire(job_id)

    # --- checking --------------------------------------------------------------------

    def check_killed_run(self, step: Step, rc: int) -> None:
        last = self.runs[-1]
        if rc in (0, -signal.SIGKILL, -signal.SIGTERM):
            return
        if rc == 1 and step.sig == "TERM" and "SignalReceived" in last.stderr_tail:
            return
        self.problems.append(f"{last.label} ended {rc}, not by its signal:\n{last.stderr_tail}")

    def observe(self, final: bool = False) -> None:
        """(c), after every run: a key's matched job is never undone by that or an older job."""
        rows = self.dest.rows(
            COMPANY.outcomes, "key, job_id, attempt, status, submitted_at, finished_at"
        )
        for key, top in latest_outcomes(rows).items():
            row = max(top, key=lambda r: r[3] == "matched")
            order = (row[4] if row[4] is not None else row[5], row[2])
            seen = self.matched_seen.get(key)
            if row[3] == "matched":
                if seen is None or order > seen[0]:
                    self.matched_seen[key] = (order, row[1])
            elif seen is not None and row[3] in ("error", "expired"):
                older = order < seen[0] or (final and row[1] == seen[1])
                if older:
                    self.problems.append(
                        f"(c) key {key}: matched by job {seen[1]} (order {seen[0]}), now "
                        f"{row[3]} by job {row[1]} (order {order})"
                    )

    def converged(self) -> bool:
        if self.dest.in_flight() or self.dest.open_entries():
            return False
        rows = self.dest.rows(
            COMPANY.outcomes, "input_pk, job_id, attempt, status, submitted_at, finished_at"
        )
        latest = latest_outcomes([r for r in rows if r[0] is not None])
        if not all(pk in latest and latest[pk][0][3] in FINAL for pk in self.valid):
            return False
        return not self.stale_rows()

    def latest_of_old_key(self) -> list[str]:
        """Valid input rows whose latest outcome (by job order) is for a key they no longer
        carry: what "the latest outcome of each input row" shows a user."""
        rows = self.dest.rows(
            COMPANY.outcomes, "input_pk, job_id, attempt, status, submitted_at, finished_at, key"
        )
        latest = latest_outcomes([r for r in rows if r[0] is not None])
        return sorted(
            f"input row {pk}: latest {latest[pk][0][3]} of key {latest[pk][0][6]}, carries "
            f"{self.current_key(pk)}"
            for pk in self.valid
            if pk in latest and latest[pk][0][6] != self.current_key(pk)
        )

    def stale_rows(self) -> list[str]:
        """Valid input rows without a final outcome for the key they carry now."""
        have = {
            (pk, key)
            for pk, key, status in self.dest.rows(COMPANY.outcomes, "input_pk, key, status")
            if status in FINAL
        }
        return sorted(pk for pk in self.valid if (pk, self.current_key(pk)) not in have)

    def final_checks(self, usage: dict[str, Any]) -> None:
        self.problems += [
            f"(a) {p}"
            for p in billing_problems(self.dest, usage["billed_per_key"], COMPANY.outcomes)
        ]
        self.problems += [f"(b) {p}" for p in outcome_problems(self.dest, self.valid, MERGE_KEYS)]
        stale = self.stale_rows()
        if stale:
            self.problems.append(
                f"(b) {len(stale)} input row(s) without a final outcome for their current key: "
                + ", ".join(f"input row {pk}" for pk in stale[:10])
            )
        old_key = self.latest_of_old_key()
        if old_key and STRICT:
            self.problems += [f"(b) {p}" for p in old_key[:10]]
        elif old_key:
            self.known.append(f"{OLD_KEY}: {len(old_key)} row(s), e.g. {old_key[0]}")
        rejected = {r[0] for r in self.dest.rows(COMPANY.rejected, "input_pk")}
        if rejected != self.invalid:
            self.problems.append(
                f"(b) rejected rows {sorted(rejected ^ self.invalid)[:10]} differ from the "
                "invalid input"
            )
        self.observe(final=True)

    # --- the report ------------------------------------------------------------------

    def report(self) -> str:
        keys = set(re.findall(r"key (\{[^}]*\})", "\n".join(self.problems)))
        keys |= set(re.findall(r"key (fz\S+?)[:,]", "\n".join(self.problems)))
        pks = set(re.findall(r"input row (\d+)", "\n".join(self.problems)))
        lines = [
            f"kill fuzzer trial failed: replay with APIONE_FUZZ_SEED={self.plan.seed} "
            "APIONE_FUZZ_TRIALS=1",
            self.plan.summary(),
            "runs:",
        ]
        lines += [f"  {r.label}: rc {r.rc} in {r.seconds:.1f}s" for r in self.runs]
        lines.append("problems:")
        lines += [f"  {p}" for p in self.problems[:20]]
        outcome_cols = "key, input_pk, job_id, attempt, status, submitted_at, load_id, input"
        involved = [
            r
            for r in self.dest.rows(COMPANY.outcomes, outcome_cols)
            if r[1] in pks or r[0] in keys or billed_key(r[7]) in keys
        ]
        if involved:
            lines.append("outcome rows involved:")
            lines += [f"  {r[:7]}" for r in sorted(involved, key=repr)[:40]]
            jobs = {r[2] for r in involved}
            lines.append("ledger rows involved:")
            lines += [
                f"  {r}"
                for r in self.dest.rows(
                    COMPANY.jobs,
                    "job_id, status, record_count, attempt, submitted_in_load, updated_in_load",
                )
                if r[0] in jobs
            ]
        journal = self.dest.journal()
        lines.append(f"journal ({len(journal)} rows):")
        lines += [
            f"  {r['entry_id'][:8]} #{r['seq']} g{r['gen']} {r['event']} {r['job_id']} "
            f"{r['reason']} load={r['load_id']} items={len(json.loads(r['items'] or '[]'))}"
            for r in sorted(journal, key=lambda r: (r["entry_id"], r["seq"]))[:60]
        ]
        lines.append(f"logs: {self.tmp}")
        if self.runs:
            lines.append(f"stderr of {self.runs[-1].label}:\n{self.runs[-1].stderr_tail[-1500:]}")
        return "\n".join(lines)


def run_trial(plan: Plan, tmp: Path) -> Trial:
    sandbox = SandboxProcess(plan.sandbox, tmp / "sandbox.log")
    trial = Trial(plan, tmp, sandbox)
    try:
        _run_trial(trial)
    finally:
        sandbox.stop()
        log = [plan.summary(), "runs:"]
        log += [f"  {r.label}: rc {r.rc} in {r.seconds:.1f}s" for r in trial.runs]
        log += ["problems:", *trial.problems, "known:", *trial.known]
        (tmp / "trial.log").write_text("\n".join(log) + "\n")
    return trial


def _run_trial(trial: Trial) -> None:
    """The killed runs, the runs to convergence, the checks and one idle run."""
    plan = trial.plan
    for i, step in enumerate(plan.steps):
        trial.insert(step.insert)
        trial.update(step.update)
        trial.expire_some(step.expire)
        rc = trial.run(f"step {i}", step, fresh=step.fresh, wait_budget=step.wait_budget)
        trial.check_killed_run(step, rc)
        trial.observe()
    for i in range(MAX_CONVERGE):
        rc = trial.run(
            f"converge {i}", None, fresh=plan.converge_fresh[i], wait_budget=CONVERGE_BUDGET
        )
        if rc != 0:
            trial.problems.append(f"converge run {i} failed:\n{trial.runs[-1].stderr_tail}")
            break
        trial.observe()
        if trial.converged():
            break
    else:
        trial.problems.append(f"not converged after {MAX_CONVERGE} runs without kills")
    if trial.problems:
        return
    trial.final_checks(trial.sandbox.usage())
    # one more run: nothing to pay, nothing left in the journal
    before = trial.sandbox.usage()["records_billed"]
    rc = trial.run("idle", None, fresh=plan.converge_fresh[-1], wait_budget=CONVERGE_BUDGET)
    after = trial.sandbox.usage()["records_billed"]
    if rc != 0:
        trial.problems.append(f"idle run failed:\n{trial.runs[-1].stderr_tail}")
    elif after != before:
        trial.problems.append(f"idle run after convergence paid {after - before} record(s)")
    elif trial.dest.journal():
        trial.problems.append(f"journal not empty after the idle run: {trial.dest.journal()}")


TEST_NAME = "test_given_random_faults_and_kills_when_run_until_converged_then_invariants_hold"


@pytest.fixture(scope="module")
def trials(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[int, Future[Trial]]]:
    """Every selected trial, submitted in seed order to ``WORKERS`` threads at once."""
    flags = sandbox_flags()
    seeds = [
        item.callspec.params["seed"]
        for item in request.session.items
        if getattr(item, "originalname", None) == TEST_NAME and hasattr(item, "callspec")
    ]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fuzz")
    futures = {
        seed: pool.submit(
            run_trial, make_plan(seed, flags), tmp_path_factory.mktemp(f"seed{seed}-")
        )
        for seed in seeds
    }
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("seed", [BASE_SEED + i for i in range(TRIALS)], ids=lambda s: f"seed{s}")
def test_given_random_faults_and_kills_when_run_until_converged_then_invariants_hold(
    seed: int, trials: dict[int, Future[Trial]]
) -> None:
    trial = trials[seed].result()
    if trial.problems:
        pytest.fail(trial.report(), pytrace=False)
    for known in trial.known:
        warnings.warn(f"seed {seed}: {known}", stacklevel=1)


def test_plans_are_reproducible_from_their_seed() -> None:
    flags = frozenset({"--failure-rate"})
    assert asdict(make_plan(5, flags)) == asdict(make_plan(5, flags))
    assert asdict(make_plan(5, flags)) != asdict(make_plan(6, flags))


def test_invariant_checks_catch_what_they_claim(tmp_path: Path) -> None:
    """The checks are not vacuous: a synthetic destination breaking each one is caught."""
    dest = Dest(tmp_path / "destination.duckdb")
    con = duckdb.connect(str(dest.path))
    try:
        con.execute("CREATE SCHEMA enriched")
        con.execute(
            f"CREATE TABLE enriched.{COMPANY.outcomes}(outcome_id VARCHAR, input_pk VARCHAR, "
            "key VARCHAR, job_id VARCHAR, attempt INT, status VARCHAR, input VARCHAR, "
            "submitted_at TIMESTAMP, finished_at TIMESTAMP)"
        )
        con.execute(f"CREATE TABLE enriched.{COMPANY.jobs}(job_id VARCHAR, status VARCHAR)")
        rows = [
            # a.com: failed once (in the ledger), then matched
            ("o1", "1", "a.com", "j1", 1, "failed", '{"domain":"a.com"}', 1, 1),
            ("o2", "1", "a.com", "j2", 2, "matched", '{"domain":"a.com"}', 2, 2),
            # b.com: lost (not in the ledger), and its latest outcome is not final
            ("o3", "2", "b.com", "lost_x_1", 1, "lost", '{"domain":"b.com"}', 1, 1),
        ]
        con.executemany(
            f"INSERT INTO enriched.{COMPANY.outcomes} VALUES (?, ?, ?, ?, ?, ?, ?, "
            "to_timestamp(?), to_timestamp(?))",
            rows,
        )
        con.executemany(
            f"INSERT INTO enriched.{COMPANY.jobs} VALUES (?, ?)",
            [("j1", "failed"), ("j2", "completed"), ("j2", "completed")],
        )
    finally:
        con.close()
    billed = {'{"domain":"a.com"}': 3, '{"domain":"b.com"}': 1, '{"domain":"c.com"}': 1}
    billing = billing_problems(dest, billed, COMPANY.outcomes)
    assert any("a.com" in p and "billed 3 times, explained by 1" in p for p in billing)
    assert any("lost_x_1 (lost)" in p and "not in the ledger" in p for p in billing)
    assert any("c.com" in p and "no outcome at all" in p for p in billing)
    outcomes = outcome_problems(
        dest, {"1", "2", "3"}, {COMPANY.outcomes: "outcome_id", COMPANY.jobs: "job_id"}
    )
    assert any("input row 2: latest outcome is 'lost'" in p for p in outcomes)
    assert any("without an outcome" in p and "'3'" in p for p in outcomes)
    assert any(f"{COMPANY.jobs} has 1 duplicate job_id" in p for p in outcomes)
    assert not any("input row 1" in p for p in outcomes)
