"""Canonical JSON (RFC 8785, the JSON Canonicalization Scheme) of audit records.

:func:`canonical_json` gives the JCS text the audit hash chains cover
(:mod:`sts.core.audit_chain`); :func:`canonical_record` gives the text a record is
stored as, and the record as a verifier will read it back.  Common values take a
fast path through ``orjson`` that is checked to write exactly what JCS writes;
anything else goes to the ``rfc8785`` library.  Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson
import rfc8785

_SAFE_INT = 2**53 - 1


def canonical_json(value: Any) -> str:
    """The RFC 8785 (JCS) text of a JSON value.

    The common case is written by ``orjson`` (https://github.com/ijl/orjson, ten
    times faster than Python's own encoder here): sorted keys, no whitespace,
    UTF-8 rather than ASCII escapes, the same escapes as ``json.dumps`` and JCS
    (``"``, backslash, the short forms and lowercase ``\\u00xx`` below U+0020),
    the shortest digits that round-trip a float; :func:`_written_alike` first
    checks that its text is the JCS text, and gives integral floats as the
    integers JCS writes for them.  Anything else (tiny or huge floats, member
    names from U+E000 up, long integers, lone surrogates, which ``orjson``
    refuses) goes to the ``rfc8785`` library.  Raises
    :class:`rfc8785.CanonicalizationError` for what JCS cannot represent (NaN,
    infinities, lone surrogates, integers beyond 2**53).
    """
    alike = _written_alike(value, 0)
    if alike is not _NOT_ALIKE:
        try:
            text = orjson.dumps(alike, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # A lone surrogate (not UTF-8): JCS refuses it too, as rfc8785 says below.
        else:
            if text.isascii() or _names_sort_alike(alike):
                return text.decode("utf-8")  # ASCII member names sort alike.
    return rfc8785.dumps(value).decode("utf-8")


#: What :func:`_written_alike` answers for a value ``orjson`` would not write as JCS does.
_NOT_ALIKE: Any = object()


def _written_alike(value: Any, depth: int) -> Any:
    """``value`` in a form ``orjson`` writes exactly as RFC 8785 does (lone surrogates aside),
    else :data:`_NOT_ALIKE`.

    Both escape strings alike (``"``, backslash, and controls below U+0020, with
    the same short forms and lowercase ``\\u00xx``), and both write the shortest
    digits that round-trip a float.  But ``orjson`` writes integral floats with
    ``.0`` where JCS writes an integer (``1.0`` against ``1``): below 2**53 an
    integral float is exactly the integer JCS writes, so it is given as that
    ``int`` (the containers holding one are copied; the value itself is never
    changed, and is returned as it is when nothing needs to change).  Tiny and
    huge floats are left to ``rfc8785`` (``orjson`` and JCS agree on ``0.00001``
    but the exponents of the two, and of Python's ``repr``, are not checked
    here); JCS refuses NaN, infinities and integers beyond 2**53; and member
    names holding characters from U+E000 up may sort differently (code points
    against UTF-16 code units): all of those are not alike, but the names are
    checked by :func:`_names_sort_alike`, and only for a text that is not ASCII
    (a name from U+E000 up is not ASCII, and ``orjson`` writes it as it is).
    Only exact types are alike (a subclass goes to ``rfc8785``).  Scalars are
    checked inline and only containers recurse, since this runs on every audit
    write: it costs less than the encoding it vouches for.
    """
    if depth > 32:
        return _NOT_ALIKE
    kind = type(value)
    if kind is dict:
        copied: dict[str, Any] | None = None
        for key, item in value.items():
            if type(key) is not str:
                return _NOT_ALIKE
            kind = type(item)
            if kind is str or item is None or kind is bool:
                continue
            if kind is int:
                if -_SAFE_INT <= item <= _SAFE_INT:
                    continue
                return _NOT_ALIKE
            if kind is dict or kind is list or kind is tuple:
                alike = _written_alike(item, depth + 1)
            elif kind is float:
                alike = _float_alike(item)
            else:
                return _NOT_ALIKE
            if alike is not item:
                if alike is _NOT_ALIKE:
                    return _NOT_ALIKE
                if copied is None:
                    copied = dict(value)
                copied[key] = alike
        return value if copied is None else copied
    if kind is list or kind is tuple:
        listed: list[Any] | None = None
        index = -1
        for item in value:
            index += 1
            kind = type(item)
            if kind is str or item is None or kind is bool:
                continue
            if kind is int:
                if -_SAFE_INT <= item <= _SAFE_INT:
                    continue
                return _NOT_ALIKE
            if kind is dict or kind is list or kind is tuple:
                alike = _written_alike(item, depth + 1)
            elif kind is float:
                alike = _float_alike(item)
            else:
                return _NOT_ALIKE
            if alike is not item:
                if alike is _NOT_ALIKE:
                    return _NOT_ALIKE
                if listed is None:
                    listed = list(value)
                listed[index] = alike
        return value if listed is None else listed
    if kind is float:
        return _float_alike(value)
    if kind is str or value is None or kind is bool:
        return value
    if kind is int:
        return value if -_SAFE_INT <= value <= _SAFE_INT else _NOT_ALIKE
    return _NOT_ALIKE


def _names_sort_alike(value: Any) -> bool:
    """Whether every member name in ``value`` (a value :func:`_written_alike` gave) sorts alike by
    code points and by UTF-16 code units: true unless a name holds a character from U+E000 up
    (the surrogates, which hold the code points past U+FFFF in UTF-16, sort below those)."""
    if type(value) is dict:
        for key, item in value.items():
            if not key.isascii() and max(key) >= "\ue000":
                return False
            if (type(item) is dict or type(item) is list or type(item) is tuple) and not _names_sort_alike(
                item
            ):
                return False
        return True
    if type(value) is list or type(value) is tuple:
        return all(
            _names_sort_alike(item)
            for item in value
            if type(item) is dict or type(item) is list or type(item) is tuple
        )
    return True


def _float_alike(item: float) -> Any:
    """:func:`_written_alike` of a float: an integral one as its ``int``, a tiny or non-finite one
    not alike."""
    if item.is_integer():  # False for NaN and the infinities
        return int(item) if -_SAFE_INT <= item <= _SAFE_INT else _NOT_ALIKE
    # Non-integral floats are below 2**52, where Python's repr has no exponent either.
    return item if math.isfinite(item) and abs(item) >= 1e-4 else _NOT_ALIKE


def canonical_record(record: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """The text to store for ``record`` (its RFC 8785 form), and the value that text stands for.

    A record JCS cannot represent as it is (a string that is not valid Unicode,
    a NaN, a value that is not JSON at all) is first made representable: lone
    surrogates become U+FFFD, out-of-range numbers and other values their
    ``str``.  The second item is then that value, which is what a reader of
    the stored text sees; otherwise it is ``record`` itself.
    """
    try:
        return canonical_json(record), record
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError):
        representable = _representable(dict(record), 0)
        return canonical_json(representable), representable


def _representable(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, int):
        return value if -_SAFE_INT <= value <= _SAFE_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > 32:
        return "(nested too deep)"
    if isinstance(value, Mapping):
        return {_representable(str(k), 0): _representable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_representable(v, depth + 1) for v in value]
    return _representable(str(value), 0)


# -- verification ------------------------------------------------------------------------------
