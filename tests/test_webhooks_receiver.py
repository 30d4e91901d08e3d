"""The webhook receiver (``apione-dlt webhooks serve``) and runs that collect from deliveries.

Real HTTP on 127.0.0.1: the receiver is the Starlette app served by uvicorn in a thread;
the sandbox delivers its signed ``jobFinished`` webhooks to it; runs read the store.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from apione_source.deliveries import Delivery, DeliveryStore
from apione_source.receiver import PATH, create_app
from apione_source.secret import Secret
from apione_source.webhooks import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign
from tests.e2e import COMPANY, Env, billed

SECRET = "whsec_test_receiver"
JOB = "job_0123456789abcdef01234567"


class FlakyStore(DeliveryStore):
    """A store whose first ``failures`` writes fail (a full disk, a bucket outage)."""

    failures = 0

    def put(self, delivery: Delivery) -> bool:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("store unavailable")
        return super().put(delivery)


class Receiver:
    def __init__(self, store: FlakyStore, url: str) -> None:
        self.store, self.url = store, url

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{self.url}{PATH}", content=body, headers=headers, timeout=10)


@contextmanager
def serving(store: DeliveryStore, **options: Any) -> Iterator[str]:
    """The receiver over ``store``, served by uvicorn on 127.0.0.1; its root URL."""
    config = uvicorn.Config(
        create_app(store, Secret(SECRET), **options),
        host="127.0.0.1",
        port=0,
        log_level="warning",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the receiver did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    store = FlakyStore(str(tmp_path / "deliveries"))
    with serving(store) as url:
        yield Receiver(store, url)


def event_body(job_id: str = JOB, event: str = "job.completed") -> bytes:
    body = {
        "event": event,
        "job_id": job_id,
        "status": "completed" if event == "job.completed" else "failed",
        "type": "company",
        "total_records": 1,
        "results": [
            {"index": 0, "input": {"domain": "firm1.com"}, "status": "not_found", "data": None}
        ],
    }
    return json.dumps(body).encode()


def signed(body: bytes, delivery: str = "dlv_1", *, at: float | None = None) -> dict[str, str]:
    t = int(time.time() if at is None else at)
    return {
        SIGNATURE_HEADER: sign(SECRET, body, t),
        DELIVERY_HEADER: delivery,
        EVENT_HEADER: "job.completed",
        "content-type": "application/json",
    }


def stored(receiver: Receiver, job_id: str = JOB) -> list[Delivery]:
    return receiver.store.find(job_id)


def test_a_signed_delivery_is_stored_once_and_duplicates_are_acknowledged(
    receiver: Receiver,
) -> None:
    body = event_body()
    first = receiver.post(body, signed(body))
    again = receiver.post(body, signed(body))  # ApiOne repeats deliveries

    assert (first.status_code, first.json()["stored"]) == (200, True)
    assert (again.status_code, again.json()["stored"]) == (200, False)
    (kept,) = stored(receiver)
    assert (kept.delivery_id, kept.job_id, kept.body) == ("dlv_1", JOB, body)
    assert httpx.get(f"{receiver.url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("unsigned", 401),
        ("wrong secret", 401),
        ("stale", 401),
        ("body changed after signing", 401),
        ("no delivery id", 400),
        ("not json", 400),
        ("not a job body", 400),
        ("event header disagrees", 400),
        ("job id not a job id", 400),
    ],
)
def test_nothing_untrusted_or_off_contract_is_stored(
    receiver: Receiver, case: str, status: int
) -> None:
    body = event_body()
    headers = signed(body)
    if case == "unsigned":
        del headers[SIGNATURE_HEADER]
    elif case == "wrong secret":
        headers[SIGNATURE_HEADER] = sign("whsec_other", body, int(time.time()))
    elif case == "stale":
        headers = signed(body, at=time.time() - 301)  # a captured delivery, replayed late
    elif case == "body changed after signing":
        body = body.replace(b"not_found", b"matched")
    elif case == "no delivery id":
        del headers[DELIVERY_HEADER]
    elif case == "not json":
        body = b"{not json"
        headers = signed(body)
    elif case == "not a job body":
        body = b'{"event": "job.completed"}'
        headers = signed(body)
    elif case == "event header disagrees":
        headers[EVENT_HEADER] = "job.failed"
    elif case == "job id not a job id":
        body = event_body(job_id="job_../../etc")
        headers = signed(body)

    answer = receiver.post(body, headers)

    assert answer.status_code == status, answer.text
    assert SECRET not in answer.text
    assert not Path(receiver.store.root).exists() or not any(Path(receiver.store.root).rglob("*"))


def test_a_store_failure_answers_503_and_the_retry_is_stored(receiver: Receiver) -> None:
    receiver.store.failures = 1
    body = event_body()

    assert receiver.post(body, signed(body)).status_code == 503  # ApiOne retries non-2xx
    assert stored(receiver) == []
    assert receiver.post(body, signed(body)).json()["stored"] is True
    assert len(stored(receiver)) == 1


# --- runs that collect from deliveries ---------------------------------------------------


def run_with_webhooks(env: Env, receiver_url: str, store: str, **overrides: Any) -> Any:
    return env.run(
        webhook_url=f"{receiver_url}{PATH}",
        webhook_secret=SECRET,
        webhook_store=store,
        input_columns={"domain": "domain"},
        **overrides,
    )


def test_a_run_collects_delivered_jobs_without_polling_them(
    make_env: Callable[..., Env], receiver: Receiver
) -> None:
    # ApiOne's deliveries as the contract has them: at least once (each accepted one sent
    # twice more, same id), out of order (random waits), retried on non-2xx
    env = make_env(
        job_seconds_base=0.5,
        webhook_secret=SECRET,
        webhook_retry_base_seconds=0.05,
        webhook_repeats=2,
        webhook_jitter_seconds=0.3,
        seed=3,
    )
    env.insert_companies([(i, f"firm{i}.com") for i in range(50)])
    receiver.store.failures = 2  # two deliveries are retried by the sandbox

    run_with_webhooks(env, receiver.url, receiver.store.root, records_per_job=10)

    usage = env.sandbox.usage()
    assert billed(env.sandbox) == (5, 50)
    assert usage["status_calls"] == 0 and usage["results_calls"] == 0
    jobs = [r[0] for r in env.query(f"SELECT job_id FROM enriched.{COMPANY.jobs}")]
    assert [len(stored(receiver, job)) for job in jobs] == [1] * 5  # repeats stored once
    assert env.count(COMPANY.outcomes) == 50
    assert {r[0] for r in env.query(f"SELECT status FROM enriched.{COMPANY.jobs}")} == {"completed"}


def test_without_deliveries_the_run_falls_back_to_polling(
    make_env: Callable[..., Env], tmp_path: Path
) -> None:
    env = make_env(job_seconds_base=0.2, webhook_secret=SECRET)
    env.insert_companies([(i, f"firm{i}.com") for i in range(10)])
    dead = "http://127.0.0.1:9"  # the receiver is down: every delivery is lost

    run_with_webhooks(env, dead, str(tmp_path / "empty"))

    assert env.count(COMPANY.outcomes) == 10
    assert env.sandbox.usage()["status_calls"] >= 1
    assert billed(env.sandbox) == (1, 10)


def test_a_stored_delivery_not_signed_with_the_runs_secret_is_never_trusted(
    make_env: Callable[..., Env], receiver: Receiver
) -> None:
    # the store holds genuine-looking deliveries, signed with another secret (a store
    # shared with, or written by, someone else): the run polls instead
    env = make_env(job_seconds_base=0.2, webhook_secret=SECRET)
    env.insert_companies([(i, f"firm{i}.com") for i in range(10)])

    env.run(
        webhook_url=f"{receiver.url}{PATH}",
        webhook_secret="whsec_not_the_receivers",
        webhook_store=receiver.store.root,
        input_columns={"domain": "domain"},
    )

    (job,) = [r[0] for r in env.query(f"SELECT job_id FROM enriched.{COMPANY.jobs}")]
    assert len(stored(receiver, job)) == 1  # delivered and stored, but not trusted
    usage = env.sandbox.usage()
    assert usage["status_calls"] >= 1 and usage["results_calls"] == 1
    assert env.count(COMPANY.outcomes) == 10


def test_the_health_check_fails_when_the_store_cannot_be_written(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store should be")
    with serving(DeliveryStore(str(blocked))) as url:
        answer = httpx.get(f"{url}/health")
    assert answer.status_code == 503 and str(blocked) not in answer.text


@pytest.mark.parametrize("trouble", ["odd job ids", "unreadable store"])
def test_store_trouble_never_ends_the_run_it_polls_instead(
    make_env: Callable[..., Env], tmp_path: Path, trouble: str
) -> None:
    odd = trouble == "odd job ids"  # ids outside the contract's pattern, as some APIs send
    env = make_env(
        job_seconds_base=0.2, webhook_secret=SECRET, job_id_style="odd" if odd else "default"
    )
    env.insert_companies([(i, f"firm{i}.com") for i in range(10)])
    store = tmp_path / "store"
    if not odd:
        store.write_text("a file where the store should be: every read fails")

    run_with_webhooks(env, "http://127.0.0.1:9", str(store))

    assert env.count(COMPANY.outcomes) == 10
    assert billed(env.sandbox) == (1, 10)
    assert env.sandbox.usage()["results_calls"] == 1


def test_completed_wins_over_failed_and_results_must_line_up(tmp_path: Path) -> None:
    from apione_source.deliveries import DeliveryInbox

    store = DeliveryStore(str(tmp_path / "deliveries"))
    inbox = DeliveryInbox(store, Secret(SECRET))

    def put(delivery_id: str, body: bytes) -> None:
        t = int(time.time())
        store.put(Delivery(delivery_id, JOB, "x", sign(SECRET, body, t), body, t))

    failed = event_body(event="job.failed").replace(
        b'"results": [{', b'"error": {"code": "x", "message": "m"}, "results": [{'
    )
    put("dlv_a", failed)
    assert inbox.event(JOB) is not None and inbox.event(JOB).event == "job.failed"  # type: ignore[union-attr]
    put("dlv_b", event_body())
    for _ in range(5):  # whatever order the store lists them in
        assert inbox.event(JOB).event == "job.completed"  # type: ignore[union-attr]
    assert inbox.event("job_../../x") is None


def test_a_delivery_whose_results_do_not_line_up_is_not_used(
    make_env: Callable[..., Env], receiver: Receiver
) -> None:
    # every job's results (and webhook) lack their last record: polling fetches them
    env = make_env(job_seconds_base=0.2, webhook_secret=SECRET, short_results_rate=1.0)
    env.insert_companies([(i, f"firm{i}.com") for i in range(10)])

    run_with_webhooks(env, receiver.url, receiver.store.root)

    (job,) = [r[0] for r in env.query(f"SELECT job_id FROM enriched.{COMPANY.jobs}")]
    assert len(stored(receiver, job)) == 1  # delivered, but short
    assert env.sandbox.usage()["results_calls"] >= 1
    assert billed(env.sandbox) == (1, 10)


def test_a_new_store_folder_is_healthy(tmp_path: Path) -> None:
    with serving(DeliveryStore(str(tmp_path / "new" / "deliveries"))) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_a_body_over_the_cap_is_refused_declared_or_streamed(tmp_path: Path) -> None:
    store = DeliveryStore(str(tmp_path / "deliveries"))
    body = event_body()
    with serving(store, max_body_bytes=len(body) - 1) as url:
        declared = httpx.post(f"{url}{PATH}", content=body, headers=signed(body))

        def chunks() -> Iterator[bytes]:  # no Content-Length: read until the cap
            yield body[:100]
            yield body[100:]

        streamed = httpx.post(f"{url}{PATH}", content=chunks(), headers=signed(body))
    assert (declared.status_code, streamed.status_code) == (413, 413)
    assert store.find(JOB) == []
    with serving(store, max_body_bytes=len(body)) as url:
        assert httpx.post(f"{url}{PATH}", content=body, headers=signed(body)).status_code == 200
