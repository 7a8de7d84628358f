"""An identity's grant counters, kept apart from its baseline and advanced by the store.

A grant writes back, with its record, the baseline it read before it was decided
(:func:`sts.core.baseline.observe` of it).  Grants of one identity decided at the same time
each wrote the count they had read plus one, and the last write won: a burst sent all at
once was counted low (an outside audit: 14 parallel exchanges where 10 make a burst did not
fire ``unexpected_s2s``; 30 fired on the 17th), and a workload stayed ``learning`` longer than
its grants.  So the counters (the grant count, and the rate window ``unexpected_s2s`` reads:
its start, its count, the usual rate) are stored apart from the baseline's JSON as well, and
a grant's write advances the stored ones by one (:func:`advanced`), in the same statement or
script: SQL ``CASE`` expressions (:mod:`sts.adapters.sql.baseline_writes`), a Lua function
(:mod:`sts.adapters.redis.baseline_writes`).  Each is this module's rule, which is
:func:`~sts.core.baseline.observe`'s for those fields (a test holds the three to it).

Stored counters that are behind what a grant read (none yet, an expired row, or a version
before this one that wrote only the JSON), or that count another baseline, are not advanced: the
grant's own are written, as before.  A load takes the stored counters unless the JSON's count is
ahead of them (:func:`with_counts`).  The first grants of a new identity, decided at once, each
begin a baseline of their own ``first_seen``: the store keeps the first one written, and the
others count in it (:func:`same_baseline`).  The sets a baseline learns (networks, audiences,
scopes, the deepest delegation) are still written back as the grant read them: one lost in a
race is new again next time, so its signal fires rather than stays quiet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from .baseline import RATE_WINDOW, Baseline

#: ``(count, window_start, window_count, usual_rate, first_seen)``: the counters, and the
#: ``first_seen`` of the baseline they count (a version before this one may have started another
#: in the row of an expired one, writing only the JSON).
Counts = tuple[int, float, int, float, float | None]
#: How a baseline without a ``first_seen`` begins, as :meth:`~sts.core.baseline.Baseline.to_json`
#: writes it (every field in declaration order): a reset one, whose counters (left by a version
#: before this one) count nothing (the stores' writes check it; a test holds it to ``to_json``).
RESET = '{"first_seen":null,'
#: How the usual rate follows each finished window (:func:`~sts.core.baseline.observe`).
KEEP, TAKE = 0.8, 0.2


def counts_of(baseline: Baseline) -> Counts:
    return (
        baseline.count,
        baseline.window_start,
        baseline.window_count,
        baseline.usual_rate,
        baseline.first_seen,
    )


def same_baseline(stored: Counts, own: Counts) -> bool:
    """Whether ``stored`` counters count the baseline a grant that computed ``own`` read: the same
    ``first_seen``; or, for a grant that read none (its count is 1), one begun at most
    :data:`~sts.core.baseline.RATE_WINDOW` before or after its own: the first grants of a new
    identity, decided at once, each begin one (each its own ``first_seen``), and the first
    written is the one the others count in.  Counters of a baseline that expired are older.  (The
    stores' writes also keep a grant out of that race when the stored baseline's JSON has no
    ``first_seen``, :data:`RESET`: an older version's reset, which left its counters; the JSON is
    not among the counters this rule sees.)"""
    if stored[4] is None or own[4] is None:
        return False
    return stored[4] == own[4] or (own[0] == 1 and abs(stored[4] - own[4]) <= RATE_WINDOW)


def advanced(stored: Counts | None, own: Counts, at: float) -> Counts:
    """The counters a grant at ``at`` leaves, given the ``stored`` ones (None: none) and its
    ``own`` (those it computed from what it read): the stored ones advanced by one grant, or
    its own where the stored ones count another baseline (:func:`same_baseline`) or are behind
    what it read (``own``'s count less one)."""
    if stored is None or not same_baseline(stored, own) or stored[0] < own[0] - 1:
        return own
    count, window_start, window_count, usual_rate, first_seen = stored
    if at - window_start > RATE_WINDOW:
        usual = usual_rate * KEEP + window_count * TAKE if count else 0.0
        return count + 1, at, 1, usual, first_seen
    return count + 1, window_start, window_count + 1, usual_rate, first_seen


def stored_counts(values: Sequence[Any]) -> Counts | None:
    """Counters as stored (five values, the last None when the baseline has no ``first_seen``;
    a counter None, or one unreadable: none)."""
    try:
        count, window_start, window_count, usual_rate, first_seen = values
        if count is None or window_start is None or window_count is None or usual_rate is None:
            return None
        seen = float(first_seen) if first_seen is not None else None
        return int(count), float(window_start), int(window_count), float(usual_rate), seen
    except (TypeError, ValueError, OverflowError):
        return None


def with_counts(baseline: Baseline, counts: Counts | None) -> Baseline:
    """``baseline`` with the counters kept apart from it, and their ``first_seen`` (the first
    writer's: :func:`same_baseline`), unless there are none, they count another baseline or the
    JSON's count is ahead of them (a version before this one wrote only the JSON)."""
    if counts is None or counts == counts_of(baseline) or counts[0] < baseline.count:
        return baseline
    count, window_start, window_count, usual_rate, first_seen = counts
    if first_seen != baseline.first_seen and not (
        first_seen is not None
        and baseline.first_seen is not None
        and abs(first_seen - baseline.first_seen) <= RATE_WINDOW
    ):
        return baseline
    return replace(
        baseline,
        first_seen=first_seen,
        count=count,
        window_start=window_start,
        window_count=window_count,
        usual_rate=usual_rate,
    )


def counts_text(counts: Counts) -> str:
    """The counters as Redis keeps them (:func:`read_counts_text` reads them; so does the Lua
    script, with ``tonumber``, the last as text): ``repr`` of a float reads back as the same
    float; ``-`` for no ``first_seen``."""
    count, window_start, window_count, usual_rate, first_seen = counts
    seen = repr(float(first_seen)) if first_seen is not None else "-"
    return f"{int(count)} {float(window_start)!r} {int(window_count)} {float(usual_rate)!r} {seen}"


def read_counts_text(text: str | bytes | None) -> Counts | None:
    if not text:
        return None
    try:
        parts = (text.decode("ascii") if isinstance(text, bytes) else text).split()
    except UnicodeDecodeError:
        return None
    if len(parts) != 5:
        return None
    return stored_counts([*parts[:4], None if parts[4] == "-" else parts[4]])
