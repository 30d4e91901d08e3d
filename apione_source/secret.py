"""A secret string that does not show itself: not in a repr, a traceback's locals or a pickle.

``repr(Secret("sk_live_..."))`` is ``Secret('***')``; only :meth:`Secret.reveal` returns the
value, and callers use it for the moment they need it (one request header, one check).

The value is not kept as a ``str`` (nor as ``bytes``) anywhere in the object: it is XORed
with a random pad, so a debugger, ``pytest --showlocals``, rich's ``show_locals`` or a
walk over an object graph finds no copy of the key, only two unrelated byte strings.
This is not encryption against someone who can read the process's memory; it keeps the
key out of the places where it leaks by accident.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

__all__ = ["Secret"]


class Secret:
    """A masked secret string; :meth:`reveal` returns it.

    Args:
        value: The secret, or another :class:`Secret` (then it is shared, not copied).

    Raises:
        TypeError: ``value`` is neither a ``str`` nor a :class:`Secret`.
    """

    __slots__ = ("_masked", "_pad")

    _masked: bytes
    _pad: bytes

    def __init__(self, value: str | Secret) -> None:
        if isinstance(value, Secret):
            pad, masked = value._pad, value._masked
        elif isinstance(value, str):
            raw = value.encode("utf-8")
            pad = os.urandom(len(raw))
            masked = bytes(a ^ b for a, b in zip(raw, pad, strict=True))
        else:
            raise TypeError(f"Secret wraps a str, not {type(value).__name__}")
        object.__setattr__(self, "_pad", pad)
        object.__setattr__(self, "_masked", masked)

    def reveal(self) -> str:
        """The secret value; use it at once, do not keep it."""
        return bytes(a ^ b for a, b in zip(self._masked, self._pad, strict=True)).decode("utf-8")

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, format_spec: str) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._masked)

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError("a Secret is immutable")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce__(self) -> NoReturn:
        # A pickle holds the pad and the masked value side by side: the key, one XOR away,
        # in a file. Refuse rather than write it (dlt pickles its trace).
        raise TypeError("a Secret is not pickled")
