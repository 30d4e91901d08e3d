"""Deterministic synthetic enrichment data for the sandbox.

Everything here is a pure function of its input: the same record always yields the
same outcome and the same payload, in any process, because every choice is drawn from
a SHA-256 stream of the input (never from a shared ``random`` state, whose sequence
would depend on call order).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from datetime import datetime, timezone
from typing import Any, TypeVar

_T = TypeVar("_T")

# A pragmatic domain check: what ApiOne accepts as a bare domain (no scheme, no path).
_DOMAIN_RE = re.compile(r"^(?=.{4,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}$")
_LOCAL_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}$")

NOT_FOUND_RATE = 0.15


def canonical_json(record: Any) -> str:
    """Return the canonical JSON of a record (sorted keys, no spaces).

    Args:
        record: A decoded JSON value.

    Returns:
        The canonical text; the sandbox's billing and hashing key.
    """
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def unit_hash(*parts: str) -> float:
    """Map strings to a stable float in ``[0, 1)``.

    Args:
        *parts: Strings hashed together (separated so ``("ab", "c") != ("a", "bc")``).

    Returns:
        A float uniformly spread over ``[0, 1)``.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class _Stream:
    """An endless deterministic stream of choices derived from one seed string."""

    # One SHAKE-256 call yields enough words for a whole payload (a company takes ~25);
    # the stream re-hashes with a longer output only in the rare case it runs out.
    _WORDS = 48

    def __init__(self, seed: str) -> None:
        self._seed = seed.encode("utf-8")
        self._words: tuple[int, ...] = ()
        self._next = 0
        self._fill(self._WORDS)

    def _fill(self, count: int) -> None:
        digest = hashlib.shake_256(self._seed).digest(4 * count)
        self._words = struct.unpack(f">{count}I", digest)

    def _u32(self) -> int:
        if self._next >= len(self._words):
            # Extending the SHAKE output keeps the words already used unchanged.
            self._fill(2 * len(self._words))
        value = self._words[self._next]
        self._next += 1
        return value

    def unit(self) -> float:
        return self._u32() / 2.0**32

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in ``[low, high]``."""
        return low + self._u32() % (high - low + 1)

    def pick(self, options: tuple[_T, ...]) -> _T:
        return options[self._u32() % len(options)]

    def sample(self, options: tuple[_T, ...], k: int) -> list[_T]:
        pool = list(options)
        return [pool.pop(self._u32() % len(pool)) for _ in range(min(k, len(pool)))]


# --- vocabularies ----------------------------------------------------------------------

_INDUSTRIES = (
    "Software",
    "Financial Services",
    "E-commerce",
    "Healthcare",
    "Telecommunications",
    "Manufacturing",
    "Media",
    "Education",
    "Logistics",
    "Energy",
    "Retail",
    "Consulting",
)
_TAGS = (
    "B2B",
    "B2C",
    "SaaS",
    "Enterprise",
    "Marketplace",
    "Payments",
    "AI",
    "Developer Tools",
    "Mobile",
    "Analytics",
    "Security",
    "Open Source",
    "Fintech",
    "Hardware",
)
_TECHNOLOGIES = (
    "AWS",
    "Google Cloud",
    "Azure",
    "Kubernetes",
    "React",
    "Python",
    "Go",
    "PostgreSQL",
    "Snowflake",
    "Salesforce",
    "HubSpot",
    "Stripe",
    "Segment",
    "Datadog",
    "Cloudflare",
    "Zendesk",
    "Slack",
    "Okta",
)
_LOCATIONS = (
    ("San Francisco", "California", "United States", "US", "94105"),
    ("New York", "New York", "United States", "US", "10001"),
    ("Austin", "Texas", "United States", "US", "73301"),
    ("London", "England", "United Kingdom", "GB", "EC1A 1BB"),
    ("Berlin", "Berlin", "Germany", "DE", "10115"),
    ("Paris", "Ile-de-France", "France", "FR", "75001"),
    ("Toronto", "Ontario", "Canada", "CA", "M5H 2N2"),
    ("Dublin", "Leinster", "Ireland", "IE", "D02 X285"),
    ("Amsterdam", "North Holland", "Netherlands", "NL", "1012"),
    ("Sydney", "New South Wales", "Australia", "AU", "2000"),
    ("Singapore", None, "Singapore", "SG", "018956"),
    ("Bangalore", "Karnataka", "India", "IN", "560001"),
)
_STREETS = ("Market St", "Main St", "High St", "King St", "Broadway", "Harbour Rd", "Park Ave")
_EMPLOYEE_RANGES = (
    (10, "1-10"),
    (50, "11-50"),
    (200, "51-200"),
    (500, "201-500"),
    (1000, "501-1000"),
    (5000, "1001-5000"),
    (10000, "5001-10000"),
)
_FIRST_NAMES = (
    "Alice",
    "Bruno",
    "Chen",
    "Dana",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kara",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rafael",
    "Sara",
    "Tomas",
)
_LAST_NAMES = (
    "Anders",
    "Brooks",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Hughes",
    "Ivanova",
    "Jensen",
    "Kim",
    "Lopez",
    "Murphy",
    "Nakamura",
    "Okafor",
    "Patel",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Weber",
)
_ROLES = (
    ("Founder & CEO", "owner", "Executive"),
    ("Chief Technology Officer", "executive", "Engineering"),
    ("VP of Sales", "executive", "Sales"),
    ("Director of Marketing", "director", "Marketing"),
    ("Engineering Manager", "manager", "Engineering"),
    ("Product Manager", "manager", "Product"),
    ("Senior Software Engineer", "senior", "Engineering"),
    ("Senior Account Executive", "senior", "Sales"),
    ("Data Analyst", "entry", "Data"),
    ("Customer Success Associate", "entry", "Customer Success"),
)
_PAST_TITLES = ("Software Engineer", "Analyst", "Consultant", "Associate", "Account Manager")
_PAST_EMPLOYERS = ("Initech", "Globex", "Umbrella Labs", "Hooli", "Vandelay Industries", "Acme")
_FREE_PROVIDERS = frozenset(
    {"gmail.com", "yahoo.com", "hotmail.com", "outlook.com", "icloud.com", "proton.me", "gmx.de"}
)
_DISPOSABLE = frozenset({"mailinator.com", "10minutemail.com", "guerrillamail.com", "yopmail.com"})
_ROLE_LOCALS = frozenset(
    {"info", "admin", "sales", "support", "contact", "hello", "billing", "noreply", "team"}
)
_COMPANY_SUFFIXES = (", Inc.", " Ltd.", " GmbH", " LLC", " S.A.", " B.V.")


# --- validation ------------------------------------------------------------------------


def is_domain(value: object) -> bool:
    """Tell whether ``value`` is a bare domain such as ``stripe.com``.

    Args:
        value: Anything from a submitted record.

    Returns:
        True for a string that is a syntactically valid domain (case-insensitive).
    """
    return isinstance(value, str) and bool(_DOMAIN_RE.match(value.lower()))


def is_email(value: object) -> bool:
    """Tell whether ``value`` is a syntactically valid email address.

    Args:
        value: Anything from a submitted record.

    Returns:
        True for ``local@domain`` with one ``@``, a sane local part and a valid domain.
    """
    if not isinstance(value, str) or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    return bool(_LOCAL_RE.match(local)) and is_domain(domain)


def _nonempty(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def invalid_reason(enrichment_type: str, record: dict[str, Any]) -> str | None:
    """Say why a record cannot be enriched, or None when it is well-formed.

    Args:
        enrichment_type: ``company``, ``people`` or ``email``.
        record: The submitted record (a JSON object).

    Returns:
        A human-readable reason, or None.
    """
    if enrichment_type == "company":
        if "domain" not in record:
            return "domain is required"
        return None if is_domain(record["domain"]) else "domain is not a valid domain"
    if enrichment_type == "email":
        if "email" not in record:
            return "email is required"
        return None if is_email(record["email"]) else "email is not a valid email address"
    # people: any one complete identifier suffices.
    if is_email(record.get("email")):
        return None
    linkedin = record.get("linkedin_url")
    if isinstance(linkedin, str) and "linkedin.com/in/" in linkedin.lower():
        return None
    if (
        _nonempty(record.get("first_name"))
        and _nonempty(record.get("last_name"))
        and is_domain(record.get("domain"))
    ):
        return None
    return "needs email, linkedin_url, or first_name + last_name + domain"


def is_not_found(record_key: str) -> bool:
    """Tell whether ApiOne's (simulated) database lacks this record.

    Args:
        record_key: The record's canonical JSON.

    Returns:
        True for about 15% of inputs, always the same ones.
    """
    return unit_hash("not_found", record_key) < NOT_FOUND_RATE


# --- payloads --------------------------------------------------------------------------


def _updated_at(s: _Stream) -> str:
    # A fixed past window keeps payloads independent of the wall clock (determinism).
    ts = 1_704_067_200 + s.integer(0, 365 * 24 * 3600)  # during 2024
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _location(s: _Stream, with_street: bool) -> dict[str, Any]:
    city, region, country, code, postal = s.pick(_LOCATIONS)
    street = f"{s.integer(1, 999)} {s.pick(_STREETS)}" if with_street else None
    return {
        "street": street,
        "city": city,
        "region": region,
        "country": country,
        "country_code": code,
        "postal_code": postal if with_street else None,
    }


def _brand(domain: str) -> str:
    label = domain.lower().split(".")[0]
    return " ".join(part.capitalize() for part in label.split("-"))


def company(record: dict[str, Any]) -> dict[str, Any]:
    """Build the Company payload for a valid ``company`` record.

    Args:
        record: A record with a valid ``domain`` (and optionally ``name``).

    Returns:
        A Company object as in the contract.
    """
    domain = str(record["domain"]).lower()
    s = _Stream("company:" + domain)
    name = record["name"] if _nonempty(record.get("name")) else _brand(domain)
    employees = s.pick((8, 35, 120, 340, 780, 2400, 7600, 15000)) + s.integer(0, 7)
    employee_range = next((r for cap, r in _EMPLOYEE_RANGES if employees <= cap), "10001+")
    company_type = s.pick(("private", "private", "private", "public", "nonprofit"))
    label = domain.split(".")[0]
    industry = s.pick(_INDUSTRIES)
    return {
        "domain": domain,
        "name": name,
        "legal_name": f"{name}{s.pick(_COMPANY_SUFFIXES)}",
        "description": f"{name} is a {industry.lower()} company serving customers worldwide.",
        "industry": industry,
        "tags": s.sample(_TAGS, s.integer(2, 4)),
        "employee_count": employees,
        "employee_range": employee_range,
        "founded_year": s.integer(1965, 2021),
        "company_type": company_type,
        "ticker": label[:4].upper() if company_type == "public" else None,
        "annual_revenue_usd": employees * s.integer(80, 400) * 1000,
        "location": _location(s, with_street=True),
        "linkedin_url": f"https://www.linkedin.com/company/{label}",
        "twitter_handle": label[:15] if s.unit() < 0.8 else None,
        "technologies": s.sample(_TECHNOLOGIES, s.integer(3, 8)),
        "updated_at": _updated_at(s),
    }


def _names_from_local(local: str) -> tuple[str, str] | None:
    # Digits are dropped: "jane.doe2" is still Jane Doe.
    parts = [p for p in (re.sub(r"\d+", "", q) for q in re.split(r"[._+-]", local)) if p.isalpha()]
    if len(parts) >= 2:
        return parts[0].capitalize(), parts[-1].capitalize()
    return None


def person(record: dict[str, Any]) -> dict[str, Any]:
    """Build the Person payload for a valid ``people`` record.

    Args:
        record: A record identifying a person (email, linkedin_url or names + domain).

    Returns:
        A Person object as in the contract.
    """
    s = _Stream("person:" + canonical_json(record))
    email = record["email"].lower() if is_email(record.get("email")) else None
    first: str = s.pick(_FIRST_NAMES)
    last: str = s.pick(_LAST_NAMES)
    domain: str | None = None
    if _nonempty(record.get("first_name")) and _nonempty(record.get("last_name")):
        first, last = record["first_name"].strip(), record["last_name"].strip()
    elif email is not None and (names := _names_from_local(email.split("@")[0])):
        first, last = names
    if is_domain(record.get("domain")):
        domain = record["domain"].lower()
    elif email is not None and email.split("@")[1] not in _FREE_PROVIDERS:
        domain = email.split("@")[1]
    if domain is None:
        domain = f"{s.pick(_PAST_EMPLOYERS).split()[0].lower()}.com"
    if email is None:
        email = f"{first.lower()}.{last.lower()}@{domain}"
    linkedin = record.get("linkedin_url")
    if not (isinstance(linkedin, str) and "linkedin.com/in/" in linkedin.lower()):
        linkedin = (
            f"https://www.linkedin.com/in/{first.lower()}-{last.lower()}-{s.integer(100, 999)}"
        )
    title, seniority, department = s.pick(_ROLES)
    history: list[dict[str, Any]] = []
    year = 2024 - s.integer(0, 3)
    history.append(
        {
            "company": _brand(domain),
            "title": title,
            "start_date": f"{year}-{s.integer(1, 12):02d}-01",
            "end_date": None,
        }
    )
    for _ in range(s.integer(0, 3)):
        end = year
        year = end - s.integer(1, 5)
        history.append(
            {
                "company": s.pick(_PAST_EMPLOYERS),
                "title": s.pick(_PAST_TITLES),
                "start_date": f"{year}-{s.integer(1, 12):02d}-01",
                "end_date": f"{end}-{s.integer(1, 12):02d}-01",
            }
        )
    return {
        "full_name": f"{first} {last}",
        "first_name": first,
        "last_name": last,
        "email": email,
        "title": title,
        "seniority": seniority,
        "department": department,
        "linkedin_url": linkedin,
        "location": _location(s, with_street=False),
        "company": {"name": _brand(domain), "domain": domain},
        "employment_history": history,
        "updated_at": _updated_at(s),
    }


def email_check(record: dict[str, Any]) -> dict[str, Any]:
    """Build the EmailCheck payload for a valid ``email`` record.

    Args:
        record: A record with a valid ``email``.

    Returns:
        An EmailCheck object as in the contract.
    """
    email = str(record["email"]).lower()
    local, domain = email.split("@")
    s = _Stream("email:" + email)
    free = domain in _FREE_PROVIDERS
    disposable = domain in _DISPOSABLE
    role = local in _ROLE_LOCALS
    mx_found = not disposable and s.unit() < 0.97
    if not mx_found:
        deliverability = "undeliverable"
    elif disposable or role:
        deliverability = "risky"
    else:
        deliverability = s.pick(("deliverable",) * 7 + ("risky", "unknown", "undeliverable"))
    names = _names_from_local(local)
    return {
        "email": email,
        "deliverability": deliverability,
        "is_free_provider": free,
        "is_disposable": disposable,
        "is_role_account": role,
        "mx_found": mx_found,
        "domain": domain,
        "person_full_name": f"{names[0]} {names[1]}" if names and not role else None,
        "company_domain": None if free or disposable else domain,
        "updated_at": _updated_at(s),
    }


PAYLOAD_BUILDERS = {"company": company, "people": person, "email": email_check}
