"""Character rules for text that reaches the store or other users.

One definition, shared by the services: NUL cannot be stored in PostgreSQL
``text``; control characters (Unicode category ``Cc``: U+0000-U+001F and
U+007F-U+009F) have no place in names and identifiers; lone surrogates
(U+D800-U+DFFF, which JSON's ``\\uXXXX`` escapes can produce) cannot be
encoded as UTF-8 at all.
"""

from __future__ import annotations

import re

# Category Cc is exactly these two ranges (unicodedata agrees for every code point).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_nul(value: str) -> bool:
    """Whether ``value`` holds U+0000."""
    return "\x00" in value


def has_control_chars(value: str) -> bool:
    """Whether ``value`` holds a control character (category Cc, NUL included)."""
    return _CONTROL.search(value) is not None


def has_surrogates(value: str) -> bool:
    """Whether ``value`` holds a lone surrogate (not encodable as UTF-8)."""
    return _SURROGATE.search(value) is not None
