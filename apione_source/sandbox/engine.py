"""The sandbox's model of ApiOne: jobs, their lifecycle, plan limits, faults and usage.

The engine knows nothing about sockets: each API call is a method taking the API key
and the raw request data and returning a :class:`Reply` (status, JSON body, headers),
so it can be tested and reasoned about without HTTP. Time comes only from the injected
``clock``; a job's state is *computed* from its timestamps rather than advanced by a
worker, which makes a fake clock drive the whole lifecycle without any sleeping.
One lock guards all mutable state; building large results bodies happens outside it.
"""

from __future__ import annotations

import heapq
import hmac
import json
import math
import random
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from apione_source.models import EnrichmentType, JobStatus, RecordStatus
from apione_source.sandbox import data
from apione_source.settings import Plan

_TYPES = frozenset(t.value for t in EnrichmentType)
_FAULTS = (
    (500, "internal_error", "an internal error occurred; retry with backoff"),
    (503, "service_unavailable", "the service is temporarily unavailable; retry later"),
    (429, "rate_limited", "too many requests; retry after the Retry-After delay"),
)
_REJECT_KEYS = ("400", "401", "413", "429", "transient")
JOB_ID_STYLES = ("default", "odd")
UNKNOWN_STATUS = "paused"  # the status value answered by ``unknown_status_rate`` jobs
MAX_BODY_DEPTH = 64  # deeper JSON is refused: records are flat, and results echo them
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class SandboxConfig:
    """Every knob of the sandbox (see :class:`~apione_source.sandbox.Sandbox`)."""

    plan: Plan
    api_key: str = field(repr=False)  # never shown: configs end up in logs
    job_seconds_base: float = 0.0
    job_seconds_per_record: float = 0.0
    queue_seconds: float = 0.0
    time_scale: float = 1.0
    estimate_factor: float = 1.0
    failure_rate: float = 0.0
    transient_error_rate: float = 0.0
    retry_after_seconds: int = 1
    latency_seconds: float = 0.0
    retention_seconds: float | None = None
    record_error_rate: float = 0.0
    short_results_rate: float = 0.0
    bad_index_rate: float = 0.0
    wrong_echo_rate: float = 0.0
    status_404_first_rate: float = 0.0
    unknown_status_rate: float = 0.0
    unknown_status_calls: int = 2
    job_id_style: str = "default"
    submit_answer_delay_seconds: float = 0.0
    request_timeout_seconds: float | None = 30.0
    seed: int = 0

    @property
    def retention(self) -> float:
        """Seconds results are kept after completion."""
        if self.retention_seconds is not None:
            return self.retention_seconds
        return float(self.plan.retention_seconds)


@dataclass(frozen=True)
class Reply:
    """One HTTP answer: status code, JSON body bytes and extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    billed: bool = False  # a submit that created (and billed) a job, whatever the answer


@dataclass(frozen=True)
class WebhookDue:
    """A finished job whose webhook must now be delivered."""

    job_id: str
    url: str
    event: str
    body: bytes


@dataclass
class _Job:
    job_id: str
    type: str
    records: list[dict[str, Any]]
    keys: list[str]  # canonical JSON of each record, computed once at submit
    webhook_url: str | None
    salt: str  # seed + sequence number: drives per-job randomness reproducibly
    generation: int
    created_at: float
    started_at: float
    finished_at: float
    failed: bool
    processed_at_failure: int
    expires_at: float | None
    expired: bool = False
    # Contract drift drawn at submit from ``salt`` (see the ``*_rate`` knobs).
    status_404_first: bool = False
    unknown_status: bool = False
    status_calls: int = 0  # authorized, unfaulted status calls naming this job
    results_body: bytes | None = None
    # The results list, encoded while the job runs (see Engine.take_results_to_prepare).
    results_json: bytes | None = None
    results_lock: threading.Lock = field(default_factory=threading.Lock)

    def status(self, now: float) -> JobStatus:
        if now < self.started_at:
            return JobStatus.QUEUED
        if now < self.finished_at:
            return JobStatus.PROCESSING
        return JobStatus.FAILED if self.failed else JobStatus.COMPLETED

    def processed(self, now: float) -> int:
        status = self.status(now)
        n = len(self.records)
        if status is JobStatus.QUEUED:
            return 0
        if status is JobStatus.COMPLETED:
            return n
        if status is JobStatus.FAILED:
            return self.processed_at_failure
        full = self.finished_at - self.started_at
        if self.failed:
            # A failing job stops at processed_at_failure; scale progress to that point.
            return int(self.processed_at_failure * (now - self.started_at) / full)
        return min(n - 1, int(n * (now - self.started_at) / full))


def iso(ts: float) -> str:
    """Format unix seconds as ISO-8601 UTC with milliseconds and a ``Z`` suffix.

    Args:
        ts: Unix seconds.

    Returns:
        E.g. ``2024-05-01T12:00:00.000Z``.
    """
    text = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def error_reply(
    status: int,
    code: str,
    message: str,
    *,
    limit: int | None = None,
    retry_after: int | None = None,
) -> Reply:
    """Build an error answer in the contract's ``{"status":"error","error":{..}}`` shape.

    Args:
        status: HTTP status.
        code: ``error.code``.
        message: ``error.message``.
        limit: ``error.limit``, for too_many_records and concurrent_job_limit.
        retry_after: Seconds for the ``Retry-After`` header.

    Returns:
        The reply.
    """
    detail: dict[str, Any] = {"code": code, "message": message}
    if limit is not None:
        detail["limit"] = limit
    headers = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
    return Reply(status, _json({"status": "error", "error": detail}), headers)


class Engine:
    """ApiOne's behaviour, driven by an injected clock; thread-safe.

    Args:
        config: The sandbox knobs.
        clock: Returns the current unix time in seconds.
    """

    def __init__(self, config: SandboxConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        # Faults are drawn from one seeded stream: the same request sequence sees the
        # same faults, which makes chaos runs reproducible.
        self._rng = random.Random(config.seed)
        self._jobs: dict[str, _Job] = {}
        self._active: list[_Job] = []
        self._webhooks_pending: list[_Job] = []
        self._seq = 0
        self._generation = 0
        self._last_now = float("-inf")
        self.webhook_signal = threading.Event()
        # Jobs whose results are built ahead, by when (engine clock), in order.
        self._to_prepare: list[tuple[float, int, _Job]] = []
        self.prepare_signal = threading.Event()
        self._reset_counters()

    # --- time and bookkeeping ----------------------------------------------------------

    def now(self) -> float:
        """Current time, never going backwards (a terminal state must never change)."""
        with self._lock:
            return self._now_locked()

    def _now_locked(self) -> float:
        self._last_now = max(self._last_now, self._clock())
        return self._last_now

    def _reset_counters(self) -> None:
        self._jobs_created = 0
        self._records_billed = 0
        self._billed: dict[str, int] = {}
        self._status_calls = 0
        self._results_calls = 0
        self._submit_calls = 0
        self._rejected = dict.fromkeys(_REJECT_KEYS, 0)
        self._max_active = 0
        self._max_records = 0
        self._lost_answers = 0

    def _draw_fault(self) -> tuple[int, str, str] | None:
        rate = self.config.transient_error_rate
        if rate <= 0 or self._rng.random() >= rate:
            return None
        return _FAULTS[self._rng.randrange(len(_FAULTS))]

    def _fault_reply(self, fault: tuple[int, str, str]) -> Reply:
        status, code, message = fault
        retry_after = self.config.retry_after_seconds if status != 500 else None
        return error_reply(status, code, message, retry_after=retry_after)

    def _authorized(self, api_key: str | None) -> bool:
        if api_key is None:
            return False
        return hmac.compare_digest(api_key.encode("utf-8"), self.config.api_key.encode("utf-8"))

    @staticmethod
    def _unauthorized() -> Reply:
        # The message never echoes the key that was sent.
        return error_reply(401, "invalid_api_key", "missing or invalid X-API-Key header")

    # --- submit ------------------------------------------------------------------------

    def submit(self, api_key: str | None, raw_body: bytes) -> Reply:
        """Handle ``POST /async/enrich``.

        A transient fault never creates a job, except that half of the injected 500s
        happen *after* a successful submit: the job exists (and is billed) but the
        answer is lost, which is what a client sees after a read timeout. The reply's
        ``billed`` tells the HTTP layer a job was created (it then applies
        ``submit_answer_delay_seconds``).

        Args:
            api_key: The ``X-API-Key`` header, or None.
            raw_body: The request body.

        Returns:
            The reply.
        """
        with self._lock:
            self._submit_calls += 1
            fault = self._draw_fault()
            lose_answer = fault is not None and fault[0] == 500 and self._rng.random() < 0.5
            if fault is not None and not lose_answer:
                self._rejected["transient"] += 1
                return self._fault_reply(fault)
        reply = self._submit(api_key, raw_body)
        if fault is not None and reply.status == 200:
            with self._lock:
                self._lost_answers += 1
            return replace(self._fault_reply(fault), billed=True)
        # A submit rejected on its merits gets its real answer: only successes get lost.
        return reply

    def _reject(self, key: str, reply: Reply) -> Reply:
        with self._lock:
            self._rejected[key] += 1
        return reply

    def _submit(self, api_key: str | None, raw_body: bytes) -> Reply:
        if not self._authorized(api_key):
            return self._reject("401", self._unauthorized())
        parsed = _parse_submit(raw_body, self.config.plan)
        if isinstance(parsed, Reply):
            return self._reject(str(parsed.status), parsed)
        enrichment_type, records, webhook_url = parsed
        keys = [data.canonical_json(r) for r in records]
        cfg = self.config
        with self._lock:
            now = self._now_locked()
            self._active = [j for j in self._active if j.finished_at > now]
            limit = cfg.plan.concurrent_jobs
            if len(self._active) >= limit:
                wait = min(j.finished_at for j in self._active) - now
                self._rejected["429"] += 1
                return error_reply(
                    429,
                    "concurrent_job_limit",
                    f"the {cfg.plan.name} plan allows {limit} queued or processing job(s)",
                    limit=limit,
                    retry_after=max(1, math.ceil(wait)),
                )
            self._seq += 1
            job = self._new_job(enrichment_type, records, keys, webhook_url, now)
            self._jobs[job.job_id] = job
            self._active.append(job)
            if not job.failed and job.finished_at > job.started_at:
                # halfway through its work: ready when it completes, as ApiOne's are
                # (an instant job's are built when asked for, as before: no time to win)
                half = job.started_at + (job.finished_at - job.started_at) / 2
                heapq.heappush(self._to_prepare, (half, self._seq, job))
                self.prepare_signal.set()
            if webhook_url is not None:
                self._webhooks_pending.append(job)
                self.webhook_signal.set()
            self._jobs_created += 1
            self._records_billed += len(records)
            for key in keys:
                self._billed[key] = self._billed.get(key, 0) + 1
            self._max_active = max(self._max_active, len(self._active))
            self._max_records = max(self._max_records, len(records))
        # The job's true duration (its ``finished_at`` minus its ``created_at`` when it
        # does not fail), times ``estimate_factor``: 1 is an honest estimate, 1/3 one
        # that is 3x too low. Rounded up, as an integer must be.
        queue = cfg.queue_seconds * cfg.time_scale
        work = (cfg.job_seconds_base + cfg.job_seconds_per_record * len(records)) * cfg.time_scale
        estimate = math.ceil(round((queue + work) * cfg.estimate_factor, 9))
        return Reply(
            200,
            _json(
                {
                    "status": "success",
                    "job_id": job.job_id,
                    "estimated_completion_seconds": estimate,
                    "total_records": len(records),
                }
            ),
            billed=True,
        )

    def _new_job(
        self,
        enrichment_type: str,
        records: list[dict[str, Any]],
        keys: list[str],
        webhook_url: str | None,
        now: float,
    ) -> _Job:
        cfg = self.config
        salt = f"{cfg.seed}:{self._seq}"
        started = now + cfg.queue_seconds * cfg.time_scale
        work = (cfg.job_seconds_base + cfg.job_seconds_per_record * len(records)) * cfg.time_scale
        failed = data.unit_hash("job_failed", salt) < cfg.failure_rate
        # A failing job gives up somewhere between 10% and 90% of its work.
        fraction = 0.1 + 0.8 * data.unit_hash("fail_at", salt) if failed else 1.0
        finished = started + work * fraction
        # Ids are random so they stay unique across sandbox restarts; everything that
        # must be reproducible hashes ``salt`` instead.
        return _Job(
            job_id=_new_job_id(cfg.job_id_style),
            type=enrichment_type,
            records=records,
            keys=keys,
            webhook_url=webhook_url,
            salt=salt,
            generation=self._generation,
            created_at=now,
            started_at=started,
            finished_at=finished,
            failed=failed,
            processed_at_failure=int(len(records) * fraction) if failed else 0,
            expires_at=None if failed else finished + cfg.retention,
            status_404_first=_drawn(cfg.status_404_first_rate, "status_404_first", salt),
            unknown_status=_drawn(cfg.unknown_status_rate, "unknown_status", salt),
        )

    # --- status and results ------------------------------------------------------------

    def _lookup(self, job_id: str) -> _Job | Reply:
        # Any string may name a job (``job_id_style="odd"``); unknown ones are 404.
        job = self._jobs.get(job_id)
        if job is None:
            return _job_not_found(job_id)
        return job

    @staticmethod
    def _job_view(job: _Job, now: float) -> dict[str, Any]:
        status = job.status(now)
        terminal = status.is_terminal
        return {
            "job_id": job.job_id,
            "status": status.value,
            "type": job.type,
            "total_records": len(job.records),
            "processed_records": job.processed(now),
            "created_at": iso(job.created_at),
            "started_at": None if status is JobStatus.QUEUED else iso(job.started_at),
            "completed_at": iso(job.finished_at) if terminal else None,
            "expires_at": iso(job.expires_at) if terminal and job.expires_at is not None else None,
            "error": _JOB_FAILED_ERROR if status is JobStatus.FAILED else None,
        }

    def status(self, api_key: str | None, job_id: str) -> Reply:
        """Handle ``GET /async/status/{job_id}``.

        Contract drift: a job drawn by ``status_404_first_rate`` answers its first
        status call 404 ``job_not_found``; a job drawn by ``unknown_status_rate``
        answers ``"status": "paused"`` (every other field true) on its first
        ``unknown_status_calls`` status answers that are not that 404. Only calls that
        reach the job count: transient faults and 401s do not.

        Args:
            api_key: The ``X-API-Key`` header, or None.
            job_id: The path parameter, decoded (unknown ids are 404).

        Returns:
            The reply; the body is the Job object.
        """
        with self._lock:
            self._status_calls += 1
            fault = self._draw_fault()
            if fault is not None:
                return self._fault_reply(fault)
            if not self._authorized(api_key):
                return self._unauthorized()
            found = self._lookup(job_id)
            if isinstance(found, Reply):
                return found
            job = found
            job.status_calls += 1
            if job.status_404_first and job.status_calls == 1:
                return _job_not_found(job_id)  # a replica that has not seen the job yet
            view = self._job_view(job, self._now_locked())
            answered = job.status_calls - (1 if job.status_404_first else 0)
            if job.unknown_status and answered <= self.config.unknown_status_calls:
                view["status"] = UNKNOWN_STATUS
            return Reply(200, _json(view))

    def results(self, api_key: str | None, job_id: str) -> Reply:
        """Handle ``GET /async/results/{job_id}``.

        A *failed* job is answered 200 with the Job body, ``results: []`` and its
        ``error`` (the same shape as its ``job.failed`` webhook) rather than 409: the
        job is finished, so "not completed yet" would make a client poll forever.

        Args:
            api_key: The ``X-API-Key`` header, or None.
            job_id: The path parameter.

        Returns:
            The reply: 200 JobResults, 404, 409 job_not_completed or 410 results_expired.
        """
        with self._lock:
            self._results_calls += 1
            fault = self._draw_fault()
            if fault is not None:
                return self._fault_reply(fault)
            if not self._authorized(api_key):
                return self._unauthorized()
            found = self._lookup(job_id)
            if isinstance(found, Reply):
                return found
            job, now = found, self._now_locked()
            status = job.status(now)
            if status is JobStatus.FAILED:
                return Reply(200, _json({**self._job_view(job, now), "results": []}))
            if status is not JobStatus.COMPLETED:
                return error_reply(
                    409, "job_not_completed", f"job {job_id} is {status.value}; poll its status"
                )
            if self._is_expired(job, now):
                job.results_body = job.results_json = None  # deleted, as in the real service
                return error_reply(
                    410, "results_expired", f"results of job {job_id} passed their retention"
                )
        return Reply(200, self._results_body(job, now))

    @staticmethod
    def _is_expired(job: _Job, now: float) -> bool:
        return job.expired or (job.expires_at is not None and now >= job.expires_at)

    def _results_body(self, job: _Job, now: float) -> bytes:
        # Built once per job, outside the engine lock (1,000 records take a few ms), and
        # reused by every later call and by the webhook: the body of a finished job
        # never changes. The results list was usually encoded while the job ran.
        with job.results_lock:
            if job.results_body is None:
                results = job.results_json or _json(self._build_results(job))
                view = _json(self._job_view(job, now))  # an object: "{...}"
                job.results_body = view[:-1] + b',"results":' + results + b"}"
                job.results_json = None
            return job.results_body

    def take_results_to_prepare(self) -> tuple[list[_Job], float | None]:
        """Jobs whose results are due to be built now, and when the next one is.

        Returns:
            The jobs, and the engine-clock time of the next one (None: none left).
        """
        with self._lock:
            now, due = self._now_locked(), []
            while self._to_prepare and self._to_prepare[0][0] <= now:
                due.append(heapq.heappop(self._to_prepare)[2])
            return due, self._to_prepare[0][0] if self._to_prepare else None

    def prepare_results(self, job: _Job) -> None:
        """Encode ``job``'s results list ahead of its first results call."""
        with job.results_lock:
            if job.results_body is None and job.results_json is None and not job.expired:
                job.results_json = _json(self._build_results(job))

    def _build_results(self, job: _Job) -> list[dict[str, Any]]:
        return self._drift(job, self._true_results(job))

    def _drift(self, job: _Job, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Apply the results drift knobs drawn for this job (none by default).

        In this order: ``short_results_rate`` drops the last result;
        ``wrong_echo_rate`` replaces one result's ``input``; ``bad_index_rate`` gives
        one result a wrong ``index``. Which result and which variant are hashed from
        the job's salt, so the same seed gives the same drift.
        """
        cfg, salt, n = self.config, job.salt, len(job.records)
        if _drawn(cfg.short_results_rate, "short_results", salt):
            out = out[:-1]
        if out and _drawn(cfg.wrong_echo_rate, "wrong_echo", salt):
            at = int(data.unit_hash("wrong_echo_at", salt) * len(out))
            out[at]["input"] = _wrong_echo(job.records, at)
        if out and _drawn(cfg.bad_index_rate, "bad_index", salt):
            at = int(data.unit_hash("bad_index_at", salt) * len(out))
            if len(out) > 1 and data.unit_hash("bad_index_kind", salt) < 0.5:
                out[at]["index"] = out[(at + 1) % len(out)]["index"]  # a duplicate
            else:
                out[at]["index"] = n  # one past the last: out of range
        return out

    def _true_results(self, job: _Job) -> list[dict[str, Any]]:
        build = data.PAYLOAD_BUILDERS[job.type]
        error_rate = self.config.record_error_rate
        out: list[dict[str, Any]] = []
        for index, (record, key) in enumerate(zip(job.records, job.keys, strict=True)):
            result: dict[str, Any] = {"index": index, "input": record}
            reason = data.invalid_reason(job.type, record)
            if reason is not None:
                result["status"] = RecordStatus.INVALID.value
                result["data"] = None
                result["error"] = {"code": "invalid_input", "message": reason}
            elif data.is_not_found(key):
                result["status"] = RecordStatus.NOT_FOUND.value
                result["data"] = None
                result["error"] = None
            elif error_rate > 0 and data.unit_hash("record_error", job.salt, key) < error_rate:
                # Hashed with the job's salt, so the same record submitted again in a new
                # job can succeed.
                result["status"] = RecordStatus.ERROR.value
                result["data"] = None
                result["error"] = {
                    "code": "enrichment_error",
                    "message": "enrichment failed for this record; submit it again",
                }
            else:
                result["status"] = RecordStatus.MATCHED.value
                result["data"] = build(record)
                result["error"] = None
            out.append(result)
        return out

    # --- webhooks ----------------------------------------------------------------------

    def has_pending_webhooks(self) -> bool:
        """Tell whether a job with a webhook_url has not finished yet."""
        with self._lock:
            return bool(self._webhooks_pending)

    def take_due_webhooks(self) -> list[WebhookDue]:
        """Remove and return the webhooks of jobs that have finished.

        Returns:
            One delivery per newly finished job: JobResults plus ``event``.
        """
        with self._lock:
            now = self._now_locked()
            due = [j for j in self._webhooks_pending if j.status(now).is_terminal]
            if not due:
                return []
            self._webhooks_pending = [j for j in self._webhooks_pending if j not in due]
        out: list[WebhookDue] = []
        for job in due:
            assert job.webhook_url is not None  # only webhook jobs are pending
            if job.failed:
                event = "job.failed"
                body = _json({"event": event, **self._job_view(job, now), "results": []})
            else:
                event = "job.completed"
                # Splice the event into the cached results body instead of re-encoding
                # 1,000 results: the cached body is a JSON object starting with "{".
                cached = self._results_body(job, now)
                body = b'{"event":"job.completed",' + cached[1:]
            out.append(WebhookDue(job.job_id, job.webhook_url, event, body))
        return out

    # --- sandbox controls --------------------------------------------------------------

    def expire(self, job_id: str) -> bool:
        """Delete a job's results now, as if its retention had passed.

        Args:
            job_id: The job.

        Returns:
            False when the job is unknown.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return False
            job.expired = True
            job.results_body = job.results_json = None
            return True

    def reset_usage(self) -> None:
        """Zero every usage counter; jobs created before are no longer counted."""
        with self._lock:
            self._reset_counters()
            self._generation += 1

    def usage(self) -> dict[str, Any]:
        """Snapshot the usage counters.

        Returns:
            The ``/_sandbox/usage`` document (see docs/INTERFACES.md), including
            ``lost_answers`` (submits that created a job but were answered 500) and
            ``failed_per_key`` (per billed key, its billings in jobs that ended
            ``failed``; keys never in a failed job are absent).
        """
        with self._lock:
            now = self._now_locked()
            jobs = {s.value: 0 for s in JobStatus}
            failed_per_key: dict[str, int] = {}
            for job in self._jobs.values():
                if job.generation == self._generation:
                    status = job.status(now)
                    jobs[status.value] += 1
                    if status is JobStatus.FAILED:
                        for key in job.keys:
                            failed_per_key[key] = failed_per_key.get(key, 0) + 1
            return {
                "jobs_created": self._jobs_created,
                "records_billed": self._records_billed,
                "billed_per_key": dict(self._billed),
                "failed_per_key": failed_per_key,
                "status_calls": self._status_calls,
                "results_calls": self._results_calls,
                "submit_calls": self._submit_calls,
                "rejected_submits": dict(self._rejected),
                "max_active_jobs_seen": self._max_active,
                "max_records_per_job_seen": self._max_records,
                "jobs": jobs,
                "lost_answers": self._lost_answers,
            }


def _drawn(rate: float, name: str, salt: str) -> bool:
    """Draw a per-job event of probability ``rate``, reproducibly from the job's salt."""
    return rate > 0 and data.unit_hash(name, salt) < rate


def _new_job_id(style: str) -> str:
    token = secrets.token_hex(12)
    if style == "odd":
        # Outside ``^job_[A-Za-z0-9]+$`` and needing path-segment encoding: "-", ".",
        # ":", "/", " ", "+" and a "%" followed by two hex digits (so a client that
        # does not encode it sends a valid escape of another id).
        t = token
        return f"job-{t[:6]}.{t[6:10]}:{t[10:14]}/{t[14:18]} {t[18:20]}+%{t[20:24]}"
    return "job_" + token


def _job_not_found(job_id: str) -> Reply:
    return error_reply(404, "job_not_found", f"no job {job_id!r} for this API key")


def _wrong_echo(records: list[dict[str, Any]], at: int) -> dict[str, Any]:
    """Build a wrong ``input`` echo for ``records[at]``.

    The next record when it differs, else the record with its first string field (by
    name) prefixed ``wrong-``, else the record plus ``"_echo": "wrong"``.
    """
    record = records[at]
    other = records[(at + 1) % len(records)]
    if other != record:
        return other
    for name in sorted(record):
        if isinstance(record[name], str):
            return {**record, name: "wrong-" + record[name]}
    return {**record, "_echo": "wrong"}


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Tell whether JSON ``value`` nests arrays/objects deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def valid_webhook_url(url: object) -> bool:
    """Tell whether ``url`` is an absolute http(s) URL that can be delivered to.

    Args:
        url: The submitted ``webhook_url``.

    Returns:
        False for non-strings, non-ASCII text, whitespace or control characters,
        another scheme, no host, an unparseable host (``http://[::1``) or a port that
        is not a number in 0-65535.
    """
    if not isinstance(url, str) or not url.isascii() or _URL_FORBIDDEN.search(url):
        return False
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError when not a number in 0-65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


_JOB_FAILED_ERROR = {
    "code": "internal_error",
    "message": "the job failed during processing; its records may be submitted again",
}


def _parse_submit(
    raw_body: bytes, plan: Plan
) -> tuple[str, list[dict[str, Any]], str | None] | Reply:
    """Validate a submit body; return (type, records, webhook_url) or the error reply."""

    def bad(message: str) -> Reply:
        return error_reply(400, "invalid_request", message)

    try:
        body = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError):
        return bad("the body is not valid JSON")
    except RecursionError:
        return bad(f"the body nests deeper than {MAX_BODY_DEPTH} levels")
    if _depth_exceeds(body, MAX_BODY_DEPTH):
        # Refused here because the results echo each record: encoding them later could
        # hit the recursion limit after the job was billed.
        return bad(f"the body nests deeper than {MAX_BODY_DEPTH} levels")
    if not isinstance(body, dict):
        return bad("the body must be a JSON object")
    enrichment_type = body.get("type")
    if not isinstance(enrichment_type, str) or enrichment_type not in _TYPES:
        return bad("type must be one of: company, people, email")
    records = body.get("records")
    if not isinstance(records, list) or not records:
        return bad("records must be a non-empty array")
    if len(records) > plan.records_per_job:
        return error_reply(
            413,
            "too_many_records",
            f"{len(records)} records exceed the {plan.name} plan's "
            f"{plan.records_per_job} records per job",
            limit=plan.records_per_job,
        )
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            return bad(f"records[{i}] must be an object")
    webhook_url = body.get("webhook_url")
    if webhook_url is not None and not valid_webhook_url(webhook_url):
        return bad("webhook_url must be an absolute http(s) URL with a valid host and port")
    return enrichment_type, records, webhook_url
