"""Names and addresses from Redis, made safe to show.

Whatever is in Redis was written by someone: a key name may hold bytes that
are not UTF-8 or terminal control sequences (ANSI escapes that rewrite what
an operator sees), and a LOCATION may carry a password. Everything
``apee_stats`` prints or emits goes through these first.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Query parameters of a Redis URL whose values are secrets.
_SECRET_PARAMS = re.compile(r"pass|secret|token|auth|key", re.IGNORECASE)
REDACTED = "***"


def text(value: Any) -> str:
    """``value`` as text: bytes that are not UTF-8 become ``\\xNN`` escapes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def printable(value: str) -> str:
    """``value`` with every non-printable character escaped (``\\x1b``, ``\\n``)."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)


def redact_url(url: str) -> str:
    """A Redis URL without its secrets: the password and secret query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{user}@{host}"
    query = urlencode(
        [
            (name, REDACTED if _SECRET_PARAMS.search(name) else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ],
        safe="*",
    )
    redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc and url.startswith(f"{parts.scheme}://"):  # unix:///path
        redacted = redacted.replace(":", "://", 1)
    return redacted
