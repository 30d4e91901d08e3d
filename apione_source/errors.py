"""Errors, named by what the caller does about them.

::

    ApiOneError
    ├── ConfigurationError        fix the configuration; raised before any API call
    ├── ConcurrentRunError        wait: another run of the same pipeline is in progress
    ├── RetryableError            retry later with backoff (the client already did)
    │   ├── RateLimitedError      429 rate_limited
    │   ├── ServerError           500 / 503
    │   └── TransportError        connect error, read timeout on a read
    ├── WaitForCapacityError      429 concurrent_job_limit: wait for a job slot
    ├── ShrinkBatchError          413 too_many_records: resend at most ``limit`` records
    ├── NotReadyError             409 job_not_completed: poll again later
    ├── ResultsExpiredError       410 results_expired: resubmit the records (costs credits)
    ├── JobNotFoundError          404: forget the job id (or resubmit its records)
    ├── SubmitOutcomeUnknownError a submit got no clear answer: record it, it may be billed
    ├── MalformedResponseError    a body broke the contract: keep the job, report it
    ├── BadRequestError           400: fix the request, do not retry
    ├── WebhookSignatureError     a webhook delivery's signature is bad or too old: reject it
    └── StopRunError              the run fails: nothing will succeed until a human acts
        ├── AuthenticationError   401: set a valid API key
        ├── InsufficientCreditsError  402: top up credits
        ├── PermissionDeniedError 403: use a key whose plan allows this enrichment
        ├── ApiUnreachableError   no answer from the host for too long: check base_url
        ├── RequestRefusedError   ApiOne refuses the request itself (400, 404 on the
        │                         route): check base_url, upgrade apione-dlt
        ├── JournalCorruptError   a job journal row cannot be read: repair it
        └── CreditLimitError      the run would bill more than max_credits_per_run:
                                  raise the limit, or cap the run (max_records_per_run)

No error message or repr ever contains the API key.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class ApiOneError(Exception):
    """Root of every error raised by apione_source.

    Attributes:
        status_code: HTTP status of the answer, when there was one.
        code: ApiOne's ``error.code``, when there was one.
        job_id: The job concerned, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        job_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status_code={self.status_code})"


class ConfigurationError(ApiOneError, ValueError):
    """The source is misconfigured; the message says what to fix."""


class ConcurrentRunError(ApiOneError):
    """Another run of the same pipeline holds the journal; run one at a time."""


class RetryableError(ApiOneError):
    """A transient failure; retrying later with backoff may succeed.

    Attributes:
        retry_after: Seconds the server asked to wait (``Retry-After``), if any.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RateLimitedError(RetryableError):
    """429 ``rate_limited``."""


class ServerError(RetryableError):
    """500 ``internal_error`` or 503 ``service_unavailable``."""


class TransportError(RetryableError):
    """No usable answer: connection failed, or a read timed out."""


class WaitForCapacityError(ApiOneError):
    """429 ``concurrent_job_limit``: too many jobs queued or processing.

    Attributes:
        retry_after: Seconds the server suggested to wait.
        limit: The plan's concurrent-job limit, when the server said.
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, limit: int | None = None, **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.limit = limit


class ShrinkBatchError(ApiOneError):
    """413 ``too_many_records``: the batch exceeds the plan's records per job.

    Attributes:
        limit: The plan's maximum records per job.
    """

    def __init__(self, message: str, *, limit: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.limit = limit


class NotReadyError(ApiOneError):
    """409 ``job_not_completed``: results were asked for too early."""


class ResultsExpiredError(ApiOneError):
    """410 ``results_expired``: results were deleted after the plan's retention."""


class JobNotFoundError(ApiOneError):
    """404 ``job_not_found``."""


class SubmitOutcomeUnknownError(ApiOneError):
    """A submit was sent but no clear answer came back (read timeout, 5xx).

    The server may have created, and billed, the job. The caller records this and
    decides whether to resubmit; the client never retries it blindly.

    Attributes:
        enrichment_type: The type that was sent.
        records: The records that were sent.
    """

    def __init__(
        self, message: str, *, enrichment_type: str, records: list[dict[str, Any]], **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.enrichment_type = enrichment_type
        self.records = records


class MalformedResponseError(ApiOneError):
    """An answer broke the contract (missing field, wrong type, not JSON).

    Attributes:
        fields: The offending field paths, when known.
    """

    def __init__(self, message: str, *, fields: list[str] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.fields = fields or []


class BadRequestError(ApiOneError):
    """400 ``invalid_request``: the request itself is wrong; do not retry."""


class StopRunError(ApiOneError):
    """Nothing will succeed until a human acts; stop the run, keep what was collected."""


class AuthenticationError(StopRunError):
    """401 ``invalid_api_key``."""


class InsufficientCreditsError(StopRunError):
    """402 ``insufficient_credits``."""


class PermissionDeniedError(StopRunError):
    """403: the key is valid but may not do this."""


class ApiUnreachableError(StopRunError):
    """ApiOne's host gave no answer at all (connection refused, DNS, timeouts) for too long."""


class RequestRefusedError(StopRunError):
    """ApiOne refused the request as such (400, or 404 on the submit route).

    Not about the records: the next batch would be refused the same way.
    """


class WebhookSignatureError(ApiOneError):
    """A webhook delivery's ``X-ApiOne-Signature`` is missing, malformed, wrong or too old.

    The receiver rejects the delivery (answer non-2xx); ApiOne retries genuine ones.
    """


class JournalCorruptError(StopRunError):
    """A row of the job journal cannot be read; the message says how to get out."""


class CreditLimitError(StopRunError):
    """The run would bill more than ``max_credits_per_run``; nothing was sent.

    Attributes:
        plan: The dry run's :class:`apione_source.plan.Plan` that said so.
    """

    def __init__(self, message: str, plan: Any) -> None:
        super().__init__(message)
        self.plan = plan


def connector_cause(exc: BaseException) -> ApiOneError | None:
    """The connector's own error behind ``exc`` (e.g. dlt's ``PipelineStepFailed``), if any."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ApiOneError):
        cause = cause.__cause__ or cause.__context__
    return cause


@contextmanager
def connector_errors() -> Iterator[None]:
    """Raise the connector's own error instead of what wraps it (dlt's step failures)."""
    try:
        yield
    except ApiOneError:
        raise
    except Exception as exc:
        cause = connector_cause(exc)
        if cause is None:
            raise
        raise cause from None
