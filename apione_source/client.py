"""Typed HTTP clients of ApiOne's async enrichment API, sync and async.

:class:`ApiOneClient` is synchronous, :class:`AsyncApiOneClient` its async twin.

Both share everything but sending and sleeping: :class:`_Call` builds one logical call,
maps each answer to a model or an error (see :mod:`apione_source.errors`) and decides
whether to retry. What is retried inside the client, with :class:`RetryPolicy`:

====================  ==================================  ==============================
failure               reads (status, results)             submit
====================  ==================================  ==============================
429 rate_limited      retried, then RateLimitedError      retried, then RateLimitedError
500 / 503             retried, then ServerError           SubmitOutcomeUnknownError
connect failure       retried, then TransportError        retried, then TransportError
read timeout, broken  retried, then TransportError        SubmitOutcomeUnknownError
====================  ==================================  ==============================

A submit is retried only where no job can exist; everything else raises at once.

The API key is kept only as a :class:`~apione_source.secret.Secret` (masked in any repr
or traceback) and is put in the ``X-API-Key`` header of each request by an ``httpx.Auth``
for the time of that request: the clients' default headers never hold it, and it never
appears in a log line, an error message or a repr.

Job ids are sent as one URL path segment, percent-encoded, whatever they look like: a job
ApiOne created (and billed) is always polled. Only an empty or non-string id is refused,
and one containing the API key (a key passed as a job id by mistake must not end up in a
URL). Logs and messages show at most a short, escaped prefix of an unusual id.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

import httpx
from pydantic import BaseModel

from apione_source.errors import (
    ApiOneError,
    AuthenticationError,
    BadRequestError,
    ConfigurationError,
    InsufficientCreditsError,
    JobNotFoundError,
    MalformedResponseError,
    NotReadyError,
    PermissionDeniedError,
    RateLimitedError,
    ResultsExpiredError,
    RetryableError,
    ServerError,
    ShrinkBatchError,
    SubmitOutcomeUnknownError,
    TransportError,
    WaitForCapacityError,
)
from apione_source.models import (
    EnrichmentType,
    ErrorBody,
    Job,
    JobResults,
    SubmitResponse,
    parse_model,
)
from apione_source.retry import RetryPolicy, parse_retry_after
from apione_source.secret import Secret
from apione_source.settings import API_KEY_HEADER, DEFAULT_BASE_URL, JOB_ID_PATTERN

__all__ = ["ApiOneClient", "AsyncApiOneClient"]

logger = logging.getLogger("apione_source.client")

AUTH_HELP = (
    'Set it in .dlt/secrets.toml under [sources.apione] api_key = "..." '
    "or the env var SOURCES__APIONE__API_KEY."
)
_AUTH_MESSAGE = f"ApiOne rejected the API key (401). {AUTH_HELP}"
_SUBMIT_PATH = "/async/enrich"
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
_SHOWN_ID_CHARS = 24  # of an unusual job id, in logs and messages
_MAX_JOB_ID_CHARS = 256  # a submit answer's job id: any non-empty string up to this
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces: a valid header value
# Failures where the request never left this machine: safe to retry even a submit.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_USER_AGENT = "apione-dlt/0.1 (+httpx)"

_M = TypeVar("_M", bound=BaseModel)


class _KeyAuth(httpx.Auth):
    """Adds the API key header to one request, and takes it off again once answered.

    So the key is in no client's default headers, and a request kept by a response or an
    exception (``response.request``, ``exc.request``) no longer carries it.
    """

    def __init__(self, secret: Secret) -> None:
        self._secret = secret

    def __repr__(self) -> str:
        return "_KeyAuth(***)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[API_KEY_HEADER] = self._secret.reveal()
        try:
            yield request
        finally:
            request.headers.pop(API_KEY_HEADER, None)

    # Explicit twins of httpx's wrappers, so the ``finally`` above also runs (at once)
    # when httpx closes the flow after a transport error.
    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        yield from self.auth_flow(request)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers[API_KEY_HEADER] = self._secret.reveal()
        try:
            yield request
        finally:
            request.headers.pop(API_KEY_HEADER, None)


def _job_id_segment(job_id: str) -> str:
    """``job_id`` as exactly one URL path segment: every reserved character encoded.

    ``.`` and ``..`` alone would be resolved away as dot segments, so their dots are
    encoded too.
    """
    segment = quote(job_id, safe="")
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def _shown_id(job_id: str) -> str:
    """How a job id appears in logs and messages: as is if usual, else a short prefix."""
    if _JOB_ID_RE.fullmatch(job_id) and len(job_id) <= 64:
        return job_id
    prefix = ascii(job_id[:_SHOWN_ID_CHARS])[1:-1]  # control and non-ASCII chars escaped
    return f"{prefix}…" if len(job_id) > _SHOWN_ID_CHARS else prefix


class _Call(Generic[_M]):
    """One logical API call: its request, its retry state, how to read its answers.

    Pure apart from logging: the clients send, sleep and loop; this decides.
    """

    def __init__(
        self,
        method: str,
        path: str,
        model: type[_M],
        *,
        policy: RetryPolicy,
        rng: random.Random,
        secret: Secret,
        job_id: str | None = None,
        payload: dict[str, Any] | None = None,
        shown_path: str | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.shown_path = path if shown_path is None else shown_path
        self.model = model
        self.policy = policy
        self.rng = rng
        self._secret = secret
        self.job_id = job_id
        self.payload = payload
        self.attempt = 0
        self.slept = 0.0

    def __repr__(self) -> str:
        return f"_Call({self.method} {self.shown_path}, attempt={self.attempt})"

    @property
    def is_submit(self) -> bool:
        """True for ``POST /async/enrich``, the one call that creates (and bills) a job."""
        return self.payload is not None

    def on_response(self, response: httpx.Response) -> _M | ApiOneError:
        """The model of a 2xx answer, else the error the answer maps to."""
        logger.debug(
            "%s %s -> %d (attempt %d)",
            self.method,
            self.shown_path,
            response.status_code,
            self.attempt,
        )
        if response.is_success:
            return self._parse(response)
        return self._scrub(self._error(response))

    def on_transport_error(self, exc: httpx.RequestError) -> ApiOneError:
        """The error a failure without an HTTP answer maps to."""
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        logger.debug("%s %s -> %s (attempt %d)", self.method, self.shown_path, reason, self.attempt)
        if self.is_submit and not isinstance(exc, _NOT_SENT):
            return self._scrub(self._outcome_unknown(f"no answer ({reason})"))
        return self._scrub(
            TransportError(f"{self.method} {self.shown_path} failed: {reason}", job_id=self.job_id)
        )

    def backoff(self, error: ApiOneError) -> float:
        """Seconds to wait before the next try; raises ``error`` when not retrying."""
        if not isinstance(error, RetryableError):
            raise error
        wait = self.policy.next_delay(self.attempt, error.retry_after, self.slept, self.rng)
        if wait is None:
            raise error
        self.slept += wait
        logger.warning(
            "retrying %s %s in %.2fs after %s%s (attempt %d of %d)",
            self.method,
            self.shown_path,
            wait,
            type(error).__name__,
            f" {error.status_code}" if error.status_code else "",
            self.attempt,
            self.policy.max_attempts,
        )
        return wait

    # --- mapping ---------------------------------------------------------------------

    def _parse(self, response: httpx.Response) -> _M | ApiOneError:
        shown = None if self.job_id is None else _shown_id(self.job_id)
        try:
            model = parse_model(self.model, response.content, shown)
        except MalformedResponseError as exc:
            if self.is_submit:
                return self._scrub(self._outcome_unknown(f"answer unreadable: {exc.message}"))
            exc.status_code = response.status_code
            exc.job_id = self.job_id
            return self._scrub(exc)
        if isinstance(model, SubmitResponse) and not 0 < len(model.job_id) <= _MAX_JOB_ID_CHARS:
            # Whatever its shape, a job id is kept and polled; only no usable id at all
            # (empty, or absurdly long) leaves the job's existence unknown.
            return self._scrub(
                self._outcome_unknown(f"answered a job id of {len(model.job_id)} characters")
            )
        return model

    def _error(self, response: httpx.Response) -> ApiOneError:
        status = response.status_code
        code, message, limit = _error_detail(response)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        coded = f"{status} {code}" if code else str(status)
        text = f"{self.method} {self.shown_path} answered {coded}: {message}"
        kw: dict[str, Any] = {"status_code": status, "code": code, "job_id": self.job_id}
        if status == 401:
            return AuthenticationError(_AUTH_MESSAGE, **kw)
        if status == 403:
            return PermissionDeniedError(
                f"{text}. Use an API key whose ApiOne plan allows this enrichment.", **kw
            )
        if status == 402:
            return InsufficientCreditsError(f"{text}. Top up ApiOne credits.", **kw)
        if status == 429 and code == "concurrent_job_limit":
            return WaitForCapacityError(text, retry_after=retry_after, limit=limit, **kw)
        if status == 429:
            return RateLimitedError(text, retry_after=retry_after, **kw)
        if status >= 500 and self.is_submit:
            return self._outcome_unknown(f"answered {status}{f' {code}' if code else ''}")
        if status >= 500:
            return ServerError(text, retry_after=retry_after, **kw)
        if status == 413:
            return ShrinkBatchError(f"{text} (limit {limit})", limit=limit, **kw)
        if status == 404 and not self.is_submit:
            return JobNotFoundError(text, **kw)
        if status == 409:
            return NotReadyError(text, **kw)
        if status == 410:
            return ResultsExpiredError(text, **kw)
        if status == 404:
            text += " (is the base URL right?)"
        return BadRequestError(text, **kw)

    def _outcome_unknown(self, reason: str) -> SubmitOutcomeUnknownError:
        payload = self.payload or {}
        records: list[dict[str, Any]] = payload.get("records", [])
        enrichment_type = str(payload.get("type", ""))
        return SubmitOutcomeUnknownError(
            f"{self.method} {self.shown_path} {reason}: the {enrichment_type} job of "
            f"{len(records)} records may have been created and billed; record it before "
            "submitting these records again",
            enrichment_type=enrichment_type,
            records=records,
        )

    def _scrub(self, error: ApiOneError) -> ApiOneError:
        """Belt and braces: never let the key through, even if a server echoes it."""
        key = self._secret.reveal()
        if key in error.message:
            error.message = error.message.replace(key, "***")
            error.args = (error.message,)
        return error


def _error_detail(response: httpx.Response) -> tuple[str | None, str, int | None]:
    """``(code, message, limit)`` from an error body; tolerant of any body."""
    try:
        detail = ErrorBody.model_validate(response.json()).error
    except ValueError:  # not JSON, or not the error schema (ValidationError is one)
        return None, response.reason_phrase or f"HTTP {response.status_code}", None
    return detail.code, detail.message[:500], detail.limit


class _ClientBase:
    """What both clients share: the key, the base URL, the retry policy, call building."""

    def __init__(self, api_key: str | Secret, base_url: str, retry: RetryPolicy) -> None:
        problem = _key_problem(api_key)
        secret = None if problem else _as_secret(api_key)
        del api_key  # from here on only the Secret: no frame local holds the plain key
        if secret is None:
            raise ConfigurationError(f"{problem} {AUTH_HELP}")
        self.__api_key = secret
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self._rng = random.Random()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    @property
    def host(self) -> str:
        """``host[:port]`` of the base URL, for messages (never any credentials)."""
        parts = urlsplit(self.base_url)
        return f"{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}"

    def _headers(self) -> dict[str, str]:
        # No API key here: _KeyAuth adds it to each request, and removes it after.
        return {"Accept": "application/json", "User-Agent": _USER_AGENT}

    def _http_options(
        self, connect_timeout: float, read_timeout: float, max_connections: int
    ) -> dict[str, Any]:
        """What both httpx clients are built with: one pool, explicit timeouts."""
        return {
            "base_url": self.base_url,
            "headers": self._headers(),
            "auth": _KeyAuth(self.__api_key),
            "timeout": httpx.Timeout(
                connect=connect_timeout, read=read_timeout, write=read_timeout, pool=read_timeout
            ),
            "limits": httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        }

    def _call(
        self, method: str, path: str, model: type[_M], job_id: str | None = None, **kw: Any
    ) -> _Call[_M]:
        """A call; ``path`` and any ``shown_path`` already encode the job id."""
        return _Call(
            method,
            path,
            model,
            policy=self.retry,
            rng=self._rng,
            secret=self.__api_key,
            job_id=job_id,
            **kw,
        )

    def _submit_call(
        self,
        enrichment_type: EnrichmentType | str,
        records: list[dict[str, Any]],
        webhook_url: str | None,
    ) -> _Call[SubmitResponse]:
        try:
            kind = EnrichmentType(enrichment_type)
        except ValueError:
            raise BadRequestError(
                f"unknown enrichment type {self._redact(enrichment_type)!r}: use one of "
                f"{', '.join(t.value for t in EnrichmentType)}"
            ) from None
        if not isinstance(records, list) or not records:
            raise BadRequestError("records must be a non-empty list of input objects")
        payload: dict[str, Any] = {"type": kind.value, "records": records}
        if webhook_url is not None:
            payload["webhook_url"] = webhook_url
        return self._call("POST", _SUBMIT_PATH, SubmitResponse, payload=payload)

    def _job_call(self, job_id: str) -> _Call[Job]:
        return self._read_call("/async/status/", job_id, Job)

    def _results_call(self, job_id: str) -> _Call[JobResults]:
        return self._read_call("/async/results/", job_id, JobResults)

    def _read_call(self, prefix: str, job_id: str, model: type[_M]) -> _Call[_M]:
        """A read of one job: any non-empty id ApiOne gave is polled, as one path segment.

        Refusing an id that merely looks unusual would leave a billed job unpolled and its
        records paid for again.
        """
        if not isinstance(job_id, str) or not job_id:
            got = "an empty string" if isinstance(job_id, str) else type(job_id).__name__
            raise BadRequestError(f"invalid job id: expected a non-empty string, got {got}")
        if self.__api_key.reveal() in job_id:
            raise BadRequestError("invalid job id: it contains the API key (swapped arguments?)")
        return self._call(
            "GET",
            prefix + _job_id_segment(job_id),
            model,
            job_id,
            shown_path=prefix + _shown_id(job_id),
        )

    def _redact(self, value: object) -> str:
        return str(value).replace(self.__api_key.reveal(), "***")


def _as_secret(api_key: str | Secret) -> Secret:
    """The key, stripped, as a :class:`Secret`."""
    raw = api_key.reveal() if isinstance(api_key, Secret) else api_key
    return Secret(raw.strip())


def _key_problem(api_key: object) -> str | None:
    """What is wrong with a key, or None; says nothing of its value."""
    if isinstance(api_key, Secret):
        key = api_key.reveal().strip()
    elif isinstance(api_key, str):
        key = api_key.strip()
    else:
        key = ""
    if not key:
        return "The ApiOne API key is empty."
    if not _KEY_RE.match(key):
        return "The ApiOne API key contains spaces or non-ASCII characters; check the value."
    return None


class ApiOneClient(_ClientBase):
    """Synchronous client; one connection pool per instance. Use as a context manager.

    Args:
        api_key: The ApiOne API key, or a :class:`~apione_source.secret.Secret` of it
            (sent as ``X-API-Key``, never logged; kept only as a Secret).
        base_url: API root, e.g. a sandbox's ``base_url``.
        connect_timeout: Seconds to establish a connection.
        read_timeout: Seconds to wait for an answer.
        retry: Backoff of retried calls.
        sleep: How to wait between tries (inject a recorder in tests).
        transport: An httpx transport to use instead of the network.
        max_connections: Size of the connection pool.
    """

    def __init__(
        self,
        api_key: str | Secret,
        base_url: str = DEFAULT_BASE_URL,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008  (frozen, so safe to share)
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
        max_connections: int = 50,
    ) -> None:
        super().__init__(api_key, base_url, retry)
        self._sleep = sleep
        self._http = httpx.Client(
            transport=transport,
            **self._http_options(connect_timeout, read_timeout, max_connections),
        )

    def submit_job(
        self,
        type: EnrichmentType | str,
        records: list[dict[str, Any]],
        webhook_url: str | None = None,
    ) -> SubmitResponse:
        """Submit a job of ``records``; see the module docstring for what is retried.

        Raises:
            SubmitOutcomeUnknownError: Sent but no clear answer; the job may exist.
            WaitForCapacityError: Too many jobs queued or processing.
            ShrinkBatchError: More records than the plan allows per job.
        """
        return self._run(self._submit_call(type, records, webhook_url))

    def get_job(self, job_id: str) -> Job:
        """Status of a job."""
        return self._run(self._job_call(job_id))

    def get_results(self, job_id: str) -> JobResults:
        """All results of a completed job, in submission order."""
        return self._run(self._results_call(job_id))

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> ApiOneClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, call: _Call[_M]) -> _M:
        while True:
            call.attempt += 1
            try:
                response = self._http.request(call.method, call.path, json=call.payload)
            except httpx.RequestError as exc:
                outcome: _M | ApiOneError = call.on_transport_error(exc)
            else:
                outcome = call.on_response(response)
                _let_go(response)
            if not isinstance(outcome, ApiOneError):
                return outcome
            self._sleep(call.backoff(outcome))


class AsyncApiOneClient(_ClientBase):
    """Asynchronous twin of :class:`ApiOneClient`; ``async with`` it, or ``aclose()``."""

    def __init__(
        self,
        api_key: str | Secret,
        base_url: str = DEFAULT_BASE_URL,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008  (frozen, so safe to share)
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 50,
    ) -> None:
        super().__init__(api_key, base_url, retry)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            transport=transport,
            **self._http_options(connect_timeout, read_timeout, max_connections),
        )

    async def submit_job(
        self,
        type: EnrichmentType | str,
        records: list[dict[str, Any]],
        webhook_url: str | None = None,
    ) -> SubmitResponse:
        """Submit a job of ``records``; see :meth:`ApiOneClient.submit_job`."""
        return await self._run(self._submit_call(type, records, webhook_url))

    async def get_job(self, job_id: str) -> Job:
        """Status of a job."""
        return await self._run(self._job_call(job_id))

    async def get_results(self, job_id: str) -> JobResults:
        """All results of a completed job, in submission order."""
        return await self._run(self._results_call(job_id))

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncApiOneClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, call: _Call[_M]) -> _M:
        while True:
            call.attempt += 1
            try:
                response = await self._http.request(call.method, call.path, json=call.payload)
            except httpx.RequestError as exc:
                outcome: _M | ApiOneError = call.on_transport_error(exc)
            else:
                outcome = call.on_response(response)
                _let_go(response)
            if not isinstance(outcome, ApiOneError):
                return outcome
            await self._sleep(call.backoff(outcome))


def _let_go(response: httpx.Response) -> None:
    """Free ``response`` (its body read and parsed) once unreferenced, not at a GC pass.

    httpx's response and its stream refer to each other, so each body would wait for the
    cyclic collector, which a run calls rarely: 70 MB of result bodies held at 100k
    records. The body is in ``response.content`` already; the stream is spent.
    """
    response.stream = httpx.ByteStream(b"")
