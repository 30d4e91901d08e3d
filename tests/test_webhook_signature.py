"""Webhook signature headers are parsed strictly (issue 8): ASCII only, ``t`` as 1 to 12
ASCII digits, ``v1`` as 64 hex digits, compared as bytes.
"""

from __future__ import annotations

from typing import Any

import pytest

from apione_source import webhooks
from apione_source.errors import WebhookSignatureError

SECRET = "whsec_test"
BODY = b'{"event":"job.completed"}'
NOW = 1_700_000_000


def signature(timestamp: int = NOW, body: bytes = BODY) -> str:
    return webhooks.sign(SECRET, body, timestamp).split(",v1=")[1]


# --- webhook signatures -------------------------------------------------------------------


def test_given_valid_header_when_verified_then_accepted_in_either_hex_case() -> None:
    webhooks.verify_signature(SECRET, BODY, webhooks.sign(SECRET, BODY, NOW), now=NOW)
    webhooks.verify_signature(SECRET, BODY, f"t={NOW},v1={signature().upper()}", now=NOW)
    # rotation: a malformed or stale entry next to the good one is ignored
    webhooks.verify_signature(SECRET, BODY, f"t={NOW},v1=00,v1={signature()}", now=NOW)
    webhooks.verify_signature(
        SECRET, BODY, f"t={NOW}, v1={'0' * 64}, v1={signature()}, v0=legacy", now=NOW
    )


@pytest.mark.parametrize(
    "t",
    [
        "1_700_000_000",  # int() accepts underscores
        "+1700000000",  # and a sign
        " 1700000000",  # and surrounding spaces
        "17 00000000",
        "\u0661\u0667\u0660\u0660\u0660\u0660\u0660\u0660\u0660\u0660",  # Arabic-Indic digits
        "\uff11\uff17\uff10\uff10\uff10\uff10\uff10\uff10\uff10\uff10",  # full-width digits
        "-1700000000",
        "0x6553f100",
        "1700000000.0",
        "",
        "1234567890123",  # 13 digits
    ],
)
def test_given_lenient_int_timestamp_when_verified_then_signature_error(t: str) -> None:
    with pytest.raises(WebhookSignatureError):
        webhooks.verify_signature(SECRET, BODY, f"t={t},v1={signature()}", now=NOW)


def test_given_timestamp_int_accepts_when_its_digits_are_signed_then_still_rejected() -> None:
    # The value int() makes of these is exactly the signed timestamp: only strict parsing
    # tells them apart (a signature over "1_700_000_000." is not one over "1700000000.").
    for t in ["1_700_000_000", "+1700000000", " 1700000000", "\uff11700000000"]:
        assert int(t) == NOW
        with pytest.raises(WebhookSignatureError, match=r"ASCII digits|not ASCII"):
            webhooks.verify_signature(SECRET, BODY, f"t={t},v1={signature()}", now=NOW)


@pytest.mark.parametrize(
    "v1",
    [
        "\u00e9" * 64,  # hmac.compare_digest raised TypeError on a non-ASCII str
        "a" * 63 + "\u00e9",
        "\u0661" * 64,
    ],
)
def test_given_non_ascii_v1_when_verified_then_signature_error_not_type_error(v1: str) -> None:
    with pytest.raises(WebhookSignatureError, match="not ASCII"):
        webhooks.verify_signature(SECRET, BODY, f"t={NOW},v1={v1}", now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        f"t={NOW},v1=" + "\u00e9" * 3 + ",v1=" + "0" * 64,
        f"t={NOW},v1=" + "0" * 64 + ",note=caf\u00e9",
        f"t={NOW}\u00a0,v1=" + "0" * 64,
        "\u2028",
    ],
)
def test_given_header_not_ascii_when_verified_then_signature_error(header: str) -> None:
    with pytest.raises(WebhookSignatureError, match="not ASCII"):
        webhooks.verify_signature(SECRET, BODY, header, now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        f"t={NOW},v1=abc",  # too short
        f"t={NOW},v1={'g' * 64}",  # not hex
        f"t={NOW},v1={'0' * 65}",  # too long
        f"t={NOW},v1= {'0' * 64}",
        f"t={NOW}",
        f"t={NOW},t={NOW},v1=" + "0" * 64,  # two timestamps: which one was signed?
    ],
)
def test_given_no_well_formed_v1_or_two_t_when_verified_then_signature_error(
    header: str,
) -> None:
    with pytest.raises(WebhookSignatureError):
        webhooks.verify_signature(SECRET, BODY, header, now=NOW)


def test_given_well_formed_but_wrong_v1_when_verified_then_no_match() -> None:
    with pytest.raises(WebhookSignatureError, match="does not match"):
        webhooks.verify_signature(SECRET, BODY, f"t={NOW},v1={'0' * 64}", now=NOW)
    with pytest.raises(WebhookSignatureError, match="does not match"):
        webhooks.verify_signature(SECRET, BODY + b" ", webhooks.sign(SECRET, BODY, NOW), now=NOW)


def test_given_header_not_str_when_verified_then_signature_error() -> None:
    header: Any = webhooks.sign(SECRET, BODY, NOW).encode()
    with pytest.raises(WebhookSignatureError):
        webhooks.verify_signature(SECRET, BODY, header, now=NOW)
