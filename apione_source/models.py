"""Pydantic v2 models of every object in ApiOne's async enrichment contract.

Models are tolerant by design: unknown fields are kept (``extra="allow"``) so a newer
API never breaks a run, while a missing required field fails validation with the
field's name. Use :func:`parse_model` to get that failure as a
:class:`~apione_source.errors.MalformedResponseError` that also names the job.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import Enum
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apione_source.errors import MalformedResponseError


class _ApiModel(BaseModel):
    """Base of every API object: unknown fields are kept, never fatal."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class EnrichmentType(str, Enum):
    """What a job enriches."""

    COMPANY = "company"
    PEOPLE = "people"
    EMAIL = "email"


class JobStatus(str, Enum):
    """Lifecycle of a job: queued -> processing -> completed | failed."""

    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        """True once the status can no longer change."""
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


class RecordStatus(str, Enum):
    """Outcome of one record inside a completed job."""

    MATCHED = "matched"
    NOT_FOUND = "not_found"
    INVALID = "invalid"
    ERROR = "error"


class ErrorDetail(_ApiModel):
    """The ``error`` object of an error answer, a failed job or a failed record."""

    code: str
    message: str
    limit: int | None = None


class ErrorBody(_ApiModel):
    """Body of every non-2xx answer."""

    status: Literal["error"] = "error"
    error: ErrorDetail


# --- inputs ----------------------------------------------------------------------------


class CompanyInput(_ApiModel):
    """Input record of a ``company`` job."""

    domain: str
    name: str | None = None


class PeopleInput(_ApiModel):
    """Input record of a ``people`` job: email, linkedin_url, or names + domain."""

    email: str | None = None
    linkedin_url: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    domain: str | None = None


class EmailInput(_ApiModel):
    """Input record of an ``email`` job."""

    email: str


class SubmitRequest(_ApiModel):
    """Body of ``POST /async/enrich``."""

    type: EnrichmentType
    records: list[dict[str, Any]] = Field(min_length=1)
    webhook_url: str | None = None


class SubmitResponse(_ApiModel):
    """Answer to a successful submit (documented)."""

    status: Literal["success"] = "success"
    job_id: str
    estimated_completion_seconds: int = Field(ge=0)
    total_records: int = Field(ge=1)


# --- enrichment payloads ---------------------------------------------------------------


class Location(_ApiModel):
    """A postal location; every part may be null."""

    street: str | None = None
    city: str | None = None
    region: str | None = None
    country: str | None = None
    country_code: str | None = None
    postal_code: str | None = None


class Company(_ApiModel):
    """Enrichment of a company domain."""

    domain: str
    name: str
    legal_name: str | None = None
    description: str | None = None
    industry: str | None = None
    tags: list[str] = Field(default_factory=list)
    employee_count: int | None = None
    employee_range: str | None = None
    founded_year: int | None = None
    company_type: Literal["public", "private", "nonprofit", "government"] | None = None
    ticker: str | None = None
    annual_revenue_usd: int | None = None
    location: Location | None = None
    linkedin_url: str | None = None
    twitter_handle: str | None = None
    technologies: list[str] = Field(default_factory=list)
    updated_at: datetime | None = None


class PersonCompany(_ApiModel):
    """The employer of a person."""

    name: str | None = None
    domain: str | None = None


class Employment(_ApiModel):
    """One entry of a person's employment history."""

    company: str | None = None
    title: str | None = None
    start_date: date | None = None
    end_date: date | None = None


class Person(_ApiModel):
    """Enrichment of a person."""

    full_name: str
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None
    title: str | None = None
    seniority: Literal["owner", "executive", "director", "manager", "senior", "entry"] | None = None
    department: str | None = None
    linkedin_url: str | None = None
    location: Location | None = None
    company: PersonCompany | None = None
    employment_history: list[Employment] = Field(default_factory=list)
    updated_at: datetime | None = None


class EmailCheck(_ApiModel):
    """Verification of an email address."""

    email: str
    deliverability: Literal["deliverable", "undeliverable", "risky", "unknown"]
    is_free_provider: bool | None = None
    is_disposable: bool | None = None
    is_role_account: bool | None = None
    mx_found: bool | None = None
    domain: str | None = None
    person_full_name: str | None = None
    company_domain: str | None = None
    updated_at: datetime | None = None


PAYLOAD_MODELS: dict[EnrichmentType, type[_ApiModel]] = {
    EnrichmentType.COMPANY: Company,
    EnrichmentType.PEOPLE: Person,
    EnrichmentType.EMAIL: EmailCheck,
}


# --- jobs and results ------------------------------------------------------------------


class Job(_ApiModel):
    """Status of an async job."""

    job_id: str
    status: JobStatus
    type: EnrichmentType
    total_records: int
    processed_records: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    error: ErrorDetail | None = None


class RecordResult(_ApiModel):
    """Result of one submitted record. ``data`` stays a dict, loaded as the API sent it."""

    index: int
    input: dict[str, Any]
    status: RecordStatus
    data: dict[str, Any] | None = None
    error: ErrorDetail | None = None


class JobResults(Job):
    """A completed job with all its results, in submission order."""

    results: list[RecordResult]


class WebhookEvent(JobResults):
    """Body of a ``jobFinished`` webhook delivery."""

    event: Literal["job.completed", "job.failed"]


_M = TypeVar("_M", bound=BaseModel)


def parse_model(model: type[_M], body: Any, job_id: str | None = None) -> _M:
    """Validate an API body, turning a validation failure into a clear error.

    Args:
        model: The model to validate against.
        body: The raw JSON body (``bytes`` or ``str``: parsed and validated in one pass by
            pydantic's Rust core, the fast path) or an already decoded object.
        job_id: The job the body belongs to, named in the error.

    Returns:
        The validated model.

    Raises:
        MalformedResponseError: A required field is missing or has the wrong type; the
            message names the field(s) and the job.
    """
    try:
        if isinstance(body, (bytes, str)):
            return model.model_validate_json(body)
        return model.model_validate(body)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise MalformedResponseError(
                f"{model.__name__} for job {job_id or '<unknown>'}: the body is not JSON",
                job_id=job_id,
            ) from None
        fields = sorted({".".join(str(p) for p in err["loc"]) or "<body>" for err in exc.errors()})
        raise MalformedResponseError(
            f"{model.__name__} for job {job_id or '<unknown>'} is malformed: "
            f"missing or invalid field(s) {', '.join(fields)}",
            job_id=job_id,
            fields=fields,
        ) from None
