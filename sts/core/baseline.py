"""Behaviour baselines: what is usual for one workload identity, bounded in size.

A baseline is plain data, updated by pure functions and kept behind the
:class:`~sts.core.ports.BaselineStore` port (embedded SQL or Redis, with
expiry).  A new identity starts in a *learning* state: for its first
``LEARNING_EXCHANGES`` exchanges, novelty signals (new network, new
audience, unusual scopes) record what they see but do not fire.

Stable facts (and the identity's proof-of-possession keys) are *confirmed*
values: set on first sight, then changed only when a new value is confirmed
(:mod:`sts.core.drift`).  A new value waits in ``pending`` with its probation
progress; ``confirmed`` says how each value came to be trusted.  A
proof-of-possession key is the one fact with several confirmed values: the
replicas of one workload each keep their own key, so earlier confirmed keys
stay confirmed (``other_keys``, at most ``MAX_OTHER_KEYS``).  Baselines
stored before these fields existed read as having no pending values.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from .assurance import KEY_FACTS

LEARNING_EXCHANGES = 5
MAX_NETWORKS = 32
MAX_AUDIENCES = 64
MAX_SCOPES = 64
MAX_FAILURES = 32
#: Earlier confirmed proof-of-possession keys an identity keeps (one per replica or restart).
MAX_OTHER_KEYS = 8
RATE_WINDOW = 60.0
#: How long an idle identity's baseline is kept (the store expires it).
BASELINE_TTL = 30 * 86400


@functools.lru_cache(maxsize=4096)
def network_of(address: str) -> str:
    """The network an address is judged by: its /24 (IPv4) or /64 (IPv6).

    Remembered for the most recent addresses: it is asked twice per exchange, and parsing an
    address costs more than the rest of updating the baseline.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ``::ffff:10.1.2.3`` (a dual-stack listener's) is the IPv4 address.
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _bounded(existing: Iterable[str], new: Iterable[str], limit: int) -> tuple[str, ...]:
    """Most recent last; oldest dropped beyond ``limit``."""
    fresh = list(dict.fromkeys(new))  # read once: ``new`` may be an iterator
    if type(existing) is tuple and len(existing) <= limit:
        # What an identity asks for is mostly what it asked for last: the new items already end
        # ``existing``, in order, and appear nowhere before, so nothing moves.
        cut = len(existing) - len(fresh)
        if cut >= 0 and list(existing[cut:]) == fresh and set(fresh).isdisjoint(existing[:cut]):
            return existing
    seen = set(fresh)
    items = [x for x in existing if x not in seen] + fresh
    return tuple(items[-limit:])


@dataclass(frozen=True)
class PendingFact:
    """A changed stable fact that is not confirmed yet, and how far its probation has got.

    ``value`` None means the fact is gone.  ``fresh_count`` counts exchanges
    with fresh attestation that presented this value, the first at ``fresh_since``;
    ``fresh_attested`` is the attestation time (``iat``) of the last one counted, so
    that one token counts once however often it is presented.
    """

    value: Any
    first_seen: float
    last_seen: float
    fresh_count: int = 0
    fresh_since: float | None = None
    fresh_attested: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """What :func:`dataclasses.asdict` gives (the stored form), built field by field."""
        value = self.value
        return {
            "value": value if type(value) in _PENDING_VALUES else asdict(self)["value"],
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "fresh_count": self.fresh_count,
            "fresh_since": self.fresh_since,
            "fresh_attested": self.fresh_attested,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PendingFact:
        since, attested = data.get("fresh_since"), data.get("fresh_attested")
        value = data.get("value")
        if value is not None and not isinstance(value, str | int | bool):
            raise ValueError("pending value")
        return cls(
            value=value,
            first_seen=float(data["first_seen"]),
            last_seen=float(data.get("last_seen", data["first_seen"])),
            fresh_count=int(data.get("fresh_count", 0)),
            fresh_since=float(since) if since is not None else None,
            fresh_attested=float(attested) if attested is not None else None,
        )


@dataclass(frozen=True)
class Baseline:
    first_seen: float | None = None
    last_seen: float | None = None
    count: int = 0
    networks: tuple[str, ...] = ()
    facts: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    max_depth: int = 0
    failures: tuple[float, ...] = ()
    window_start: float = 0.0
    window_count: int = 0
    usual_rate: float = 0.0
    #: Changed facts waiting for confirmation, by fact name.
    pending: Mapping[str, PendingFact] = field(default_factory=dict)
    #: How each confirmed fact's value came to be trusted: ``{"how": "first_seen", "at": 1700000000.0}``.
    confirmed: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Earlier confirmed keys (``cnf_jkt``, ``cnf_x5t``) that still count as the identity's.
    other_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def confirmed_values(self, name: str) -> tuple[Any, ...]:
        """The values of ``name`` that are confirmed (none when it has no baseline value)."""
        if name not in self.facts:
            return ()
        return (self.facts[name], *self.other_keys.get(name, ()))

    def confirmed_keys(self) -> dict[str, tuple[Any, ...]]:
        """The identity's confirmed proof-of-possession keys, by fact."""
        return {name: self.confirmed_values(name) for name in KEY_FACTS if name in self.facts}

    def with_confirmed(self, name: str, value: Any, how: str, at: float) -> Baseline:
        """``value`` confirmed for ``name`` (None: the fact is gone), and no longer pending."""
        facts = dict(self.facts)
        other_keys = dict(self.other_keys)
        earlier = facts.get(name)
        if value is None:
            facts.pop(name, None)
        else:
            facts[name] = value
        if name in KEY_FACTS and earlier is not None and value is not None and earlier != value:
            kept = [k for k in other_keys.get(name, ()) if k != value]
            other_keys[name] = _bounded(kept, [earlier], MAX_OTHER_KEYS)
        return replace(
            self,
            facts=facts,
            other_keys=other_keys,
            confirmed={**self.confirmed, name: {"how": how, "at": at}},
            pending={n: p for n, p in self.pending.items() if n != name},
        )

    @property
    def learning(self) -> bool:
        return self.count < LEARNING_EXCHANGES

    def current_rate(self, now: float) -> float:
        """Exchanges per minute in the current window (this one included)."""
        if now - self.window_start > RATE_WINDOW:
            return 1.0
        return float(self.window_count + 1)

    @functools.cached_property
    def reads_back_as_itself(self) -> bool:
        """:func:`_reads_back_as_itself`, once per baseline (baselines are immutable); :func:`observe`
        carries it over to the baseline it derives when it can tell without looking again.
        (``cached_property`` writes the instance dict directly, so it works on a frozen dataclass.)"""
        return _reads_back_as_itself(self)

    def to_json(self) -> str:
        """The stored form: every field in declaration order, tuples as arrays.

        Built field by field rather than with :func:`dataclasses.asdict`, whose recursive deep
        copy cost more than the rest of saving a baseline (it runs after every grant); the text
        is the same.
        """
        plain = self.reads_back_as_itself
        pending = {name: p.as_dict() for name, p in self.pending.items()} if self.pending else {}
        facts: Mapping[str, Any]
        confirmed: Mapping[str, Any]
        other_keys: Mapping[str, Any]
        if plain:
            # Plain dicts of plain values (what the check found): written as they are, which is the
            # same text as the copies below (a tuple is written as the list it would be copied to).
            facts, confirmed, other_keys = self.facts, self.confirmed, self.other_keys
        else:
            facts = dict(self.facts)
            confirmed = {name: dict(how) for name, how in self.confirmed.items()}
            other_keys = {name: list(keys) for name, keys in self.other_keys.items()}
        # Every field, in declaration order (a test holds this to ``dataclasses.fields``).
        data = {
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "count": self.count,
            "networks": self.networks,
            "facts": facts,
            "audiences": self.audiences,
            "scopes": self.scopes,
            "max_depth": self.max_depth,
            "failures": self.failures,
            "window_start": self.window_start,
            "window_count": self.window_count,
            "usual_rate": self.usual_rate,
            "pending": pending,
            "confirmed": confirmed,
            "other_keys": other_keys,
        }
        text = (
            "".join(_PLAIN_ENCODER(data, 0))
            if plain and _PLAIN_ENCODER is not None
            else _ENCODER.encode(data)
        )
        if plain:
            _WRITTEN.remember(text, self)
        return text

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Baseline:
        if not text:
            return cls()
        written = _WRITTEN.get(text)
        if written is not None:
            return written
        try:
            data = json.loads(text)
            return cls(
                first_seen=None if (first := data.get("first_seen")) is None else float(first),
                last_seen=None if (last := data.get("last_seen")) is None else float(last),
                count=int(data.get("count", 0)),
                networks=tuple(data.get("networks", ())),
                facts=dict(data.get("facts", {})),
                audiences=tuple(data.get("audiences", ())),
                scopes=tuple(data.get("scopes", ())),
                max_depth=int(data.get("max_depth", 0)),
                failures=tuple(float(t) for t in data.get("failures", ())),
                window_start=float(data.get("window_start", 0.0)),
                window_count=int(data.get("window_count", 0)),
                usual_rate=float(data.get("usual_rate", 0.0)),
                pending={
                    str(name): PendingFact.from_dict(p) for name, p in dict(data.get("pending", {})).items()
                },
                confirmed={str(name): dict(how) for name, how in dict(data.get("confirmed", {})).items()},
                other_keys={
                    str(name): tuple(str(k) for k in keys)
                    for name, keys in dict(data.get("other_keys", {})).items()
                    if isinstance(keys, list)
                },
            )
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError, KeyError):
            # A corrupt baseline is treated as a new identity (learning), never as trusted.
            return cls()


_BASELINE_FIELDS = tuple(f.name for f in fields(Baseline))
#: ``json.dumps(..., separators=(",", ":"), default=str)``, built once: the same encoder ``dumps``
#: would build for each call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
#: The C encoder that :data:`_ENCODER` makes for each call (the same settings: ASCII escapes,
#: ``default=str``, no indent, those separators, unsorted, NaN allowed), made once, without the
#: circular-reference bookkeeping: used only for a baseline that reads back as itself, which holds
#: no container inside another that could lead back to it.  None where ``json`` has no C speedups.
_PLAIN_ENCODER = (
    c_make_encoder(None, str, encode_basestring_ascii, None, ":", ",", False, False, True)
    if c_make_encoder is not None
    else None
)

#: Scalars that JSON gives back as they were written: same type, same value.
_PLAIN = frozenset({str, int, float, bool, type(None)})
#: Pending values :meth:`PendingFact.from_dict` reads back (any other makes the baseline unreadable).
_PENDING_VALUES = frozenset({str, int, bool, type(None)})
_STR = frozenset({str})
_FLOAT = frozenset({float})
_FLOAT_OR_NONE = frozenset({float, type(None)})


def _reads_back_as_itself(b: Baseline) -> bool:
    """Whether :meth:`Baseline.from_json` of :meth:`Baseline.to_json` gives a baseline equal to this
    one, field for field and type for type: every value one that JSON and ``from_json`` give back as
    it was (float timestamps, tuples of strings, plain fact values).  Only such a baseline is
    remembered by :data:`_WRITTEN`.  (The types are gathered with ``map`` and compared as sets.)"""
    if not (
        {type(b.first_seen), type(b.last_seen)} <= _FLOAT_OR_NONE
        and type(b.count) is int
        and type(b.max_depth) is int
        and type(b.window_count) is int
        and {type(b.window_start), type(b.usual_rate), *map(type, b.failures)} <= _FLOAT
        and {type(b.failures), type(b.networks), type(b.audiences), type(b.scopes)} == {tuple}
        and set(map(type, b.networks + b.audiences + b.scopes)) <= _STR
        and {type(b.facts), type(b.pending), type(b.confirmed), type(b.other_keys)} == {dict}
        and set(map(type, b.facts.values())) <= _PLAIN
        and {*map(type, b.facts), *map(type, b.pending), *map(type, b.confirmed), *map(type, b.other_keys)}
        <= _STR
    ):
        return False
    for p in b.pending.values():
        if not (
            type(p) is PendingFact
            and type(p.value) in _PENDING_VALUES
            and {type(p.first_seen), type(p.last_seen)} <= _FLOAT
            and type(p.fresh_count) is int
            and type(p.fresh_since) in _FLOAT_OR_NONE
            and type(p.fresh_attested) in _FLOAT_OR_NONE
        ):
            return False
    for how in b.confirmed.values():
        if not (type(how) is dict and set(map(type, how)) <= _STR and set(map(type, how.values())) <= _PLAIN):
            return False
    return all(type(keys) is tuple and set(map(type, keys)) <= _STR for keys in b.other_keys.values())


class _WrittenBaselines:
    """The baselines this process wrote lately, by their stored text (at most ``size``, the oldest
    forgotten first).  Reading one of those texts back gives the baseline that was written, which
    equals what parsing the text gives (:func:`_reads_back_as_itself`): after every grant the
    pipeline reads back the text it wrote on the identity's previous exchange, and parsing it cost
    more than the rest of reading the baseline.  Baselines are immutable values, so sharing one
    between requests is safe; a text written by another process is simply parsed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[str, Baseline] = {}
        self.lock = threading.Lock()

    def get(self, text: str | bytes) -> Baseline | None:
        return self.entries.get(text) if type(text) is str else None

    def remember(self, text: str, baseline: Baseline) -> None:
        with self.lock:
            self.entries.pop(text, None)
            self.entries[text] = baseline
            while len(self.entries) > self.size:
                del self.entries[next(iter(self.entries))]


#: One text per identity that exchanges often, a few hundred bytes each.
_WRITTEN = _WrittenBaselines(1024)


def observe(
    baseline: Baseline,
    *,
    now: float,
    source_ip: str | None,
    stable_facts: Mapping[str, Any],
    audiences: Iterable[str],
    scopes: Iterable[str],
    depth: int,
    rebaseline: bool,
) -> Baseline:
    """The baseline after a granted exchange.

    Stable facts are set on first sight and replaced only by ``rebaseline``;
    the pipeline confirms changed facts beforehand (:func:`sts.core.drift.review`),
    so fresh attestation alone never replaces one and drift keeps firing.
    """
    facts = dict(baseline.facts)
    for name, value in stable_facts.items():
        if rebaseline or name not in facts:
            facts[name] = value
    if now - baseline.window_start > RATE_WINDOW:
        usual = baseline.usual_rate * 0.8 + baseline.window_count * 0.2 if baseline.count else 0.0
        window_start, window_count = now, 1
    else:
        usual, window_start, window_count = (
            baseline.usual_rate,
            baseline.window_start,
            baseline.window_count + 1,
        )
    # Every field named (what ``dataclasses.replace`` would do, without its per-call introspection).
    updated = Baseline(
        first_seen=baseline.first_seen if baseline.first_seen is not None else now,
        last_seen=now,
        count=baseline.count + 1,
        networks=_bounded(baseline.networks, [network_of(source_ip)] if source_ip else [], MAX_NETWORKS),
        facts=facts,
        audiences=_bounded(baseline.audiences, audiences, MAX_AUDIENCES),
        scopes=_bounded(baseline.scopes, scopes, MAX_SCOPES),
        max_depth=max(baseline.max_depth, depth),
        failures=baseline.failures,
        window_start=window_start,
        window_count=window_count,
        usual_rate=usual,
        pending=baseline.pending,
        confirmed=baseline.confirmed,
        other_keys=baseline.other_keys,
    )
    if (
        baseline.__dict__.get("reads_back_as_itself") is True
        and type(now) is float
        and type(depth) is int
        and type(usual) is float
        and all(type(k) is str and type(v) in _PLAIN for k, v in stable_facts.items())
        and set(map(type, updated.audiences + updated.scopes)) <= _STR
    ):
        # Derived from a baseline that reads back as itself, with values that do too (the networks
        # are network_of's strings, the rest is the old baseline's): so does this one.  Otherwise
        # it is checked field by field when it is written.
        updated.__dict__["reads_back_as_itself"] = True
    return updated


def appended_failure(failures: tuple[float, ...], at: float) -> tuple[float, ...]:
    """``failures`` with a refusal at ``at`` appended, the oldest dropped past :data:`MAX_FAILURES`:
    what each store's atomic ``add_failure`` writes."""
    return (*failures, at)[-MAX_FAILURES:]


def failures_to_json(failures: Iterable[float]) -> str:
    """The stored form of an identity's recent refusals, kept apart from its baseline: a grant
    writes back the whole baseline it read, and would undo a refusal recorded in between."""
    return _ENCODER.encode([float(t) for t in failures])


def with_failures(baseline: Baseline, failures: str | bytes | None) -> Baseline:
    """``baseline`` with the refusals kept apart from it (:func:`failures_to_json`); None (or an
    unreadable value) leaves the baseline's own, which is where they were kept before."""
    try:
        data = json.loads(failures) if failures else None
        kept = tuple(float(t) for t in data) if isinstance(data, list) else None
    except (ValueError, TypeError, OverflowError, RecursionError):
        kept = None
    return baseline if kept is None or kept == baseline.failures else replace(baseline, failures=kept)


def accept_pending(baseline: Baseline, now: float, names: Iterable[str] | None = None) -> Baseline:
    """An operator confirms pending values (all, or those ``names``): they become the baseline's facts."""
    chosen = sorted(set(baseline.pending) if names is None else set(names) & set(baseline.pending))
    for name in chosen:
        baseline = baseline.with_confirmed(name, baseline.pending[name].value, "operator_accept", now)
    return baseline
