"""The introspection (RFC 7662) and revocation (RFC 7009) endpoints' decisions, with their audit records.

Both need an authenticated client (RFC 7662 §2.1, RFC 7009 §2.1)::

    POST /introspect                          POST /revoke
    Authorization: Basic ...                  Authorization: Basic ...
    token=eyJ...&token_type_hint=access_token token=eyJ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InvalidClient, InvalidRequest, OAuthError, TemporarilyUnavailable, UnauthorizedClient
from ..protocol.client_auth import NONE, parse_client_credentials
from ..protocol.identifiers import uuid4_text
from ..protocol.token_exchange import CLIENT_AUTHENTICATION_PARAMETERS, check_no_repeats, single
from ..protocol.wire import WireRequest, check_content_type
from .audit import AuditRecord, log_unaudited, token_hash
from .clients import AssertionAudience, AuthenticatedClient, RegisteredClient, authenticate_client
from .exchange.request import trace_details
from .introspection import OwnTokenVerifier, audiences_of, introspect, verify_own_token
from .ports import (
    AuditSink,
    AuditUnavailable,
    ReplayCache,
    RevokedTokens,
    StoreUnavailable,
    SubjectStateStore,
)
from .rate_limit import NO_LIMITS, RateLimiter

log = logging.getLogger(__name__)

#: The parameters both endpoints define (RFC 7662 §2.1, RFC 7009 §2.1): each at most once.
#: Any other parameter is ignored (RFC 6749 §3.2), however often it is sent.
TOKEN_STATUS_PARAMETERS = CLIENT_AUTHENTICATION_PARAMETERS | {"token", "token_type_hint"}


@dataclass
class TokenStatus:
    verifier: OwnTokenVerifier
    clients: Mapping[str, RegisteredClient]
    client_audiences: Mapping[str, Collection[str]]
    issuer_names: Collection[str]
    replay: ReplayCache
    states: SubjectStateStore
    revoked: RevokedTokens
    audit: AuditSink
    assertion_audience: AssertionAudience
    clock: Callable[[], float]
    leeway: int
    max_assertion_lifetime: int
    #: The public URL of each endpoint (``introspect``, ``revoke``): also an accepted ``aud`` of a
    #: client assertion presented there (see :class:`.clients.AssertionAudience`).
    endpoint_urls: Mapping[str, str] = field(default_factory=dict)
    limits: RateLimiter = field(default=NO_LIMITS)
    #: Each trusted issuer's configured name by its ``iss``: whose state applies to a token's actor.
    issuer_of: Mapping[str, str] = field(default_factory=dict)

    def _start(self, wire: WireRequest, endpoint: str) -> tuple[AuditRecord, float]:
        now = self.clock()
        record = AuditRecord(
            event_id=uuid4_text(),
            time=now,
            request_id=wire.request_id,
            endpoint=endpoint,
            source_ip=wire.source_ip,
            user_agent=(wire.user_agent or "")[:200] or None,
            details=trace_details(wire),
        )
        return record, now

    def _authenticate(
        self, wire: WireRequest, record: AuditRecord, now: float
    ) -> tuple[AuthenticatedClient, str]:
        # Global and per-network limits first, before the client's credentials cost any work.
        self.limits.on_arrival(record.endpoint, wire.source_ip, now, record)
        if wire.query:
            raise InvalidRequest("request.query_parameters")
        check_content_type(wire.content_type)
        check_no_repeats(wire.form, TOKEN_STATUS_PARAMETERS)
        token = single(wire.form, "token")
        creds = parse_client_credentials(wire.form, wire.authorization)
        record.client_auth_method = creds.method
        client = authenticate_client(
            creds,
            self.clients,
            self.replay,
            replace(self.assertion_audience, endpoint=self.endpoint_urls.get(record.endpoint)),
            now=now,
            leeway=self.leeway,
            max_assertion_lifetime=self.max_assertion_lifetime,
        )
        if client is None:
            record.client_auth_method = NONE  # a public client's id, in the body or in Basic: no credential
            raise InvalidClient("client.authentication_required")
        record.client_id = client.client_id
        self.limits.for_client(record.endpoint, client.client_id, now, record)
        if token is None:
            raise InvalidRequest("request.missing_token")
        record.subject_token_sha256 = token_hash(token)
        return client, token

    def _finish(self, record: AuditRecord, error: OAuthError | None = None) -> None:
        if error is not None:
            record.refuse(error.error, error.reason, error.detail)
        try:
            self.audit.write(record)
        except AuditUnavailable as exc:
            # A refusal stands either way; an answer is withheld.  The log keeps the decision.
            log_unaudited(log, record, str(exc), outcome=None if error is not None else "withheld")
            if error is None:
                raise TemporarilyUnavailable("audit.unavailable", str(exc)) from None

    def refuse_early(self, wire: WireRequest, endpoint: str, exc: OAuthError) -> None:
        """Record a request to ``endpoint`` (``introspect``, ``revoke``) refused before it could be
        read (body too large or unparseable, repeated ``Authorization``), as the token endpoint does."""
        record, _now = self._start(wire, endpoint)
        self._finish(record, exc)

    def introspect(self, wire: WireRequest) -> dict[str, Any]:
        record, now = self._start(wire, "introspect")
        try:
            client, token = self._authenticate(wire, record, now)
        except OAuthError as exc:
            self._finish(record, exc)
            raise
        audiences = self.client_audiences.get(client.client_id, ())
        response = introspect(
            token, audiences, self.verifier, self.issuer_names, self.states, self.revoked, now, self.issuer_of
        )
        record.outcome = "active" if response["active"] else "inactive"
        record.subject = response.get("sub")
        record.issued_jti = response.get("jti")
        self._finish(record)
        return response

    def revoke(self, wire: WireRequest) -> None:
        """RFC 7009 §2.2: 200 whether or not the token was known; revoked if it was ours and valid."""
        record, now = self._start(wire, "revoke")
        try:
            client, token = self._authenticate(wire, record, now)
            claims = verify_own_token(token, self.verifier, now)
            if claims is None:
                record.outcome = "ignored"
                record.reasons.append("revoke.unknown_or_invalid_token")
                self._finish(record)
                return
            record.subject, record.issued_jti = str(claims["sub"]), str(claims["jti"])
            mine = claims.get("client_id") == client.client_id
            served = set(audiences_of(claims)) & set(self.client_audiences.get(client.client_id, ()))
            if not (mine or served):
                raise UnauthorizedClient("revoke.token_not_issued_to_client")
            try:
                # Remembered for as long as the token still verifies: up to exp + leeway.
                self.revoked.revoke(str(claims["jti"]), float(claims["exp"]) + self.leeway)
            except StoreUnavailable as exc:
                raise TemporarilyUnavailable("store.unavailable", str(exc)) from None
        except OAuthError as exc:
            self._finish(record, exc)
            raise
        record.outcome = "revoked"
        self._finish(record)
