"""Signing and verification of ApiOne webhook deliveries.

A delivery carries ``X-ApiOne-Signature: t=<unix seconds>,v1=<hex>`` where ``hex`` is
HMAC-SHA256 of ``"<t>." + raw body`` under the account's webhook secret. The timestamp
is signed too, so a captured delivery cannot be replayed later than ``tolerance``.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from apione_source.errors import WebhookSignatureError

SIGNATURE_HEADER = "X-ApiOne-Signature"
EVENT_HEADER = "X-ApiOne-Event"
DELIVERY_HEADER = "X-ApiOne-Delivery"

DEFAULT_TOLERANCE_SECONDS = 300


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    return hmac.new(
        secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256
    ).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """Build the ``X-ApiOne-Signature`` header value for a delivery.

    Args:
        secret: The account's webhook secret.
        body: The raw request body, exactly as sent.
        timestamp: Unix seconds of the signing.

    Returns:
        ``"t=<timestamp>,v1=<hex hmac-sha256>"``.
    """
    return f"t={timestamp},v1={_digest(secret, body, timestamp)}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    tolerance: int = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Check a delivery's signature header against its raw body.

    Several ``v1=`` entries are accepted (any one matching suffices) so the secret can
    be rotated; unknown schemes are ignored.

    Args:
        secret: The account's webhook secret.
        body: The raw request body, exactly as received (before any JSON parsing).
        header: The ``X-ApiOne-Signature`` header value.
        now: Current unix time; defaults to ``time.time()``.
        tolerance: Maximum distance in seconds between ``t`` and ``now``.

    Raises:
        WebhookSignatureError: The header is missing or malformed, no signature matches,
            or the timestamp is more than ``tolerance`` seconds away from ``now``.
    """
    if not header:
        raise WebhookSignatureError("webhook signature header is missing")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise WebhookSignatureError("webhook signature header is malformed")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookSignatureError(
                    "webhook signature timestamp is not an integer"
                ) from None
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookSignatureError("webhook signature header lacks t= or v1=")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookSignatureError(
            f"webhook signature timestamp is {abs(current - timestamp):.0f}s away from now "
            f"(tolerance {tolerance}s)"
        )
    expected = _digest(secret, body, timestamp)
    # compare_digest on every candidate keeps the check constant-time per candidate.
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise WebhookSignatureError("webhook signature does not match the body")
