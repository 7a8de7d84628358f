"""What a token of ours presented again (a re-exchange) is judged by for novelty.

Its identity is ``self:<issuer>|<sub>`` (:func:`~sts.core.delegation.workload_issuer`), with a
baseline of its own that learns and is written as ever;
but it is the same workload as the upstream identity it was first issued to, and judged by its
own baseline alone a mature workload's first re-exchanges were learning: a delegation chain built
by re-exchange never looked deeper than usual (an outside audit).  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from .attest import VerifiedToken
from .baseline import Baseline
from .delegation import SELF_ISSUER
from .introspection import upstream_issuer
from .subject_state import identity_key


def upstream_identity(subject: VerifiedToken, issuers: Collection[str]) -> str | None:
    """For a token of ours presented again: the identity it was first issued to (whose baseline
    :func:`joined` joins); else None."""
    if subject.issuer_name != SELF_ISSUER:
        return None
    upstream = upstream_issuer(subject.claims, issuers)
    return identity_key(upstream, subject.subject) if upstream is not None else None


def joined(own: Baseline, upstream: Baseline) -> Baseline:
    """``own`` (the re-exchange identity's baseline) joined with ``upstream`` (that of the identity the
    token was first issued to), for the novelty signals (:attr:`sts.core.risk.RiskContext.history`).
    Seen by either counts as seen (networks, audiences, scopes, the deepest chain), their exchanges
    count together towards the end of learning, and the rate is ``own``'s (re-exchanges, as ever);
    facts, drift and refusals are not joined (they are read from ``own``).  Never stored."""
    if upstream.count == 0:
        return own
    return replace(
        own,
        count=own.count + upstream.count,
        networks=_union(upstream.networks, own.networks),
        audiences=_union(upstream.audiences, own.audiences),
        scopes=_union(upstream.scopes, own.scopes),
        max_depth=max(own.max_depth, upstream.max_depth),
    )


def _union(first: tuple[str, ...], then: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(first + then))
