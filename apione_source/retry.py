"""When to retry and how long to wait: exponential backoff with full jitter.

Pure: no clock, no sleeping. The client asks :meth:`RetryPolicy.next_delay` after each
retryable failure and sleeps (through its injected ``sleep``) for the answer, or gives
up and raises the last error when the answer is ``None``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

_DEFAULT_RNG = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter that honours ``Retry-After``.

    Attributes:
        max_attempts: Total tries, the first included (1 means never retry).
        base_delay: Upper bound of the first backoff; it doubles on each failure.
        max_delay: No single wait is longer than this, ``Retry-After`` included.
        max_total_seconds: The sum of all waits of one call never exceeds this.
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_total_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if min(self.base_delay, self.max_delay, self.max_total_seconds) < 0:
            raise ValueError("delays must not be negative")

    def delay(
        self, attempt: int, retry_after: float | None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based).

        Full jitter: uniform in ``[0, min(max_delay, base_delay * 2**(attempt-1))]``.
        When the server sent ``Retry-After``, wait at least that long; never more than
        ``max_delay``.
        """
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** min(max(attempt - 1, 0), 62))
        wait = (rng or _DEFAULT_RNG).uniform(0.0, ceiling)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_delay)

    def next_delay(
        self,
        attempt: int,
        retry_after: float | None,
        slept: float,
        rng: random.Random | None = None,
    ) -> float | None:
        """The wait before try ``attempt + 1``, or ``None`` when the budget is spent.

        Args:
            attempt: 1-based number of the try that just failed.
            retry_after: The server's ``Retry-After`` in seconds, if any.
            slept: Seconds already waited during this call.
            rng: Source of jitter (for reproducible tests).
        """
        if attempt >= self.max_attempts:
            return None
        wait = self.delay(attempt, retry_after, rng)
        if slept + wait > self.max_total_seconds:
            return None
        return wait


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), else ``None``."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
