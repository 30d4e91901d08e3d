"""Signing and verification of ApiOne webhook deliveries.

A delivery carries ``X-ApiOne-Signature: t=<unix seconds>,v1=<hex>`` where ``hex`` is
HMAC-SHA256 of ``"<t>." + raw body`` under the account's webhook secret. The timestamp
is signed too, so a captured delivery cannot be replayed later than ``tolerance``.

The header is parsed strictly, as ASCII: ``t`` is 1 to 12 ASCII digits (no sign, no
spaces, no underscores, no other scripts' digits, all of which Python's ``int()``
accepts), and appears once. A ``v1`` entry that is not exactly 64 hex digits (either
case) is ignored, like an unknown scheme: it can never match, and skipping it keeps a
rotation header with one stale or foreign entry working. A header left with no
well-formed ``v1`` is rejected. Signatures are compared as bytes, in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from apione_source.errors import WebhookSignatureError

SIGNATURE_HEADER = "X-ApiOne-Signature"
EVENT_HEADER = "X-ApiOne-Event"
DELIVERY_HEADER = "X-ApiOne-Delivery"

DEFAULT_TOLERANCE_SECONDS = 300

_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")  # ASCII digits only: [0-9] is not \d
_SIGNATURE_RE = re.compile(r"[0-9a-fA-F]{64}")


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
    tolerance: int | None = DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Check a delivery's signature header against its raw body.

    Several ``v1=`` entries are accepted (any one matching suffices) so the secret can
    be rotated; unknown schemes are ignored. Parsing is strict (see the module docstring).

    Args:
        secret: The account's webhook secret.
        body: The raw request body, exactly as received (before any JSON parsing).
        header: The ``X-ApiOne-Signature`` header value.
        now: Current unix time; defaults to ``time.time()``.
        tolerance: Maximum distance in seconds between ``t`` and ``now``; None checks no
            age (a delivery stored after it was checked on arrival).

    Raises:
        WebhookSignatureError: The header is missing, not ASCII or malformed, no
            signature matches, or the timestamp is more than ``tolerance`` seconds away
            from ``now``.
    """
    if not header:
        raise WebhookSignatureError("webhook signature header is missing")
    if not isinstance(header, str) or not header.isascii():
        raise WebhookSignatureError("webhook signature header is not ASCII text")
    timestamp: int | None = None
    candidates: list[bytes] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise WebhookSignatureError("webhook signature header is malformed")
        if key == "t":
            if timestamp is not None:
                raise WebhookSignatureError("webhook signature header has more than one t=")
            if not _TIMESTAMP_RE.fullmatch(value):
                raise WebhookSignatureError(
                    "webhook signature timestamp is not 1 to 12 ASCII digits"
                )
            timestamp = int(value)
        elif key == "v1" and _SIGNATURE_RE.fullmatch(value):  # others never match: ignored
            candidates.append(value.lower().encode("ascii"))
    if timestamp is None or not candidates:
        raise WebhookSignatureError(
            "webhook signature header lacks t= or a v1= of 64 hexadecimal characters"
        )
    current = time.time() if now is None else now
    if tolerance is not None and abs(current - timestamp) > tolerance:
        raise WebhookSignatureError(
            f"webhook signature timestamp is {abs(current - timestamp):.0f}s away from now "
            f"(tolerance {tolerance}s)"
        )
    expected = _digest(secret, body, timestamp).encode("ascii")
    # compare_digest on every candidate keeps the check constant-time per candidate.
    if not any(hmac.compare_digest(expected, c) for c in candidates):
        raise WebhookSignatureError("webhook signature does not match the body")
