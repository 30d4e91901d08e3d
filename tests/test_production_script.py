"""The production script as a user runs it: the summary shows, a normal run warns nothing."""

from __future__ import annotations

from collections.abc import Callable

from tests.e2e import ROOT, Env, enrich_process


def test_given_the_shipped_config_when_the_production_script_runs_then_it_prints_its_summary(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(1, "a.com"), (2, "b.com"), (3, "not a domain")])

    proc = enrich_process(env, cwd=ROOT)  # the repo's .dlt/config.toml applies
    out, _ = proc.communicate(timeout=120)

    assert proc.returncode == 0, out
    assert (
        "company_enrichment: rows read 3, rejected 1 (invalid_domain 1), already fresh 0, "
        "submitted 2 records in 1 jobs, collected 2" in out
    ), out
    assert "WARNING" not in out and "Warning" not in out, out
    # ... and the same summary is in the warehouse, for dashboards and alerts
    (row,) = env.query(
        "SELECT rows_read, rows_rejected, records_submitted, records_collected, "
        "jobs_carried_over FROM enriched.apione_runs"
    )
    assert row == (3, 1, 2, 2, 0)


def test_given_a_wrong_key_when_the_production_script_runs_then_it_exits_non_zero(
    make_env: Callable[..., Env],
) -> None:
    env = make_env()
    env.insert_companies([(1, "a.com")])

    proc = enrich_process(env, api_key="sk_wrong_987")
    out, _ = proc.communicate(timeout=120)

    assert proc.returncode != 0
    assert "AuthenticationError" in out and "SOURCES__APIONE__API_KEY" in out
    assert "sk_wrong_987" not in out
