"""Publish-before-use rotation of the service's signing keys, decided on plain values.

Relying parties cache our JWK Set (RFC 7517 §5) for a while.  A key that
starts signing the moment it is created would produce tokens those caches
cannot verify yet.  So the ring always holds a ``next`` key that is published
in the JWK Set but never signs::

    state:   next ──rotate──▶ active ──rotate──▶ retired ──prune──▶ (deleted)
    signs:    no               yes               no
    JWKS:     yes              yes               yes, until publish_until

:func:`plan_rotation` promotes ``next`` to ``active`` (refusing when it has
been published for less than ``min_published`` seconds, i.e. shorter than
relying parties' JWKS cache lifetime), retires the former active key, which
stays published until every token it signed has expired
(``publish_until = now + max_token_lifetime + 60 s`` of clock skew), and asks
for a fresh ``next`` key.  :func:`prunable` names the retired keys whose
``publish_until`` has passed.

Nothing here reads a file or touches key material: the adapter
(:class:`sts.adapters.keyring.KeyRing`) loads the ring, asks for a plan,
generates the keys the plan calls for (it passes their ``kid`` back), and
writes the result.  Times are Unix seconds and always a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal, TypeAlias

from sts.errors import ConfigurationError

KeyState: TypeAlias = Literal["next", "active", "retired"]
KEY_STATES: Final[frozenset[str]] = frozenset({"next", "active", "retired"})

#: Added to ``max_token_lifetime`` when a key retires: relying parties' clocks may run late.
ROTATION_SKEW_SECONDS: Final = 60

_STATE_ORDER: Final = {"active": 0, "next": 1, "retired": 2}


class KeyRotationRefused(ConfigurationError):
    """The ``next`` key may not start signing now (see the message)."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key of the ring as recorded in ``keyring.json`` (times are Unix seconds).

    ``publish_until`` is set on retired keys only: the key stays in the JWK Set
    until then, so every token it signed can still be verified.
    """

    kid: str
    alg: str
    state: KeyState
    created_at: float
    activated_at: float | None = None
    retired_at: float | None = None
    publish_until: float | None = None


@dataclass(frozen=True, slots=True)
class RotationTiming:
    """How long relying parties hold on to what we publish, in seconds.

    ``max_token_lifetime`` is the longest a token signed by the retiring key
    stays valid; ``min_published`` is the relying parties' JWKS cache
    lifetime, the least time a ``next`` key must have been published before
    it may sign.
    """

    max_token_lifetime: int
    min_published: int = 0

    def __post_init__(self) -> None:
        if self.max_token_lifetime < 0 or self.min_published < 0:
            raise ValueError("max_token_lifetime and min_published must not be negative")


@dataclass(frozen=True, slots=True)
class RotationPlan:
    """What a rotation does, before any key is generated.

    ``promoted`` is the published ``next`` key, now ``active``; it is None
    when a forced rotation found no ``next`` key, and then a new key of
    ``active_alg`` must be created and activated at once.  ``retired`` is the
    former active key with its ``publish_until``; ``unchanged`` are the other
    (retired) keys.  A fresh ``next`` key of ``next_alg`` is always created.
    """

    now: float
    promoted: KeyEntry | None
    retired: KeyEntry
    unchanged: tuple[KeyEntry, ...]
    active_alg: str
    next_alg: str

    def entries_after(self, *, next_kid: str, active_kid: str | None = None) -> list[KeyEntry]:
        """The ring after the rotation, given the ``kid`` of each key created for the plan.

        Listed as ``keyring.json`` stores it: the active key, the fresh next
        key, the key just retired, then the others.  ``active_kid`` is given
        exactly when :attr:`promoted` is None.
        """
        if self.promoted is not None:
            if active_kid is not None:
                raise ValueError("this rotation promotes the next key; it needs no new active key")
            active = self.promoted
        elif active_kid is None:
            raise ValueError("this rotation has no next key to promote; it needs a new active key")
        else:
            active = KeyEntry(
                kid=active_kid,
                alg=self.active_alg,
                state="active",
                created_at=self.now,
                activated_at=self.now,
            )
        fresh = KeyEntry(kid=next_kid, alg=self.next_alg, state="next", created_at=self.now)
        return [active, fresh, self.retired, *self.unchanged]


def initial_entries(*, active_kid: str, next_kid: str, alg: str, now: float) -> list[KeyEntry]:
    """A new ring: one key that signs at once (no relying party can hold an older set) and its ``next``."""
    return [
        KeyEntry(kid=active_kid, alg=alg, state="active", created_at=now, activated_at=now),
        KeyEntry(kid=next_kid, alg=alg, state="next", created_at=now),
    ]


def plan_rotation(
    entries: Sequence[KeyEntry],
    now: float,
    timing: RotationTiming,
    *,
    force: bool = False,
    next_alg: str | None = None,
    ring_name: str = "the key ring",
) -> RotationPlan:
    """Decide a rotation of the ring ``entries`` (which hold exactly one active key).

    Unless ``force``, raises :class:`KeyRotationRefused` when there is no
    ``next`` key, or when it has been published for less than
    ``timing.min_published`` seconds.  With ``force`` and no ``next`` key, a
    key no relying party has seen yet is activated at once.  The fresh
    ``next`` key uses ``next_alg`` (default: the new active key's algorithm),
    which is how the ring migrates to another algorithm, itself
    publish-before-use.  ``ring_name`` only names the ring in messages.
    """
    old_active = next(e for e in entries if e.state == "active")
    upcoming = next((e for e in entries if e.state == "next"), None)
    promoted: KeyEntry | None = None
    if upcoming is None:
        if not force:
            raise KeyRotationRefused(
                f"{ring_name} has no next key to promote; "
                "rotate with force to activate a key that no relying party has seen yet"
            )
        active_alg = old_active.alg
    else:
        published_for = now - upcoming.created_at
        if published_for < timing.min_published and not force:
            raise KeyRotationRefused(
                f"next key {upcoming.kid} has been published for {published_for:.0f} s, less than "
                f"the required {timing.min_published} s; relying parties may not have fetched it yet "
                "(wait, or force the rotation)"
            )
        promoted = replace(upcoming, state="active", activated_at=now)
        active_alg = upcoming.alg
    retired = replace(
        old_active,
        state="retired",
        retired_at=now,
        publish_until=now + timing.max_token_lifetime + ROTATION_SKEW_SECONDS,
    )
    moved = {old_active.kid} if upcoming is None else {old_active.kid, upcoming.kid}
    return RotationPlan(
        now=now,
        promoted=promoted,
        retired=retired,
        unchanged=tuple(e for e in entries if e.kid not in moved),
        active_alg=active_alg,
        next_alg=next_alg or active_alg,
    )


def prunable(entries: Iterable[KeyEntry], now: float) -> list[KeyEntry]:
    """The retired keys whose ``publish_until`` has passed: no token they signed is still valid."""
    return [
        e for e in entries if e.state == "retired" and e.publish_until is not None and e.publish_until <= now
    ]


def in_ring_order(entries: Iterable[KeyEntry]) -> list[KeyEntry]:
    """Active first, then next, then retired (most recently retired first)."""
    return sorted(entries, key=lambda e: (_STATE_ORDER[e.state], -(e.retired_at or 0.0)))


def ring_problem(entries: Sequence[KeyEntry]) -> str | None:
    """Why ``entries`` is not a usable ring (a kid twice, not one active key, several next), or None."""
    kids = [e.kid for e in entries]
    if len(set(kids)) != len(kids):
        return "a kid is listed twice"
    states = [e.state for e in entries]
    if states.count("active") != 1:
        return f"expected exactly one active key, found {states.count('active')}"
    if states.count("next") > 1:
        return f"expected at most one next key, found {states.count('next')}"
    return None
