"""Rate limits: how often anyone, a client, a workload identity or a source network may ask.

Each limit is a Generic Cell Rate Algorithm (GCRA, ITU-T I.371 / ATM Forum TM 4.0;
as in rwz/redis-gcra and go-redis/redis_rate): a sustained rate of ``requests``
per ``period`` seconds, with up to ``burst`` requests at once from rest.  A key
keeps one number, its *theoretical arrival time* (TAT)::

    interval  = period / requests          # the emission interval T
    tolerance = interval * burst           # how far ahead of now the TAT may run
    tat'      = max(tat, now) + interval   # the TAT after admitting one more request
    admitted  when tat' - tolerance <= now;  else retry after tat' - tolerance - now

so the state is a single value per key that expires by itself once ``tat <= now``;
there are no windows to line up across instances and no counters to reset.  A TAT
further ahead than ``now + tolerance`` (left by an earlier, stricter limit) counts as
``now + tolerance``: the current limit's burst spent, never more (:func:`gcra_start`).

The limits are checked as the pipeline learns who is asking:

* on arrival, before anything is parsed: ``global`` (everyone) and ``network``
  (the source address's IPv4 /24 or IPv6 /56, configurable), which bound the
  work an unauthenticated flood can cause;
* once a client has authenticated: ``client``;
* once the subject token is verified: ``identity`` (issuer and subject);
* once the policy has chosen a rule: that rule's own ``rate_limit``, per identity.

All limits of one check are admitted together or not at all (the store does it
atomically), so a request refused for its network is not charged to the global
limit, and a flood from one network cannot spend everyone's budget.  A refused
request is answered ``429`` with ``Retry-After`` (RFC 6585 §4, RFC 9110 §10.2.3)
and audited with the reason ``rate_limit.<scope>``.  A store that cannot answer
refuses the request with ``temporarily_unavailable`` (503): like every other
store failure, the service fails closed.

The shared state lives behind :class:`~sts.core.ports.RateLimitStore` (Redis, or
the embedded SQL database), so every instance and worker sharing the store
enforces one combined count.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from ..errors import RateLimited, TemporarilyUnavailable
from .audit import AuditRecord
from .ports import LimitedKey, RateLimitStore, StoreUnavailable

#: Where limits apply, in the order they are checked.
SCOPES = ("global", "network", "client", "identity", "rule")
#: The endpoints with limits of their own.
ENDPOINTS = ("token", "introspect", "revoke", "ssf")
UNKNOWN_NETWORK = "unknown"
ROUNDING_SLACK = 1e-6
#: Refused keys remembered per process, at most (least recently refused ones are forgotten first).
MAX_REMEMBERED = 10_000
#: Seconds by which the times limits are counted at may disagree before a time written under the
#: same limit is taken for a clock's that was ahead: instances sharing PostgreSQL count by their own
#: clocks, and every request counts by the time it started, read once (its checks after the subject
#: token's verification come later, a JWKS fetch or a TokenReview after its arrival).  A TAT within
#: it is counted as it is (lowering it handed allowance back: a review found a limit of 100/s
#: admitting 1,377 requests in 3 s from 8 threads); one beyond it is lowered (a clock set back).
CLOCK_SKEW = 60.0


@dataclass(frozen=True)
class Limit:
    """A sustained rate of ``requests`` per ``period`` seconds, with ``burst`` at once from rest."""

    requests: int
    period: float
    burst: int

    def __post_init__(self) -> None:
        if self.requests < 1 or self.burst < 1 or not self.period > 0:
            raise ValueError("a rate limit needs requests >= 1, burst >= 1 and period > 0")

    @property
    def interval(self) -> float:
        """The emission interval: seconds per request at the sustained rate."""
        return self.period / self.requests

    @property
    def tolerance(self) -> float:
        """How far ahead of now a key's TAT may run: ``burst`` intervals."""
        return self.interval * self.burst

    def describe(self) -> str:
        return f"{self.requests}/{self.period:g}s burst {self.burst}"


@dataclass(frozen=True)
class Check:
    """One limit to apply: the store key, the limit, its scope and what it limits (for the record)."""

    scope: str
    key: str
    limit: Limit
    shown: str

    def cell(self) -> LimitedKey:
        """The key as the store sees it."""
        # A microsecond of slack absorbs floating-point rounding, so the burst-th request of a
        # burst is admitted exactly (B additions of the interval may overshoot B * interval).
        return LimitedKey(self.key, self.limit.interval, self.limit.tolerance + ROUNDING_SLACK)


def gcra_start(tat: float | None, now: float, tolerance: float) -> float:
    """The TAT a request is counted from: ``now`` for a key at rest, and at most ``now + tolerance``.

    Under one limit a TAT never runs further ahead than that (a request is admitted only when
    its new TAT is within ``tolerance`` of now); one that does was written under another,
    stricter limit, since relaxed.  Read as it is, it kept refusing the key under the new limit
    for as long as the old one would have (an outside audit: a /24 refused for 110 s, and up to
    an hour with a period of 3600, after the limit was raised to the default 200/s), and told
    the caller to wait that long.  Capped, it means the most it can under the current limit:
    its whole burst spent just now, so the next request waits one interval at most.
    The decision is the same either way (a TAT at the cap refuses, as any beyond it does);
    what changes is the wait given, and what a store writes back (see the stores).
    """
    if tat is None or tat < now:
        return now
    return min(tat, now + tolerance)


def gcra_wait(tat: float | None, now: float, interval: float, tolerance: float) -> float:
    """Seconds until one more request on a key with this TAT is admitted; ``<= 0`` means now.

    At most ``interval``: a TAT beyond what the limit allows is capped (:func:`gcra_start`)."""
    return gcra_start(tat, now, tolerance) + interval - tolerance - now


def gcra_admit(tat: float | None, now: float, interval: float, tolerance: float) -> float | None:
    """The key's new TAT when one more request is admitted now, else None (the reference algorithm)."""
    if gcra_wait(tat, now, interval, tolerance) > 0:
        return None
    return gcra_start(tat, now, tolerance) + interval


@functools.lru_cache(maxsize=4096)
def network_of(address: str | None, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The source network an address is counted under: ``10.1.2.0/24``, ``2001:db8:0:100::/56``.

    An IPv4-mapped IPv6 address (``::ffff:10.1.2.3``) counts as its IPv4 address.  An
    address that cannot be read (none, a Unix socket) counts under one shared ``unknown``.
    Computed by masking the address's integer (``ip_network`` would build and validate a
    network object on every request), and cached for the addresses seen most.
    """
    try:
        ip = ipaddress.ip_address((address or "").strip())
    except ValueError:
        return UNKNOWN_NETWORK
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix, bits = (ipv4_prefix, 32) if ip.version == 4 else (ipv6_prefix, 128)
    mask = ((1 << prefix) - 1) << (bits - prefix)
    return f"{type(ip)(int(ip) & mask)}/{prefix}"


def _digest(value: str) -> str:
    """A short, fixed-length, storable stand-in for a client id or identity in a store key."""
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class RateLimitPolicy:
    """The configured limits: per endpoint, per scope (``global``, ``network``, ``client``, ``identity``)."""

    endpoints: Mapping[str, Mapping[str, Limit]] = field(default_factory=dict)
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56

    def limit(self, endpoint: str, scope: str) -> Limit | None:
        return self.endpoints.get(endpoint, {}).get(scope)


class RateLimiter:
    """Checks the configured limits against the shared store; raises :class:`RateLimited` (429).

    Each method is at most one atomic store call covering every limit it applies,
    and none at all when no limit of its scopes is configured.  The refusal fills
    in the audit record's ``details.rate_limit`` (scope, what was limited, the
    limit, the wait) and its reason ``rate_limit.<scope>``.

    A key the store refused is refused again from memory until the time the store
    said to come back (no process can make room on a key before then: its TAT only
    grows), so a flood of refused requests costs the store nothing.  Admissions
    always go to the store, one cell at a time: taking cells in batches to serve
    from memory was tried, and with several worker processes the cells each
    reserved and let expire unused spent a busy key's whole burst.
    """

    def __init__(self, policy: RateLimitPolicy, store: RateLimitStore | None) -> None:
        if store is None and any(policy.endpoints.values()):
            raise ValueError("rate limits are configured but no store holds them")
        self.policy = policy
        self.store = store
        #: Keys the store refused: until the time it said to come back, and how long that was.
        self._refused: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def on_arrival(self, endpoint: str, source_ip: str | None, now: float, record: AuditRecord) -> None:
        """``global`` and ``network``: before any work is done for the request."""
        self._admit(self._arrival_checks(endpoint, source_ip), now, record)

    def _arrival_checks(self, endpoint: str, source_ip: str | None) -> list[Check]:
        checks = []
        everyone = self.policy.limit(endpoint, "global")
        if everyone is not None:
            checks.append(Check("global", f"{endpoint}:global", everyone, "*"))
        per_network = self.policy.limit(endpoint, "network")
        if per_network is not None:
            network = network_of(source_ip, self.policy.ipv4_prefix, self.policy.ipv6_prefix)
            checks.append(Check("network", f"{endpoint}:network:{network}", per_network, network))
        return checks

    def for_client(self, endpoint: str, client_id: str, now: float, record: AuditRecord) -> None:
        """``client``: once the client has authenticated (an unauthenticated name is not counted)."""
        limit = self.policy.limit(endpoint, "client")
        if limit is not None:
            key = f"{endpoint}:client:{_digest(client_id)}"
            self._admit([Check("client", key, limit, client_id[:200])], now, record)

    def for_identity(self, endpoint: str, issuer: str, subject: str, now: float, record: AuditRecord) -> None:
        """``identity``: once the subject token is verified (issuer name and subject)."""
        limit = self.policy.limit(endpoint, "identity")
        if limit is not None:
            identity = f"{issuer}|{subject}"
            key = f"{endpoint}:identity:{_digest(identity)}"
            self._admit([Check("identity", key, limit, identity[:300])], now, record)

    def for_rule(
        self, rule: str, limit: Limit, issuer: str, subject: str, now: float, record: AuditRecord
    ) -> None:
        """A policy rule's own limit, per identity, once every check that can refuse has passed.
        Nothing with rate limits switched off (``enabled: false``: no limit at all; a review found
        such a rule answered ``500``, there being no store)."""
        if self.store is None:
            return
        identity = f"{issuer}|{subject}"
        key = f"token:rule:{rule}:{_digest(identity)}"
        self._admit([Check("rule", key, limit, f"{rule} {identity[:300]}")], now, record)

    def for_sign_in(self, endpoint: str, username: str, source_ip: str | None, now: float) -> None:
        """A password sign-in (the review page's): ``global``, ``network`` and ``client`` (here the
        user name tried, known or not) admitted together, before the password hash is computed,
        so that guessing is slow and a flood cannot spend the CPU that issues tokens.  Not audited
        as a decision: raises :class:`RateLimited` or :class:`TemporarilyUnavailable`."""
        checks = self._arrival_checks(endpoint, source_ip)
        per_user = self.policy.limit(endpoint, "client")
        if per_user is not None:
            checks.append(Check("client", f"{endpoint}:user:{_digest(username)}", per_user, "user"))
        self._admit(checks, now, None)

    def _admit(self, checks: Sequence[Check], now: float, record: AuditRecord | None) -> None:
        if not checks:
            return
        with self._lock:
            refused = [(c, self._refused_until(c.key, now)) for c in checks]
        blocked = [(c, until - now) for c, until in refused if until is not None]
        if blocked:
            # Refused a moment ago, and no other process can have made room since: refused
            # again, from memory, so that a flood costs the store nothing.
            self._refuse(*max(blocked, key=lambda item: item[1]), record)
        assert self.store is not None
        try:
            waits = self.store.acquire([c.cell() for c in checks], now)
        except StoreUnavailable as exc:
            raise TemporarilyUnavailable("store.unavailable", f"rate limits: {exc}") from None
        if max(waits) <= 0:
            return
        with self._lock:
            for check, wait in zip(checks, waits, strict=True):
                if wait > 0:
                    self._refused[check.key] = (now + wait, wait)
                    self._refused.move_to_end(check.key)
            while len(self._refused) > MAX_REMEMBERED:
                self._refused.popitem(last=False)
        worst = max(range(len(checks)), key=lambda i: waits[i])
        self._refuse(checks[worst], waits[worst], record)

    @staticmethod
    def _refuse(check: Check, wait: float, record: AuditRecord | None) -> NoReturn:
        retry_after = max(1, math.ceil(wait))
        if record is not None:
            record.details["rate_limit"] = {
                "scope": check.scope,
                "limited": check.shown,
                # The limiter's own key (digests: ``limited`` is cut short), which the audit trail
                # coalesces a flood's refusals by (sts.adapters.coalesced_refusals).
                "key": check.key,
                "limit": check.limit.describe(),
                "retry_after": retry_after,
            }
        raise RateLimited(f"rate_limit.{check.scope}", check.shown, retry_after=retry_after)

    def _refused_until(self, key: str, now: float) -> float | None:
        """Until when ``key`` stays refused (called with the lock held); None once it may pass, or
        once the clock has been set back (further from that time than the wait the store gave, by
        more than :data:`CLOCK_SKEW`: the refusal would otherwise hold for as long as the clock
        was ahead)."""
        remembered = self._refused.get(key)
        if remembered is None:
            return None
        until, wait = remembered
        if now >= until or until - now > wait + CLOCK_SKEW:
            del self._refused[key]
            return None
        return until


#: No limits: checks nothing and needs no store.
NO_LIMITS = RateLimiter(RateLimitPolicy(), None)
