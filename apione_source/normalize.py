r"""Normalize and validate input rows before they are sent (and billed) to ApiOne.

Every warehouse row goes through :func:`normalize_record` before any credit is spent.
It returns either a :class:`Normalized` (a dedupe ``key`` and the exact ``record`` to
send) or a :class:`Rejection` (a stable reason code and a short human ``detail``). It
never raises for any row value; the lower-level :func:`normalize_domain`,
:func:`normalize_email` and :func:`normalize_linkedin_url` raise :class:`InvalidInput`
carrying the same reason codes. All functions are pure (no I/O) and cheap: regexes are
compiled once at import time.

Rejection reasons (stable short codes, see :data:`REJECTION_REASONS`):

- ``null``: the value is ``None`` (or the field is absent from the row).
- ``empty``: the value is an empty string or only whitespace.
- ``not_a_string``: the value is not a ``str`` (``bytes``, ``int``, ``float``, ``bool``,
  ...). Nothing is coerced: ``123`` is not the domain ``"123"``.
- ``too_long``: the raw string is longer than :data:`MAX_INPUT_CHARS` (2048) characters,
  or the normalized value exceeds a protocol limit (domain > 253 octets, domain label
  > 63 octets, email local part > 64 octets, email > 254 octets, name > 256 characters,
  LinkedIn slug > 100 characters).
- ``control_characters``: the value contains a C0 (``\x00``-``\x1f``), DEL or C1
  (``\x80``-``\x9f``) control character after trimming. Surrounding whitespace
  (including tab, CR, LF) is trimmed first; the C0/C1 controls that Python counts as
  whitespace but that never legitimately surround a value (``\x1c``-``\x1f`` and NEL
  ``\x85``) are *not* trimmed and are rejected. Lone surrogates (``\ud800``-``\udfff``,
  which cannot be encoded as UTF-8 JSON) are rejected with this code too.
- ``invalid_domain``: not a valid public hostname after normalization.
- ``invalid_email``: not a valid email address after normalization.
- ``invalid_linkedin_url``: not a ``linkedin.com/in/<slug>`` profile URL.
- ``missing_fields``: a people row with no identity at all (no email, no LinkedIn URL,
  and not all of first_name, last_name and domain), or a row that is not a mapping.

Domains (company ``domain``, people ``domain``): trimmed, lowercased; a leading
``scheme://`` (any scheme) or ``//``, then anything from the first ``/``, ``\``, ``?``
or ``#`` on, then ``userinfo@`` (only when a scheme was given), a ``:port`` and one
trailing dot are removed, then (after IDNA encoding) leading ``www.`` labels (only while
at least two labels remain, so ``www.com`` stays itself; this keeps normalization
idempotent). Unicode labels are IDNA-encoded with Python's stdlib codec (IDNA 2003:
``münchen.de`` -> ``xn--mnchen-3ya.de``; note ``ß`` maps to ``ss``). Unicode labels may
contain only letters, marks and digits (emoji, symbols and invisible format characters
are rejected); ``xn--`` labels must decode and obey the same rule. The result must be a
hostname of at least two labels, each 1-63 characters of ``[a-z0-9-]`` not starting or
ending with ``-``, with a non-numeric TLD and at most 253 characters. IP addresses and
``localhost`` are rejected. Strictness: a bare ``user@stripe.com`` is rejected as
``invalid_domain`` (it is an email, and guessing would bill the wrong company);
homoglyph domains (``\u0455tripe.com`` with a Cyrillic ``\u0455``) are valid IDNs and
are kept distinct from their ASCII look-alikes, never conflated.

Emails: trimmed, lowercased (local part included: virtually every provider treats it
case-insensitively and it makes the dedupe key stable); exactly one ``@``; local part
1-64 octets (UTF-8) of non-whitespace, visible characters (no zero-width, private-use or
unassigned code points) without RFC 5322 specials (``()<>[]:;@\,"``), no leading,
trailing or doubled dot (quoted local parts are not accepted); the domain part is
IDNA-normalized and validated with the domain rules but is *not* URL-stripped and keeps
``www.`` (a mail domain is taken literally; a trailing dot is dropped); total at most
254 octets. Plus tags are kept: ``a+b@x.com`` and ``a@x.com`` are different mailboxes to
a verifier (a server may reject the tagged one), and only some providers implement
sub-addressing, so collapsing them would return the wrong verdict for one of the two
rows.

Records and keys per enrichment type:

- ``company``: record ``{"domain": <domain>}``, key ``<domain>``. The optional ``name``
  is ignored (neither sent nor part of the key): the domain alone identifies the company
  and sending a name could make two rows for one domain look different.
- ``email``: record ``{"email": <email>}``, key ``<email>``.
- ``people``: identity precedence is email, then linkedin_url, then first_name +
  last_name + domain. A field is *present* when it is not ``None`` and not a blank
  string. The first present field that is valid wins; a present but invalid
  higher-precedence field falls through to the next one (the row is still enrichable,
  and the invalid field would have been rejected by ApiOne anyway). Only the chosen
  identity fields are sent:

  - ``{"email": e}``, key ``email:<e>``;
  - ``{"linkedin_url": "https://www.linkedin.com/in/<slug>"}``, key
    ``linkedin:linkedin.com/in/<slug>``;
  - ``{"first_name", "last_name", "domain"}`` with the names trimmed but otherwise as
    given and the domain normalized, key ``name:<first> <last>@<domain>`` with the names'
    inner whitespace collapsed and casefolded. (The key cannot tell ``"Mary Ann" +
    "Lee"`` from ``"Mary" + "Ann Lee"``; both describe the same full name.)

  If every present field is invalid, the rejection carries the reason of the
  highest-precedence present field and a detail listing each failure; if no identity
  field is present (or only part of the name triple), the reason is ``missing_fields``.

LinkedIn URLs: trimmed, lowercased; optional ``http://`` or ``https://``; host
``linkedin.com`` with an optional ``www.``, ``m.`` or two-letter country prefix; query,
fragment and trailing slashes removed; the path must be exactly ``/in/<slug>``.
The slug is percent-decoded and must be 1-100 letters, digits, ``-`` or ``_``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote

from apione_source.errors import ApiOneError
from apione_source.models import EnrichmentType

__all__ = [
    "CONTROL_CHARACTERS",
    "EMPTY",
    "INVALID_DOMAIN",
    "INVALID_EMAIL",
    "INVALID_LINKEDIN_URL",
    "MAX_INPUT_CHARS",
    "MISSING_FIELDS",
    "NOT_A_STRING",
    "NULL",
    "REJECTION_REASONS",
    "TOO_LONG",
    "InvalidInput",
    "Normalized",
    "Rejection",
    "normalize_domain",
    "normalize_email",
    "normalize_linkedin_url",
    "normalize_record",
]

# --- reason codes ----------------------------------------------------------------------

NULL: Final = "null"
EMPTY: Final = "empty"
NOT_A_STRING: Final = "not_a_string"
TOO_LONG: Final = "too_long"
CONTROL_CHARACTERS: Final = "control_characters"
INVALID_DOMAIN: Final = "invalid_domain"
INVALID_EMAIL: Final = "invalid_email"
INVALID_LINKEDIN_URL: Final = "invalid_linkedin_url"
MISSING_FIELDS: Final = "missing_fields"

REJECTION_REASONS: Final[frozenset[str]] = frozenset(
    {
        NULL,
        EMPTY,
        NOT_A_STRING,
        TOO_LONG,
        CONTROL_CHARACTERS,
        INVALID_DOMAIN,
        INVALID_EMAIL,
        INVALID_LINKEDIN_URL,
        MISSING_FIELDS,
    }
)
"""Every reason code a :class:`Rejection` or :class:`InvalidInput` can carry."""

# --- limits ----------------------------------------------------------------------------

MAX_INPUT_CHARS: Final = 2048
"""Raw strings longer than this are rejected as ``too_long`` before any work."""

_MAX_DOMAIN = 253
_MAX_LABEL = 63
_MAX_LOCAL = 64
_MAX_EMAIL = 254
_MAX_NAME = 256
_MAX_SLUG = 100
_PREVIEW_CHARS = 80

# --- precompiled patterns and tables ---------------------------------------------------

# Whitespace trimmed around every value: ASCII whitespace, Unicode space separators,
# line/paragraph separators, zero-width characters and the BOM. Deliberately excludes
# \x1c-\x1f and \x85 (controls that str.strip() would remove) so they are rejected.
_TRIM = (
    " \t\n\r\x0b\x0c\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\u200b\u200c\u200d\u2060\ufeff"
)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.\-]*://")
_URL_CUT_RE = re.compile(r"[/\\?#]")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_DIGITS_RE = re.compile(r"[0-9]+")
# Unicode full stops that IDNA treats as label separators.
_DOTS_TABLE = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_WHITESPACE_RE = re.compile(r"\s")
_LOCAL_FORBIDDEN_RE = re.compile(r'[\s()<>\[\]:;@\\,"]')
_LINKEDIN_SCHEME_RE = re.compile(r"https?://")
_LINKEDIN_HOST_RE = re.compile(r"(?:(?:www|m|[a-z]{2})\.)?linkedin\.com")
_LINKEDIN_SLUG_EXTRA = frozenset("-_")
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Co", "Cn", "Cs", "Zl", "Zp", "Zs"})


# --- public types ----------------------------------------------------------------------


@dataclass(frozen=True)
class Normalized:
    """A valid row.

    Attributes:
        key: Dedupe key; rows with equal keys are the same enrichment.
        record: Exactly what is sent to ApiOne for this row.
    """

    key: str
    record: dict[str, str]


@dataclass(frozen=True)
class Rejection:
    """A row that must not be sent.

    Attributes:
        reason: A code from :data:`REJECTION_REASONS`.
        detail: Short human message; echoes at most 80 characters of the bad value.
    """

    reason: str
    detail: str


class InvalidInput(ApiOneError, ValueError):
    """A single value failed normalization.

    Attributes:
        reason: A code from :data:`REJECTION_REASONS`.
        detail: Short human message; echoes at most 80 characters of the bad value.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}", code=reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.detail))

    def __repr__(self) -> str:
        return f"InvalidInput({self.reason!r}, {self.detail!r})"


# --- helpers ---------------------------------------------------------------------------


def _preview(value: str) -> str:
    """Return a repr of at most the first 80 characters of ``value``."""
    if len(value) <= _PREVIEW_CHARS:
        return repr(value)
    return f"{value[:_PREVIEW_CHARS]!r}... ({len(value)} chars)"


def _prepare(value: object, what: str) -> str:
    """Check the type, raw length and characters of a value, and trim it.

    Args:
        value: The raw value.
        what: Name of the expected kind of value, used in details.

    Returns:
        The trimmed, non-empty, control-free string (not lowercased).

    Raises:
        InvalidInput: ``null``, ``not_a_string``, ``too_long``, ``empty`` or
            ``control_characters``.
    """
    if value is None:
        raise InvalidInput(NULL, f"{what} is null")
    if not isinstance(value, str):
        raise InvalidInput(NOT_A_STRING, f"{what} must be a string, got {type(value).__name__}")
    text = str.__str__(value)  # a plain str even for str subclasses
    if len(text) > MAX_INPUT_CHARS:
        raise InvalidInput(
            TOO_LONG, f"{what} is {len(text)} characters, more than {MAX_INPUT_CHARS}"
        )
    text = text.strip(_TRIM)
    if not text:
        raise InvalidInput(EMPTY, f"{what} is empty")
    if _CONTROL_RE.search(text) is not None:
        raise InvalidInput(
            CONTROL_CHARACTERS, f"{what} contains control characters: {_preview(text)}"
        )
    return text


def _is_idn_char_ok(label: str) -> bool:
    """True if every non-ASCII character of ``label`` is a letter, mark or digit."""
    return all(ch < "\x80" or unicodedata.category(ch)[0] in "LMN" for ch in label)


def _is_visible(text: str) -> bool:
    """True unless ``text`` has invisible format, private-use or unassigned characters."""
    return all(unicodedata.category(ch) not in _INVISIBLE_CATEGORIES for ch in text)


def _host_to_ascii(host: str, reason: str, shown: str) -> str:
    """IDNA-encode and validate a lowercased hostname.

    Args:
        host: Hostname, already lowercased and stripped of URL parts.
        reason: Reason code used for invalid hosts.
        shown: The original value, for details.

    Returns:
        The ASCII hostname.

    Raises:
        InvalidInput: ``reason`` or ``too_long``.
    """
    if not host.isascii():
        labels = host.translate(_DOTS_TABLE).split(".")
        encoded: list[str] = []
        for label in labels:
            if label.isascii():
                encoded.append(label)
                continue
            if not _is_idn_char_ok(label):
                raise InvalidInput(
                    reason,
                    f"domain has characters not allowed in a hostname: {_preview(shown)}",
                )
            try:
                encoded.append(label.encode("idna").decode("ascii").lower())
            except UnicodeError:
                raise InvalidInput(reason, f"not a valid IDN domain: {_preview(shown)}") from None
        host = ".".join(encoded)
    if len(host) > _MAX_DOMAIN:
        raise InvalidInput(TOO_LONG, f"domain is longer than {_MAX_DOMAIN} characters")
    labels = host.split(".")
    if len(labels) < 2:
        raise InvalidInput(
            reason, f"domain needs at least two labels (like example.com): {_preview(shown)}"
        )
    for label in labels:
        if len(label) > _MAX_LABEL:
            raise InvalidInput(TOO_LONG, f"domain label is longer than {_MAX_LABEL} characters")
        if _LABEL_RE.fullmatch(label) is None:
            raise InvalidInput(reason, f"not a valid hostname: {_preview(shown)}")
        if label.startswith("xn--"):
            try:
                decoded = label.encode("ascii").decode("idna")
            except UnicodeError:
                raise InvalidInput(
                    reason, f"invalid punycode label in domain: {_preview(shown)}"
                ) from None
            if not _is_idn_char_ok(decoded):
                raise InvalidInput(
                    reason,
                    f"domain has characters not allowed in a hostname: {_preview(shown)}",
                )
    if _DIGITS_RE.fullmatch(labels[-1]) is not None:
        raise InvalidInput(
            reason, f"IP addresses and numeric TLDs are not domains: {_preview(shown)}"
        )
    return host


# --- public functions ------------------------------------------------------------------


def normalize_domain(value: object) -> str:
    """Normalize a company domain, URL or hostname to its canonical ASCII form.

    Args:
        value: The raw value, typically a warehouse cell.

    Returns:
        The normalized domain, e.g. ``"stripe.com"`` or ``"xn--mnchen-3ya.de"``.

    Raises:
        InvalidInput: With one of the documented reason codes.
    """
    shown = _prepare(value, "domain")
    host = shown.lower()
    has_scheme = False
    match = _SCHEME_RE.match(host)
    if match is not None:
        host = host[match.end() :]
        has_scheme = True
    elif host.startswith("//"):
        host = host[2:]
        has_scheme = True
    cut = _URL_CUT_RE.search(host)
    if cut is not None:
        host = host[: cut.start()]
    if "@" in host:
        if not has_scheme:
            raise InvalidInput(
                INVALID_DOMAIN,
                f"looks like an email address, not a domain: {_preview(shown)}",
            )
        host = host.rpartition("@")[2]
    if host.startswith("["):
        raise InvalidInput(INVALID_DOMAIN, f"IP addresses are not domains: {_preview(shown)}")
    if ":" in host:
        host, _, port = host.rpartition(":")
        if port and (len(port) > 5 or _DIGITS_RE.fullmatch(port) is None):
            raise InvalidInput(INVALID_DOMAIN, f"not a valid host:port: {_preview(shown)}")
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise InvalidInput(INVALID_DOMAIN, f"no host in value: {_preview(shown)}")
    host = _host_to_ascii(host, INVALID_DOMAIN, shown)
    # after IDNA, so that e.g. fullwidth "\uff57\uff57\uff57." is stripped too (idempotence)
    while host.startswith("www.") and "." in host[4:]:
        host = host[4:]
    return host


def normalize_email(value: object) -> str:
    """Normalize an email address (lowercase, IDNA domain; plus tags kept).

    Args:
        value: The raw value, typically a warehouse cell.

    Returns:
        The normalized address, e.g. ``"jane+news@xn--mnchen-3ya.de"``.

    Raises:
        InvalidInput: With one of the documented reason codes.
    """
    shown = _prepare(value, "email")
    text = shown.lower()
    if text.count("@") != 1:
        raise InvalidInput(INVALID_EMAIL, f"email must contain exactly one '@': {_preview(shown)}")
    local, _, domain = text.partition("@")
    if not local:
        raise InvalidInput(INVALID_EMAIL, f"email has an empty local part: {_preview(shown)}")
    if len(local.encode("utf-8", "surrogatepass")) > _MAX_LOCAL:
        raise InvalidInput(TOO_LONG, f"email local part is longer than {_MAX_LOCAL} octets")
    if (
        _LOCAL_FORBIDDEN_RE.search(local) is not None
        or local.startswith(".")
        or local.endswith(".")
        or ".." in local
        or not (local.isascii() or _is_visible(local))
    ):
        raise InvalidInput(INVALID_EMAIL, f"invalid email local part: {_preview(shown)}")
    if domain.endswith("."):
        domain = domain[:-1]
    if not domain or _WHITESPACE_RE.search(domain) is not None:
        raise InvalidInput(INVALID_EMAIL, f"invalid email domain: {_preview(shown)}")
    domain = _host_to_ascii(domain, INVALID_EMAIL, shown)
    email = f"{local}@{domain}"
    if len(email.encode("utf-8", "surrogatepass")) > _MAX_EMAIL:
        raise InvalidInput(TOO_LONG, f"email is longer than {_MAX_EMAIL} octets")
    return email


def normalize_linkedin_url(value: object) -> str:
    """Normalize a LinkedIn profile URL to ``linkedin.com/in/<slug>``.

    Args:
        value: The raw value, typically a warehouse cell.

    Returns:
        The canonical form ``"linkedin.com/in/<slug>"`` (slug lowercased and
        percent-decoded).

    Raises:
        InvalidInput: With one of the documented reason codes.
    """
    shown = _prepare(value, "linkedin_url")
    text = shown.lower()
    match = _LINKEDIN_SCHEME_RE.match(text)
    if match is not None:
        text = text[match.end() :]
    for sep in "#?":
        text = text.partition(sep)[0]
    text = text.rstrip("/")
    host, _, path = text.partition("/")
    kind, _, slug = path.partition("/")
    if _LINKEDIN_HOST_RE.fullmatch(host) is None or kind != "in" or not slug or "/" in slug:
        raise InvalidInput(
            INVALID_LINKEDIN_URL,
            f"not a linkedin.com/in/<slug> profile URL: {_preview(shown)}",
        )
    slug = unquote(slug, errors="replace").lower()
    if len(slug) > _MAX_SLUG:
        raise InvalidInput(TOO_LONG, f"LinkedIn slug is longer than {_MAX_SLUG} characters")
    if not slug or not all(ch.isalnum() or ch in _LINKEDIN_SLUG_EXTRA for ch in slug):
        raise InvalidInput(
            INVALID_LINKEDIN_URL, f"invalid LinkedIn profile slug: {_preview(shown)}"
        )
    return f"linkedin.com/in/{slug}"


def _normalize_name(value: object, what: str) -> tuple[str, str]:
    """Return ``(trimmed, key_form)`` of a person name."""
    name = _prepare(value, what)
    if len(name) > _MAX_NAME:
        raise InvalidInput(TOO_LONG, f"{what} is longer than {_MAX_NAME} characters")
    return name, " ".join(name.split()).casefold()


def _is_present(value: object) -> bool:
    """True unless the value is ``None`` or a blank string."""
    if value is None:
        return False
    return not (isinstance(value, str) and not value.strip(_TRIM))


def _normalize_people(values: Mapping[str, Any]) -> Normalized | Rejection:
    """Choose the identity of a people row by precedence (see the module docstring)."""
    failures: list[tuple[str, str]] = []
    email = values.get("email")
    if _is_present(email):
        try:
            e = normalize_email(email)
        except InvalidInput as exc:
            failures.append((exc.reason, f"email: {exc.detail}"))
        else:
            return Normalized(key=f"email:{e}", record={"email": e})
    linkedin = values.get("linkedin_url")
    if _is_present(linkedin):
        try:
            url = normalize_linkedin_url(linkedin)
        except InvalidInput as exc:
            failures.append((exc.reason, f"linkedin_url: {exc.detail}"))
        else:
            slug = url[len("linkedin.com/in/") :]
            return Normalized(
                key=f"linkedin:{url}",
                record={"linkedin_url": f"https://www.linkedin.com/in/{quote(slug, safe='')}"},
            )
    first, last, domain = (values.get(f) for f in ("first_name", "last_name", "domain"))
    present = [_is_present(v) for v in (first, last, domain)]
    if all(present):
        try:
            first_name, first_key = _normalize_name(first, "first_name")
            last_name, last_key = _normalize_name(last, "last_name")
            d = normalize_domain(domain)
        except InvalidInput as exc:
            failures.append((exc.reason, exc.detail))
        else:
            return Normalized(
                key=f"name:{first_key} {last_key}@{d}",
                record={"first_name": first_name, "last_name": last_name, "domain": d},
            )
    elif any(present):
        failures.append(
            (MISSING_FIELDS, "first_name, last_name and domain are all needed together")
        )
    if not failures:
        return Rejection(
            MISSING_FIELDS,
            "people row needs email, linkedin_url, or first_name + last_name + domain",
        )
    return Rejection(failures[0][0], "; ".join(detail for _, detail in failures))


def normalize_record(
    enrichment_type: EnrichmentType | str, values: Mapping[str, Any]
) -> Normalized | Rejection:
    """Normalize one input row for an enrichment type.

    Never raises for any row content; an unknown ``enrichment_type`` is a programming
    error and raises ``ValueError``.

    Args:
        enrichment_type: ``company``, ``people`` or ``email``.
        values: The row, keyed by ApiOne input field names (``domain``, ``name``,
            ``email``, ``linkedin_url``, ``first_name``, ``last_name``). Absent fields
            count as ``None``; other keys are ignored.

    Returns:
        A :class:`Normalized` with the dedupe key and the record to send, or a
        :class:`Rejection` with a reason from :data:`REJECTION_REASONS`.

    Raises:
        ValueError: ``enrichment_type`` is not a known enrichment type.
    """
    # (EnrichmentType(member) costs more than normalizing a domain: once per row adds up)
    kind = (
        enrichment_type
        if isinstance(enrichment_type, EnrichmentType)
        else EnrichmentType(enrichment_type)
    )
    if not isinstance(values, Mapping):
        return Rejection(MISSING_FIELDS, f"row must be a mapping, got {type(values).__name__}")
    try:
        if kind is EnrichmentType.COMPANY:
            domain = normalize_domain(values.get("domain"))
            return Normalized(key=domain, record={"domain": domain})
        if kind is EnrichmentType.EMAIL:
            email = normalize_email(values.get("email"))
            return Normalized(key=email, record={"email": email})
    except InvalidInput as exc:
        return Rejection(exc.reason, exc.detail)
    return _normalize_people(values)
