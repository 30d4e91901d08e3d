"""The sandbox against the whole ApiOne contract, over real loopback HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from apione_source import webhooks
from apione_source.errors import ConfigurationError, WebhookSignatureError
from apione_source.models import (
    PAYLOAD_MODELS,
    EnrichmentType,
    Job,
    JobResults,
    SubmitResponse,
    WebhookEvent,
    parse_model,
)
from apione_source.sandbox import Sandbox
from apione_source.sandbox import server as server_module
from apione_source.sandbox.__main__ import build_parser, sandbox_from_args
from apione_source.sandbox.engine import WebhookDue
from apione_source.settings import JOB_ID_PATTERN, PLANS

KEY = "sk_test_sandbox"
HEADERS = {"X-API-Key": KEY}
ROOT = Path(__file__).resolve().parents[1]

Factory = Callable[..., Sandbox]


# Module-scoped: creating an httpx.Client (its SSL context) costs tens of milliseconds.
@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(headers=HEADERS, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def bare() -> Iterator[httpx.Client]:
    """A client sending no API key (sandbox controls need none)."""
    with httpx.Client(timeout=10) as client:
        yield client


def submit(
    http: httpx.Client, sb: Sandbox, type_: str, records: list[Any], **extra: Any
) -> httpx.Response:
    return http.post(
        f"{sb.base_url}/async/enrich", json={"type": type_, "records": records, **extra}
    )


def submit_ok(http: httpx.Client, sb: Sandbox, type_: str, records: list[Any], **extra: Any) -> str:
    r = submit(http, sb, type_, records, **extra)
    assert r.status_code == 200, r.text
    return str(r.json()["job_id"])


def status(http: httpx.Client, sb: Sandbox, job_id: str) -> httpx.Response:
    return http.get(f"{sb.base_url}/async/status/{job_id}")


def results(http: httpx.Client, sb: Sandbox, job_id: str) -> httpx.Response:
    return http.get(f"{sb.base_url}/async/results/{job_id}")


def domains(n: int, prefix: str = "company") -> list[dict[str, Any]]:
    return [{"domain": f"{prefix}{i}.com"} for i in range(n)]


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert body["status"] == "error"
    assert set(body["error"]) >= {"code", "message"}
    return dict(body["error"])


def ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def connect(sb: Sandbox, timeout: float = 5.0) -> socket.socket:
    host, port = sb.root_url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one answer up to the server closing the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers, body


def raw_exchange(sb: Sandbox, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer until the server closes."""
    with connect(sb) as sock:
        sock.sendall(data)
        return read_answer(sock)


def assert_json_error(headers: dict[str, str], body: bytes, code: str) -> None:
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    doc = json.loads(body)
    assert doc["status"] == "error" and doc["error"]["code"] == code, doc
    assert doc["error"]["message"]


# --- auth and validation ---------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "sk_wrong"}, {"X-API-Key": ""}])
def test_every_endpoint_needs_the_api_key(
    sandbox: Sandbox, http: httpx.Client, bare: httpx.Client, headers: dict[str, str]
) -> None:
    job_id = submit_ok(http, sandbox, "company", domains(1))
    answers = [
        bare.post(
            f"{sandbox.base_url}/async/enrich",
            json={"type": "company", "records": []},
            headers=headers,
        ),
        bare.get(f"{sandbox.base_url}/async/status/{job_id}", headers=headers),
        bare.get(f"{sandbox.base_url}/async/results/{job_id}", headers=headers),
    ]
    for r in answers:
        assert r.status_code == 401
        assert error_of(r)["code"] == "invalid_api_key"
        assert "sk_wrong" not in r.text and KEY not in r.text
    assert sandbox.usage()["rejected_submits"]["401"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {"type": "companies", "records": [{"domain": "a.com"}]},
        {"records": [{"domain": "a.com"}]},
        {"type": 3, "records": [{"domain": "a.com"}]},
        {"type": "company"},
        {"type": "company", "records": []},
        {"type": "company", "records": {"domain": "a.com"}},
        {"type": "company", "records": "a.com"},
        {"type": "company", "records": ["a.com"]},
        {"type": "company", "records": [{"domain": "a.com"}, None]},
        {"type": "company", "records": [{"domain": "a.com"}], "webhook_url": "ftp://x"},
        [{"type": "company"}],
    ],
)
def test_bad_submit_bodies_are_400(sandbox: Sandbox, http: httpx.Client, body: Any) -> None:
    r = http.post(f"{sandbox.base_url}/async/enrich", json=body)
    assert r.status_code == 400
    assert error_of(r)["code"] == "invalid_request"
    assert sandbox.usage()["jobs_created"] == 0


def test_non_json_body_is_400(sandbox: Sandbox, http: httpx.Client) -> None:
    r = http.post(f"{sandbox.base_url}/async/enrich", content=b"{not json")
    assert r.status_code == 400
    assert error_of(r)["code"] == "invalid_request"
    assert sandbox.usage()["rejected_submits"]["400"] == 1


@pytest.mark.parametrize("plan", ["free", "starter", "growth", "scale"])
def test_records_per_job_limit_is_413_with_the_plans_limit(
    sandbox_factory: Factory, http: httpx.Client, plan: str
) -> None:
    sb = sandbox_factory(plan=plan)
    limit = PLANS[plan].records_per_job
    r = submit(http, sb, "company", domains(limit + 1))
    assert r.status_code == 413
    err = error_of(r)
    assert err["code"] == "too_many_records" and err["limit"] == limit
    assert submit(http, sb, "company", domains(limit)).status_code == 200
    usage = sb.usage()
    assert usage["rejected_submits"]["413"] == 1
    assert usage["max_records_per_job_seen"] == limit


def test_free_plan_limit_is_50(sandbox_factory: Factory, http: httpx.Client) -> None:
    r = submit(http, sandbox_factory(plan="free"), "email", [{"email": "a@b.com"}] * 51)
    assert r.status_code == 413 and error_of(r)["limit"] == 50


def test_concurrent_job_limit_is_429_with_retry_after(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(plan="free", job_seconds_base=30, clock=fake_clock)
    first = submit_ok(http, sb, "company", domains(2))
    r = submit(http, sb, "company", domains(2, "other"))
    assert r.status_code == 429
    err = error_of(r)
    assert err["code"] == "concurrent_job_limit" and err["limit"] == 1
    assert r.headers["Retry-After"] == "30"
    fake_clock.advance(29.5)
    r = submit(http, sb, "company", domains(2, "other"))
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"  # never below 1
    fake_clock.advance(0.5)
    assert status(http, sb, first).json()["status"] == "completed"
    submit_ok(http, sb, "company", domains(2, "other"))
    usage = sb.usage()
    assert usage["rejected_submits"]["429"] == 2
    assert usage["jobs_created"] == 2 and usage["max_active_jobs_seen"] == 1


def test_concurrency_counts_queued_and_processing(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(plan="starter", queue_seconds=5, job_seconds_base=5, clock=fake_clock)
    ids = [submit_ok(http, sb, "company", domains(1, f"c{i}-")) for i in range(5)]
    fake_clock.advance(6)  # all processing now
    assert {status(http, sb, j).json()["status"] for j in ids} == {"processing"}
    r = submit(http, sb, "company", domains(1))
    assert r.status_code == 429 and error_of(r)["limit"] == 5
    assert r.headers["Retry-After"] == "4"
    assert sb.usage()["max_active_jobs_seen"] == 5


# --- lifecycle ---------------------------------------------------------------------------


def test_lifecycle_queued_processing_completed(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(
        queue_seconds=10, job_seconds_base=2, job_seconds_per_record=1, clock=fake_clock
    )
    r = submit(http, sb, "company", domains(10))
    sub = parse_model(SubmitResponse, r.json())
    assert sub.estimated_completion_seconds == 22 and sub.total_records == 10
    job_id = sub.job_id
    assert re.match(JOB_ID_PATTERN, job_id)

    job = parse_model(Job, status(http, sb, job_id).json())
    assert job.status == "queued" and job.processed_records == 0
    assert job.started_at is None and job.completed_at is None and job.expires_at is None
    assert job.created_at is not None and job.created_at.timestamp() == fake_clock.now
    assert error_of(results(http, sb, job_id))["code"] == "job_not_completed"

    seen = []
    for _ in range(12):
        fake_clock.advance(1)
        body = status(http, sb, job_id).json()
        seen.append((body["status"], body["processed_records"]))
        if body["status"] == "processing":
            assert ts(body["started_at"]) == 1_700_000_010.0
            assert body["completed_at"] is None
            res = results(http, sb, job_id)
            assert res.status_code == 409 and error_of(res)["code"] == "job_not_completed"
    statuses = [s for s, _ in seen]
    assert statuses[:9] == ["queued"] * 9 and statuses[9:] == ["processing"] * 3
    processed = [p for s, p in seen if s == "processing"]
    assert processed == sorted(processed) and processed[-1] > processed[0]
    assert all(0 <= p < 10 for p in processed)

    fake_clock.advance(10)
    job = parse_model(Job, status(http, sb, job_id).json())
    assert job.status == "completed" and job.processed_records == 10
    assert job.completed_at is not None and job.expires_at is not None
    assert job.completed_at.timestamp() == 1_700_000_022.0
    assert job.expires_at - job.completed_at == timedelta(days=30)  # growth retention
    assert job.error is None
    fake_clock.advance(1000)  # a terminal state never changes
    assert status(http, sb, job_id).json()["status"] == "completed"
    assert results(http, sb, job_id).status_code == 200


def test_time_scale_shrinks_durations(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(job_seconds_per_record=1, time_scale=0.5, clock=fake_clock)
    assert submit(http, sb, "company", domains(10)).json()["estimated_completion_seconds"] == 5
    job_id = submit_ok(http, sb, "company", domains(10, "x"))
    fake_clock.advance(5)
    assert status(http, sb, job_id).json()["status"] == "completed"


def test_estimate_factor_skews_the_estimate_not_the_job(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    # 30 s of work answered as 10 s (3x low), then as 60 s (2x high); the jobs take 30 s
    low = sandbox_factory(job_seconds_per_record=3, estimate_factor=1 / 3, clock=fake_clock)
    high = sandbox_factory(job_seconds_per_record=3, estimate_factor=2.0, clock=fake_clock)
    answers = [submit(http, sb, "company", domains(10)).json() for sb in (low, high)]
    assert [a["estimated_completion_seconds"] for a in answers] == [10, 60]
    pairs = [(low, answers[0]["job_id"]), (high, answers[1]["job_id"])]
    fake_clock.advance(29.9)
    assert [status(http, sb, j).json()["status"] for sb, j in pairs] == ["processing"] * 2
    fake_clock.advance(0.1)
    assert [status(http, sb, j).json()["status"] for sb, j in pairs] == ["completed"] * 2


def test_processed_records_grow_linearly_while_processing(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    # what a client extrapolating the rate relies on: processed / elapsed is the rate
    sb = sandbox_factory(queue_seconds=5, job_seconds_per_record=0.1, clock=fake_clock)
    job_id = submit_ok(http, sb, "company", domains(1000))  # 100 s of work after 5 s queued
    fake_clock.advance(5)
    for _ in range(9):
        fake_clock.advance(10)
        body = status(http, sb, job_id).json()
        elapsed = fake_clock.now - ts(body["started_at"])
        assert body["processed_records"] == int(1000 * elapsed / 100)


def test_instant_jobs_complete_at_once(sandbox: Sandbox, http: httpx.Client) -> None:
    r = submit(http, sandbox, "company", domains(3))
    assert r.json()["estimated_completion_seconds"] == 0
    assert status(http, sandbox, r.json()["job_id"]).json()["status"] == "completed"


# --- results ----------------------------------------------------------------------------


def test_results_are_in_submission_order_and_echo_inputs(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    records = [{"domain": f"z{i}.io", "name": f"Z {i}", "row_id": 1000 - i} for i in range(300)]
    job_id = submit_ok(http, sandbox, "company", records)
    body = parse_model(JobResults, results(http, sandbox, job_id).json(), job_id)
    assert body.job_id == job_id and body.status == "completed" and body.total_records == 300
    assert [r.index for r in body.results] == list(range(300))
    assert [r.input for r in body.results] == records
    for r in body.results:
        if r.status == "matched":
            assert r.data is not None and r.data["domain"] == r.input["domain"]
            assert r.data["name"] == r.input["name"]
        else:
            assert r.data is None


def test_all_four_record_statuses_and_payload_schemas(
    sandbox_factory: Factory, http: httpx.Client
) -> None:
    sb = sandbox_factory(record_error_rate=0.2)
    cases: dict[str, list[dict[str, Any]]] = {
        "company": [
            *domains(60),
            {"name": "No Domain Inc"},
            {"domain": "not a domain"},
            {"domain": "https://stripe.com/about"},
            {"domain": 42},
        ],
        "people": [
            *[{"email": f"first{i}.last{i}@acme{i}.com"} for i in range(20)],
            *[{"linkedin_url": f"https://www.linkedin.com/in/person-{i}"} for i in range(20)],
            *[
                {"first_name": "Ann", "last_name": f"Lee{i}", "domain": "example.org"}
                for i in range(20)
            ],
            {"first_name": "Ann", "last_name": "Lee"},
            {"email": "no-at-sign"},
            {},
        ],
        "email": [
            *[{"email": f"user{i}@example{i}.com"} for i in range(60)],
            {"email": "broken@"},
            {"email": "two@@signs.com"},
            {"mail": "typo@example.com"},
        ],
    }
    for type_, records in cases.items():
        job_id = submit_ok(http, sb, type_, records)
        body = parse_model(JobResults, results(http, sb, job_id).json(), job_id)
        by_status: dict[str, int] = {}
        for r in body.results:
            by_status[r.status.value] = by_status.get(r.status.value, 0) + 1
            if r.status == "matched":
                assert r.data is not None and r.error is None
                parse_model(PAYLOAD_MODELS[EnrichmentType(type_)], r.data)
            else:
                assert r.data is None
            if r.status == "invalid":
                assert r.error is not None and r.error.code == "invalid_input"
            if r.status == "error":
                assert r.error is not None and r.error.code == "enrichment_error"
        assert set(by_status) == {"matched", "not_found", "invalid", "error"}, (type_, by_status)
        invalid_tail = len(records) - 60
        assert by_status["invalid"] == invalid_tail, (type_, by_status)


def test_payloads_are_rich_and_nested(sandbox: Sandbox, http: httpx.Client) -> None:
    job_id = submit_ok(http, sandbox, "company", domains(40))
    company = next(r["data"] for r in results(http, sandbox, job_id).json()["results"] if r["data"])
    assert company["tags"] and company["technologies"] and company["location"]["country"]
    job_id = submit_ok(
        http, sandbox, "people", [{"email": f"jane.doe{i}@acme.io"} for i in range(20)]
    )
    person = next(r["data"] for r in results(http, sandbox, job_id).json()["results"] if r["data"])
    assert person["employment_history"] and person["company"]["domain"] == "acme.io"
    assert person["full_name"].startswith("Jane")


def test_not_found_share_is_about_15_percent(sandbox: Sandbox, http: httpx.Client) -> None:
    job_id = submit_ok(http, sandbox, "company", domains(1000))
    found = [r["status"] for r in results(http, sandbox, job_id).json()["results"]]
    assert 0.10 < found.count("not_found") / 1000 < 0.20
    assert found.count("matched") == 1000 - found.count("not_found")


def test_same_input_same_outcome_across_sandboxes(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    records = [*domains(50), *[{"domain": f"c{i}.com"} for i in range(50)], {"domain": "bad"}]

    def run(sb: Sandbox) -> list[Any]:
        job_id = submit_ok(http, sb, "company", records)
        return list(results(http, sb, job_id).json()["results"])

    a = run(sandbox_factory(seed=7, record_error_rate=0.3, clock=fake_clock))
    b = run(sandbox_factory(seed=7, record_error_rate=0.3, clock=fake_clock))
    assert a == b
    assert {r["status"] for r in a} == {"matched", "not_found", "invalid", "error"}
    # Data depends only on the input: without record errors the matched data agree too.
    c = run(sandbox_factory(seed=99, clock=fake_clock))
    for left, right in zip(a, c, strict=True):
        if left["status"] == "matched" and right["status"] == "matched":
            assert left["data"] == right["data"]


def test_record_errors_can_succeed_on_resubmit(
    sandbox_factory: Factory, http: httpx.Client
) -> None:
    sb = sandbox_factory(record_error_rate=0.5)
    records = domains(100)
    outcomes = []
    for _ in range(2):
        job_id = submit_ok(http, sb, "company", records)
        outcomes.append([r["status"] for r in results(http, sb, job_id).json()["results"]])
    first, second = outcomes
    errored_then_matched = [i for i in range(100) if first[i] == "error" and second[i] == "matched"]
    assert errored_then_matched
    # not_found is a property of the input, not of the job
    assert [s == "not_found" for s in first] == [s == "not_found" for s in second]


def test_failed_jobs(sandbox_factory: Factory, http: httpx.Client, fake_clock: Any) -> None:
    sb = sandbox_factory(failure_rate=1.0, job_seconds_base=10, clock=fake_clock)
    job_id = submit_ok(http, sb, "company", domains(10))
    assert status(http, sb, job_id).json()["status"] == "processing"
    fake_clock.advance(10)
    job = parse_model(Job, status(http, sb, job_id).json())
    assert job.status == "failed"
    assert job.error is not None and job.error.code and job.error.message
    assert job.completed_at is not None and job.expires_at is None
    assert job.processed_records is not None and 0 <= job.processed_records < 10
    # Documented choice: results of a failed job are the Job body, results [] and error.
    r = results(http, sb, job_id)
    assert r.status_code == 200
    body = parse_model(JobResults, r.json(), job_id)
    assert body.status == "failed" and body.results == [] and body.error is not None
    fake_clock.advance(10_000_000)
    assert status(http, sb, job_id).json()["status"] == "failed"
    assert sb.usage()["jobs"] == {"queued": 0, "processing": 0, "completed": 0, "failed": 1}


def test_failure_rate_is_reproducible_from_seed(
    sandbox_factory: Factory, http: httpx.Client
) -> None:
    def outcome(seed: int) -> list[str]:
        sb = sandbox_factory(failure_rate=0.5, seed=seed)
        ids = [submit_ok(http, sb, "company", domains(1, f"s{i}-")) for i in range(20)]
        return [status(http, sb, j).json()["status"] for j in ids]

    first = outcome(3)
    assert first == outcome(3)
    assert set(first) == {"completed", "failed"}


def test_results_expire_after_retention(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(plan="free", retention_seconds=100, clock=fake_clock)
    job_id = submit_ok(http, sb, "company", domains(3))
    assert results(http, sb, job_id).status_code == 200
    fake_clock.advance(99.9)
    assert results(http, sb, job_id).status_code == 200
    fake_clock.advance(0.1)
    r = results(http, sb, job_id)
    assert r.status_code == 410 and error_of(r)["code"] == "results_expired"
    body = status(http, sb, job_id).json()  # the status call still answers
    assert body["status"] == "completed"
    assert ts(body["expires_at"]) - ts(body["completed_at"]) == 100


def test_plan_retention_is_the_default(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(plan="free", clock=fake_clock)
    job_id = submit_ok(http, sb, "company", domains(1))
    fake_clock.advance(24 * 3600 - 1)
    assert results(http, sb, job_id).status_code == 200
    fake_clock.advance(1)
    assert results(http, sb, job_id).status_code == 410


def test_expire_makes_results_410_at_once(
    sandbox: Sandbox, http: httpx.Client, bare: httpx.Client
) -> None:
    a = submit_ok(http, sandbox, "company", domains(2))
    b = submit_ok(http, sandbox, "company", domains(2, "b"))
    sandbox.expire(a)
    assert results(http, sandbox, a).status_code == 410
    r = bare.post(f"{sandbox.root_url}/_sandbox/expire/{b}")
    assert r.status_code == 200
    assert results(http, sandbox, b).status_code == 410
    assert status(http, sandbox, b).status_code == 200
    assert bare.post(f"{sandbox.root_url}/_sandbox/expire/job_nope").status_code == 404
    with pytest.raises(KeyError):
        sandbox.expire("job_nope")


@pytest.mark.parametrize("job_id", ["job_doesnotexist", "job-123", "job_", "abc", "job_a%2Fb"])
def test_unknown_or_malformed_job_ids_are_404(
    sandbox: Sandbox, http: httpx.Client, job_id: str
) -> None:
    for r in (status(http, sandbox, job_id), results(http, sandbox, job_id)):
        assert r.status_code == 404 and error_of(r)["code"] == "job_not_found"


def test_results_of_1000_records_are_fast(sandbox: Sandbox, http: httpx.Client) -> None:
    job_id = submit_ok(
        http, sandbox, "people", [{"email": f"p{i}.q@x{i}.com"} for i in range(1000)]
    )
    start = time.perf_counter()
    first = results(http, sandbox, job_id)
    assert len(first.json()["results"]) == 1000
    again = results(http, sandbox, job_id)
    assert again.content == first.content
    assert time.perf_counter() - start < 2.0


# --- faults, latency, usage ---------------------------------------------------------------


def test_transient_rate_one_gives_only_transient_errors(
    sandbox_factory: Factory, http: httpx.Client
) -> None:
    sb = sandbox_factory(transient_error_rate=1.0, retry_after_seconds=7, seed=1)
    seen: dict[int, int] = {}
    for i in range(40):
        for r in (
            submit(http, sb, "company", domains(1, f"t{i}-")),
            status(http, sb, "job_abc"),
            results(http, sb, "job_abc"),
        ):
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            code = error_of(r)["code"]
            assert (r.status_code, code) in {
                (500, "internal_error"),
                (503, "service_unavailable"),
                (429, "rate_limited"),
            }
            if r.status_code in (429, 503):
                assert r.headers["Retry-After"] == "7"
    assert set(seen) == {500, 503, 429}
    usage = sb.usage()
    assert usage["submit_calls"] == 40 and usage["status_calls"] == 40
    assert usage["results_calls"] == 40
    # Lost answers: a 500 after the job was created; the job exists and is billed.
    assert usage["lost_answers"] > 0
    assert usage["jobs_created"] == usage["lost_answers"] == usage["records_billed"]
    assert usage["rejected_submits"]["transient"] + usage["lost_answers"] == 40


def test_transient_faults_are_reproducible_from_seed(
    sandbox_factory: Factory, http: httpx.Client
) -> None:
    def codes(seed: int) -> list[int]:
        sb = sandbox_factory(transient_error_rate=0.3, seed=seed)
        return [status(http, sb, "job_x").status_code for _ in range(60)]

    first = codes(5)
    assert first == codes(5)
    assert 404 in first and {500, 503, 429} & set(first)


def test_latency_is_added(sandbox_factory: Factory, http: httpx.Client) -> None:
    sb = sandbox_factory(latency_seconds=0.05)
    start = time.perf_counter()
    status(http, sb, "job_x")
    assert time.perf_counter() - start >= 0.05


def test_usage_counters(
    sandbox_factory: Factory, http: httpx.Client, bare: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(plan="free", job_seconds_base=5, clock=fake_clock)
    rec = {"domain": "stripe.com", "name": "Stripe"}
    job_id = submit_ok(http, sb, "company", [rec, {"domain": "a.com"}])
    assert submit(http, sb, "company", [rec]).status_code == 429
    assert submit(http, sb, "nope", [rec]).status_code == 400
    assert submit(http, sb, "company", [rec] * 51).status_code == 413
    status(http, sb, job_id)
    results(http, sb, job_id)
    fake_clock.advance(5)
    submit_ok(http, sb, "company", [rec])
    usage = sb.usage()
    assert usage == bare.get(f"{sb.root_url}/_sandbox/usage").json()
    assert usage == {
        "jobs_created": 2,
        "records_billed": 3,
        "billed_per_key": {'{"domain":"stripe.com","name":"Stripe"}': 2, '{"domain":"a.com"}': 1},
        "failed_per_key": {},
        "status_calls": 1,
        "results_calls": 1,
        "submit_calls": 5,
        "rejected_submits": {"400": 1, "401": 0, "413": 1, "429": 1, "transient": 0},
        "max_active_jobs_seen": 1,
        "max_records_per_job_seen": 2,
        "jobs": {"queued": 0, "processing": 1, "completed": 1, "failed": 0},
        "lost_answers": 0,
    }
    sb.reset_usage()
    usage = sb.usage()
    assert usage["jobs_created"] == 0 and usage["billed_per_key"] == {}
    assert usage["jobs"] == {"queued": 0, "processing": 0, "completed": 0, "failed": 0}
    submit(http, sb, "nope", [])
    assert bare.post(f"{sb.root_url}/_sandbox/reset").status_code == 200
    assert sb.usage()["submit_calls"] == 0


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        Sandbox(plan="platinum")
    with pytest.raises(ConfigurationError):
        Sandbox(failure_rate=1.5)


def test_stop_closes_the_port(sandbox_factory: Factory) -> None:
    sb = sandbox_factory()
    url = sb.base_url
    with httpx.Client(headers=HEADERS) as c:
        assert c.get(f"{url}/async/status/job_x").status_code == 404  # keep-alive connection
        sb.stop()
        with pytest.raises(httpx.TransportError):
            c.get(f"{url}/async/status/job_x")
    assert "sk_test" not in repr(sb)


# --- webhooks -----------------------------------------------------------------------------


class Receiver:
    """A tiny webhook receiver on 127.0.0.1 answering scripted statuses."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.answers = list(answers or [])
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.deliveries.append((dict(self.headers.items()), body))
                    code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/apione"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.deliveries) >= count:
                    return list(self.deliveries)
            time.sleep(0.01)
        raise AssertionError(f"expected {count} deliveries, got {len(self.deliveries)}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(answers: list[int] | None = None) -> Receiver:
        made.append(Receiver(answers))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_webhook_delivery_is_signed(
    sandbox_factory: Factory,
    http: httpx.Client,
    fake_clock: Any,
    receiver_factory: Callable[..., Receiver],
) -> None:
    receiver = receiver_factory()
    sb = sandbox_factory(webhook_secret="whsec_test", job_seconds_base=30, clock=fake_clock)
    job_id = submit_ok(http, sb, "company", domains(5), webhook_url=receiver.url)
    fake_clock.advance(30)
    [(headers, body)] = receiver.wait_for(1)
    webhooks.verify_signature("whsec_test", body, headers["X-ApiOne-Signature"], now=fake_clock())
    assert headers["X-ApiOne-Event"] == "job.completed"
    assert headers["X-ApiOne-Delivery"]
    event = parse_model(WebhookEvent, json.loads(body), job_id)
    assert event.event == "job.completed" and event.job_id == job_id
    assert len(event.results) == 5
    # The webhook carries exactly what the results call answers, plus the event.
    assert {**results(http, sb, job_id).json(), "event": "job.completed"} == json.loads(body)
    with pytest.raises(WebhookSignatureError):
        webhooks.verify_signature(
            "whsec_test",
            body.replace(b"company0", b"company9"),
            headers["X-ApiOne-Signature"],
            now=fake_clock(),
        )
    with pytest.raises(WebhookSignatureError):
        webhooks.verify_signature(
            "whsec_other", body, headers["X-ApiOne-Signature"], now=fake_clock()
        )


def test_webhook_is_retried_with_the_same_delivery_id(
    sandbox_factory: Factory, http: httpx.Client, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory(answers=[500, 404, 200])
    sb = sandbox_factory(webhook_retry_base_seconds=0.01)
    submit_ok(http, sb, "email", [{"email": "a@b.com"}], webhook_url=receiver.url)
    deliveries = receiver.wait_for(3)
    assert len({h["X-ApiOne-Delivery"] for h, _ in deliveries}) == 1
    assert len({body for _, body in deliveries}) == 1
    for headers, body in deliveries:
        webhooks.verify_signature("whsec_sandbox", body, headers["X-ApiOne-Signature"])


def test_webhook_retries_stop_after_8_attempts(
    sandbox_factory: Factory, http: httpx.Client, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory(answers=[503] * 20)
    sb = sandbox_factory(webhook_retry_base_seconds=0.001)
    submit_ok(http, sb, "company", domains(1), webhook_url=receiver.url)
    assert len(receiver.wait_for(8)) == 8
    # two more deliveries in the window after the eighth would mean no cap
    time.sleep(0.3)
    assert len(receiver.deliveries) == 8


def test_failed_job_webhook(
    sandbox_factory: Factory, http: httpx.Client, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory()
    sb = sandbox_factory(failure_rate=1.0, job_seconds_base=0.001)
    job_id = submit_ok(http, sb, "company", domains(2), webhook_url=receiver.url)
    [(headers, body)] = receiver.wait_for(1)
    event = json.loads(body)
    assert headers["X-ApiOne-Event"] == "job.failed" and event["event"] == "job.failed"
    assert event["job_id"] == job_id and event["results"] == [] and event["error"]["code"]


def test_sign_and_verify() -> None:
    header = webhooks.sign("s", b"{}", 1000)
    assert header.startswith("t=1000,v1=")
    webhooks.verify_signature("s", b"{}", header, now=1000)
    webhooks.verify_signature("s", b"{}", header, now=1300)
    webhooks.verify_signature("s", b"{}", f"t=1000,v1=00,{header.split(',')[1]}", now=1000)
    for bad, now in [
        (header, 1301.0),  # too old
        (header, 699.0),  # too far in the future
        ("", 1000.0),
        ("t=1000", 1000.0),
        ("v1=abc", 1000.0),
        ("garbage", 1000.0),
        ("t=x,v1=abc", 1000.0),
    ]:
        with pytest.raises(WebhookSignatureError):
            webhooks.verify_signature("s", b"{}", bad, now=now)


# --- robustness against bad input ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b'{"type":"company","records":[{"domain":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        # parses, but its results echo would nest too deep: refused before billing
        b'{"type":"company","records":[{"domain":' + b"[" * 100 + b"]" * 100 + b"}]}",
    ],
    ids=["bare", "in-record", "parseable"],
)
def test_deeply_nested_bodies_are_400(sandbox: Sandbox, http: httpx.Client, raw: bytes) -> None:
    r = http.post(f"{sandbox.base_url}/async/enrich", content=raw)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_request"
    assert sandbox.usage()["jobs_created"] == 0
    submit_ok(http, sandbox, "company", domains(1))  # the sandbox still serves


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "http://[::1/hooks",
        "not a url",
        "ftp://example.com/hooks",
        "file:///etc/passwd",
        "//example.com/hooks",
        "http://",
        "http:///hooks",
        "http://example.com:99999/hooks",
        "http://example.com:port/hooks",
        "http://exa mple.com/hooks",
        "http://example.com/a b",
        "http://example.com/a\r\nX-Injected: 1",
        "https://exämple.com/hooks",
        "",
        42,
    ],
)
def test_undeliverable_webhook_urls_are_400_before_billing(
    sandbox: Sandbox, http: httpx.Client, url: Any
) -> None:
    r = submit(http, sandbox, "company", domains(1), webhook_url=url)
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_request"
    usage = sandbox.usage()
    assert usage["jobs_created"] == 0 and usage["records_billed"] == 0


def test_bad_webhook_urls_never_stop_deliveries(
    sandbox_factory: Factory,
    http: httpx.Client,
    receiver_factory: Callable[..., Receiver],
    capfd: pytest.CaptureFixture[str],
) -> None:
    receiver = receiver_factory()
    sb = sandbox_factory(webhook_retry_base_seconds=0.001)
    for bad in ("http://[::1", "http://127.0.0.1:99999/x"):
        assert submit(http, sb, "company", domains(1), webhook_url=bad).status_code == 400
    # Were one to reach delivery anyway, it is abandoned at once, without a traceback.
    for bad in ("http://[::1", "http://127.0.0.1:99999/x", "http://:80/x", "mailto:a@b.c"):
        sb._dispatcher._deliver(WebhookDue("job_x", bad, "job.completed", b"{}"))
    # User info in the URL is not part of the address.
    with_user = receiver.url.replace("http://", "http://user:pw@")
    first = submit_ok(http, sb, "company", domains(1), webhook_url=with_user)
    second = submit_ok(http, sb, "company", domains(1, "b"), webhook_url=receiver.url)
    deliveries = receiver.wait_for(2)
    assert {json.loads(body)["job_id"] for _, body in deliveries} == {first, second}
    assert "Traceback" not in capfd.readouterr().err


def test_client_disconnects_print_no_traceback(
    sandbox_factory: Factory, capfd: pytest.CaptureFixture[str]
) -> None:
    sb = sandbox_factory(latency_seconds=0.2)
    request = f"GET /api/v1/async/status/job_x HTTP/1.1\r\nX-API-Key: {KEY}\r\n\r\n"
    with connect(sb) as sock:
        sock.sendall(request.encode())
        # Reset (not a graceful close) while the sandbox is still answering.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
    with connect(sb) as sock:
        sock.sendall(b"GET /api/v1/async/status/job_x HTTP/1.1\r\nX-API")
        time.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
    time.sleep(0.5)  # the sandbox writes to the reset connection after its latency
    with httpx.Client(headers=HEADERS) as c:
        assert c.get(f"{sb.base_url}/async/status/job_x").status_code == 404
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_sandbox_bugs_stay_visible_and_answer_500_json(
    sandbox: Sandbox,
    http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    def boom(api_key: str | None, job_id: str) -> Any:
        raise RuntimeError("boom in the engine")

    monkeypatch.setattr(sandbox.engine, "status", boom)
    r = status(http, sandbox, "job_x")
    assert r.status_code == 500 and error_of(r)["code"] == "internal_error"
    err = capfd.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom in the engine" in err


def test_a_stalled_upload_is_answered_408_and_closed(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(request_timeout_seconds=0.2)
    head = (
        "POST /api/v1/async/enrich HTTP/1.1\r\n"
        f"X-API-Key: {KEY}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    start = time.monotonic()
    with connect(sb, timeout=5) as sock:
        sock.sendall(head.encode() + b'{"type":"c')
        code, headers, body = read_answer(sock)  # returns only once the sandbox closes
    assert time.monotonic() - start < 3
    assert code == 408 and headers["connection"] == "close"
    assert_json_error(headers, body, "request_timeout")
    assert sb.usage()["submit_calls"] == 0


def test_an_idle_connection_is_closed_after_the_request_timeout(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(request_timeout_seconds=0.2)
    with connect(sb, timeout=5) as sock:
        assert sock.recv(1) == b""  # closed by the sandbox, well before the 5 s


_LONG = b"a" * 70_000


@pytest.mark.parametrize(
    ("raw", "status_code", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "invalid_request"),
        (b"GET /api/v1/async/status/job_x HTTP/abc\r\n\r\n", 400, "invalid_request"),
        (b"GET /api/v1/async/status/job_x HTTP/9.9\r\n\r\n", 505, "http_version_not_supported"),
        (b"PATCH /api/v1/async/enrich HTTP/1.1\r\nHost: x\r\n\r\n", 501, "not_implemented"),
        (b"BREW /api/v1/async/enrich HTTP/1.1\r\n\r\n", 501, "not_implemented"),
        (b"GET /" + _LONG + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long"),
        (b"GET / HTTP/1.1\r\nX-Long: " + _LONG + b"\r\n\r\n", 431, "headers_too_large"),
        (b"GET / HTTP/1.1\r\n" + b"X-H: 1\r\n" * 200 + b"\r\n", 431, "headers_too_large"),
        (
            b"POST /api/v1/async/enrich HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
            400,
            "invalid_request",
        ),
        (
            b"POST /api/v1/async/enrich HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n",
            411,
            "length_required",
        ),
    ],
    ids=[
        "syntax",
        "version",
        "http2",
        "patch",
        "unknown-method",
        "long-uri",
        "long-header",
        "many-headers",
        "content-length",
        "chunked",
    ],
)
def test_http_layer_errors_are_json_envelopes(
    sandbox: Sandbox, raw: bytes, status_code: int, code: str
) -> None:
    got, headers, body = raw_exchange(sandbox, raw)
    assert got == status_code
    assert headers["connection"] == "close"
    assert_json_error(headers, body, code)


def test_head_gets_a_json_error_without_body(sandbox: Sandbox) -> None:
    got, headers, body = raw_exchange(sandbox, b"HEAD /_sandbox/usage HTTP/1.1\r\n\r\n")
    assert got == 501 and headers["content-type"] == "application/json" and body == b""


def test_reprs_never_show_the_key_or_secret(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(api_key="sk_live_TOPSECRET", webhook_secret="whsec_TOPSECRET")
    for obj in (sb, sb.config, sb.engine, sb.engine.config, sb._dispatcher):
        for text in (repr(obj), str(obj)):
            assert "TOPSECRET" not in text, text
    assert "plan=" in repr(sb.config)  # the rest stays visible


def test_request_timeout_configuration() -> None:
    with pytest.raises(ConfigurationError):
        Sandbox(request_timeout_seconds=0)
    assert Sandbox(request_timeout_seconds=None).config.request_timeout_seconds is None
    args = build_parser().parse_args(["--request-timeout-seconds", "0"])
    assert sandbox_from_args(args).config.request_timeout_seconds is None
    args = build_parser().parse_args([])
    assert sandbox_from_args(args).config.request_timeout_seconds == 30


# --- contract drift knobs ----------------------------------------------------------------------

DRIFT_KNOBS = [
    "short_results_rate",
    "bad_index_rate",
    "wrong_echo_rate",
    "status_404_first_rate",
    "unknown_status_rate",
]


def results_drifted(records: list[dict[str, Any]], body: dict[str, Any]) -> bool:
    got = [(r["index"], r["input"]) for r in body["results"]]
    return got != list(enumerate(records))


def test_short_results_lack_the_last_record(
    sandbox_factory: Factory, http: httpx.Client, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory()
    sb = sandbox_factory(short_results_rate=1.0)
    records = domains(5)
    job_id = submit_ok(http, sb, "company", records, webhook_url=receiver.url)
    body = results(http, sb, job_id).json()
    assert body["status"] == "completed" and body["total_records"] == 5
    assert body["processed_records"] == 5
    assert [(r["index"], r["input"]) for r in body["results"]] == list(enumerate(records[:4]))
    # The webhook carries the same short body.
    [(_, hook)] = receiver.wait_for(1)
    assert json.loads(hook) == {**body, "event": "job.completed"}
    assert (
        results(http, sb, submit_ok(http, sb, "email", [{"email": "a@b.co"}])).json()["results"]
        == []
    )


def test_bad_index_duplicates_or_overflows_one_index(
    sandbox_factory: Factory, http: httpx.Client
) -> None:
    sb = sandbox_factory(bad_index_rate=1.0)
    kinds = set()
    for i in range(20):
        records = domains(4, f"b{i}-")
        body = results(http, sb, submit_ok(http, sb, "company", records)).json()
        indexes = [r["index"] for r in body["results"]]
        assert [r["input"] for r in body["results"]] == records  # only an index drifts
        [wrong] = [k for k, index in enumerate(indexes) if index != k]
        if indexes[wrong] < 4:
            kinds.add("duplicate")
            assert indexes.count(indexes[wrong]) == 2
        else:
            kinds.add("out of range")
            assert indexes[wrong] == 4  # total_records
    assert kinds == {"duplicate", "out of range"}
    one = results(http, sb, submit_ok(http, sb, "company", domains(1, "one"))).json()
    assert [r["index"] for r in one["results"]] == [1]


def test_wrong_echo_changes_one_input(sandbox_factory: Factory, http: httpx.Client) -> None:
    sb = sandbox_factory(wrong_echo_rate=1.0)
    records = domains(4)
    body = results(http, sb, submit_ok(http, sb, "company", records)).json()
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3]
    inputs = [r["input"] for r in body["results"]]
    [wrong] = [k for k in range(4) if inputs[k] != records[k]]
    assert inputs[wrong] == records[(wrong + 1) % 4]  # the echo of another record sent
    result = body["results"][wrong]
    if result["status"] == "matched":  # the data is still that of the record sent
        assert result["data"]["domain"] == records[wrong]["domain"]
    # Identical records: the echo is altered instead.
    same = [{"domain": "same.com", "name": "Same"}] * 3
    inputs = [
        r["input"]
        for r in results(http, sb, submit_ok(http, sb, "company", same)).json()["results"]
    ]
    assert sorted(map(json.dumps, inputs)) == sorted(
        map(json.dumps, [same[0], same[0], {"domain": "wrong-same.com", "name": "Same"}])
    )
    job_id = submit_ok(http, sb, "company", [{"domain": 42}])
    assert results(http, sb, job_id).json()["results"][0]["input"] == {
        "domain": 42,
        "_echo": "wrong",
    }


def test_status_404_first_then_normal(
    sandbox_factory: Factory, http: httpx.Client, bare: httpx.Client
) -> None:
    sb = sandbox_factory(status_404_first_rate=1.0)
    job_id = submit_ok(http, sb, "company", domains(2))
    assert results(http, sb, job_id).status_code == 200  # results calls are not affected
    assert bare.get(f"{sb.base_url}/async/status/{job_id}").status_code == 401  # not counted
    r = status(http, sb, job_id)
    assert r.status_code == 404 and error_of(r)["code"] == "job_not_found"
    for _ in range(3):
        r = status(http, sb, job_id)
        assert r.status_code == 200 and r.json()["status"] == "completed"


def test_unknown_status_for_the_first_calls(sandbox_factory: Factory, http: httpx.Client) -> None:
    sb = sandbox_factory(unknown_status_rate=1.0)
    job_id = submit_ok(http, sb, "company", domains(2))
    answers = [status(http, sb, job_id).json() for _ in range(4)]
    assert [a["status"] for a in answers] == ["paused", "paused", "completed", "completed"]
    assert answers[0] == {**answers[2], "status": "paused"}  # every other field is true
    assert results(http, sb, job_id).json()["status"] == "completed"

    sb = sandbox_factory(unknown_status_rate=1.0, unknown_status_calls=1, status_404_first_rate=1)
    job_id = submit_ok(http, sb, "company", domains(2))
    first, *later = [status(http, sb, job_id) for _ in range(3)]
    assert first.status_code == 404
    assert [r.json()["status"] for r in later] == ["paused", "completed"]

    sb = sandbox_factory(unknown_status_rate=1.0, unknown_status_calls=0)
    assert status(http, sb, submit_ok(http, sb, "company", domains(1))).json()["status"] == (
        "completed"
    )


@pytest.mark.parametrize("knob", DRIFT_KNOBS)
def test_drift_is_reproducible_from_seed(
    sandbox_factory: Factory, http: httpx.Client, knob: str
) -> None:
    def drifted_jobs(seed: int) -> list[bool]:
        sb = sandbox_factory(seed=seed, **{knob: 0.5})
        out = []
        for i in range(16):
            records = domains(3, f"r{i}-")
            job_id = submit_ok(http, sb, "company", records)
            if knob in ("status_404_first_rate", "unknown_status_rate"):
                r = status(http, sb, job_id)
                out.append(r.status_code == 404 or r.json()["status"] == "paused")
            else:
                out.append(results_drifted(records, results(http, sb, job_id).json()))
        return out

    first = drifted_jobs(11)
    assert first == drifted_jobs(11)
    assert True in first and False in first


def test_odd_job_ids_route_when_percent_encoded(
    sandbox_factory: Factory, http: httpx.Client, bare: httpx.Client
) -> None:
    sb = sandbox_factory(job_id_style="odd")
    a = submit_ok(http, sb, "company", domains(2))
    b = submit_ok(http, sb, "company", domains(3, "b"))
    assert a != b and not re.match(JOB_ID_PATTERN, a)
    assert set("-.:/ +%") <= set(a)
    for job_id, n in ((a, 2), (b, 3)):
        segment = quote(job_id, safe="")
        assert "%2F" in segment
        r = status(http, sb, segment)
        assert r.status_code == 200 and r.json()["job_id"] == job_id
        assert r.json()["total_records"] == n
        body = results(http, sb, segment).json()
        assert body["job_id"] == job_id and len(body["results"]) == n
    # Left unencoded, the "/" splits the path and the "%xx" decodes to another id.
    assert status(http, sb, a).status_code == 404
    r = status(http, sb, quote(a, safe="%"))
    assert r.status_code == 404 and error_of(r)["code"] == "job_not_found"
    # The sandbox controls take the same encoding.
    assert bare.post(f"{sb.root_url}/_sandbox/expire/{quote(a, safe='')}").status_code == 200
    assert results(http, sb, quote(a, safe="")).status_code == 410
    sb.expire(b)
    assert results(http, sb, quote(b, safe="")).status_code == 410
    usage = bare.get(f"{sb.root_url}/_sandbox/usage").json()
    assert usage["jobs_created"] == 2 and usage["jobs"]["completed"] == 2


def test_default_job_ids_are_unchanged(sandbox: Sandbox, http: httpx.Client) -> None:
    assert re.fullmatch(r"job_[0-9a-f]{24}", submit_ok(http, sandbox, "company", domains(1)))


def test_submit_answer_delay_bills_before_answering(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(submit_answer_delay_seconds=0.5)
    answers: list[httpx.Response] = []

    def run() -> None:
        with httpx.Client(headers=HEADERS, timeout=10) as c:
            answers.append(submit(c, sb, "company", domains(2)))

    start = time.monotonic()
    thread = threading.Thread(target=run)
    thread.start()
    while sb.usage()["jobs_created"] == 0:
        assert time.monotonic() - start < 0.4, "the job is created before the delay"
        time.sleep(0.01)
    assert sb.usage()["records_billed"] == 2 and thread.is_alive()  # billed, unanswered
    thread.join(5)
    assert time.monotonic() - start >= 0.5
    assert answers[0].status_code == 200
    with httpx.Client(headers=HEADERS, timeout=10) as c:
        start = time.monotonic()
        assert submit(c, sb, "nope", domains(1)).status_code == 400  # no job, no delay
        assert status(c, sb, answers[0].json()["job_id"]).status_code == 200
        assert time.monotonic() - start < 0.4


def test_submit_answer_delay_applies_to_lost_answers(sandbox_factory: Factory) -> None:
    sb = sandbox_factory(transient_error_rate=1.0, submit_answer_delay_seconds=0.2, seed=1)
    slow = 0
    with httpx.Client(headers=HEADERS, timeout=10) as c:
        for i in range(12):
            start = time.monotonic()
            submit(c, sb, "company", domains(1, f"l{i}-"))
            slow += time.monotonic() - start >= 0.2
    assert slow == sb.usage()["lost_answers"] > 0


@pytest.mark.parametrize("cut_late", [False, True], ids=["cut", "cut-late"])
def test_stop_during_a_delayed_submit_answer(
    sandbox_factory: Factory, monkeypatch: pytest.MonkeyPatch, cut_late: bool
) -> None:
    """The stop ends the wait at once; the answer is never sent, even where the stop
    cuts the connection only after the waiting handler woke (a race CI once lost)."""
    if cut_late:
        cut = server_module._Server.close_connections

        def late(self: Any) -> None:
            self.stopping.set()
            time.sleep(0.5)  # the woken handler would answer meanwhile
            cut(self)

        monkeypatch.setattr(server_module._Server, "close_connections", late)
    sb = sandbox_factory(submit_answer_delay_seconds=30)
    errors: list[Exception] = []

    def run() -> None:
        with httpx.Client(headers=HEADERS, timeout=10) as c:
            try:
                submit(c, sb, "company", domains(2))
            except httpx.TransportError as exc:
                errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 5
    while sb.usage()["jobs_created"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    sb.stop()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - start < 5
    assert len(errors) == 1  # no answer at all
    assert sb.usage()["records_billed"] == 2


def test_failed_per_key_counts_billings_in_failed_jobs(
    sandbox_factory: Factory, http: httpx.Client, fake_clock: Any
) -> None:
    sb = sandbox_factory(failure_rate=0.5, job_seconds_base=1, seed=3, clock=fake_clock)
    shared = {"domain": "shared.com"}
    ids = [submit_ok(http, sb, "company", [shared, {"domain": f"x{i}.com"}]) for i in range(10)]
    assert sb.usage()["failed_per_key"] == {}  # nothing has finished yet
    fake_clock.advance(1)
    failed = [status(http, sb, j).json()["status"] for j in ids].count("failed")
    assert 0 < failed < 10
    usage = sb.usage()
    assert usage["billed_per_key"]['{"domain":"shared.com"}'] == 10
    assert usage["failed_per_key"]['{"domain":"shared.com"}'] == failed
    assert sum(usage["failed_per_key"].values()) == 2 * failed
    sb.reset_usage()
    assert sb.usage()["failed_per_key"] == {}


@pytest.mark.parametrize(
    "kwargs",
    [
        *[{knob: 1.5} for knob in DRIFT_KNOBS],
        *[{knob: -0.1} for knob in DRIFT_KNOBS],
        {"unknown_status_calls": -1},
        {"job_id_style": "weird"},
        {"submit_answer_delay_seconds": -1},
        {"estimate_factor": -0.5},
        {"estimate_factor": float("inf")},
    ],
)
def test_drift_knob_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Sandbox(**kwargs)


def test_cli_flags_set_every_drift_knob() -> None:
    args = build_parser().parse_args(
        [
            "--short-results-rate",
            "0.1",
            "--bad-index-rate",
            "0.2",
            "--wrong-echo-rate",
            "0.3",
            "--status-404-first-rate",
            "0.4",
            "--unknown-status-rate",
            "0.5",
            "--unknown-status-calls",
            "3",
            "--job-id-style",
            "odd",
            "--submit-answer-delay-seconds",
            "1.5",
            "--estimate-factor",
            "0.25",
        ]
    )
    config = sandbox_from_args(args).config
    assert (
        config.short_results_rate,
        config.bad_index_rate,
        config.wrong_echo_rate,
        config.status_404_first_rate,
        config.unknown_status_rate,
        config.unknown_status_calls,
        config.job_id_style,
        config.submit_answer_delay_seconds,
        config.estimate_factor,
    ) == (0.1, 0.2, 0.3, 0.4, 0.5, 3, "odd", 1.5, 0.25)
    defaults = sandbox_from_args(build_parser().parse_args([])).config
    assert defaults == Sandbox().config  # the CLI's defaults are the constructor's


# --- CLI ------------------------------------------------------------------------------------


def test_cli_prints_url_and_stops_on_sigterm(bare: httpx.Client) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apione_source.sandbox",
            "--port",
            "0",
            "--plan",
            "free",
            "--api-key",
            "sk_cli",
            "--job-seconds-base",
            "0",
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/api/v1")
        r = bare.post(
            f"{base_url}/async/enrich",
            json={"type": "company", "records": domains(51)},
            headers={"X-API-Key": "sk_cli"},
        )
        assert r.status_code == 413 and r.json()["error"]["limit"] == 50
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stderr is not None
        assert "sk_cli" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_results_built_halfway_through_a_job_are_those_built_when_asked(
    fake_clock: Any,
) -> None:
    """The sandbox builds a job's results halfway through its work (as ApiOne has them
    when a job completes): the answer is byte for byte the one built at the call."""

    def engine_with_a_job() -> tuple[Any, str]:
        # not started: no threads, the test drives the preparer's steps itself
        engine = Sandbox(
            seed=3, job_seconds_base=10, record_error_rate=0.2, clock=fake_clock
        ).engine
        body = json.dumps({"type": "company", "records": domains(50)}).encode()
        reply = engine.submit(engine.config.api_key, body)
        assert reply.status == 200
        return engine, json.loads(reply.body)["job_id"]

    start = fake_clock.now
    ahead, ahead_id = engine_with_a_job()
    asked, asked_id = engine_with_a_job()
    due, next_at = ahead.take_results_to_prepare()
    assert due == [] and next_at == start + 5  # halfway through its 10 s
    fake_clock.advance(5)
    (job,) = ahead.take_results_to_prepare()[0]
    ahead.prepare_results(job)
    assert job.results_json is not None and job.results_body is None
    fake_clock.advance(5)

    answer = ahead.results(ahead.config.api_key, ahead_id)
    assert answer.status == 200
    built_at_the_call = asked.results(asked.config.api_key, asked_id).body
    # the same seed and clock: the same job but for its (random) id
    assert answer.body.replace(ahead_id.encode(), asked_id.encode()) == built_at_the_call
    assert job.results_json is None  # spent into the body, not held twice
