"""How the review page shows a record's values, and where it may send a signed-in user back to."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from ..core.audit_filter import format_time

#: Levels of a record the decision page shows; a deeper value (only a record written into the
#: database by hand has one) is shown as :data:`TOO_DEEP`: a record nested 300 levels deep made its
#: page fail with a ``RecursionError`` (an outside red team).
MAX_DEPTH = 32
TOO_DEEP = "\N{HORIZONTAL ELLIPSIS} (nested too deeply to show)"


def short_hash(value: Any) -> str:
    text = str(value or "")
    return text[:16] + "\N{HORIZONTAL ELLIPSIS}" if len(text) > 16 else text


def display(key: str, value: Any, depth: int = 0) -> Any:
    """A record value for display: hashes shortened (the record never holds a token; its chain
    hashes are for ``sts audit verify``, not for reading), at most :data:`MAX_DEPTH` levels."""
    if isinstance(value, str) and (key.endswith("sha256") or key in ("hash", "prev_hash")):
        return short_hash(value)
    if isinstance(value, dict | list) and depth >= MAX_DEPTH:
        return TOO_DEEP
    if isinstance(value, dict):
        return {k: display(k, v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [display(key, v, depth + 1) for v in value]
    return value


def when(value: Any) -> str:
    try:
        return format_time(float(value))
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def safe_next(target: str | None, prefix: str) -> str:
    """Only a path of this page (under ``prefix``): never another site (an open redirect), nor,
    through dot segments (``/review/../x``, ``%2e%2e``, which the browser resolves), another path
    of this one (an outside red team)."""
    if (
        target
        and target.startswith(prefix + "/")
        and "\\" not in target
        and target.isprintable()
        and not any(c.isspace() for c in target)
    ):
        segments = unquote(target.split("?", 1)[0].split("#", 1)[0]).split("/")
        if "." not in segments and ".." not in segments:
            return target
    return prefix + "/"
