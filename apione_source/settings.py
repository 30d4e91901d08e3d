"""Constants of the ApiOne contract: base URL, plans and their limits."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BASE_URL = "https://apione.store/api/v1"
API_KEY_HEADER = "X-API-Key"
JOB_ID_PATTERN = r"^job_[A-Za-z0-9]+$"
MAX_RECORDS_PER_JOB = 1000  # documented hard ceiling, whatever the plan


@dataclass(frozen=True)
class Plan:
    """Limits of an ApiOne plan (documented on the Async Jobs page)."""

    name: str
    records_per_job: int
    concurrent_jobs: int
    retention_seconds: int


_DAY = 24 * 3600

PLANS: dict[str, Plan] = {
    "free": Plan("free", 50, 1, 1 * _DAY),
    "starter": Plan("starter", 500, 5, 7 * _DAY),
    "growth": Plan("growth", 1000, 20, 30 * _DAY),
    "scale": Plan("scale", 1000, 50, 90 * _DAY),
}


def get_plan(name: str) -> Plan:
    """Return the plan called ``name`` (case-insensitive).

    Raises:
        ConfigurationError: ``name`` is not a known plan.
    """
    from apione_source.errors import ConfigurationError

    try:
        return PLANS[name.strip().lower()]
    except KeyError:
        raise ConfigurationError(f"unknown plan {name!r}: use one of {', '.join(PLANS)}") from None
