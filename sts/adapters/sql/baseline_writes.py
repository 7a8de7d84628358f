"""How a baseline is written: a grant's update (its counters advanced from the stored ones) or a
whole baseline (an operator's ``sts baseline``).

The counters (:mod:`sts.core.baseline_counts`) have columns of their own (revision
``0013_baseline_counts``): ``grants``, ``window_start``, ``window_count``, ``usual_rate``, and
the ``first_seen`` of the baseline they count, ``counts_first_seen``.  A grant's statement
advances the stored ones by one grant with ``CASE`` expressions that are
:func:`sts.core.baseline_counts.advanced` (a test holds them to it): both databases compute in
IEEE doubles, and the constants are cast to ``DOUBLE PRECISION`` so that PostgreSQL does not
compute them as ``numeric``.  In ``ON CONFLICT DO UPDATE`` every ``baselines.`` column is the
stored row's value before the update, ``excluded.`` the grant's own.
"""

from __future__ import annotations

from typing import Any

from ...core.baseline import RATE_WINDOW
from ...core.baseline_counts import KEEP, RESET, TAKE

#: The counters' columns, in the order of :func:`~sts.core.baseline_counts.counts_of`.
COUNT_COLUMNS = ("grants", "window_start", "window_count", "usual_rate", "counts_first_seen")
#: The values of a baseline write (:func:`~sts.adapters.sql.key_value.baseline_params`) before
#: its ``now``: the row's columns (``identity, baseline, drift, expires_at``, the counters and
#: ``counts_first_seen``) and the grant's time.
ROW_VALUES = 10


def _double(value: float) -> str:
    return f"CAST({value!r} AS DOUBLE PRECISION)"


def advanced_counts_sql(now: str, at: str) -> str:
    """The ``SET`` clauses that advance the stored counters by one grant at ``at`` (SQL), the row
    live at ``now`` (SQL): :func:`sts.core.baseline_counts.advanced`, with the grant's own
    counters (``excluded``) where the stored ones are NULL, expired, count another baseline
    (``counts_first_seen``, the ``first_seen`` of the baseline written with them) or are behind
    what it read."""
    # :func:`~sts.core.baseline_counts.same_baseline` and not behind what the grant read.  (Not the
    # first grants' race when the stored baseline has no ``first_seen``: an older version's
    # ``sts baseline reset``, which left the counters; a rolling deploy's check.)
    same = (
        "(baselines.counts_first_seen = excluded.counts_first_seen OR (excluded.grants = 1 AND "
        f"substr(baselines.baseline, 1, {len(RESET)}) <> '{RESET}' AND "
        f"abs(baselines.counts_first_seen - excluded.counts_first_seen) <= {_double(RATE_WINDOW)}))"
    )
    ahead = f"baselines.expires_at > {now} AND {same} AND baselines.grants >= excluded.grants - 1"
    rolled = f"{at} - baselines.window_start > {_double(RATE_WINDOW)}"
    usual = (
        f"CASE WHEN baselines.grants > 0 THEN baselines.usual_rate * {_double(KEEP)} "
        f"+ baselines.window_count * {_double(TAKE)} ELSE {_double(0.0)} END"
    )
    stored = {
        "grants": "baselines.grants + 1",
        "window_start": f"CASE WHEN {rolled} THEN {at} ELSE baselines.window_start END",
        "window_count": f"CASE WHEN {rolled} THEN 1 ELSE baselines.window_count + 1 END",
        "usual_rate": f"CASE WHEN {rolled} THEN {usual} ELSE baselines.usual_rate END",
        "counts_first_seen": "baselines.counts_first_seen",
    }
    return ", ".join(
        f"{column} = CASE WHEN {ahead} THEN {stored[column]} ELSE excluded.{column} END"
        for column in COUNT_COLUMNS
    )


def _statement(now: str, at: str, *, grant: bool) -> str:
    columns = ("identity", "baseline", "drift", "expires_at", *COUNT_COLUMNS)
    counts = (
        advanced_counts_sql(now, at) if grant else ", ".join(f"{c} = excluded.{c}" for c in COUNT_COLUMNS)
    )
    # Column names are constants of this module; values are parameters.
    return (
        f"INSERT INTO baselines ({', '.join(columns)}) VALUES ({', '.join(['{p}'] * len(columns))}) "  # noqa: S608
        "ON CONFLICT (identity) DO UPDATE SET baseline = excluded.baseline, drift = CASE "
        "WHEN excluded.drift IS NOT NULL THEN excluded.drift "
        f"WHEN baselines.expires_at > {now} THEN baselines.drift END, "
        # The refusals recorded apart go with an expired row: a grant under it brought them back,
        # and only while nothing had removed the row yet (an outside review).
        f"failures = CASE WHEN baselines.expires_at > {now} THEN baselines.failures END, "
        f"expires_at = excluded.expires_at, {counts}"
    )


class BaselineWrite:
    """One statement writing an identity's baseline, with positional ``placeholder``s.

    ``grant``: a grant's update, its drift state only when it changed it (else the stored one is
    kept, unless it expired with the row: one a refused exchange wrote since the grant read the
    baseline), its counters advanced from the stored ones.  Otherwise the baseline as given (its
    counters too).  Parameters: :meth:`params` of
    :func:`~sts.adapters.sql.key_value.baseline_params`."""

    def __init__(self, placeholder: str, *, grant: bool = True) -> None:
        marked = _statement("\x00now\x00", "\x00at\x00", grant=grant)
        parts = marked.split("\x00")
        #: Where each parameter after the row's columns comes from: ``now`` or ``at``.
        self._extra = [ROW_VALUES if part == "now" else ROW_VALUES - 1 for part in parts[1::2]]
        self.sql = "".join(placeholder if i % 2 else part for i, part in enumerate(parts)).replace(
            "{p}", placeholder
        )

    def params(self, values: tuple[Any, ...]) -> tuple[Any, ...]:
        return (*values[: ROW_VALUES - 1], *(values[i] for i in self._extra))
