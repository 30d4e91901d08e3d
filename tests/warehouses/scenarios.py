"""The end-to-end scenarios every warehouse suite runs (the DuckDB e2e suite's core).

A suite subclasses :class:`Scenarios` (:class:`CoreScenarios` for the bare minimum) as
``Test<Something>`` and sets ``input_wh`` and ``output_wh`` to warehouse fixture
prefixes (``duckdb``, ``postgres``, ``snowflake``, ``bigquery``; the fixtures are in
``conftest.py``). Every test makes its own input dataset and output dataset (unique
names) and drops both afterwards.

Everything is checked through SQL on the warehouse itself (dlt's SQL client), the way a
user or dbt would look, plus the sandbox's usage counters (what ApiOne would bill).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from apione_source.models import EnrichmentType
from apione_source.sandbox import Sandbox
from apione_source.sandbox.data import canonical_json
from apione_source.tables import TableNames
from tests.conftest import SANDBOX_API_KEY
from tests.warehouses.harness import Env

COMPANY = TableNames("apione_", EnrichmentType.COMPANY)
TAGS = f"{COMPANY.enrichment}_tags"
TECHNOLOGIES = f"{COMPANY.enrichment}_technologies"
TEN_KB = "a" * 10_240


def company_key(domain: str) -> str:
    """The sandbox's billing key of a company record with this (normalized) domain."""
    return canonical_json({"domain": domain})


def billed(sb: Sandbox) -> tuple[int, int]:
    u = sb.usage()
    return u["jobs_created"], u["records_billed"]


def outcomes_per_pk(env: Env) -> Counter[str]:
    rows = env.query(
        f"SELECT input_pk, count(*) FROM {env.out(COMPANY.outcomes)} GROUP BY input_pk"
    )
    return Counter({str(pk): int(n) for pk, n in rows})


def assert_no_duplicate_keys(env: Env, table: str = COMPANY.enrichment) -> None:
    total, distinct = env.query(f"SELECT count(*), count(DISTINCT key) FROM {env.out(table)}")[0]
    assert total == distinct, f"{table} has {total - distinct} duplicate key row(s)"


def assert_each_job_row_once(env: Env) -> None:
    """No outcome, no list element of a job, twice (a job collected twice, a late package)."""
    keys = {
        COMPANY.outcomes: "outcome_id",
        TAGS: "key, job_id, idx",
        TECHNOLOGIES: "key, job_id, idx",
    }
    for table, key in keys.items():
        twice = env.query(
            f"SELECT count(*) FROM (SELECT {key} FROM {env.out(table)} GROUP BY {key} "
            "HAVING count(*) > 1) d"
        )
        assert twice == [(0,)], f"{table}: {twice[0][0]} row(s) twice"


def assert_dbt_style_join(env: Env, expected_keys: dict[str, str]) -> None:
    """The README's current-status join (input -> latest outcome -> enrichment), as written.

    Args:
        env: Input and results in one warehouse.
        expected_keys: Input primary key -> the normalized key it must join to.
    """
    text = env.input_wh.types["text"]
    outcomes, inputs = env.out(COMPANY.outcomes), env.out(COMPANY.inputs)
    rows = env.query(
        f"WITH latest AS ("
        f" SELECT o.*, row_number() OVER ("
        f"  PARTITION BY o.input_pk"
        f"  ORDER BY coalesce(o.submitted_at, o.finished_at) DESC, o.attempt DESC) AS position"
        f" FROM {outcomes} o LEFT JOIN {inputs} i ON i.input_pk = o.input_pk"
        f" WHERE i.input_pk IS NULL OR i.key = o.key) "
        f"SELECT c.id, CASE WHEN r.input_pk IS NOT NULL THEN 'rejected'"
        f" ELSE coalesce(l.status, 'pending') END AS status, r.reason, e.key, e.name "
        f"FROM {env.input_table()} c "
        f"LEFT JOIN {env.out(COMPANY.rejected)} r ON r.input_pk = CAST(c.id AS {text}) "
        f"LEFT JOIN latest l ON l.input_pk = CAST(c.id AS {text}) AND l.position = 1"
        f" AND r.input_pk IS NULL "
        f"LEFT JOIN {env.out(COMPANY.enrichment)} e ON e.key = l.key AND l.status = 'matched'"
    )
    input_ids = [str(pk) for (pk,) in env.query(f"SELECT id FROM {env.input_table()}")]
    assert sorted(str(r[0]) for r in rows) == sorted(input_ids)  # every input row once
    statuses = {str(pk): status for pk, status, *_ in rows}
    assert "matched" in statuses.values()
    for pk, status, reason, key, name in rows:
        if status == "matched":
            assert key == expected_keys[str(pk)] and name, (pk, key, name)
        else:
            assert key is None and name is None, (pk, status, key)
        assert (status == "rejected") == (reason is not None), (pk, status, reason)


def snapshot(env: Env) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "enrichment": env.query(
            f"SELECT key, job_id, enriched_at FROM {env.out(COMPANY.enrichment)} ORDER BY key"
        ),
        "outcomes": env.query(
            f"SELECT outcome_id, input_pk, key, job_id, attempt, status, finished_at "
            f"FROM {env.out(COMPANY.outcomes)} ORDER BY outcome_id"
        ),
        "jobs": env.query(
            f"SELECT job_id, status, record_count FROM {env.out(COMPANY.jobs)} ORDER BY job_id"
        ),
        "rejected": env.query(
            f"SELECT input_pk, reason FROM {env.out(COMPANY.rejected)} ORDER BY input_pk"
        ),
        "tags": env.query(f"SELECT count(*) FROM {env.out(TAGS)}"),
    }


class CoreScenarios:
    """First run and incremental runs; subclasses name the input and output warehouses."""

    input_wh: ClassVar[str]
    output_wh: ClassVar[str]

    @pytest.fixture
    def env(self, make_env: Callable[..., Env]) -> Env:
        return make_env(self.input_wh, self.output_wh)

    def test_first_run_loads_everything_once_and_dbt_can_join_it(self, env: Env) -> None:
        domains = [f"firm{i}.com" for i in range(60)]
        valid = list(enumerate(domains))
        dup_rows = [(500, "https://www.FIRM1.com/about"), (501, "firm2.com.")]
        bad_rows = [(900, None), (901, ""), (902, "not a domain"), (903, TEN_KB)]
        env.insert_companies(valid + dup_rows + bad_rows)

        env.run(records_per_job=25)

        # outcomes: every valid input row exactly once
        per_pk = outcomes_per_pk(env)
        assert set(per_pk) == {str(i) for i, _ in valid + dup_rows}
        assert set(per_pk.values()) == {1}
        statuses = {r[0] for r in env.query(f"SELECT status FROM {env.out(COMPANY.outcomes)}")}
        assert statuses <= {"matched", "not_found"}
        # enrichment: one row per unique matched key
        matched = {
            r[0]
            for r in env.query(
                f"SELECT DISTINCT key FROM {env.out(COMPANY.outcomes)} WHERE status = 'matched'"
            )
        }
        keys = [r[0] for r in env.query(f"SELECT key FROM {env.out(COMPANY.enrichment)}")]
        assert sorted(keys) == sorted(matched)
        assert len(matched) > 30
        assert_no_duplicate_keys(env)
        # child tables, joinable to their parent
        for child in (TAGS, TECHNOLOGIES):
            assert (env.count(child) or 0) > 0, child
        orphans = env.query(
            f"SELECT count(*) FROM {env.out(TAGS)} t LEFT JOIN {env.out(COMPANY.enrichment)} e "
            f"ON t.key = e.key AND t.job_id = e.job_id WHERE e.key IS NULL"
        )
        assert orphans == [(0,)]
        # the job ledger accounts for every unique record
        jobs = env.query(f"SELECT status, record_count, matched FROM {env.out(COMPANY.jobs)}")
        assert len(jobs) == 3
        assert {s for s, _, _ in jobs} == {"completed"}
        assert sum(n for _, n, _ in jobs) == 60
        assert sum(m for _, _, m in jobs) == len(matched)
        # rejected rows with their reasons
        rejected = dict(env.query(f"SELECT input_pk, reason FROM {env.out(COMPANY.rejected)}"))
        assert rejected == {
            "900": "null",
            "901": "empty",
            "902": "invalid_domain",
            "903": "too_long",
        }
        usage = env.sandbox.usage()
        assert usage["records_billed"] == 60
        assert set(usage["billed_per_key"].values()) == {1}
        # a dbt model over input + results (needs both in one warehouse)
        if env.same_warehouse:
            expected = {str(i): d for i, d in valid} | {"500": "firm1.com", "501": "firm2.com"}
            assert_dbt_style_join(env, expected)

    def test_second_run_submits_nothing_and_a_new_row_exactly_one_record(self, env: Env) -> None:
        env.insert_companies([(i, f"firm{i}.com") for i in range(40)] + [(900, None)])
        env.run()
        before_usage, before = billed(env.sandbox), snapshot(env)

        env.run()  # nothing changed

        assert billed(env.sandbox) == before_usage
        assert snapshot(env) == before

        env.insert_companies([(1000, "brand-new-company.io")])
        # and the rejected row 900 gets fixed: sent now, and gone from the rejected table
        env.input_exec(f"UPDATE {env.input_table()} SET domain = 'fixed-at-last.io' WHERE id = 900")
        env.run()

        jobs, records = billed(env.sandbox)
        assert (jobs - before_usage[0], records - before_usage[1]) == (1, 2)
        assert env.query(f"SELECT input_pk FROM {env.out(COMPANY.rejected)}") == []
        assert env.sandbox.usage()["billed_per_key"][company_key("brand-new-company.io")] == 1
        rows = env.query(
            f"SELECT key, attempt FROM {env.out(COMPANY.outcomes)} WHERE input_pk = '1000'"
        )
        assert rows == [("brand-new-company.io", 1)]
        assert set(outcomes_per_pk(env).values()) == {1}
        assert len(env.query(f"SELECT job_id FROM {env.out(COMPANY.jobs)}")) == 2


class Scenarios(CoreScenarios):
    """Every scenario (the dbt-style join runs when input and results share a warehouse)."""

    def test_expired_ttl_reenriches_each_key_once_and_merges_in_place(self, env: Env) -> None:
        domains = [f"firm{i}.com" for i in range(20)]
        env.insert_companies(list(enumerate(domains)))
        env.run()
        first = {
            k: (j, at)
            for k, j, at in env.query(
                f"SELECT key, job_id, enriched_at FROM {env.out(COMPANY.enrichment)}"
            )
        }
        tags_before = env.count(TAGS)
        assert first

        env.run(ttl_matched_days=0, ttl_not_found_days=0)

        per_key = env.sandbox.usage()["billed_per_key"]
        assert {per_key[company_key(d)] for d in domains} == {2}
        assert env.sandbox.usage()["records_billed"] == 40
        # merged in place: same keys, new job and timestamp, no duplicates anywhere
        second = env.query(f"SELECT key, job_id, enriched_at FROM {env.out(COMPANY.enrichment)}")
        assert_no_duplicate_keys(env)
        assert {k for k, _, _ in second} == set(first)
        old_jobs = {j for j, _ in first.values()}
        for key, job_id, enriched_at in second:
            assert job_id not in old_jobs, f"{key} still points at the first run's job"
            assert enriched_at > first[key][1]
        # each enrichment keeps its own list rows; joined on key and job_id, the current
        # enrichment shows exactly one list (no old and new tags mixed)
        assert env.count(TAGS) == 2 * tags_before
        current_tags = env.query(
            f"SELECT count(*) FROM {env.out(TAGS)} t JOIN {env.out(COMPANY.enrichment)} e "
            f"ON t.key = e.key AND t.job_id = e.job_id"
        )
        assert current_tags == [(tags_before,)]
        # one outcome row per input row per attempt, and two jobs in the ledger
        assert set(outcomes_per_pk(env).values()) == {2}
        assert len(env.query(f"SELECT job_id FROM {env.out(COMPANY.jobs)}")) == 2

    def test_cursor_column_reads_only_changed_rows(self, env: Env) -> None:
        env.insert_companies([(i, f"firm{i}.com", f"2024-01-01 00:00:{i:02d}") for i in range(30)])
        env.run(cursor_column="updated_at")
        assert billed(env.sandbox) == (1, 30)

        env.input_exec(
            f"UPDATE {env.input_table()} SET domain = 'rebranded-firm.com', "
            f"updated_at = CAST('2024-06-01 00:00:00' AS {env.input_wh.types['timestamp']}) "
            f"WHERE id = 7"
        )
        env.run(cursor_column="updated_at")

        assert billed(env.sandbox) == (2, 31)
        rows = env.query(
            f"SELECT key FROM {env.out(COMPANY.outcomes)} WHERE input_pk = '7' ORDER BY finished_at"
        )
        assert [r[0] for r in rows] == ["firm7.com", "rebranded-firm.com"]
        env.run(cursor_column="updated_at")
        assert billed(env.sandbox) == (2, 31)


KILL_POINTS = (
    "job_created:2",  # the second job is journaled, the worker dies right after
    "job_created:2:before",  # ApiOne created (and billed) it; its id was never written
    "collected:1:before",  # results handled, their load never happened
    "spend:1",  # a failed job spent and its resend planned, nothing sent yet
)


class KillScenarios:
    """A worker SIGKILLed mid-run, then a worker on an EMPTY pipelines dir: nothing lost,
    nothing paid twice (the journal and dlt's state live in the warehouse)."""

    input_wh: ClassVar[str]
    output_wh: ClassVar[str]

    def _worker(self, env: Env, pipelines_dir: Path, kill_at: str | None) -> Any:
        """Run ``kill_runner.py`` on its own pipelines dir (another machine's disk)."""
        source = {
            "api_key": SANDBOX_API_KEY,
            "base_url": env.sandbox.base_url,
            "enrichment_type": "company",
            "input_table": "companies",
            "primary_key": "id",
            "input_dataset": env.input_dataset,
            "input_destination": env.input_wh.kind,
            "input_credentials": env.input_wh.credentials,
            "records_per_job": 10,
            "wait_budget_seconds": 60,
        }
        spec = {
            "pipeline": env.pipeline.pipeline_name,
            "dataset": env.output_dataset,
            "pipelines_dir": str(pipelines_dir),
            "destination": env.output_wh.kind,
            "credentials": env.output_wh.credentials,
            "source": source,
            "kill_at": kill_at,
        }
        runner = Path(__file__).with_name("kill_runner.py")
        return subprocess.run(
            [sys.executable, str(runner), json.dumps(spec)], capture_output=True, text=True
        )

    @pytest.mark.parametrize("kill_at", KILL_POINTS)
    def test_a_killed_worker_then_a_fresh_disk_converge_without_paying_twice(
        self, make_env: Callable[..., Env], tmp_path: Path, kill_at: str
    ) -> None:
        # a third of the jobs fail (reproducibly, from the seed): resends happen
        env = make_env(self.input_wh, self.output_wh, failure_rate=0.35, seed=4)
        env.insert_companies([(i, f"kill{i}.com") for i in range(50)])
        worker = self._worker(env, tmp_path / "worker_1", kill_at)
        assert worker.returncode == -signal.SIGKILL, worker.stdout + worker.stderr

        # the next worker starts on an empty disk (env.pipeline's dir was never used)
        for _ in range(3):
            env.run(records_per_job=10)

        usage = env.sandbox.usage()
        spent = env.query(
            f"SELECT key, count(DISTINCT job_id) FROM {env.out(COMPANY.outcomes)} "
            "WHERE status IN ('failed', 'expired', 'timed_out', 'vanished', 'lost') GROUP BY key"
        )
        allowed = {company_key(k): 1 + int(n) for k, n in spent}
        for key, n in usage["billed_per_key"].items():
            assert n <= allowed.get(key, 1), (key, n, allowed.get(key, 1))
        assert len(usage["billed_per_key"]) == 50
        latest = env.query(
            f"SELECT input_pk, status FROM {env.out(COMPANY.outcomes)} o WHERE NOT EXISTS ("
            f"SELECT 1 FROM {env.out(COMPANY.outcomes)} n WHERE n.input_pk = o.input_pk AND "
            "(n.submitted_at > o.submitted_at OR (n.submitted_at = o.submitted_at AND "
            "n.attempt > o.attempt)))"
        )
        assert {str(pk) for pk, _ in latest} == {str(i) for i in range(50)}
        assert {s for _, s in latest} <= {"matched", "not_found", "invalid", "error"}
        assert len(latest) == 50, "a row has two latest outcomes"
        assert_no_duplicate_keys(env)
        assert_each_job_row_once(env)
        journal = env.query(f"SELECT count(*) FROM {env.out(COMPANY.journal)}")
        assert journal == [(0,)], "the journal still has open entries"

    def test_a_load_job_run_again_after_a_kill_does_not_stop_every_later_run(
        self, make_env: Callable[..., Env], tmp_path: Path
    ) -> None:
        """dlt runs a load job again when it was killed between the warehouse's commit and
        its own note of it: a table that refuses the same rows twice would fail every run."""
        env = make_env(self.input_wh, self.output_wh)
        env.insert_companies([(i, f"again{i}.com") for i in range(10)])
        first = self._worker(env, tmp_path / "worker", None)  # nothing rejected: created empty
        assert first.returncode == 0, first.stdout + first.stderr
        env.insert_companies([(100 + i, "not a domain") for i in range(3)])
        killed = self._worker(env, tmp_path / "worker", f"load_committed:{COMPANY.rejected}")
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        again = self._worker(env, tmp_path / "worker", None)
        assert again.returncode == 0, again.stdout + again.stderr
        rejected = env.query(f"SELECT input_pk FROM {env.out(COMPANY.rejected)}")
        assert sorted(pk for (pk,) in rejected) == ["100", "101", "102"]

    def test_a_package_loaded_after_another_worker_collected_its_jobs_leaves_no_row_twice(
        self, make_env: Callable[..., Env], tmp_path: Path
    ) -> None:
        env = make_env(self.input_wh, self.output_wh)
        env.insert_companies([(i, f"late{i}.com") for i in range(30)])
        # worker 1 dies before its load: its package waits on its disk
        worker = self._worker(env, tmp_path / "worker_1", "load:1:before")
        assert worker.returncode == -signal.SIGKILL, worker.stdout + worker.stderr
        # another worker (an empty disk) collects the same jobs again and loads them
        env.run(records_per_job=10)
        assert env.query(f"SELECT count(*) FROM {env.out(COMPANY.outcomes)}") == [(30,)]
        # worker 1 comes back and loads its package: the jobs keep one set of rows
        back = self._worker(env, tmp_path / "worker_1", None)
        assert back.returncode == 0, back.stdout + back.stderr
        assert env.query(f"SELECT count(*) FROM {env.out(COMPANY.outcomes)}") == [(30,)]
        assert_each_job_row_once(env)
        assert_no_duplicate_keys(env)
        assert env.sandbox.usage()["records_billed"] == 30
        journal = env.query(f"SELECT count(*) FROM {env.out(COMPANY.journal)}")
        assert journal == [(0,)], "the journal still has open entries"
