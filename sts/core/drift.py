"""Drift that fresh attestation cannot launder.

A CI platform hands out a new OIDC token for every job, so "renew your
credential" is no answer to a changed stable fact (a repository's runner
moving from ``github-hosted`` to ``self-hosted``): the renewed credential
carries the same drifted fact.  So a changed fact stays *unconfirmed* in the
identity's baseline, and ``attestation_drift`` keeps firing, fresh
attestation or not, until one of these confirms the new value:

* an operator: ``sts baseline accept IDENTITY``;
* probation: the same new value in ``probation_exchanges`` exchanges with
  fresh attestation, the first and the last at least ``probation_period``
  seconds apart (the exchange that completes it is already judged confirmed);
* independent evidence the rule names in ``drift_evidence``:
  ``pop_key_continuity`` (a DPoP proof or client certificate with the
  identity's confirmed key) or ``posture_token`` (a verified posture token
  about the subject whose posture fact is good).

A changed proof-of-possession key (``cnf_jkt``, ``cnf_x5t``) is confirmed only
by an operator or probation: a new key cannot vouch for itself.  One exception,
which no rule names: the key a re-exchanged token of ours is bound to, issued at
``pop`` or above, is confirmed at once (:data:`EVIDENCE_ISSUED`; its issuance
judged it the identity's).  Facts seen for the first time are confirmed on
sight (``first_seen``).

:func:`review` is pure: it returns the baseline's facts as they stand after
this exchange, which facts remain unconfirmed, and what would clear them, in
the machine-readable form a refusal carries (``clears``)::

    [{"by": "operator_accept", "identity": "github|repo:acme/app:ref:refs/heads/main"},
     {"by": "probation", "exchanges_left": 2, "not_before": 1700003600, "max_age": 60},
     {"by": "pop_key_continuity", "acr_values": ["urn:workload-sts:acr:pop", "..."]}]
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .assurance import ACR_POP, ACR_POSTURE, KEY_FACTS, at_least, rank
from .baseline import Baseline, PendingFact

EVIDENCE_POP = "pop_key_continuity"
EVIDENCE_POSTURE = "posture_token"
EVIDENCE_KINDS: frozenset[str] = frozenset({EVIDENCE_POP, EVIDENCE_POSTURE})
#: Shown (never named by a rule) by a token of ours bound to the key it presents and issued at ``pop``
#: or above: its issuance judged that key the identity's, so its re-exchanges' identity takes it so
#: at once (else a rotated key went through a second probation there, after the upstream one).
EVIDENCE_ISSUED = "issued_at_pop"
#: The level a workload presents to show each kind of evidence.
EVIDENCE_LEVEL: Mapping[str, str] = {EVIDENCE_POP: ACR_POP, EVIDENCE_POSTURE: ACR_POSTURE}

DEFAULT_PROBATION_EXCHANGES = 3
DEFAULT_PROBATION_PERIOD = 3600


@dataclass(frozen=True)
class DriftSettings:
    """A rule's drift confirmation settings (``risk.probation_exchanges``, ``probation_period``,
    ``drift_evidence``)."""

    probation_exchanges: int = DEFAULT_PROBATION_EXCHANGES
    probation_period: int = DEFAULT_PROBATION_PERIOD
    evidence: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DriftReview:
    """The outcome of :func:`review` for one exchange."""

    #: Watched facts that changed and are not confirmed: ``{fact: {"was": ..., "now": ...}}`` (drift fires).
    changed: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Facts confirmed by this exchange, and how (``probation``, ``pop_key_continuity``...).
    confirmed_now: Mapping[str, str] = field(default_factory=dict)
    #: The baseline with its facts, pending values and confirmations as they stand after this exchange.
    baseline: Baseline = field(default_factory=Baseline)
    #: What would confirm every fact in ``changed`` (empty when nothing changed).
    clears: tuple[Mapping[str, Any], ...] = ()
    #: Evidence the workload could still present that would confirm every fact in ``changed``.
    remedies: tuple[str, ...] = ()

    @property
    def acr_values(self) -> tuple[str, ...]:
        """The levels that show the remedies (empty without one)."""
        if not self.remedies:
            return ()
        return at_least(min((EVIDENCE_LEVEL[r] for r in self.remedies), key=rank))


def _probation_done(pending: PendingFact, settings: DriftSettings) -> bool:
    return (
        pending.fresh_since is not None
        and pending.fresh_count >= settings.probation_exchanges
        and pending.last_seen - pending.fresh_since >= settings.probation_period
    )


def review(
    baseline: Baseline,
    current: Mapping[str, Any],
    *,
    watched: tuple[str, ...],
    now: float,
    fresh: bool,
    settings: DriftSettings,
    shown: frozenset[str] = frozenset(),
    presentable: frozenset[str] = frozenset(),
    max_age: int = 60,
    identity: str = "",
    attested_at: float | None = None,
) -> DriftReview:
    """Compare ``current`` (the watched facts and presented key facts) with the baseline.

    ``shown`` is the evidence this request shows; ``presentable`` the evidence
    the workload could show that it has not (both only count when the rule
    names them in ``settings.evidence``, but for :data:`EVIDENCE_ISSUED`, which
    confirms a presented key at once).  ``max_age`` is how fresh an
    exchange must be to count for probation; ``attested_at`` is its attestation
    time, so that a token presented again is not counted again.
    """
    updated = baseline
    changed: dict[str, dict[str, Any]] = {}
    confirmed_now: dict[str, str] = {}
    evidence = settings.evidence & shown
    for name in _tracked(watched):
        value = current.get(name)
        if value is None and name not in watched:
            # A key fact only the levels look at: a bearer request leaves the identity's key alone.
            continue
        facts = updated.facts
        if name not in facts:
            if value is None:
                continue
            if not (name in KEY_FACTS and _other_key_unproven(updated, current, name)):
                updated = updated.with_confirmed(name, value, "first_seen", now)
                continue
            # A first key of this kind beside a confirmed key of the other kind, not proven in
            # this request: a new key, confirmed as a changed one is (see assurance.key_state).
        else:
            # ``value in updated.confirmed_values(name)``, without building the tuple.
            known = facts[name]
            if known is value or known == value or value in updated.other_keys.get(name, ()):
                continue
        entry = updated.pending.get(name)
        if entry is not None and entry.value != value and not fresh:
            # A stale token with yet another value is refused, and leaves the probation under way
            # alone (an old token must not restart someone else's progress).
            if name in watched:
                changed[name] = {"was": baseline.facts.get(name), "now": value}
            continue
        if entry is None or entry.value != value:
            entry = PendingFact(value=value, first_seen=now, last_seen=now)
        entry = replace(entry, last_seen=now)
        # A fresh exchange counts once per attestation: the same token presented again (its iat
        # not newer than the last one counted) is no new evidence.
        counted = fresh and (
            entry.fresh_attested is None or attested_at is None or attested_at > entry.fresh_attested
        )
        if counted:
            entry = replace(
                entry,
                fresh_count=entry.fresh_count + 1,
                fresh_since=entry.fresh_since if entry.fresh_since is not None else now,
                fresh_attested=attested_at,
            )
        how: str | None = None
        if evidence and name not in KEY_FACTS:
            how = sorted(evidence)[0]
        elif name in KEY_FACTS and value is not None and EVIDENCE_ISSUED in shown:
            how = EVIDENCE_ISSUED
        elif counted and _probation_done(entry, settings):
            # The exchange that completes probation is one of its fresh ones (the last of them
            # ``probation_period`` after the first): a stale token, replayed at the end, cannot.
            how = "probation"
        if how is not None:
            updated = updated.with_confirmed(name, value, how, now)
            confirmed_now[name] = how
            continue
        updated = replace(updated, pending={**updated.pending, name: entry})
        if name in watched:
            changed[name] = {"was": baseline.facts.get(name), "now": value}
    if not changed:
        return DriftReview(baseline=updated, confirmed_now=confirmed_now)
    remedies: tuple[str, ...] = ()
    if not any(name in KEY_FACTS for name in changed):
        remedies = tuple(sorted((settings.evidence & presentable) - shown))
    return DriftReview(
        changed=changed,
        confirmed_now=confirmed_now,
        baseline=updated,
        clears=_clears(updated, tuple(changed), settings, remedies, max_age, now, identity),
        remedies=remedies,
    )


def _other_key_unproven(baseline: Baseline, current: Mapping[str, Any], name: str) -> bool:
    """Whether the identity has a confirmed key of another kind than ``name`` and this request
    does not prove one (a DPoP key beside a confirmed client certificate, or the reverse)."""
    others = [fact for fact in KEY_FACTS if fact != name and fact in baseline.facts]
    return bool(others) and not any(
        current.get(fact) is not None
        and (current[fact] == baseline.facts[fact] or current[fact] in baseline.other_keys.get(fact, ()))
        for fact in others
    )


@functools.lru_cache(maxsize=256)
def _tracked(watched: tuple[str, ...]) -> tuple[str, ...]:
    """The facts :func:`review` looks at: the watched ones, then the proof-of-possession keys (the
    same few tuples of watched facts come with every exchange: one per rule)."""
    return tuple(dict.fromkeys((*watched, *KEY_FACTS)))


def _clears(
    baseline: Baseline,
    changed: tuple[str, ...],
    settings: DriftSettings,
    remedies: tuple[str, ...],
    max_age: int,
    now: float,
    identity: str,
) -> tuple[Mapping[str, Any], ...]:
    left = 0
    not_before = now
    for name in changed:
        entry = baseline.pending[name]
        since = entry.fresh_since if entry.fresh_since is not None else None
        # Still pending, so at least one more fresh exchange (at ``ready_at`` or later) is needed.
        needed = max(settings.probation_exchanges - entry.fresh_count, 1)
        ready_at = (since if since is not None else now) + settings.probation_period
        left = max(left, needed)
        not_before = max(not_before, ready_at)
    clears: list[Mapping[str, Any]] = [
        # The identity is the caller's own (issuer name and subject): what the operator accepts.
        {"by": "operator_accept", "identity": identity} if identity else {"by": "operator_accept"},
        {
            "by": "probation",
            "exchanges_left": left,
            "not_before": math.ceil(not_before),
            "max_age": max_age,
        },
    ]
    for remedy in remedies:
        clears.append({"by": remedy, "acr_values": list(at_least(EVIDENCE_LEVEL[remedy]))})
    return tuple(clears)


def session_summary(baseline: Baseline, watched: tuple[str, ...]) -> dict[str, Any]:
    """The baseline as the audit record and ``sts baseline show`` present it: each fact's value,
    whether it is confirmed (and how), and what is pending with its probation progress."""
    facts: dict[str, Any] = {}
    known, pending, confirmed, other_keys = (
        baseline.facts,
        baseline.pending,
        baseline.confirmed,
        baseline.other_keys,
    )
    for name in dict.fromkeys((*watched, *known)) if watched else known:
        p = pending.get(name)
        if p is None and name not in known:
            continue
        how = confirmed.get(name)
        entry: dict[str, Any] = {
            "value": known.get(name),
            "confirmed": p is None,
            "how": "first_seen" if how is None else how.get("how", "first_seen"),
        }
        if p is not None:
            entry["pending"] = {"value": p.value, "fresh_exchanges": p.fresh_count, "since": p.fresh_since}
        also = other_keys.get(name)
        if also:
            entry["also"] = list(also)
        facts[name] = entry
    return {"count": baseline.count, "learning": baseline.learning, "facts": facts}


def progress(original: Baseline, reviewed: DriftReview) -> Baseline:
    """What a refused exchange keeps of its review: probation progress and the confirmations it
    completed, but not facts seen for the first time (those wait for a grant)."""
    kept = original
    for name, how in reviewed.confirmed_now.items():
        kept = kept.with_confirmed(
            name, reviewed.baseline.facts.get(name), how, reviewed.baseline.confirmed[name]["at"]
        )
    return replace(kept, pending=dict(reviewed.baseline.pending))


#: The fields of a baseline that make its drift state: the confirmed facts, the pending values with
#: their probation, how each value was confirmed, and the earlier confirmed keys.
DRIFT_FIELDS = ("facts", "pending", "confirmed", "other_keys")
_DRIFT_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def same_drift(a: Baseline, b: Baseline) -> bool:
    """Whether ``a`` and ``b`` hold the same drift state (:data:`DRIFT_FIELDS`)."""
    return a is b or (
        a.facts == b.facts
        and a.pending == b.pending
        and a.confirmed == b.confirmed
        and a.other_keys == b.other_keys
    )


def drift_to_json(baseline: Baseline) -> str:
    """The stored form of a baseline's drift state, kept apart from the rest of it: a grant writes
    back the whole baseline it read before it was decided, and a probation step or a confirmation
    recorded meanwhile by another request was undone by it (last writer wins: concurrent grants of
    the confirmed value kept a drifted workload's probation from ever completing; an outside
    audit).  Only a change of the drift state writes it.  It names the baseline it belongs to (its
    ``first_seen``): see :func:`with_drift`."""
    return _DRIFT_ENCODER.encode(
        {
            "first_seen": baseline.first_seen,
            "facts": dict(baseline.facts),
            "pending": {name: p.as_dict() for name, p in baseline.pending.items()},
            "confirmed": {name: dict(how) for name, how in baseline.confirmed.items()},
            "other_keys": {name: list(keys) for name, keys in baseline.other_keys.items()},
        }
    )


@functools.lru_cache(maxsize=1024)
def _read_drift(text: str | bytes) -> Baseline | None:
    """The drift state stored as ``text`` (:func:`drift_to_json`), as a baseline holding only it;
    None when it cannot be read.  Remembered for the most recent texts: every exchange of an
    identity reads the same text until its drift state changes."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(name), dict) for name in DRIFT_FIELDS):
        return None
    read = Baseline.from_json(text)
    if read == Baseline() and any(data[name] for name in DRIFT_FIELDS):
        return None  # ``from_json`` met something it cannot read (it then gives a new baseline).
    return read


def with_drift(baseline: Baseline, drift: str | bytes | None) -> Baseline:
    """``baseline`` with the drift state kept apart from it (:func:`drift_to_json`); None (or an
    unreadable value) leaves the baseline's own, which is what a grant read and wrote back with
    it (and where it was kept before revision ``0012_baseline_drift``).

    A drift state of another baseline (another ``first_seen``: both known) is not this one's: a
    version before 0012 that starts a new baseline in the row of an expired one writes the
    baseline alone, and the expired drift state came back to life beside it (an outside re-check:
    the value from before the expiry was then granted, and the current one refused)."""
    kept = _read_drift(drift) if drift else None
    if kept is None or same_drift(kept, baseline):
        return baseline
    if (
        kept.first_seen is not None
        and baseline.first_seen is not None
        and kept.first_seen != baseline.first_seen
    ):
        return baseline
    return replace(
        baseline, facts=kept.facts, pending=kept.pending, confirmed=kept.confirmed, other_keys=kept.other_keys
    )
