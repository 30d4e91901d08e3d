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

    model_config = ConfigDict(extra="allow", populate_by_name=True, use_attribute_docstrings=True)


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
    """Street address."""
    city: str | None = None
    """City."""
    region: str | None = None
    """Region within the country, such as a state or province."""
    country: str | None = None
    """Country."""
    country_code: str | None = None
    """Country code."""
    postal_code: str | None = None
    """Postal code."""


class Company(_ApiModel):
    """Enrichment of a company domain."""

    domain: str
    """The company's web domain."""
    name: str
    """The company's name."""
    legal_name: str | None = None
    """The company's registered legal name."""
    description: str | None = None
    """A text describing the company."""
    industry: str | None = None
    """The industry the company is in."""
    tags: list[str] = Field(default_factory=list)
    """Tags ApiOne assigns to the company (keywords)."""
    employee_count: int | None = None
    """Number of employees."""
    employee_range: str | None = None
    """Number of employees as a range label (text), as ApiOne reports it."""
    founded_year: int | None = None
    """Year the company was founded."""
    company_type: Literal["public", "private", "nonprofit", "government"] | None = None
    """Kind of company: public, private, nonprofit or government."""
    ticker: str | None = None
    """Stock ticker symbol."""
    annual_revenue_usd: int | None = None
    """Annual revenue, in whole US dollars per year."""
    location: Location | None = None
    """Where the company is headquartered."""
    linkedin_url: str | None = None
    """URL of the company's LinkedIn page."""
    twitter_handle: str | None = None
    """The company's Twitter (X) handle."""
    technologies: list[str] = Field(default_factory=list)
    """Technologies the company uses, as ApiOne reports them."""
    updated_at: datetime | None = None
    """When ApiOne last updated this company's data."""


class PersonCompany(_ApiModel):
    """The employer of a person."""

    name: str | None = None
    """Name."""
    domain: str | None = None
    """Web domain."""


class Employment(_ApiModel):
    """One entry of a person's employment history."""

    company: str | None = None
    """Name of the company of this position."""
    title: str | None = None
    """Job title in this position."""
    start_date: date | None = None
    """Date the position started."""
    end_date: date | None = None
    """Date the position ended."""


class Person(_ApiModel):
    """Enrichment of a person."""

    full_name: str
    """The person's full name."""
    first_name: str | None = None
    """The person's first (given) name."""
    last_name: str | None = None
    """The person's last (family) name."""
    email: str | None = None
    """The person's email address."""
    title: str | None = None
    """The person's job title."""
    seniority: Literal["owner", "executive", "director", "manager", "senior", "entry"] | None = None
    """Seniority level: owner, executive, director, manager, senior or entry."""
    department: str | None = None
    """The department the person works in."""
    linkedin_url: str | None = None
    """URL of the person's LinkedIn profile."""
    location: Location | None = None
    """Where the person is based."""
    company: PersonCompany | None = None
    """The company the person works at."""
    employment_history: list[Employment] = Field(default_factory=list)
    """The person's employment history, one entry per position."""
    updated_at: datetime | None = None
    """When ApiOne last updated this person's data."""


class EmailCheck(_ApiModel):
    """Verification of an email address."""

    email: str
    """The email address checked."""
    deliverability: Literal["deliverable", "undeliverable", "risky", "unknown"]
    """Whether the address accepts mail: deliverable, undeliverable, risky or unknown."""
    is_free_provider: bool | None = None
    """True if the address is at a free email provider."""
    is_disposable: bool | None = None
    """True if the address is a disposable (throwaway) address."""
    is_role_account: bool | None = None
    """True if the address is a role account (such as info@ or sales@) rather than a person's."""
    mx_found: bool | None = None
    """True if the address's domain has MX (mail exchanger) DNS records."""
    domain: str | None = None
    """The domain part of the email address."""
    person_full_name: str | None = None
    """Full name of the person the address belongs to, if known."""
    company_domain: str | None = None
    """Domain of the company the address belongs to, if known."""
    updated_at: datetime | None = None
    """When ApiOne last updated this check."""


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
