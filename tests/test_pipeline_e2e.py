"""End-to-end tests: the `apione` source against a real sandbox, DuckDB files and dlt pipelines.

Every test builds an input warehouse (a DuckDB file with ``crm.<table>``), runs the source
through :func:`run_enrichment` into another DuckDB file and checks what a user would check:
the loaded tables (queried with short-lived read-only connections, since DuckDB allows one
writer per file) and the sandbox's usage counters (what ApiOne would bill).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import duckdb
import pytest

from apione_source.errors import ConfigurationError
from tests.e2e import (
    COMPANY,
    EMAIL,
    PEOPLE,
    TEN_KB,
    Env,
    RealTimeClock,
    assert_no_duplicate_keys,
    billed,
    company_key,
    found_domains,
    outcome_counts_per_pk,
)

# --- 1. first run --------------------------------------------------------------------------


def test_given_new_table_when_first_run_then_everything_is_loaded_once(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    domains = [f"firm{i}.com" for i in range(200)]
    valid = [(i, d) for i, d in enumerate(domains)]
    dup_rows = [(500, "https://www.FIRM1.com/about"), (501, "firm2.com.")]
    bad_rows = [(900, None), (901, ""), (902, "not a domain"), (903, TEN_KB)]
    env.insert_companies(valid + dup_rows + bad_rows)

    env.run()

    # every valid input row has exactly one outcome row
    per_pk = outcome_counts_per_pk(env)
    valid_pks = {str(i) for i, _ in valid + dup_rows}
    assert set(per_pk) == valid_pks
    assert set(per_pk.values()) == {1}

    # the enrichment table: one row per unique matched key, no duplicates
    matched = {
        r[0]
        for r in env.query(
            f"SELECT DISTINCT key FROM enriched.{COMPANY.outcomes} WHERE status = 'matched'"
        )
    }
    keys = [r[0] for r in env.query(f"SELECT key FROM enriched.{COMPANY.enrichment}")]
    assert sorted(keys) == sorted(matched)
    assert_no_duplicate_keys(env, COMPANY.enrichment)
    assert len(matched) > 100  # most of the 200 companies are found

    # nested lists became child tables
    tables = env.tables()
    for child in (f"{COMPANY.enrichment}_tags", f"{COMPANY.enrichment}_technologies"):
        assert child in tables
        assert env.count(child) > 0

    # the ledger: every job completed and accounts for every unique record
    jobs = env.query(f"SELECT status, record_count FROM enriched.{COMPANY.jobs}")
    assert jobs and {s for s, _ in jobs} == {"completed"}
    assert sum(n for _, n in jobs) == 200

    # rejected rows with their reasons
    rejected = dict(env.query(f"SELECT input_pk, reason FROM enriched.{COMPANY.rejected}"))
    assert rejected == {
        "900": "null",
        "901": "empty",
        "902": "invalid_domain",
        "903": "too_long",
    }
    usage = env.sandbox.usage()
    assert usage["records_billed"] == 200
    assert set(usage["billed_per_key"].values()) == {1}


# --- 2. second run without changes ---------------------------------------------------------


def snapshot(env: Env) -> dict[str, list[tuple[Any, ...]]]:
    return {
        "enrichment": env.query(
            f"SELECT key, job_id, enriched_at FROM enriched.{COMPANY.enrichment} ORDER BY key"
        ),
        "outcomes": env.query(
            f"SELECT outcome_id, input_pk, key, job_id, attempt, status, finished_at "
            f"FROM enriched.{COMPANY.outcomes} ORDER BY outcome_id"
        ),
        "jobs": env.query(
            f"SELECT job_id, status, record_count FROM enriched.{COMPANY.jobs} ORDER BY job_id"
        ),
        "rejected": env.query(
            f"SELECT input_pk, reason FROM enriched.{COMPANY.rejected} ORDER BY input_pk"
        ),
    }


def test_given_loaded_table_when_run_again_unchanged_then_nothing_is_submitted(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"firm{i}.com") for i in range(150)] + [(900, None)])
    env.run()
    before_usage, before_tables = billed(env.sandbox), snapshot(env)

    env.run()

    assert billed(env.sandbox) == before_usage
    assert snapshot(env) == before_tables


# --- 3. one new row ------------------------------------------------------------------------


def test_given_loaded_table_when_one_row_added_then_exactly_one_record_is_billed(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"firm{i}.com") for i in range(150)])
    env.run()
    jobs0, records0 = billed(env.sandbox)

    env.insert_companies([(1000, "brand-new-company.io")])
    env.run()

    jobs1, records1 = billed(env.sandbox)
    assert (jobs1 - jobs0, records1 - records0) == (1, 1)
    assert env.sandbox.usage()["billed_per_key"][company_key("brand-new-company.io")] == 1
    rows = env.query(
        f"SELECT key, attempt FROM enriched.{COMPANY.outcomes} WHERE input_pk = '1000'"
    )
    assert rows == [("brand-new-company.io", 1)]
    assert set(outcome_counts_per_pk(env).values()) == {1}


# --- 4. TTL ----------------------------------------------------------------------------------


def test_given_expired_ttl_when_run_again_then_each_key_is_reenriched_once_in_place(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    domains = [f"firm{i}.com" for i in range(40)]
    env.insert_companies(list(enumerate(domains)))
    env.run()
    first = {
        key: (job_id, at)
        for key, job_id, at in env.query(
            f"SELECT key, job_id, enriched_at FROM enriched.{COMPANY.enrichment}"
        )
    }
    assert first

    env.run(ttl_matched_days=0, ttl_not_found_days=0)

    per_key = env.sandbox.usage()["billed_per_key"]
    assert {per_key[company_key(d)] for d in domains} == {2}
    assert env.sandbox.usage()["records_billed"] == 80
    second = env.query(f"SELECT key, job_id, enriched_at FROM enriched.{COMPANY.enrichment}")
    assert_no_duplicate_keys(env, COMPANY.enrichment)
    assert {k for k, _, _ in second} == set(first)
    old_jobs = {job_id for job_id, _ in first.values()}
    for key, job_id, enriched_at in second:
        assert job_id not in old_jobs, f"{key} still points at the first run's job"
        assert enriched_at > first[key][1]
    # one outcome row per input row per attempt (job)
    assert set(outcome_counts_per_pk(env).values()) == {2}


def test_given_only_not_found_ttl_expired_when_run_again_then_only_not_found_keys_are_resent(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"firm{i}.com") for i in range(120)])
    env.run()
    not_found = {
        r[0]
        for r in env.query(
            f"SELECT key FROM enriched.{COMPANY.outcomes} WHERE status = 'not_found'"
        )
    }
    assert not_found
    records0 = env.sandbox.usage()["records_billed"]

    env.run(ttl_not_found_days=0)

    usage = env.sandbox.usage()
    assert usage["records_billed"] - records0 == len(not_found)
    twice = {k for k, n in usage["billed_per_key"].items() if n == 2}
    assert twice == {company_key(k) for k in not_found}


# --- 5. duplicates ----------------------------------------------------------------------------


def test_given_many_spellings_of_one_domain_when_run_then_it_is_billed_once(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    (dom,) = found_domains(1, prefix="dupco")
    spellings = [
        f"https://www.{dom}/path",
        f"{dom}.",
        dom.upper(),
        f"  www.{dom}  ",
        f"http://{dom}:443/?q=1",
    ]
    others = [(100 + i, d) for i, d in enumerate(found_domains(30, prefix="other"))]
    # spread the duplicates over several read chunks and batches
    rows = [(i, s) for i, s in enumerate(spellings)] + others
    rows = rows[::2] + rows[1::2]
    env.insert_companies(rows)

    env.run(chunk_size=4, records_per_job=7)

    usage = env.sandbox.usage()
    assert usage["billed_per_key"][company_key(dom)] == 1
    assert set(usage["billed_per_key"].values()) == {1}
    assert usage["records_billed"] == 31
    dup_outcomes = env.query(
        f"SELECT input_pk, key, job_id, status FROM enriched.{COMPANY.outcomes} "
        f"WHERE input_pk IN ('0', '1', '2', '3', '4')"
    )
    assert sorted(r[0] for r in dup_outcomes) == ["0", "1", "2", "3", "4"]
    assert {r[1] for r in dup_outcomes} == {dom}
    assert len({r[2] for r in dup_outcomes}) == 1
    assert {r[3] for r in dup_outcomes} == {"matched"}
    assert env.query(
        f"SELECT count(*) FROM enriched.{COMPANY.enrichment} WHERE key = ?", [dom]
    ) == [(1,)]

    # another spelling arriving later reuses the known result: no new bill
    env.insert_companies([(50, f"WWW.{dom.upper()}")])
    env.run()

    assert env.sandbox.usage()["billed_per_key"][company_key(dom)] == 1
    assert billed(env.sandbox)[1] == 31
    late = env.query(f"SELECT key, status FROM enriched.{COMPANY.outcomes} WHERE input_pk = '50'")
    assert late == [(dom, "matched")]


# --- 6. jobs outliving the wait budget ----------------------------------------------------


# Jobs take 10 s of sandbox time and the wait budget is 3 s: the first look at a job
# (halfway through the server's 10 s estimate) falls after the budget, so a run carries
# its jobs over at once without waiting, and the test moves the sandbox clock instead of
# sleeping.
SLOW_JOB_SECONDS = 10.0
SHORT_BUDGET = 3.0


def test_given_jobs_outlive_wait_budget_when_next_run_then_they_are_collected_beside_new_submits(
    make_env: Callable[..., Env],
) -> None:
    clock = RealTimeClock()
    env = make_env(job_seconds_base=SLOW_JOB_SECONDS, clock=clock)
    domains = [f"slow{i}.com" for i in range(50)]
    env.insert_companies(list(enumerate(domains)))

    first = env.run(wait_budget_seconds=SHORT_BUDGET, records_per_job=20)

    jobs = env.query(f"SELECT job_id, status FROM enriched.{COMPANY.jobs}")
    assert len(jobs) == 3
    assert {s for _, s in jobs} == {"in_flight"}
    assert env.count(COMPANY.enrichment) == 0
    assert env.count(COMPANY.outcomes) == 0
    carried = {j for j, _ in jobs}
    assert billed(env.sandbox) == (3, 50)

    clock.advance(60)  # the sandbox has finished the jobs
    env.insert_companies([(1000, "late-arrival.com")])
    second = env.run(wait_budget_seconds=SHORT_BUDGET, records_per_job=20)

    # the carried jobs' records were not submitted again; only the new row was
    usage = env.sandbox.usage()
    assert (usage["jobs_created"], usage["records_billed"]) == (4, 51)
    assert set(usage["billed_per_key"].values()) == {1}
    # the carried jobs are loaded
    ledger = dict(env.query(f"SELECT job_id, status FROM enriched.{COMPANY.jobs}"))
    assert len(ledger) == 4
    assert {ledger[j] for j in carried} == {"completed"}
    assert set(outcome_counts_per_pk(env)) == {str(i) for i in range(50)}
    assert env.count(COMPANY.enrichment) > 0
    # ... and were collected before the new row's job was submitted, in the same run
    (new_job,) = set(ledger) - carried
    assert ledger[new_job] == "in_flight"
    new_submitted_at, submitted_in = env.query(
        f"SELECT submitted_at, submitted_in_load FROM enriched.{COMPANY.jobs} WHERE job_id = ?",
        [new_job],
    )[0]
    # a load of the second run (it may load the carried jobs' results in a package of
    # their own while the new job runs)
    second_loads = {
        load_id
        for (load_id,) in env.query(
            "SELECT load_id FROM enriched._dlt_loads WHERE load_id > ?", [first.loads_ids[-1]]
        )
    }
    assert second.loads_ids[-1] in second_loads
    assert submitted_in in second_loads
    assert new_submitted_at is not None

    clock.advance(60)
    env.run(wait_budget_seconds=SHORT_BUDGET, records_per_job=20)

    assert billed(env.sandbox) == (4, 51)
    ledger = dict(env.query(f"SELECT job_id, status FROM enriched.{COMPANY.jobs}"))
    assert set(ledger.values()) == {"completed"}
    per_pk = outcome_counts_per_pk(env)
    assert set(per_pk) == {str(i) for i in range(50)} | {"1000"}
    assert set(per_pk.values()) == {1}
    assert_no_duplicate_keys(env, COMPANY.enrichment)


def test_given_carried_job_whose_results_expired_when_next_run_then_records_are_resubmitted(
    make_env: Callable[..., Env],
) -> None:
    clock = RealTimeClock()
    env = make_env(job_seconds_base=SLOW_JOB_SECONDS, clock=clock)
    domains = [f"gone{i}.com" for i in range(10)]
    env.insert_companies(list(enumerate(domains)))
    env.run(wait_budget_seconds=SHORT_BUDGET)
    ((job_id,),) = env.query(f"SELECT job_id FROM enriched.{COMPANY.jobs}")

    clock.advance(60)
    env.sandbox.expire(job_id)
    env.run(wait_budget_seconds=SHORT_BUDGET)  # sees the expiry, resubmits
    clock.advance(60)
    env.run(wait_budget_seconds=SHORT_BUDGET)  # collects the resubmitted job

    ledger = dict(env.query(f"SELECT job_id, status FROM enriched.{COMPANY.jobs}"))
    assert ledger.pop(job_id) == "expired"
    assert list(ledger.values()) == ["completed"]
    rows = env.query(
        f"SELECT input_pk, attempt, status FROM enriched.{COMPANY.outcomes} "
        f"ORDER BY input_pk, attempt"
    )
    by_pk: dict[str, list[tuple[int, str]]] = {}
    for pk, attempt, status in rows:
        by_pk.setdefault(pk, []).append((attempt, status))
    assert set(by_pk) == {str(i) for i in range(10)}
    for history in by_pk.values():
        assert len(history) == 2
        assert history[0] == (1, "expired")
        assert history[1][0] == 2
        assert history[1][1] in ("matched", "not_found")
    assert {env.sandbox.usage()["billed_per_key"][company_key(d)] for d in domains} == {2}


# --- 7. plan limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_seconds",
    [
        pytest.param(0.0, id="instant-jobs"),
        # jobs that take time make a second concurrent submit really overlap (429)
        pytest.param(0.2, id="slow-jobs", marks=pytest.mark.slow),
    ],
)
def test_given_free_plan_when_300_inputs_then_limits_are_never_exceeded(
    make_env: Callable[..., Env], job_seconds: float
) -> None:
    env = make_env(plan="free", job_seconds_base=job_seconds)
    env.insert_companies([(i, f"firm{i}.com") for i in range(300)])

    env.run(plan="free")

    usage = env.sandbox.usage()
    assert usage["max_records_per_job_seen"] <= 50
    assert usage["max_active_jobs_seen"] <= 1
    assert usage["rejected_submits"]["429"] == 0
    assert usage["rejected_submits"]["413"] == 0
    assert usage["records_billed"] == 300
    assert set(outcome_counts_per_pk(env)) == {str(i) for i in range(300)}
    assert set(outcome_counts_per_pk(env).values()) == {1}


def test_given_records_per_job_above_plan_when_run_then_batches_shrink_and_all_load(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(plan="free")
    env.insert_companies([(i, f"firm{i}.com") for i in range(300)])

    env.run(plan="free", records_per_job=100)

    usage = env.sandbox.usage()
    assert usage["rejected_submits"]["413"] >= 1
    assert usage["max_records_per_job_seen"] <= 50
    assert usage["max_active_jobs_seen"] <= 1
    assert usage["records_billed"] == 300
    assert set(usage["billed_per_key"].values()) == {1}
    assert set(outcome_counts_per_pk(env)) == {str(i) for i in range(300)}
    statuses = {r[0] for r in env.query(f"SELECT status FROM enriched.{COMPANY.jobs}")}
    assert statuses == {"completed"}


# --- 8. failed jobs and not_found -----------------------------------------------------------


def test_given_every_job_fails_when_run_then_outcomes_show_failed_then_error(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(failure_rate=1.0)
    domains = [f"firm{i}.com" for i in range(10)]
    env.insert_companies(list(enumerate(domains)))

    env.run(max_attempts=2)

    rows = env.query(
        f"SELECT input_pk, key, attempt, status, error FROM enriched.{COMPANY.outcomes} "
        f"ORDER BY input_pk, attempt"
    )
    by_pk: dict[str, list[tuple[int, str]]] = {}
    for pk, _key, attempt, status, _err in rows:
        by_pk.setdefault(pk, []).append((attempt, status))
    assert by_pk == {str(i): [(1, "failed"), (2, "error")] for i in range(10)}
    assert all(err for *_, err in rows)
    ledger = env.query(f"SELECT status, attempt FROM enriched.{COMPANY.jobs} ORDER BY attempt")
    assert [s for s, _ in ledger] == ["failed", "failed"]
    assert [a for _, a in ledger] == [1, 2]
    assert env.count(COMPANY.enrichment) == 0
    # max_attempts submits per key, no more
    assert {env.sandbox.usage()["billed_per_key"][company_key(d)] for d in domains} == {2}


def test_given_normal_sandbox_when_run_then_a_realistic_share_is_not_found(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(i, f"firm{i}.com") for i in range(300)])

    env.run()

    status = dict(env.query(f"SELECT status, count(*) FROM enriched.{COMPANY.outcomes} GROUP BY 1"))
    assert set(status) == {"matched", "not_found"}
    assert 0.05 <= status["not_found"] / 300 <= 0.30
    not_found_keys = {
        r[0]
        for r in env.query(
            f"SELECT key FROM enriched.{COMPANY.outcomes} WHERE status = 'not_found'"
        )
    }
    enriched_keys = {r[0] for r in env.query(f"SELECT key FROM enriched.{COMPANY.enrichment}")}
    assert not not_found_keys & enriched_keys
    (ledger_not_found,) = env.query(f"SELECT sum(not_found) FROM enriched.{COMPANY.jobs}")[0]
    assert ledger_not_found == status["not_found"]


# --- 9. rejected rows --------------------------------------------------------------------------


def test_given_unusable_rows_when_run_then_they_are_rejected_with_reasons_and_never_sent(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    bad = {900: None, 901: "", 902: "   ", 903: "not a domain", 904: TEN_KB, 905: "127.0.0.1"}
    env.insert_companies([(i, f"firm{i}.com") for i in range(20)] + list(bad.items()))

    env.run()

    rejected = {
        pk: (reason, detail)
        for pk, reason, detail in env.query(
            f"SELECT input_pk, reason, detail FROM enriched.{COMPANY.rejected}"
        )
    }
    assert {pk: r for pk, (r, _) in rejected.items()} == {
        "900": "null",
        "901": "empty",
        "902": "empty",
        "903": "invalid_domain",
        "904": "too_long",
        "905": "invalid_domain",
    }
    assert all(detail for _, detail in rejected.values())
    assert all(len(detail) < 500 for _, detail in rejected.values())  # no 10 KB echo
    usage = env.sandbox.usage()
    assert usage["records_billed"] == 20
    assert set(usage["billed_per_key"]) == {company_key(f"firm{i}.com") for i in range(20)}
    outcome_pks = set(outcome_counts_per_pk(env))
    assert not outcome_pks & {str(pk) for pk in bad}


# --- 10. cursor mode -------------------------------------------------------------------------


def test_given_cursor_column_when_one_row_changes_then_only_it_is_submitted(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies(
        [(i, f"firm{i}.com", f"2024-01-01 00:{i // 60:02d}:{i % 60:02d}") for i in range(100)]
    )
    env.run(cursor_column="updated_at")
    assert billed(env.sandbox) == (1, 100)

    env.exec(
        "UPDATE crm.companies SET domain = 'rebranded-firm.com', "
        "updated_at = TIMESTAMP '2024-06-01' WHERE id = 42"
    )
    env.run(cursor_column="updated_at")

    usage = env.sandbox.usage()
    assert (usage["jobs_created"], usage["records_billed"]) == (2, 101)
    assert usage["billed_per_key"][company_key("rebranded-firm.com")] == 1
    rows = env.query(
        f"SELECT key FROM enriched.{COMPANY.outcomes} WHERE input_pk = '42' ORDER BY finished_at"
    )
    assert [r[0] for r in rows] == ["firm42.com", "rebranded-firm.com"]

    # and a run without changes sends nothing
    env.run(cursor_column="updated_at")
    assert billed(env.sandbox) == (2, 101)


# --- 11. people and email ---------------------------------------------------------------------


CONTACTS_DDL = (
    "CREATE TABLE crm.contacts(contact_id INT, work_email VARCHAR, li VARCHAR, "
    "fname VARCHAR, lname VARCHAR, company VARCHAR)"
)


def _insert_contacts(env: Env) -> None:
    rows: list[tuple[Any, ...]] = []
    for i in range(40):
        rows.append((i, f"person{i}@firm{i}.com", None, None, None, None))
    for i in range(40, 60):
        rows.append((i, None, f"https://linkedin.com/in/someone-{i}", None, None, None))
    for i in range(60, 80):
        rows.append((i, None, None, f"First{i}", f"Last{i}", f"firm{i}.com"))
    rows.append((99, None, None, None, None, None))
    con = duckdb.connect(str(env.warehouse))
    try:
        con.executemany("INSERT INTO crm.contacts VALUES (?, ?, ?, ?, ?, ?)", rows)
    finally:
        con.close()


def test_given_people_type_when_run_then_people_table_and_history_are_loaded(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(input_ddl=CONTACTS_DDL)
    _insert_contacts(env)

    env.run(
        enrichment_type="people",
        input_table="contacts",
        primary_key="contact_id",
        input_columns={
            "email": "work_email",
            "linkedin_url": "li",
            "first_name": "fname",
            "last_name": "lname",
            "domain": "company",
        },
    )

    tables = env.tables()
    assert PEOPLE.enrichment in tables
    assert f"{PEOPLE.enrichment}_employment_history" in tables
    assert env.count(f"{PEOPLE.enrichment}_employment_history") > 0
    assert COMPANY.enrichment not in tables
    assert env.count(PEOPLE.enrichment) > 40
    assert_no_duplicate_keys(env, PEOPLE.enrichment)
    per_pk = outcome_counts_per_pk(env, PEOPLE)
    assert set(per_pk) == {str(i) for i in range(80)}
    prefixes = {
        r[0].split(":", 1)[0] for r in env.query(f"SELECT key FROM enriched.{PEOPLE.outcomes}")
    }
    assert prefixes == {"email", "linkedin", "name"}
    rejected = dict(env.query(f"SELECT input_pk, reason FROM enriched.{PEOPLE.rejected}"))
    assert rejected == {"99": "missing_fields"}
    assert env.sandbox.usage()["records_billed"] == 80


def test_given_email_type_when_run_then_email_checks_are_loaded(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(input_ddl=CONTACTS_DDL)
    _insert_contacts(env)

    env.run(
        enrichment_type="email",
        input_table="contacts",
        primary_key="contact_id",
        input_columns={"email": "work_email"},
    )

    tables = env.tables()
    assert EMAIL.enrichment in tables
    assert PEOPLE.enrichment not in tables
    assert env.count(EMAIL.enrichment) > 20
    assert_no_duplicate_keys(env, EMAIL.enrichment)
    emails = {r[0] for r in env.query(f"SELECT email FROM enriched.{EMAIL.enrichment}")}
    assert emails <= {f"person{i}@firm{i}.com" for i in range(40)}
    assert set(outcome_counts_per_pk(env, EMAIL)) == {str(i) for i in range(40)}
    # the rows without an email are rejected, not sent
    rejected = dict(env.query(f"SELECT input_pk, reason FROM enriched.{EMAIL.rejected}"))
    assert set(rejected) == {str(i) for i in [*range(40, 80), 99]}
    assert set(rejected.values()) == {"null"}
    assert env.sandbox.usage()["records_billed"] == 40


# --- 12. bad configuration ---------------------------------------------------------------------


def _config_error(exc: BaseException) -> ConfigurationError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConfigurationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"enrichment_type": "companies_and_more"}, "enrichment_type"),
        ({"input_table": "no_such_table"}, "does not exist"),
        ({"input_columns": {"domain": "website"}}, "website"),
        ({"primary_key": "company_id"}, "company_id"),
        ({"cursor_column": "modified"}, "modified"),
        ({"input_columns": {"domian": "domain"}}, "domian"),
        ({"plan": "enterprise"}, "plan"),
    ],
    ids=[
        "unknown-type",
        "missing-table",
        "missing-column",
        "missing-pk",
        "missing-cursor",
        "unknown-field",
        "unknown-plan",
    ],
)
def test_given_bad_config_when_run_then_configuration_error_before_any_api_call(
    make_env: Callable[..., Env], overrides: dict[str, Any], message: str
) -> None:
    env = make_env()
    env.insert_companies([(i, f"firm{i}.com") for i in range(5)])

    with pytest.raises(Exception) as raised:
        env.run(**overrides)

    err = _config_error(raised.value)
    assert err is not None, f"not a ConfigurationError: {raised.value!r}"
    assert message in str(err)
    usage = env.sandbox.usage()
    calls = usage["submit_calls"] + usage["status_calls"] + usage["results_calls"]
    assert calls == 0
    assert usage["jobs_created"] == 0
