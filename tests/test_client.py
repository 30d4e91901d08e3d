"""The ApiOne clients over real loopback HTTP.

Against the sandbox for whole flows; against a tiny scripted server (below) for answers
the sandbox cannot produce on demand: exact status sequences, broken bodies, delays.
No real sleeps: every client gets a sleep that only records the delays.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import logging
import pickle
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from apione_source.client import ApiOneClient, AsyncApiOneClient
from apione_source.errors import (
    ApiOneError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InsufficientCreditsError,
    JobNotFoundError,
    MalformedResponseError,
    NotReadyError,
    RateLimitedError,
    ResultsExpiredError,
    ServerError,
    ShrinkBatchError,
    SubmitOutcomeUnknownError,
    TransportError,
    WaitForCapacityError,
)
from apione_source.models import JobStatus, RecordStatus
from apione_source.retry import RetryPolicy, parse_retry_after
from apione_source.sandbox import Sandbox
from apione_source.secret import Secret

SECRET = "sk_live_SECRET123"
JOB = "job_abc123"
AUTH_MESSAGE = (
    "ApiOne rejected the API key (401). Set it in .dlt/secrets.toml under [sources.apione] "
    'api_key = "..." or the env var SOURCES__APIONE__API_KEY.'
)
FAST = RetryPolicy(max_attempts=4, base_delay=0.5, max_delay=10.0, max_total_seconds=60.0)
RECORDS = [{"domain": "stripe.com"}, {"domain": "shopify.com"}]


# --- a scripted HTTP server -------------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str -> sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def ok(**body: Any) -> Reply:
    return Reply(200, body)


def err(status: int, code: str, message: str = "nope", **extra: Any) -> Reply:
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else {}
    return Reply(
        status, {"status": "error", "error": {"code": code, "message": message, **extra}}, headers
    )


def job_body(job_id: str = JOB, status: str = "completed", **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "status": status, "type": "company", "total_records": 2, **extra}


def results_body(job_id: str = JOB, **extra: Any) -> dict[str, Any]:
    results = [
        {"index": i, "input": r, "status": "not_found", "data": None} for i, r in enumerate(RECORDS)
    ]
    return {**job_body(job_id), "results": results, **extra}


SUBMITTED = ok(status="success", job_id=JOB, estimated_completion_seconds=5, total_records=2)


class ScriptedServer:
    """Answers each path (after ``/api/v1``) with its scripted replies in turn; the last repeats."""

    def __init__(self, script: dict[str, list[Reply]]) -> None:
        self.script = {path: list(replies) for path, replies in script.items()}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.removeprefix("/api/v1")
                with server._lock:
                    server.requests.append((self.command, path, dict(self.headers), body))
                    replies = server.script.get(path) or [err(404, "job_not_found")]
                    reply = replies.pop(0) if len(replies) > 1 else replies[0]
                time.sleep(reply.delay)
                raw = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                data = raw.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (read timeout)
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/api/v1"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def count(self, path: str) -> int:
        return sum(1 for _, p, _, _ in self.requests if p == path)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[[dict[str, list[Reply]]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: dict[str, list[Reply]]) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


class Sleeps(list[float]):
    """An injected sleep that records instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(url: str, sleeps: Sleeps | None = None, **kw: Any) -> ApiOneClient:
    kw.setdefault("retry", FAST)
    return ApiOneClient(SECRET, url, sleep=sleeps if sleeps is not None else Sleeps(), **kw)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v1"


# --- retry policy -----------------------------------------------------------------------


def test_given_attempts_when_delay_then_full_jitter_under_the_doubling_cap() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0)
    rng = random.Random(1)
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0), (500, 4.0)]:
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # jitter spans the range
        assert min(delays) < cap * 0.2


def test_given_retry_after_when_delay_then_at_least_it_and_capped() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=10.0)
    assert all(policy.delay(1, 3.0) >= 3.0 for _ in range(50))
    assert policy.delay(1, 99.0) == 10.0


def test_given_budget_when_next_delay_then_none_past_attempts_or_total() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=1.0, max_delay=5.0, max_total_seconds=4.0)
    assert policy.next_delay(1, None, 0.0) is not None
    assert policy.next_delay(3, None, 0.0) is None  # third try was the last
    assert policy.next_delay(1, 3.0, 2.0) is None  # 2 + 3 > 4
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_parse_retry_after_accepts_seconds_and_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


# --- construction and validation ----------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "sk live", "sk_\u00e9"])
def test_given_bad_key_when_constructing_then_configuration_error(key: str) -> None:
    with pytest.raises(ConfigurationError, match="SOURCES__APIONE__API_KEY") as info:
        ApiOneClient(key)
    assert key.strip() == "" or key not in str(info.value)


def test_repr_shows_base_url_only() -> None:
    with ApiOneClient(SECRET, "http://127.0.0.1:9/api/v1/") as client:
        assert repr(client) == "ApiOneClient(base_url='http://127.0.0.1:9/api/v1')"


# --- job ids: any id ApiOne gave is polled, as one path segment ---------------------------

ODD_JOB_IDS = [
    ("abc", "abc"),
    ("job_", "job_"),
    ("job-a/b", "job-a%2Fb"),
    ("job-7f3a.b:c/d e", "job-7f3a.b%3Ac%2Fd%20e"),
    ("../job_x", "..%2Fjob_x"),
    ("..", "%2E%2E"),
    (".", "%2E"),
    ("job_1 ", "job_1%20"),
    ("job_1\n", "job_1%0A"),
    ("a?b#c", "a%3Fb%23c"),
    ("100%2F", "100%252F"),
    ("j\u00f6b", "j%C3%B6b"),
]


def recording_transport(seen: list[httpx.Request], job_id: str) -> httpx.MockTransport:
    """Answers every read with a completed job ``job_id`` (results included)."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=results_body(job_id))

    return httpx.MockTransport(handle)


@pytest.mark.parametrize(("job_id", "segment"), ODD_JOB_IDS)
def test_given_unusual_job_id_when_reading_then_sent_as_one_encoded_path_segment(
    job_id: str, segment: str
) -> None:
    seen: list[httpx.Request] = []
    base = "http://127.0.0.1:9/api/v1"
    with ApiOneClient(SECRET, base, transport=recording_transport(seen, job_id)) as client:
        assert client.get_job(job_id).job_id == job_id
        assert client.get_results(job_id).job_id == job_id

    async def read_async() -> None:
        transport = recording_transport(seen, job_id)
        async with AsyncApiOneClient(SECRET, base, transport=transport) as client:
            await client.get_job(job_id)
            await client.get_results(job_id)

    asyncio.run(read_async())
    paths = [r.url.raw_path for r in seen]
    status, results = (f"/api/v1/async/{kind}/{segment}".encode() for kind in ("status", "results"))
    assert paths == [status, results, status, results]
    assert unquote(segment) == job_id  # the server decodes exactly the id


def test_given_slash_in_job_id_when_polling_over_http_then_the_server_sees_percent_2f(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(
        {
            "/async/status/job-a%2Fb": [ok(**job_body("job-a/b"))],
            "/async/results/job-a%2Fb": [ok(**results_body("job-a/b"))],
        }
    )
    with client_for(server.base_url) as client:
        assert client.get_job("job-a/b").job_id == "job-a/b"
        assert len(client.get_results("job-a/b").results) == 2
    assert [(m, p) for m, p, _, _ in server.requests] == [
        ("GET", "/async/status/job-a%2Fb"),
        ("GET", "/async/results/job-a%2Fb"),
    ]


@pytest.mark.parametrize("job_id", ["", None, 42, b"job_1"])
def test_given_empty_or_non_string_job_id_when_reading_then_bad_request_without_a_call(
    scripted: Callable[..., ScriptedServer], job_id: Any
) -> None:
    server = scripted({})
    with client_for(server.base_url) as client:
        with pytest.raises(BadRequestError, match="non-empty string"):
            client.get_job(job_id)
        with pytest.raises(BadRequestError, match="non-empty string"):
            client.get_results(job_id)
    assert server.requests == []


@pytest.mark.parametrize(
    ("job_id", "accepted"),
    [("job-7f3a.b:c/d e", True), ("x" * 256, True), ("", False), ("x" * 257, False)],
)
def test_given_submit_answer_job_id_when_parsed_then_any_non_empty_id_is_kept(
    scripted: Callable[..., ScriptedServer], job_id: str, accepted: bool
) -> None:
    body = {**SUBMITTED.body, "job_id": job_id}
    server = scripted({"/async/enrich": [Reply(200, body)]})
    with client_for(server.base_url) as client:
        if accepted:
            assert client.submit_job("company", RECORDS).job_id == job_id
        else:
            with pytest.raises(SubmitOutcomeUnknownError) as info:
                client.submit_job("company", RECORDS)
            assert info.value.records == RECORDS
    assert server.count("/async/enrich") == 1


def test_given_long_odd_job_id_when_logged_and_in_errors_then_only_an_escaped_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="apione_source.client")
    job_id = "job-\n" + "x" * 300 + "TAIL"

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"error": {"code": "down", "message": "down"}})

    client = ApiOneClient(
        SECRET, "http://127.0.0.1:9", transport=httpx.MockTransport(handle), sleep=Sleeps()
    )
    with client, pytest.raises(ServerError) as info:
        client.get_job(job_id)
    assert info.value.job_id == job_id  # the caller still knows which job
    ours = [r for r in caplog.records if r.name.startswith("apione_source")]
    texts = [str(info.value), *(r.getMessage() for r in ours)]
    assert len(ours) > 1  # (httpx logs each URL in full itself, percent-encoded)
    for text in texts:
        assert "TAIL" not in text and "\n" not in text
        assert "job-\\nxxx" in text  # an escaped prefix, enough to recognise it


def test_given_the_key_as_job_id_when_reading_then_refused_before_it_reaches_a_url(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted({})
    with client_for(server.base_url) as client, pytest.raises(BadRequestError) as info:
        client.get_job(f"job_{SECRET}")
    assert "API key" in str(info.value)
    assert SECRET not in str(info.value)
    assert server.requests == []


# --- the key: a Secret, added per request --------------------------------------------------


def test_secret_masks_itself_and_reveals_on_demand() -> None:
    secret = Secret(SECRET)
    assert repr(secret) == "Secret('***')"
    assert str(secret) == f"{secret}" == "***"
    assert secret.reveal() == SECRET
    assert Secret(secret).reveal() == SECRET
    assert copy.deepcopy(secret) is secret
    assert not hasattr(secret, "__dict__")
    stored = [getattr(secret, slot) for slot in Secret.__slots__]
    assert all(SECRET.encode() not in b and SECRET not in repr(b) for b in stored)
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    with pytest.raises(AttributeError):
        secret._pad = b""  # type: ignore[misc]
    with pytest.raises(TypeError):
        Secret(b"sk")  # type: ignore[arg-type]


@pytest.mark.parametrize("as_secret", [False, True])
def test_given_key_when_requests_are_sent_then_header_only_while_sending(
    as_secret: bool,
) -> None:
    seen: list[tuple[httpx.Request, str | None]] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append((request, request.headers.get("X-API-Key")))
        if request.url.path.endswith("/job_down"):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=job_body())

    key: str | Secret = Secret(f" {SECRET} ") if as_secret else SECRET
    client = ApiOneClient(
        key, "http://127.0.0.1:9", transport=httpx.MockTransport(handle), sleep=Sleeps(), retry=FAST
    )
    with client:
        assert "X-API-Key" not in client._http.headers
        assert SECRET not in repr(dict(client._http.headers))
        assert client.get_job(JOB).job_id == JOB
        with pytest.raises(TransportError):
            client.get_job("job_down")
    assert len(seen) == 1 + FAST.max_attempts  # the connect error was retried
    assert all(sent == SECRET for _, sent in seen)
    assert all(request.headers.get("X-API-Key") is None for request, _ in seen)


def test_given_key_when_async_requests_are_sent_then_header_only_while_sending() -> None:
    seen: list[tuple[httpx.Request, str | None]] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        seen.append((request, request.headers.get("X-API-Key")))
        if request.url.path.endswith("/job_down"):
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=job_body())

    async def no_sleep(seconds: float) -> None:
        pass

    async def scenario() -> None:
        async with AsyncApiOneClient(
            Secret(SECRET),
            "http://127.0.0.1:9",
            transport=httpx.MockTransport(handle),
            sleep=no_sleep,
        ) as client:
            assert "X-API-Key" not in client._http.headers
            await client.get_job(JOB)
            with pytest.raises(TransportError):
                await client.get_job("job_down")

    asyncio.run(scenario())
    assert len(seen) > 2 and all(sent == SECRET for _, sent in seen)
    assert all(request.headers.get("X-API-Key") is None for request, _ in seen)


def test_given_unknown_type_or_no_records_when_submitting_then_bad_request() -> None:
    client = client_for(closed_port_url())
    with client, pytest.raises(BadRequestError, match="enrichment type"):
        client.submit_job("phone", RECORDS)
        with pytest.raises(BadRequestError, match="non-empty"):
            client.submit_job("company", [])


# --- error mapping ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reply", "error"),
    [
        ("/async/status/" + JOB, err(400, "invalid_request"), BadRequestError),
        ("/async/status/" + JOB, err(401, "invalid_api_key"), AuthenticationError),
        ("/async/status/" + JOB, err(402, "insufficient_credits"), InsufficientCreditsError),
        ("/async/status/" + JOB, err(404, "job_not_found"), JobNotFoundError),
        ("/async/results/" + JOB, err(409, "job_not_completed"), NotReadyError),
        ("/async/results/" + JOB, err(410, "results_expired"), ResultsExpiredError),
        ("/async/status/" + JOB, Reply(418, "<html>teapot</html>"), BadRequestError),
    ],
)
def test_given_client_error_when_reading_then_mapped_and_not_retried(
    scripted: Callable[..., ScriptedServer], path: str, reply: Reply, error: type[ApiOneError]
) -> None:
    server = scripted({path: [reply]})
    sleeps = Sleeps()
    with client_for(server.base_url, sleeps) as client, pytest.raises(error) as info:
        if "results" in path:
            client.get_results(JOB)
        else:
            client.get_job(JOB)
    assert server.count(path) == 1 and sleeps == []
    assert info.value.status_code == reply.status
    assert info.value.job_id == JOB


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (err(400, "invalid_request", "records must be an array"), BadRequestError),
        (err(401, "invalid_api_key"), AuthenticationError),
        (err(402, "insufficient_credits"), InsufficientCreditsError),
        (err(413, "too_many_records", limit=50), ShrinkBatchError),
        (err(429, "concurrent_job_limit", limit=5, retry_after=7), WaitForCapacityError),
    ],
)
def test_given_refusal_when_submitting_then_mapped_and_raised_at_once(
    scripted: Callable[..., ScriptedServer], reply: Reply, error: type[ApiOneError]
) -> None:
    server = scripted({"/async/enrich": [reply]})
    sleeps = Sleeps()
    with client_for(server.base_url, sleeps) as client, pytest.raises(error) as info:
        client.submit_job("company", RECORDS)
    assert server.count("/async/enrich") == 1 and sleeps == []
    if isinstance(info.value, ShrinkBatchError):
        assert info.value.limit == 50
    if isinstance(info.value, WaitForCapacityError):
        assert (info.value.retry_after, info.value.limit) == (7.0, 5)


def test_given_401_then_message_says_how_to_set_the_key(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted({"/async/status/" + JOB: [err(401, "invalid_api_key")]})
    with client_for(server.base_url) as client, pytest.raises(AuthenticationError) as info:
        client.get_job(JOB)
    assert str(info.value) == AUTH_MESSAGE


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (err(429, "rate_limited", retry_after=1), RateLimitedError),
        (err(500, "internal_error"), ServerError),
        (err(503, "service_unavailable", retry_after=2), ServerError),
        (Reply(502, "<html>bad gateway</html>"), ServerError),
    ],
)
def test_given_transient_error_when_reading_then_retried_until_success(
    scripted: Callable[..., ScriptedServer], reply: Reply, error: type[ApiOneError]
) -> None:
    path = "/async/status/" + JOB
    server = scripted({path: [reply, reply, ok(**job_body())]})
    sleeps = Sleeps()
    with client_for(server.base_url, sleeps) as client:
        job = client.get_job(JOB)
    assert job.status is JobStatus.COMPLETED
    assert server.count(path) == 3 and len(sleeps) == 2


def test_given_retry_after_then_each_wait_honours_it(
    scripted: Callable[..., ScriptedServer],
) -> None:
    path = "/async/results/" + JOB
    script = [
        err(503, "service_unavailable", retry_after=3),
        err(429, "rate_limited", retry_after=2),
        Reply(200, results_body()),
    ]
    server = scripted({path: script})
    sleeps = Sleeps()
    with client_for(server.base_url, sleeps) as client:
        assert len(client.get_results(JOB).results) == 2
    assert len(sleeps) == 2
    assert 3.0 <= sleeps[0] <= FAST.max_delay and 2.0 <= sleeps[1] <= FAST.max_delay


def test_given_persistent_500_then_attempts_bounded_and_last_error_raised(
    scripted: Callable[..., ScriptedServer],
) -> None:
    path = "/async/status/" + JOB
    server = scripted({path: [err(500, "internal_error", "boom")]})
    sleeps = Sleeps()
    with client_for(server.base_url, sleeps) as client, pytest.raises(ServerError, match="boom"):
        client.get_job(JOB)
    assert server.count(path) == FAST.max_attempts and len(sleeps) == FAST.max_attempts - 1
    assert all(0 <= s <= FAST.max_delay for s in sleeps)


def test_given_long_retry_after_then_total_wait_bounded(
    scripted: Callable[..., ScriptedServer],
) -> None:
    path = "/async/status/" + JOB
    server = scripted({path: [err(503, "service_unavailable", retry_after=2)]})
    policy = RetryPolicy(max_attempts=10, base_delay=0.1, max_delay=10.0, max_total_seconds=5.0)
    sleeps = Sleeps()
    client = client_for(server.base_url, sleeps, retry=policy)
    with client, pytest.raises(ServerError) as info:
        client.get_job(JOB)
    assert sleeps == [2.0, 2.0] and server.count(path) == 3
    assert info.value.retry_after == 2.0


def test_given_read_timeout_on_a_read_then_retried_and_succeeds(
    scripted: Callable[..., ScriptedServer],
) -> None:
    path = "/async/status/" + JOB
    server = scripted({path: [Reply(200, job_body(), delay=1.0), ok(**job_body())]})
    sleeps = Sleeps()
    with client_for(server.base_url, sleeps, read_timeout=0.2) as client:
        assert client.get_job(JOB).job_id == JOB
    assert server.count(path) == 2 and len(sleeps) == 1


def test_given_read_timeouts_on_a_read_then_transport_error(
    scripted: Callable[..., ScriptedServer],
) -> None:
    path = "/async/status/" + JOB
    server = scripted({path: [Reply(200, job_body(), delay=0.5)]})
    policy = RetryPolicy(max_attempts=2, base_delay=0.1)
    client = client_for(server.base_url, read_timeout=0.1, retry=policy)
    with client, pytest.raises(TransportError, match="ReadTimeout"):
        client.get_job(JOB)
    assert server.count(path) == 2


# --- submit: never retried once it may have created a job ---------------------------------


def test_given_read_timeout_on_submit_then_outcome_unknown_and_not_retried(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted({"/async/enrich": [Reply(200, SUBMITTED.body, delay=1.0)]})
    sleeps = Sleeps()
    client = client_for(server.base_url, sleeps, read_timeout=0.2)
    with client, pytest.raises(SubmitOutcomeUnknownError) as info:
        client.submit_job("company", RECORDS)
    assert server.count("/async/enrich") == 1 and sleeps == []
    assert info.value.records == RECORDS and info.value.enrichment_type == "company"
    assert "may have been created and billed" in str(info.value)


@pytest.mark.parametrize(
    "reply",
    [
        err(500, "internal_error"),
        err(503, "service_unavailable", retry_after=1),
        Reply(200, "{not json"),
        Reply(200, {"status": "success", "total_records": 2}),  # no job_id
    ],
)
def test_given_5xx_or_broken_answer_on_submit_then_outcome_unknown(
    scripted: Callable[..., ScriptedServer], reply: Reply
) -> None:
    server = scripted({"/async/enrich": [reply]})
    sleeps = Sleeps()
    client = client_for(server.base_url, sleeps)
    with client, pytest.raises(SubmitOutcomeUnknownError) as info:
        client.submit_job("company", RECORDS, webhook_url="https://example.test/hook")
    assert server.count("/async/enrich") == 1 and sleeps == []
    assert info.value.records == RECORDS
    sent = json.loads(server.requests[0][3])
    assert sent == {
        "type": "company",
        "records": RECORDS,
        "webhook_url": "https://example.test/hook",
    }


def test_given_rate_limited_submit_then_retried(scripted: Callable[..., ScriptedServer]) -> None:
    server = scripted({"/async/enrich": [err(429, "rate_limited", retry_after=1), SUBMITTED]})
    sleeps = Sleeps()
    with client_for(server.base_url, sleeps) as client:
        answer = client.submit_job("company", RECORDS)
    assert answer.job_id == JOB and answer.total_records == 2
    assert server.count("/async/enrich") == 2 and len(sleeps) == 1 and sleeps[0] >= 1.0


def test_given_connection_refused_then_submit_retried_then_transport_error() -> None:
    sleeps = Sleeps()
    with client_for(closed_port_url(), sleeps) as client, pytest.raises(TransportError):
        client.submit_job("company", RECORDS)
    assert len(sleeps) == FAST.max_attempts - 1


def test_given_connection_refused_then_read_retried_then_transport_error() -> None:
    sleeps = Sleeps()
    with client_for(closed_port_url(), sleeps) as client, pytest.raises(TransportError) as info:
        client.get_results(JOB)
    assert len(sleeps) == FAST.max_attempts - 1 and info.value.job_id == JOB


# --- tolerant models ----------------------------------------------------------------------


def test_given_unknown_fields_then_tolerated_and_kept(
    scripted: Callable[..., ScriptedServer],
) -> None:
    body = results_body(priority="high", region="eu")
    body["results"][0]["confidence"] = 0.9
    body["results"][0]["status"] = "matched"
    body["results"][0]["data"] = {"domain": "stripe.com", "name": "Stripe", "new_field": [1]}
    server = scripted({"/async/results/" + JOB: [Reply(200, body)]})
    with client_for(server.base_url) as client:
        results = client.get_results(JOB)
    assert results.model_extra == {"priority": "high", "region": "eu"}
    assert results.results[0].model_extra == {"confidence": 0.9}
    assert results.results[0].status is RecordStatus.MATCHED
    assert results.results[0].data is not None and results.results[0].data["new_field"] == [1]


@pytest.mark.parametrize(
    ("path", "body", "missing"),
    [
        ("/async/status/" + JOB, {"job_id": JOB, "type": "company", "total_records": 2}, "status"),
        ("/async/results/" + JOB, job_body(), "results"),
    ],
)
def test_given_missing_required_field_then_error_names_field_and_job(
    scripted: Callable[..., ScriptedServer], path: str, body: dict[str, Any], missing: str
) -> None:
    server = scripted({path: [Reply(200, body)]})
    with client_for(server.base_url) as client, pytest.raises(MalformedResponseError) as info:
        if "results" in path:
            client.get_results(JOB)
        else:
            client.get_job(JOB)
    assert missing in info.value.fields
    assert missing in str(info.value) and JOB in str(info.value)
    assert server.count(path) == 1


def test_given_non_json_answer_on_a_read_then_malformed(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted({"/async/status/" + JOB: [Reply(200, "<html>oops</html>")]})
    with client_for(server.base_url) as client, pytest.raises(MalformedResponseError, match=JOB):
        client.get_job(JOB)


# --- the key never leaks ------------------------------------------------------------------


def test_given_a_distinctive_key_then_it_never_appears_in_logs_errors_or_reprs(
    scripted: Callable[..., ScriptedServer],
    sandbox_factory: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"bad key {SECRET}"  # a server that echoes the key must not leak it either
    server = scripted(
        {
            "/async/status/" + JOB: [
                err(503, "service_unavailable", retry_after=1),
                err(429, "rate_limited", echo),
                err(401, "invalid_api_key", echo),
            ],
            "/async/results/" + JOB: [err(409, "job_not_completed", echo)],
            "/async/enrich": [Reply(200, SUBMITTED.body, delay=0.5)],
            "/async/status/job_malformed": [Reply(200, {"echo": SECRET})],
        }
    )
    seen: list[str] = []
    calls: list[Callable[[ApiOneClient], Any]] = [
        lambda c: c.get_job(JOB),
        lambda c: c.get_results(JOB),
        lambda c: c.submit_job("company", RECORDS),
        lambda c: c.get_job("job_malformed"),
        lambda c: c.get_job(SECRET),  # a key passed as a job id by mistake
    ]
    with client_for(server.base_url, read_timeout=0.1) as client:
        seen.append(repr(client))
        for call in calls:
            with pytest.raises(ApiOneError) as info:
                call(client)
            seen += [str(info.value), repr(info.value), *map(str, info.value.args)]
    with client_for(closed_port_url()) as client, pytest.raises(TransportError) as refused:
        client.submit_job("company", RECORDS)
    seen += [str(refused.value), repr(refused.value)]
    sandbox = sandbox_factory(api_key=SECRET)
    with client_for(sandbox.base_url) as client:
        job_id = client.submit_job("company", RECORDS).job_id
        seen += [repr(client.get_job(job_id))]
    other = sandbox_factory(api_key="sk_test_other")
    with client_for(other.base_url) as client, pytest.raises(AuthenticationError) as rejected:
        client.get_job(job_id)
    seen += [str(rejected.value), repr(rejected.value)]

    assert all(r[2].get("X-API-Key") == SECRET for r in server.requests)  # it was sent
    assert caplog.records, "expected DEBUG/WARNING log lines"
    logged = [caplog.text, *(r.getMessage() for r in caplog.records)]
    for text in seen + logged:
        assert SECRET not in text
        assert "SECRET123" not in text
    assert any(
        r.levelno == logging.WARNING and r.name == "apione_source.client" for r in caplog.records
    )
    assert any(
        r.levelno == logging.DEBUG and r.name == "apione_source.client" for r in caplog.records
    )


# --- against the sandbox ------------------------------------------------------------------


def test_sync_round_trip_submit_status_results(sandbox_factory: Callable[..., Any]) -> None:
    sandbox = sandbox_factory(api_key=SECRET)
    records = [{"domain": f"company{i}.com"} for i in range(5)]
    with client_for(sandbox.base_url) as client:
        submitted = client.submit_job("company", records)
        assert submitted.total_records == 5
        for _ in range(200):
            job = client.get_job(submitted.job_id)
            if job.status.is_terminal:
                break
            time.sleep(0.01)
        assert job.status is JobStatus.COMPLETED and job.job_id == submitted.job_id
        results = client.get_results(submitted.job_id)
    assert [r.index for r in results.results] == list(range(5))
    assert [r.input for r in results.results] == records
    usage = sandbox.usage()
    assert usage["jobs_created"] == 1 and usage["records_billed"] == 5


def test_given_expired_job_when_reading_results_then_results_expired(
    sandbox_factory: Callable[..., Any],
) -> None:
    sandbox = sandbox_factory(api_key=SECRET)
    with client_for(sandbox.base_url) as client:
        job_id = client.submit_job("email", [{"email": "a@b.com"}]).job_id
        for _ in range(200):
            if client.get_job(job_id).status.is_terminal:
                break
            time.sleep(0.01)
        sandbox.expire(job_id)
        with pytest.raises(ResultsExpiredError):
            client.get_results(job_id)
        assert client.get_job(job_id).status is JobStatus.COMPLETED


def test_concurrent_polling_of_many_jobs_with_the_async_client(
    sandbox_factory: Callable[..., Any], fake_clock: Any
) -> None:
    sandbox = sandbox_factory(
        api_key=SECRET, plan="scale", job_seconds_base=30.0, queue_seconds=1.0, clock=fake_clock
    )
    n_jobs = 50  # the scale plan's concurrent-job limit

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(0)

    async def scenario() -> None:
        async with AsyncApiOneClient(
            SECRET, sandbox.base_url, sleep=sleep, retry=FAST, max_connections=20
        ) as client:
            submitted = await asyncio.gather(
                *(client.submit_job("company", [{"domain": f"c{i}.com"}]) for i in range(n_jobs))
            )
            ids = [s.job_id for s in submitted]
            assert len(set(ids)) == n_jobs
            early = await asyncio.gather(*(client.get_job(i) for i in ids))
            assert not any(j.status.is_terminal for j in early)
            with pytest.raises(WaitForCapacityError):
                await client.submit_job("company", [{"domain": "one-too-many.com"}])
            fake_clock.advance(3600)
            done = await asyncio.gather(*(client.get_job(i) for i in ids))
            assert {j.status for j in done} == {JobStatus.COMPLETED}
            results = await asyncio.gather(*(client.get_results(i) for i in ids))
            assert [r.results[0].input for r in results] == [
                {"domain": f"c{i}.com"} for i in range(n_jobs)
            ]

    asyncio.run(scenario())
    usage = sandbox.usage()
    assert usage["jobs_created"] == n_jobs and usage["max_active_jobs_seen"] == n_jobs


def test_a_read_response_is_freed_at_once_not_by_the_cycle_collector(sandbox: Sandbox) -> None:
    """httpx's response and its stream refer to each other: without letting go of the
    stream, every results body of a run waited for the cyclic collector (70 MB at 100k)."""

    def responses_alive() -> int:
        return sum(isinstance(o, httpx.Response) for o in gc.get_objects())

    async def fetch_async(job_id: str) -> None:
        async with AsyncApiOneClient(sandbox.config.api_key, sandbox.base_url) as client:
            for _ in range(5):
                await client.get_results(job_id)

    with ApiOneClient(sandbox.config.api_key, sandbox.base_url) as client:
        job_id = client.submit_job("company", RECORDS).job_id
    gc.collect()
    gc.disable()
    try:
        before = responses_alive()
        with ApiOneClient(sandbox.config.api_key, sandbox.base_url) as client:
            for _ in range(5):
                client.get_results(job_id)
        asyncio.run(fetch_async(job_id))
        assert responses_alive() == before
    finally:
        gc.enable()
