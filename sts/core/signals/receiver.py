"""The Shared Signals receiver (RFC 8935 push): the steps of :mod:`sts.core.signals`, run in order
for one delivery, with the subjects' states and the replay records reached through the ports."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ...errors import RateLimited, TemporarilyUnavailable
from ...protocol.identifiers import uuid4_text
from ...protocol.security_events import (
    MAX_EVENTS,
    SET_MEDIA_TYPE,
    SHOWN_CHARS,
    ReceiverRateLimited,
    ReceiverUnavailable,
    SetDelivery,
    SetRefused,
    check_media_type,
    decode_body,
    invalid_set,
)
from ..attest import IssuerDirectory
from ..audit import AuditRecord, log_unaudited, token_hash
from ..audited import AuditedEndpoint
from ..claims import numeric_date_value
from ..ports import (
    AuditSink,
    AuditUnavailable,
    ReplayCache,
    ReplayWindowLost,
    StoreUnavailable,
    SubjectStateStore,
)
from ..rate_limit import NO_LIMITS, RateLimiter
from ..subject_state import STATE_TTL, SubjectState
from .events import SecurityEvent, apply_event, parse_events
from .subjects import SubjectScope, unique_identities
from .verify import Transmitter, VerifiedSET, authenticate_set, check_set_claims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetReceipt:
    """An accepted SET: which transmitter, which events, which identities changed."""

    transmitter: str
    jti: str
    events: tuple[SecurityEvent, ...]
    states: Mapping[str, SubjectState] = field(default_factory=dict)


class SignalReceiver(AuditedEndpoint[SetRefused]):
    """RFC 8935 push receiver for the configured transmitters.

    ``receive`` returns a :class:`SetReceipt` (answer ``202``) or raises
    :class:`SetRefused` (``400``) / :class:`ReceiverUnavailable` (``503``).
    Every delivery, accepted or refused, leaves one audit record (endpoint
    ``ssf``) holding the SET's SHA-256, never the SET.
    """

    refusal = SetRefused
    logger = log
    decision_name = "SET receipt"

    def __init__(
        self,
        transmitters: Sequence[Transmitter],
        *,
        issuers: IssuerDirectory,
        replay: ReplayCache,
        states: SubjectStateStore,
        audit: AuditSink,
        clock: Callable[[], float],
        leeway: int,
        limits: RateLimiter = NO_LIMITS,
    ) -> None:
        self.transmitters = {t.policy.issuer: t for t in transmitters}
        self.limits = limits
        self.issuers = issuers
        self.replay = replay
        self.states = states
        self.audit = audit
        self.clock = clock
        self.leeway = leeway

    def _record(self, delivery: SetDelivery, now: float) -> AuditRecord:
        return AuditRecord(
            event_id=uuid4_text(),
            time=now,
            request_id=delivery.request_id,
            endpoint="ssf",
            source_ip=delivery.source_ip,
            user_agent=(delivery.user_agent or "")[:200] or None,
            subject_token_type=SET_MEDIA_TYPE,
            details={"trace_id": delivery.trace_id} if delivery.trace_id else {},
        )

    def refuse_early(self, delivery: SetDelivery, exc: SetRefused) -> None:
        """Record a delivery refused before it could be read (body too large, unreadable)."""
        self.record_refusal(self._record(delivery, self.clock()), exc)

    def receive(self, delivery: SetDelivery) -> SetReceipt:
        """Decide on one delivery and record it; the receipt is returned once the record is committed."""
        now = self.clock()
        record = self._record(delivery, now)
        receipt, _consumed = self.decide_and_record(
            record,
            lambda: self._receive(delivery, record, now),
            lambda accepted: self._commit(record, accepted[1]),
        )
        return receipt

    def _commit(self, record: AuditRecord, consumed: tuple[str, str] | None) -> None:
        """Commit the record of an accepted SET (``consumed``: its ``jti``'s use, None for a SET
        received before, whose use is the first delivery's)."""
        try:
            self.audit.write(record)
        except AuditUnavailable as exc:
            # The state change stands (it only tightens), but the transmitter must retry so the
            # trail is complete: forget the jti so that the retry is not taken for a replay.
            log.error("audit write of an accepted SET failed (request %s): %s", record.request_id, exc)
            log_unaudited(log, record, str(exc), outcome="withheld")
            try:
                if consumed is not None:
                    self.replay.release(*consumed)
            except StoreUnavailable:
                log.error("could not release a SET jti after an audit failure")
            raise ReceiverUnavailable("audit.unavailable", str(exc)) from None

    @staticmethod
    def _limit(check: Callable[[], None]) -> None:
        """Run a rate-limit check, with its refusal in this endpoint's terms (RFC 8935 ``err``)."""
        try:
            check()
        except RateLimited as exc:
            raise ReceiverRateLimited(exc.reason, exc.detail, retry_after=exc.retry_after) from None
        except TemporarilyUnavailable as exc:
            raise ReceiverUnavailable(exc.reason, exc.detail) from None

    def _receive(
        self, delivery: SetDelivery, record: AuditRecord, now: float
    ) -> tuple[SetReceipt, tuple[str, str] | None]:
        if delivery.body:
            record.subject_token_sha256 = hashlib.sha256(delivery.body).hexdigest()
        self._limit(lambda: self.limits.on_arrival("ssf", delivery.source_ip, now, record))
        check_media_type(delivery.content_type)
        token = decode_body(delivery.body)
        record.subject_token_sha256 = token_hash(token)
        policy, claims = authenticate_set(token, self.transmitters)
        record.issuer = policy.name
        # The transmitter, once its signature has authenticated it, is the "client" of this endpoint.
        self._limit(lambda: self.limits.for_client("ssf", policy.name, now, record))
        types = claims.get("events")
        if isinstance(types, dict):
            record.details["events"] = [str(t)[:SHOWN_CHARS] for t in list(types)[:MAX_EVENTS]]
        jti, iat = check_set_claims(claims, policy, now=now, leeway=self.leeway)
        verified = VerifiedSET(transmitter=policy, claims=claims, jti=jti, iat=iat)
        record.subject_token_iat = verified.iat
        jti_hash = hashlib.sha256(verified.jti.encode("utf-8", "surrogatepass")).hexdigest()
        record.details["jti_sha256"] = jti_hash
        events = parse_events(verified.claims, SubjectScope(self.issuers, policy.subject_issuers))
        identities = unique_identities(key for event in events for key in event.identities)
        record.subject = " ".join(identities) or None
        record.details["identities"] = list(identities)
        record.details["ignored_events"] = [e.type[:SHOWN_CHARS] for e in events if not e.acted_on]

        # Single use (RFC 8417 §2.2 jti), checked last so that a refused SET does not burn its jti.
        consumed = self._use_once(verified, jti_hash, now)
        if consumed is None:
            # Received before: RFC 8935 §2 has the recipient "respond as it would if the SET had not
            # been previously received" (a transmitter resends when an answer was lost), and
            # RFC 8417 §2.2's jti tells it apart: accepted, and not applied again (an outside
            # conformance check found it refused as invalid, which a transmitter never retries).
            record.outcome = "accepted"
            record.reasons.append("set.already_received")
            return SetReceipt(policy.name, verified.jti, events, {}), None
        try:
            states = self._apply(events, verified, now)
        except StoreUnavailable as exc:
            try:
                self.replay.release(*consumed)
            except StoreUnavailable:
                log.error("could not release a SET jti after a store failure")
            raise ReceiverUnavailable("store.unavailable", str(exc)) from None
        record.outcome = "accepted"
        record.reasons.extend(f"event.{e.short_name}" for e in events if e.acted_on)
        if not any(e.acted_on for e in events):
            record.reasons.append("set.no_known_event")
        return SetReceipt(policy.name, verified.jti, events, states), consumed

    def _apply(
        self, events: Sequence[SecurityEvent], verified: VerifiedSET, now: float
    ) -> dict[str, SubjectState]:
        acted = [e for e in events if e.acted_on]
        keys = unique_identities(key for event in acted for key in event.identities)
        if not keys:
            return {}
        toe = numeric_date_value(verified.claims.get("toe"))
        issued = verified.iat
        policy = verified.transmitter
        current: dict[str, SubjectState] = {}
        for key in keys:

            def change(state: SubjectState, key: str = key) -> SubjectState:
                for event in acted:
                    if key in event.identities:
                        state = apply_event(
                            state,
                            event.type,
                            event.payload,
                            now,
                            policy.block_duration,
                            leeway=self.leeway,
                            toe=toe,
                            issued=issued,
                        )
                return state

            # Atomic read-modify-write in the store: concurrent SETs about one subject,
            # in any worker process or instance, can never overwrite each other.
            current[key] = self.states.update(key, change, STATE_TTL)
        return current

    def _use_once(self, verified: VerifiedSET, jti_hash: str, now: float) -> tuple[str, str] | None:
        """Record the first use of the SET's ``jti``: what to release should the SET not be applied
        after all; None when it was received (and applied) before."""
        policy = verified.transmitter
        purpose = f"set:{policy.name}"
        try:
            first = self.replay.first_use(
                purpose,
                jti_hash,
                verified.iat + policy.max_age + self.leeway,
                now,
                valid_from=verified.iat - self.leeway,
            )
        except StoreUnavailable as exc:
            raise ReceiverUnavailable("store.unavailable", str(exc)) from None
        except ReplayWindowLost as exc:
            # The replay store lost its records after this SET could have been received: it may be
            # a replay.  The transmitter must send the event again as a new SET (new jti and iat).
            raise invalid_set("set.replay_window_lost", str(exc)) from None
        if not first:
            return None
        return purpose, jti_hash

    # -- how this endpoint's refusals are recorded (sts.core.audited) ---------------------------------

    def refusal_fields(self, exc: SetRefused) -> tuple[str, str, str]:
        return exc.err, exc.reason, exc.detail

    def unexpected_failure(self, reason: str) -> SetRefused:
        """503, so that the transmitter delivers again: a bug must not look like an accepted SET."""
        return ReceiverUnavailable(reason)
