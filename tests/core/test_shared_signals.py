"""The Shared Signals receiver: RFC 8935 push delivery of RFC 8417 SETs carrying OpenID CAEP 1.0 events.

The transmitter is a real development issuer serving its JWKS over HTTP
(ES256, so the upstream workload issuer of ``conftest`` stays RS256), and
SETs are signed with it: ``transmitter.issuer.mint(claims, header={"typ":
"secevent+jwt"})``.  Every CAEP event type is delivered end to end on the
embedded store and on the real Redis (database 12, flushed before and after),
and the resulting :class:`SubjectState` is read back from the app's own store.
Every refusal asserts its exact RFC 8935 §2.4 ``err`` code.

Event shapes follow the non-normative examples of OpenID CAEP 1.0 §3 and SSF
1.0 (``sub_id`` with RFC 9493 subject identifiers).  Time is a parameter: the
app runs on a clock the tests set, started at the real time so that Redis
expiries (on the server's clock) are not already past.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey
from werkzeug.test import TestResponse

from sts.adapters.redis.client import connect as connect_redis
from sts.adapters.redis.key_value import RedisSubjectStateStore
from sts.adapters.sql.audit_sink import SqlAuditSink
from sts.adapters.sql.engines import make_engine
from sts.app import create_app
from sts.core.ports import StoreUnavailable
from sts.core.signals.events import ACTED_ON, apply_event
from sts.core.signals.receiver import SignalReceiver
from sts.core.signals.subjects import SubjectScope, resolve_subject
from sts.core.subject_state import STATE_TTL, SubjectState, is_revoked
from sts.dev.issuer import DevIssuer, RunningServer
from sts.errors import ConfigurationError
from sts.protocol.security_events import (
    ASSURANCE_LEVEL_CHANGE,
    CREDENTIAL_CHANGE,
    DESCRIPTIONS,
    DEVICE_COMPLIANCE_CHANGE,
    RISK_LEVEL_CHANGE,
    SESSION_REVOKED,
    TOKEN_CLAIMS_CHANGE,
    SetDelivery,
    SetRefused,
)
from sts.settings import Settings
from sts.wiring.trust import build_transmitters
from tests.conftest import STS_ISSUER
from tests.support.clock import Clock
from tests.support.crafted_jose import NOT_UTF8, KeySetServer, rsa_key_with_exponent_3, sign_encoded
from tests.support.redis_server import url_of

SET_CONTENT_TYPE = "application/secevent+jwt"
SUBJECT = "repo:acme/app:ref:refs/heads/main"
UPSTREAM_KEY = f"upstream|{SUBJECT}"
LEEWAY = 30  # the settings default
#: Nothing listens on port 1: connections are refused at once.
DEAD_PORT_URL = "redis://127.0.0.1:1/0"
RSA_KEY = RSAKey.generate_key(2048)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    """Overrides conftest's per-test workload issuer: one RSA key for the module keeps the suite fast."""
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture(scope="module")
def transmitter() -> Iterator[RunningServer]:
    """The SET transmitter: a dev issuer whose JWKS is served over real HTTP."""
    with DevIssuer.serve_ephemeral(alg="ES256", mint_endpoints=False) as server:
        yield server


@pytest.fixture
def transmitter_entry(transmitter: RunningServer) -> dict[str, Any]:
    return {
        "name": "idp",
        "issuer": transmitter.issuer.issuer_url,
        "jwks_uri": transmitter.jwks_uri,
        "algorithms": ["ES256"],
    }


@pytest.fixture
def redis_db(fresh_redis_url: str) -> Iterator[redis.Redis]:
    """An empty database of this run's private redis-server (see tests/support/redis_server.py)."""
    client = redis.Redis.from_url(fresh_redis_url, socket_timeout=2)
    yield client
    client.close()


@pytest.fixture
def build_app(
    make_settings: Callable[..., Settings], transmitter_entry: dict[str, Any], clock: Clock
) -> Callable[..., Flask]:
    def build(transmitters: list[dict[str, Any]] | None = None, **overrides: Any) -> Flask:
        entries = transmitters if transmitters is not None else [transmitter_entry]
        return create_app(make_settings(transmitters=entries, **overrides), clock=clock)

    return build


@pytest.fixture
def ssf_app(build_app: Callable[..., Flask]) -> Flask:
    return build_app()


@pytest.fixture
def ssf_client(ssf_app: Flask) -> FlaskClient:
    return ssf_app.test_client()


@pytest.fixture(params=["embedded", "redis"])
def store_app(request: pytest.FixtureRequest, build_app: Callable[..., Flask]) -> Flask:
    if request.param == "redis":
        db: redis.Redis = request.getfixturevalue("redis_db")
        return build_app(store="redis", redis_url=url_of(db))
    return build_app()


# -- helpers -------------------------------------------------------------------------------------


def iss_sub(sub: str = SUBJECT, iss: str | None = None, *, upstream: RunningServer) -> dict[str, str]:
    return {"format": "iss_sub", "iss": iss or upstream.issuer.issuer_url, "sub": sub}


def set_claims(
    transmitter: RunningServer,
    clock: Clock,
    events: dict[str, Any],
    sub_id: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": transmitter.issuer.issuer_url,
        "aud": STS_ISSUER,
        "iat": int(clock.now),
        "jti": uuid.uuid4().hex,
        "events": events,
    }
    if sub_id is not None:
        claims["sub_id"] = sub_id
    for name, value in extra.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def sign(transmitter: RunningServer, claims: dict[str, Any], **header: Any) -> str:
    return transmitter.issuer.mint(claims, header={"typ": "secevent+jwt", **header})


def push(client: FlaskClient, body: str | bytes, content_type: str | None = SET_CONTENT_TYPE) -> TestResponse:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    return client.post("/ssf/events", data=body, headers=headers)


def states(app: Flask, *keys: str) -> list[SubjectState]:
    return app.extensions["sts"].subject_states.get(list(keys))


def audit_records(app: Flask, **filters: str) -> list[dict[str, Any]]:
    return app.extensions["sts"].audit.recent(200, endpoint="ssf", **filters)


def assert_refused(response: TestResponse, err: str) -> None:
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json() == {"err": err, "description": DESCRIPTIONS[err]}
    assert response.headers["Cache-Control"] == "no-store"


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# -- happy path: each CAEP event type, on both stores --------------------------------------------


def _expected(kind: str, now: float, when: float) -> SubjectState:
    """What each event does to an empty state (see ``apply_event``): block, step-up, revocation, risk."""
    name = kind.rsplit("/", 1)[1]
    base = {"events": (name,), "updated_at": now}
    return {
        SESSION_REVOKED: SubjectState(blocked_until=now + 3600, revoked_before=now, **base),
        CREDENTIAL_CHANGE: SubjectState(reauth_after=when, revoked_before=now, **base),
        TOKEN_CLAIMS_CHANGE: SubjectState(reauth_after=when, revoked_before=now, **base),
        ASSURANCE_LEVEL_CHANGE: SubjectState(reauth_after=when, **base),
        RISK_LEVEL_CHANGE: SubjectState(risk_level="high", reauth_after=when, risk_level_at=when, **base),
        DEVICE_COMPLIANCE_CHANGE: SubjectState(posture="not-compliant", posture_at=when, **base),
    }[kind]


#: CAEP 1.0 §3 example payloads (event_timestamp added by the test).
PAYLOADS: dict[str, dict[str, Any]] = {
    SESSION_REVOKED: {"initiating_entity": "policy", "reason_admin": {"en": "Landspeed Policy Violation"}},
    CREDENTIAL_CHANGE: {"credential_type": "fido2-roaming", "change_type": "create"},
    TOKEN_CLAIMS_CHANGE: {"claims": {"role": "ro-admin"}},
    ASSURANCE_LEVEL_CHANGE: {
        "namespace": "NIST-AAL",
        "current_level": "nist-aal2",
        "change_direction": "decrease",
    },
    RISK_LEVEL_CHANGE: {
        "principal": "USER",
        "current_level": "HIGH",
        "risk_reason": "PASSWORD_FOUND_IN_DATA_BREACH",
    },
    DEVICE_COMPLIANCE_CHANGE: {"previous_status": "compliant", "current_status": "not-compliant"},
}


@pytest.mark.parametrize("kind", sorted(ACTED_ON), ids=lambda k: k.rsplit("/", 1)[1])
def test_each_caep_event_changes_the_named_subject(
    kind: str, store_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    when = clock.now - 120
    event = {**PAYLOADS[kind], "event_timestamp": int(when)}
    token = sign(transmitter, set_claims(transmitter, clock, {kind: event}, iss_sub(upstream=upstream)))

    response = push(store_app.test_client(), token)

    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.get_data() == b""
    own, any_issuer, other = states(store_app, UPSTREAM_KEY, f"*|{SUBJECT}", "upstream|someone-else")
    assert own == _expected(kind, clock.now, when)
    assert any_issuer.empty and other.empty


def test_redis_state_expires_with_the_state_ttl(
    build_app: Callable[..., Flask],
    redis_db: redis.Redis,
    transmitter: RunningServer,
    upstream: RunningServer,
    clock: Clock,
) -> None:
    app = build_app(store="redis", redis_url=url_of(redis_db))
    token = sign(
        transmitter, set_claims(transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream))
    )
    assert push(app.test_client(), token).status_code == 202
    ttl = redis_db.ttl(f"sts:subject:{UPSTREAM_KEY}".encode())
    assert STATE_TTL - 60 < ttl <= STATE_TTL


def test_session_revoked_blocks_for_the_configured_duration_and_revokes_issued_tokens(
    build_app: Callable[..., Flask],
    transmitter_entry: dict[str, Any],
    transmitter: RunningServer,
    upstream: RunningServer,
    clock: Clock,
) -> None:
    app = build_app([{**transmitter_entry, "block_duration": 600}])
    token = sign(
        transmitter, set_claims(transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream))
    )
    assert push(app.test_client(), token).status_code == 202
    [state] = states(app, UPSTREAM_KEY)
    assert state.blocked_until == clock.now + 600
    # The revocation list: a token issued before receipt is revoked, one issued after is not.
    assert is_revoked(state, clock.now - 1)
    assert not is_revoked(state, clock.now)


def test_several_events_and_unknown_ones_in_one_set(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    events = {
        RISK_LEVEL_CHANGE: {"principal": "USER", "current_level": "medium"},
        DEVICE_COMPLIANCE_CHANGE: {"previous_status": "not-compliant", "current_status": "compliant"},
        "https://schemas.openid.net/secevent/caep/event-type/session-established": {"fp_ua": "abc"},
        "https://example.com/event-type/made-up": {},
    }
    token = sign(transmitter, set_claims(transmitter, clock, events, iss_sub(upstream=upstream)))
    assert push(ssf_app.test_client(), token).status_code == 202
    [state] = states(ssf_app, UPSTREAM_KEY)
    # MEDIUM raises the risk without asking for step-up.
    assert state == SubjectState(
        risk_level="medium",
        posture="compliant",
        risk_level_at=clock.now,  # no event_timestamp: the time it was received
        posture_at=clock.now,
        events=("risk-level-change", "device-compliance-change"),
        updated_at=clock.now,
    )
    [record] = audit_records(ssf_app)
    assert record["outcome"] == "accepted"
    assert record["details"]["ignored_events"] == list(events)[2:]
    assert record["details"]["events"] == list(events)


def test_a_set_with_only_unknown_events_is_accepted_and_changes_nothing(
    ssf_app: Flask, transmitter: RunningServer, clock: Clock
) -> None:
    # SSF stream verification events name the stream, not a subject (SSF 1.0 §8.1.4).
    verification = "https://schemas.openid.net/secevent/ssf/event-type/verification"
    claims = set_claims(
        transmitter,
        clock,
        {verification: {"state": "VGhpcyBpcyBhbiBleGFtcGxl"}},
        {"format": "opaque", "id": "s1"},
    )
    assert push(ssf_app.test_client(), sign(transmitter, claims)).status_code == 202
    [record] = audit_records(ssf_app)
    assert record["outcome"] == "accepted"
    assert record["reasons"] == ["set.no_known_event"]
    assert record["subject"] is None
    assert states(ssf_app, "*|s1") == [SubjectState()]


def test_legacy_event_level_subject_is_honoured(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    """Older CAEP drafts put ``subject`` (with ``subject_type``) inside the event payload."""
    legacy = {"subject_type": "iss-sub", "iss": upstream.issuer.issuer_url, "sub": "legacy-job"}
    claims = set_claims(transmitter, clock, {ASSURANCE_LEVEL_CHANGE: {"subject": legacy}})
    assert push(ssf_app.test_client(), sign(transmitter, claims)).status_code == 202
    [state] = states(ssf_app, "upstream|legacy-job")
    assert state.reauth_after == clock.now


@pytest.mark.parametrize("typ", ["secevent+jwt", "application/secevent+jwt", "SecEvent+JWT"])
def test_typ_is_a_case_insensitive_media_type(
    typ: str, ssf_client: FlaskClient, transmitter: RunningServer, clock: Clock
) -> None:
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})
    assert push(ssf_client, sign(transmitter, claims, typ=typ)).status_code == 202


def test_content_type_parameters_are_ignored_and_audience_may_be_a_list(
    ssf_client: FlaskClient, transmitter: RunningServer, clock: Clock
) -> None:
    claims = set_claims(
        transmitter,
        clock,
        {SESSION_REVOKED: {}},
        {"format": "opaque", "id": "job-1"},
        aud=["https://other.example", STS_ISSUER],
    )
    response = push(
        ssf_client, sign(transmitter, claims) + "\r\n", "Application/SecEvent+JWT; charset=us-ascii"
    )
    assert response.status_code == 202


def test_configured_audience_replaces_the_default(
    build_app: Callable[..., Flask],
    transmitter_entry: dict[str, Any],
    transmitter: RunningServer,
    clock: Clock,
) -> None:
    client = build_app([{**transmitter_entry, "audience": "urn:sts:receiver"}]).test_client()
    sub_id = {"format": "opaque", "id": "job-1"}
    ours = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, sub_id)
    assert_refused(push(client, sign(transmitter, ours)), "invalid_audience")
    theirs = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, sub_id, aud="urn:sts:receiver")
    assert push(client, sign(transmitter, theirs)).status_code == 202


# -- subject identifiers (RFC 9493) ---------------------------------------------------------------


@pytest.fixture
def spiffe_app(
    build_app: Callable[..., Flask], upstream: RunningServer, transmitter_entry: dict[str, Any]
) -> Flask:
    issuers = [
        {
            "name": "upstream",
            "issuer": upstream.issuer.issuer_url,
            "jwks_uri": upstream.jwks_uri,
            "algorithms": ["RS256"],
            "audiences": [STS_ISSUER],
        },
        {
            "name": "mesh",
            "issuer": "https://mesh.example.org",
            "jwks_uri": upstream.jwks_uri,
            "audiences": [STS_ISSUER],
            "profile": "spiffe",
            "trust_domain": "example.org",
        },
    ]
    return build_app(issuers=issuers)


def test_subject_identifiers_resolve_to_identity_keys(spiffe_app: Flask, upstream: RunningServer) -> None:
    directory = spiffe_app.extensions["sts"].exchange.issuers
    scope = SubjectScope(directory)
    upstream_iss = upstream.issuer.issuer_url
    cases: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        ({"format": "iss_sub", "iss": upstream_iss, "sub": "job"}, ("upstream|job",)),
        ({"format": "iss_sub", "iss": STS_ISSUER, "sub": "job"}, ("self|job",)),
        ({"format": "opaque", "id": "abc"}, ("*|abc",)),
        ({"format": "email", "email": "bot@example.com"}, ("*|bot@example.com",)),
        (
            {"format": "uri", "uri": "spiffe://example.org/ns/a/sa/b"},
            ("mesh|spiffe://example.org/ns/a/sa/b",),
        ),
        ({"format": "uri", "uri": "spiffe://elsewhere.org/x"}, ("*|spiffe://elsewhere.org/x",)),
        ({"format": "uri", "uri": "https://ci.example.com/jobs/7"}, ("*|https://ci.example.com/jobs/7",)),
        (
            {
                "format": "aliases",
                "identifiers": [{"format": "opaque", "id": "a"}, {"format": "email", "email": "b"}],
            },
            ("*|a", "*|b"),
        ),
        (
            {
                "format": "complex",
                "user": {"format": "iss_sub", "iss": upstream_iss, "sub": "job"},
                "device": {"format": "opaque", "id": "node-7"},
                "unknown_member": {"format": "made-up"},
            },
            ("upstream|job", "*|node-7"),
        ),
    ]
    for sub_id, expected in cases:
        assert resolve_subject(sub_id, scope) == expected, sub_id


@pytest.mark.parametrize(
    ("sub_id", "reason"),
    [
        (None, "subject.missing"),
        ("repo:acme/app", "subject.missing"),
        ({"iss": "x", "sub": "y"}, "subject.missing_format"),
        ({"format": "phone_number", "phone_number": "+12065550100"}, "subject.unknown_format"),
        ({"format": "iss_sub", "iss": "https://unknown.example", "sub": "y"}, "subject.unknown_issuer"),
        ({"format": "iss_sub", "iss": "https://unknown.example"}, "subject.malformed"),
        ({"format": "opaque", "id": ""}, "subject.malformed"),
        ({"format": "opaque", "id": 7}, "subject.malformed"),
        ({"format": "opaque", "id": "x" * 513}, "subject.malformed"),
        (
            {"format": "complex", "tenant_id": {"format": "opaque", "id": "t"}},
            "subject.complex_without_known_member",
        ),
        ({"format": "complex", "user": {"format": "complex", "user": {}}}, "subject.nested"),
        ({"format": "aliases", "identifiers": []}, "subject.malformed"),
    ],
)
def test_unusable_subjects_are_invalid_request(spiffe_app: Flask, sub_id: Any, reason: str) -> None:
    scope = SubjectScope(spiffe_app.extensions["sts"].exchange.issuers)
    with pytest.raises(SetRefused) as caught:
        resolve_subject(sub_id, scope)
    assert (caught.value.err, caught.value.reason) == ("invalid_request", reason)


def test_subject_issuers_restrict_what_a_transmitter_may_name(
    build_app: Callable[..., Flask],
    transmitter_entry: dict[str, Any],
    transmitter: RunningServer,
    upstream: RunningServer,
    clock: Clock,
) -> None:
    app = build_app([{**transmitter_entry, "subject_issuers": ["self"]}])
    client = app.test_client()
    upstream_subject = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream))
    assert_refused(push(client, sign(transmitter, upstream_subject)), "access_denied")
    assert states(app, UPSTREAM_KEY) == [SubjectState()]
    # An issuer-less subject applies only to the issuers it may name, not to every issuer.
    opaque = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-2"})
    assert push(client, sign(transmitter, opaque)).status_code == 202
    mine, everyone = states(app, "self|job-2", "*|job-2")
    assert mine.blocked_until is not None and everyone.empty


# -- the pure transition ---------------------------------------------------------------------------


def test_blocks_step_up_and_revocation_only_move_later() -> None:
    now = 1_700_000_000.0
    later = apply_event(SubjectState(), SESSION_REVOKED, {}, now + 100, 3600)
    # A late-delivered event cannot lift a newer block or revocation.
    earlier = apply_event(later, SESSION_REVOKED, {}, now, 60)
    assert earlier.blocked_until == now + 100 + 3600
    assert earlier.revoked_before == now + 100
    stepped = apply_event(
        SubjectState(reauth_after=now), CREDENTIAL_CHANGE, {"event_timestamp": now - 50}, now, 0
    )
    assert stepped.reauth_after == now
    # Risk level and posture are the transmitter's latest statement: they can come down.
    lowered = apply_event(
        SubjectState(risk_level="high", reauth_after=now - 10),
        RISK_LEVEL_CHANGE,
        {"current_level": "LOW", "event_timestamp": now},
        now,
        0,
    )
    assert (lowered.risk_level, lowered.reauth_after) == ("low", now - 10)


def test_event_timestamp_in_the_future_is_not_believed() -> None:
    now = 1_700_000_000.0
    far = apply_event(SubjectState(), ASSURANCE_LEVEL_CHANGE, {"event_timestamp": now + 86400}, now, 0)
    near = apply_event(SubjectState(), ASSURANCE_LEVEL_CHANGE, {"event_timestamp": now + 10}, now, 0)
    past = apply_event(SubjectState(), ASSURANCE_LEVEL_CHANGE, {}, now, 0, toe=now - 30)
    assert (far.reauth_after, near.reauth_after, past.reauth_after) == (now, now, now - 30)


def test_unknown_event_types_leave_the_state_alone() -> None:
    state = SubjectState(risk_level="low")
    assert apply_event(state, "https://example.com/other", {"current_level": "HIGH"}, 1.0, 60) is state


# -- refusals, with their RFC 8935 error codes --------------------------------------------------------


@pytest.mark.parametrize("content_type", [None, "application/jwt", "text/plain", "application/json"])
def test_wrong_content_type_is_invalid_request(
    content_type: str | None, ssf_app: Flask, transmitter: RunningServer, clock: Clock
) -> None:
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})
    assert_refused(push(ssf_app.test_client(), sign(transmitter, claims), content_type), "invalid_request")
    assert states(ssf_app, "*|job-1") == [SubjectState()]


@pytest.mark.parametrize("coding", ["gzip", "deflate, identity", "br", "x-anything"])
def test_a_coded_body_is_invalid_request_and_not_read(
    coding: str, ssf_app: Flask, transmitter: RunningServer, clock: Clock
) -> None:
    """A valid SET sent as it is, but marked ``Content-Encoding: gzip``, was applied (202): read as
    other bytes than the message declares (RFC 9110 §8.4), as ``/token`` already refuses (an
    outside audit).  ``identity`` is no coding."""
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})
    token = sign(transmitter, claims)
    headers = {"Content-Type": SET_CONTENT_TYPE, "Content-Encoding": coding}
    assert_refused(ssf_app.test_client().post("/ssf/events", data=token, headers=headers), "invalid_request")
    assert states(ssf_app, "*|job-1") == [SubjectState()]
    [record] = audit_records(ssf_app)
    assert record["reasons"] == ["request.content_encoding"]
    headers["Content-Encoding"] = "identity"
    assert ssf_app.test_client().post("/ssf/events", data=token, headers=headers).status_code == 202


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "application/at+jwt", "secevent", "jwt+secevent", None])
def test_wrong_typ_is_invalid_request(
    typ: Any, ssf_app: Flask, transmitter: RunningServer, clock: Clock
) -> None:
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})
    token = transmitter.issuer.mint(claims, header={"typ": typ})
    assert_refused(push(ssf_app.test_client(), token), "invalid_request")
    assert states(ssf_app, "*|job-1") == [SubjectState()]
    [record] = audit_records(ssf_app)
    assert record["reasons"] == ["set.typ"]


def test_unknown_or_missing_issuer_is_invalid_issuer(
    ssf_client: FlaskClient, transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    sub_id = {"format": "opaque", "id": "job-1"}
    # A real issuer this service trusts for workload tokens is still no transmitter.
    for iss in (upstream.issuer.issuer_url, transmitter.issuer.issuer_url + "/", None, 42):
        claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, sub_id, iss=iss)
        assert_refused(push(ssf_client, sign(transmitter, claims)), "invalid_issuer")


def test_signature_and_key_failures_are_invalid_key(
    ssf_app: Flask, transmitter: RunningServer, clock: Clock
) -> None:
    client = ssf_app.test_client()

    def claims() -> dict[str, Any]:
        return set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})

    attacker = ECKey.generate_key("P-256")
    good = sign(transmitter, claims())
    header, _, signature = good.split(".")
    tampered_payload = b64({**claims(), "events": {SESSION_REVOKED: {}, CREDENTIAL_CHANGE: {}}})
    none_header = b64({"alg": "none", "typ": "secevent+jwt", "kid": transmitter.issuer.kid})
    forged = {
        # Signed by a key the transmitter does not publish, under the transmitter's kid.
        "bad_signature": transmitter.issuer.mint(
            claims(), header={"typ": "secevent+jwt", "kid": transmitter.issuer.kid}, key=attacker
        ),
        "tampered_payload": f"{header}.{tampered_payload}.{signature}",
        "unknown_kid": sign(transmitter, claims(), kid="no-such-key"),
        "attacker_key": transmitter.issuer.mint(claims(), header={"typ": "secevent+jwt"}, key=attacker),
        "alg_none": f"{none_header}.{b64(claims())}.",
        "hs256": transmitter.issuer.mint(
            claims(),
            header={"typ": "secevent+jwt", "kid": transmitter.issuer.kid},
            key=OctKey.import_key(b"k" * 32),
            alg="HS256",
        ),
        # RS256 is not on this transmitter's allow-list (ES256 only).
        "rs256_not_allowed": transmitter.issuer.mint(
            claims(), header={"typ": "secevent+jwt", "kid": transmitter.issuer.kid}, key=RSA_KEY, alg="RS256"
        ),
    }
    for name, token in forged.items():
        response = push(client, token)
        assert response.status_code == 400, name
        assert response.get_json()["err"] == "invalid_key", name
    assert states(ssf_app, "*|job-1") == [SubjectState()]
    reasons = [r["reasons"][0] for r in audit_records(ssf_app)]
    assert set(reasons) == {"set.jws.bad_signature", "set.unknown_kid", "set.jws.algorithm_not_allowed"}


def test_crit_header_is_invalid_request(
    ssf_client: FlaskClient, transmitter: RunningServer, clock: Clock
) -> None:
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})
    token = sign(transmitter, claims, crit=["exp-ext"], **{"exp-ext": True})
    assert_refused(push(ssf_client, token), "invalid_request")


@pytest.mark.parametrize(
    "aud", ["https://other.example", [], ["https://other.example"], STS_ISSUER + "/", None, 5]
)
def test_wrong_audience_is_invalid_audience(
    aud: Any, ssf_client: FlaskClient, transmitter: RunningServer, clock: Clock
) -> None:
    claims = set_claims(
        transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"}, aud=aud
    )
    assert_refused(push(ssf_client, sign(transmitter, claims)), "invalid_audience")


def _claim_cases(now: float) -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("missing_iat", {"iat": None}, "set.missing_iat"),
        ("string_iat", {"iat": str(int(now))}, "set.malformed_iat"),
        ("boolean_iat", {"iat": True}, "set.malformed_iat"),
        # RFC 8935 §2.3: a SET that can never be valid is 400, not 503 (which the transmitter would retry).
        ("huge_iat", {"iat": 10**400}, "set.malformed_iat"),
        ("huge_negative_iat", {"iat": -(10**400)}, "set.malformed_iat"),
        ("huge_exp", {"exp": 10**400}, "set.malformed_exp"),
        ("huge_toe", {"toe": 10**400}, "set.malformed_toe"),
        ("string_toe", {"toe": "yesterday"}, "set.malformed_toe"),
        ("huge_nbf", {"nbf": 10**400}, "set.malformed_nbf"),
        ("old_iat", {"iat": int(now) - 86400 - LEEWAY - 1}, "set.too_old"),
        ("future_iat", {"iat": int(now) + LEEWAY + 5}, "set.issued_in_future"),
        ("expired", {"exp": int(now) - LEEWAY - 1}, "set.expired"),
        ("malformed_exp", {"exp": "soon"}, "set.malformed_exp"),
        ("missing_jti", {"jti": None}, "set.missing_jti"),
        ("empty_jti", {"jti": ""}, "set.malformed_jti"),
        ("numeric_jti", {"jti": 12345}, "set.malformed_jti"),
        ("long_jti", {"jti": "j" * 257}, "set.jti_too_long"),
        ("missing_events", {"events": None}, "set.events_missing"),
        ("empty_events", {"events": {}}, "set.events_missing"),
        ("list_events", {"events": [SESSION_REVOKED]}, "set.events_missing"),
        ("string_event", {"events": {SESSION_REVOKED: "now"}}, "set.event_not_object"),
        (
            "too_many_events",
            {"events": {f"https://e.example/{i}": {} for i in range(17)}},
            "set.too_many_events",
        ),
        ("missing_sub_id", {"sub_id": None}, "subject.missing"),
        ("unknown_format", {"sub_id": {"format": "did", "url": "did:example:123"}}, "subject.unknown_format"),
        (
            "unknown_subject_issuer",
            {"sub_id": {"format": "iss_sub", "iss": "https://nobody.example", "sub": "x"}},
            "subject.unknown_issuer",
        ),
        (
            "risk_level_unknown",
            {"events": {RISK_LEVEL_CHANGE: {"current_level": "extreme"}}},
            "event.risk_level_change.current_level",
        ),
        (
            "compliance_missing",
            {"events": {DEVICE_COMPLIANCE_CHANGE: {"previous_status": "compliant"}}},
            "event.device_compliance_change.current_status",
        ),
        (
            "timestamp_not_a_number",
            {"events": {SESSION_REVOKED: {"event_timestamp": "yesterday"}}},
            "event.malformed_event_timestamp",
        ),
        (
            "timestamp_too_large",
            {"events": {SESSION_REVOKED: {"event_timestamp": 10**400}}},
            "event.malformed_event_timestamp",
        ),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _claim_cases(0)])
def test_bad_claims_are_invalid_request_and_change_nothing(
    case: str, ssf_app: Flask, transmitter: RunningServer, clock: Clock
) -> None:
    [(_, changes, reason)] = [c for c in _claim_cases(clock.now) if c[0] == case]
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})
    claims.update(changes)
    claims = {name: value for name, value in claims.items() if value is not None}
    assert_refused(push(ssf_app.test_client(), sign(transmitter, claims)), "invalid_request")
    assert states(ssf_app, "*|job-1") == [SubjectState()]
    [record] = audit_records(ssf_app)
    assert (record["outcome"], record["error"], record["reasons"]) == ("refused", "invalid_request", [reason])


KEYS_TRANSMITTER = "https://keys-transmitter.example"


@pytest.fixture
def key_set_server() -> Iterator[KeySetServer]:
    server = KeySetServer()
    yield server
    server.stop()


@pytest.fixture
def keys_app(build_app: Callable[..., Flask], key_set_server: KeySetServer) -> Flask:
    """A receiver whose one transmitter publishes its keys through :class:`KeySetServer` (RS256)."""
    entry = {
        "name": "keys",
        "issuer": KEYS_TRANSMITTER,
        "jwks_uri": key_set_server.url,
        "algorithms": ["RS256"],
    }
    return build_app([entry])


def keys_set_claims(clock: Clock) -> dict[str, Any]:
    return {
        "iss": KEYS_TRANSMITTER,
        "aud": STS_ISSUER,
        "iat": int(clock.now),
        "jti": uuid.uuid4().hex,
        "sub_id": {"format": "opaque", "id": "job-1"},
        "events": {SESSION_REVOKED: {}},
    }


@pytest.mark.parametrize("part", ["payload", "header"])
def test_a_set_not_in_utf8_is_invalid_request(
    part: str, keys_app: Flask, key_set_server: KeySetServer, clock: Clock
) -> None:
    """RFC 8417 §2 / RFC 7519 §7.2: the SET is UTF-8 JSON; UTF-16, UTF-32 or a byte-order mark is refused."""
    key = RSAKey.generate_key(2048, parameters={"kid": "raw", "use": "sig", "alg": "RS256"})
    key_set_server.document = {"keys": [key.as_dict(private=False)]}
    header = {"alg": "RS256", "kid": "raw", "typ": "secevent+jwt"}
    client = keys_app.test_client()
    utf8 = sign_encoded(key, header, keys_set_claims(clock), encoding="utf-8", part=part)
    assert push(client, utf8).status_code == 202
    for encoding in NOT_UTF8.values():
        token = sign_encoded(key, header, keys_set_claims(clock), encoding=encoding, part=part)
        assert_refused(push(client, token), "invalid_request")
        assert audit_records(keys_app)[0]["reasons"] == ["set.jws.not_utf8"], encoding


def test_rsa_key_with_public_exponent_3_in_a_transmitter_jwks_is_skipped(
    keys_app: Flask, key_set_server: KeySetServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    e3 = rsa_key_with_exponent_3()
    strong = RSAKey.generate_key(2048, parameters={"kid": "strong", "use": "sig", "alg": "RS256"})
    key_set_server.document = {"keys": [e3.as_dict(private=False), strong.as_dict(private=False)]}
    client = keys_app.test_client()
    header = {"alg": "RS256", "kid": "e3", "typ": "secevent+jwt"}
    weak = jwt.encode(header, keys_set_claims(clock), e3, algorithms=["RS256"])
    with caplog.at_level("WARNING", logger="sts.adapters.jwks"):
        response = push(client, weak)
    assert_refused(response, "invalid_key")
    assert audit_records(keys_app)[0]["reasons"] == ["set.unknown_kid"]
    assert any("kid 'e3'" in m and "public exponent 3" in m for m in caplog.messages), caplog.messages
    good = jwt.encode(
        {"alg": "RS256", "kid": "strong", "typ": "secevent+jwt"},
        keys_set_claims(clock),
        strong,
        algorithms=["RS256"],
    )
    assert push(client, good).status_code == 202


def test_iat_at_the_edges_of_max_age_and_leeway_is_accepted(
    ssf_client: FlaskClient, transmitter: RunningServer, clock: Clock
) -> None:
    sub_id = {"format": "opaque", "id": "job-1"}
    for iat in (int(clock.now) - 86400 - LEEWAY, int(clock.now) + LEEWAY):
        claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, sub_id, iat=iat)
        assert push(ssf_client, sign(transmitter, claims)).status_code == 202, iat


def test_a_set_received_again_is_accepted_and_not_applied_again(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    """RFC 8935 §2: a transmitter resends a SET whose answer it did not get, and the recipient
    "MUST respond as it would if the SET had not been previously received"; its ``jti`` (RFC 8417
    §2.2) tells this one apart, so it changes nothing (an outside conformance check found it
    refused as invalid, which a transmitter must never retry)."""
    client = ssf_app.test_client()
    token = sign(
        transmitter, set_claims(transmitter, clock, {CREDENTIAL_CHANGE: {}}, iss_sub(upstream=upstream))
    )
    assert push(client, token).status_code == 202
    [first] = states(ssf_app, UPSTREAM_KEY)
    clock.now += 60
    again = push(client, token)
    assert again.status_code == 202 and again.get_data() == b""
    # The repeat changed nothing (the revocation did not move to the repeat's time).
    assert states(ssf_app, UPSTREAM_KEY) == [first]
    repeated, accepted = audit_records(ssf_app)
    assert repeated["outcome"] == "accepted" and repeated["reasons"] == ["set.already_received"]
    assert accepted["outcome"] == "accepted" and accepted["reasons"] != ["set.already_received"]


@pytest.mark.parametrize("kind", [RISK_LEVEL_CHANGE, DEVICE_COMPLIANCE_CHANGE], ids=["risk", "posture"])
def test_an_older_event_delivered_later_does_not_undo_a_newer_one(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock, kind: str
) -> None:
    """Push delivery may reorder events (retries): a risk level or posture said by an older event
    (``event_timestamp``) does not replace a newer one's (an outside audit had a late LOW lift a
    newer critical, and the workload exchange again)."""
    client = ssf_app.test_client()
    bad, good = (
        ({"current_level": "critical"}, {"current_level": "low"})
        if kind == RISK_LEVEL_CHANGE
        else ({"current_status": "not-compliant"}, {"current_status": "compliant"})
    )

    def deliver(payload: dict[str, Any], age: int) -> None:
        event = {**PAYLOADS[kind], **payload, "event_timestamp": int(clock.now) - age}
        claims = set_claims(transmitter, clock, {kind: event}, iss_sub(upstream=upstream))
        assert push(client, sign(transmitter, claims)).status_code == 202

    deliver(bad, age=10)
    deliver(good, age=20)  # older, delivered later
    [state] = states(ssf_app, UPSTREAM_KEY)
    assert (state.risk_level if kind == RISK_LEVEL_CHANGE else state.posture) == next(iter(bad.values()))
    deliver(good, age=5)  # newer: it does
    [state] = states(ssf_app, UPSTREAM_KEY)
    assert (state.risk_level if kind == RISK_LEVEL_CHANGE else state.posture) == next(iter(good.values()))


@pytest.mark.parametrize("kind", [RISK_LEVEL_CHANGE, DEVICE_COMPLIANCE_CHANGE], ids=["risk", "posture"])
def test_an_event_without_a_time_of_its_own_is_as_old_as_its_set(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock, kind: str
) -> None:
    """With neither ``event_timestamp`` nor ``toe``, the event happened no later than its SET was
    issued (``iat``): dated at its receipt, a SET issued ten minutes before a critical and delivered
    after it lifted it, and then hid the next critical, dated before that receipt (an outside audit)."""
    client = ssf_app.test_client()
    bad, good = (
        ({"current_level": "critical"}, {"current_level": "low"})
        if kind == RISK_LEVEL_CHANGE
        else ({"current_status": "not-compliant"}, {"current_status": "compliant"})
    )

    def said() -> Any:
        [state] = states(ssf_app, UPSTREAM_KEY)
        return state.risk_level if kind == RISK_LEVEL_CHANGE else state.posture

    def deliver(payload: dict[str, Any], *, issued_ago: int, event_ago: int | None = None) -> None:
        event = {**PAYLOADS[kind], **payload}
        if event_ago is not None:
            event["event_timestamp"] = int(clock.now) - event_ago
        claims = set_claims(transmitter, clock, {kind: event}, iss_sub(upstream=upstream))
        claims["iat"] = int(clock.now) - issued_ago
        assert push(client, sign(transmitter, claims)).status_code == 202

    deliver(good, issued_ago=600)  # the first statement: as of ten minutes ago
    assert said() == next(iter(good.values()))
    deliver(bad, issued_ago=0, event_ago=60)  # happened after that SET was issued: it counts
    assert said() == next(iter(bad.values()))
    deliver(good, issued_ago=300)  # older than the critical, delivered later (a retry): it does not
    assert said() == next(iter(bad.values()))
    deliver(good, issued_ago=1)  # newer: it does
    assert said() == next(iter(good.values()))


def test_a_refused_set_does_not_use_up_its_jti(
    build_app: Callable[..., Flask],
    transmitter_entry: dict[str, Any],
    transmitter: RunningServer,
    upstream: RunningServer,
    clock: Clock,
) -> None:
    """The jti is recorded only for a SET that passed every check; a fixed configuration then accepts it."""
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream))
    token = sign(transmitter, claims)
    restricted = build_app([{**transmitter_entry, "subject_issuers": ["self"]}])
    assert_refused(push(restricted.test_client(), token), "access_denied")
    # Same database (same tmp_path), configuration fixed.
    fixed = build_app()
    assert push(fixed.test_client(), token).status_code == 202


GARBAGE: list[bytes] = [
    b"",
    b"   \n",
    b"not a jwt",
    b"a.b.c",
    b"a.b.c.d.e",
    b"\xff\xfe\x00garbage",
    b"eyJhbGciOiJFUzI1NiJ9..",
    b"." * 2,
    b"eyJ0eXAiOiJzZWNldmVudCtqd3QifQ.e30.",
    json.dumps({"iss": "x", "events": {}}).encode(),
    ("\u00e9" * 10).encode(),
]


def test_garbage_bodies_are_invalid_request_never_500(ssf_app: Flask) -> None:
    client = ssf_app.test_client()
    rng = random.Random(8935)  # deterministic fuzz
    fuzz = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(40)]
    dotted = [
        b".".join(base64.urlsafe_b64encode(rng.randbytes(40)).rstrip(b"=") for _ in range(3))
        for _ in range(20)
    ]
    for body in GARBAGE + fuzz + dotted:
        response = push(client, body)
        assert response.status_code == 400, body
        assert response.get_json()["err"] == "invalid_request", body
    assert len(audit_records(ssf_app)) == len(GARBAGE) + len(fuzz) + len(dotted)


def test_body_over_the_size_cap_is_invalid_request(ssf_app: Flask) -> None:
    response = push(ssf_app.test_client(), b"a" * (16384 + 1))
    assert_refused(response, "invalid_request")
    [record] = audit_records(ssf_app)
    assert record["reasons"] == ["request.body_too_large"]


def test_other_methods_are_405_and_no_transmitters_means_no_endpoint(
    ssf_client: FlaskClient, client: FlaskClient
) -> None:
    assert ssf_client.get("/ssf/events").status_code == 405
    response = push(client, b"x.y.z")
    assert response.status_code == 404
    assert response.get_json() == {"error": "not_found", "error_description": "No such endpoint."}


# -- audit -----------------------------------------------------------------------------------------


def test_audit_records_hold_hashes_never_the_set(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    client = ssf_app.test_client()
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream))
    accepted_token = sign(transmitter, claims)
    refused_claims = set_claims(
        transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream), aud="x"
    )
    refused_token = sign(transmitter, refused_claims)
    assert push(client, accepted_token, "application/secevent+jwt").status_code == 202
    assert push(client, refused_token).status_code == 400

    refused, accepted = audit_records(ssf_app)
    assert accepted["endpoint"] == "ssf"
    assert accepted["outcome"] == "accepted" and accepted["error"] is None
    assert accepted["issuer"] == "idp"
    assert accepted["subject"] == UPSTREAM_KEY
    assert accepted["reasons"] == ["event.session-revoked"]
    assert accepted["subject_token_sha256"] == hashlib.sha256(accepted_token.encode()).hexdigest()
    assert accepted["subject_token_iat"] == claims["iat"]
    assert accepted["details"]["events"] == [SESSION_REVOKED]
    assert accepted["details"]["identities"] == [UPSTREAM_KEY]
    assert accepted["details"]["jti_sha256"] == hashlib.sha256(claims["jti"].encode()).hexdigest()
    assert refused["outcome"] == "refused" and refused["error"] == "invalid_audience"
    assert refused["issuer"] == "idp"
    assert refused["reasons"] == ["set.audience_mismatch"]
    assert refused["subject_token_sha256"] == hashlib.sha256(refused_token.encode()).hexdigest()
    for record, token, jti in (
        (accepted, accepted_token, claims["jti"]),
        (refused, refused_token, refused_claims["jti"]),
    ):
        text = json.dumps(record)
        # Neither the SET, nor its signature, nor its payload segment, nor the raw jti.
        for secret in (token, *token.split(".")[1:], jti):
            assert secret not in text


# -- failing closed --------------------------------------------------------------------------------


def test_dead_redis_is_503_and_nothing_is_recorded_as_applied(
    build_app: Callable[..., Flask], transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    app = build_app(store="redis", redis_url=DEAD_PORT_URL)
    token = sign(
        transmitter, set_claims(transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream))
    )
    response = push(app.test_client(), token)
    assert response.status_code == 503
    assert response.get_json()["err"] == "temporarily_unavailable"
    assert response.headers["Retry-After"] == "5"
    [record] = audit_records(app)
    assert (record["outcome"], record["error"], record["reasons"]) == (
        "refused",
        "temporarily_unavailable",
        ["store.unavailable"],
    )
    with pytest.raises(StoreUnavailable):
        states(app, UPSTREAM_KEY)


def test_state_store_failure_releases_the_jti_so_the_retry_is_applied(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock, redis_db: redis.Redis
) -> None:
    """Replay records on the (working) embedded store, subject states on a dead Redis: 503, then a
    retry against a working state store is applied rather than refused as a replay."""
    runtime = ssf_app.extensions["sts"]
    transmitters = build_transmitters(runtime.settings, runtime.clock)

    def receiver(states_store: Any) -> SignalReceiver:
        return SignalReceiver(
            transmitters,
            issuers=runtime.exchange.issuers,
            replay=runtime.replay,
            states=states_store,
            audit=runtime.audit,
            clock=clock,
            leeway=LEEWAY,
        )

    token = sign(
        transmitter, set_claims(transmitter, clock, {SESSION_REVOKED: {}}, iss_sub(upstream=upstream))
    )
    delivery = SetDelivery(body=token.encode(), content_type=SET_CONTENT_TYPE, request_id="r1")
    dead = RedisSubjectStateStore(connect_redis(DEAD_PORT_URL))
    with pytest.raises(SetRefused) as caught:
        receiver(dead).receive(delivery)
    assert (caught.value.status, caught.value.err) == (503, "temporarily_unavailable")

    live = RedisSubjectStateStore(redis_db)
    receipt = receiver(live).receive(delivery)
    assert receipt.states[UPSTREAM_KEY].blocked_until == clock.now + 3600
    assert live.get([UPSTREAM_KEY])[0].blocked_until == clock.now + 3600


def test_unreachable_transmitter_keys_are_503(
    build_app: Callable[..., Flask],
    transmitter_entry: dict[str, Any],
    transmitter: RunningServer,
    clock: Clock,
) -> None:
    app = build_app([{**transmitter_entry, "jwks_uri": "http://127.0.0.1:1/jwks"}])
    claims = set_claims(transmitter, clock, {SESSION_REVOKED: {}}, {"format": "opaque", "id": "job-1"})
    response = push(app.test_client(), sign(transmitter, claims))
    assert response.status_code == 503
    assert response.get_json()["err"] == "temporarily_unavailable"
    assert states(app, "*|job-1") == [SubjectState()]


def test_audit_failure_on_an_accepted_set_is_503_and_the_retry_is_accepted(
    ssf_app: Flask, transmitter: RunningServer, upstream: RunningServer, clock: Clock
) -> None:
    runtime = ssf_app.extensions["sts"]
    receiver: SignalReceiver = runtime.signals
    token = sign(
        transmitter, set_claims(transmitter, clock, {CREDENTIAL_CHANGE: {}}, iss_sub(upstream=upstream))
    )
    delivery = SetDelivery(body=token.encode(), content_type=SET_CONTENT_TYPE, request_id="r1")
    # An audit sink on a database that cannot be reached (nothing listens on port 1).
    broken = SqlAuditSink(make_engine("postgresql+psycopg://sts@127.0.0.1:1/sts"), timeout=2)
    receiver.audit = broken
    with pytest.raises(SetRefused) as caught:
        receiver.receive(delivery)
    assert (caught.value.status, caught.value.reason) == (503, "audit.unavailable")
    receiver.audit = runtime.audit
    receiver.receive(delivery)
    [record] = audit_records(ssf_app)
    assert record["outcome"] == "accepted"


# -- settings --------------------------------------------------------------------------------------


def test_transmitter_defaults(
    make_settings: Callable[..., Settings], transmitter_entry: dict[str, Any]
) -> None:
    entry = {k: v for k, v in transmitter_entry.items() if k != "algorithms"}
    [t] = make_settings(transmitters=[entry]).transmitters
    assert (t.algorithms, t.audience, t.block_duration, t.max_age, t.subject_issuers) == (
        ("RS256", "ES256"),
        None,
        3600,
        86400,
        None,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithms": ["HS256"]}, "transmitters.0.algorithms.0"),
        ({"algorithms": ["none"]}, "transmitters.0.algorithms.0"),
        ({"jwks_file": "x.json"}, "transmitters.0"),
        ({"jwks_uri": None}, "transmitters.0"),
        ({"name": "self"}, "transmitters.0.name"),
        ({"block_duration": 0}, "transmitters.0.block_duration"),
        ({"block_duration": STATE_TTL + 1}, "transmitters.0.block_duration"),
        ({"max_age": 0}, "transmitters.0.max_age"),
        ({"unknown": 1}, "transmitters.0"),
        ({"issuer": STS_ISSUER}, "transmitters.idp.issuer: must not be this service's own issuer"),
        ({"jwks_uri": "http://keys.example.com/jwks"}, "must use https"),
        ({"subject_issuers": ["nobody"]}, "transmitters.idp.subject_issuers: nobody not configured"),
    ],
)
def test_bad_transmitter_settings_stop_the_start(
    change: dict[str, Any],
    message: str,
    make_settings: Callable[..., Settings],
    transmitter_entry: dict[str, Any],
) -> None:
    entry = {k: v for k, v in {**transmitter_entry, **change}.items() if v is not None}
    with pytest.raises(ConfigurationError, match=message.replace(".", r"\.")):
        make_settings(transmitters=[entry])


def test_duplicate_transmitters_stop_the_start(
    make_settings: Callable[..., Settings], transmitter_entry: dict[str, Any]
) -> None:
    with pytest.raises(ConfigurationError, match="duplicate transmitter name"):
        make_settings(transmitters=[transmitter_entry, {**transmitter_entry, "issuer": "https://b.example"}])
    with pytest.raises(ConfigurationError, match=r"is already the issuer of transmitters\.idp"):
        make_settings(transmitters=[transmitter_entry, {**transmitter_entry, "name": "other"}])


def test_caep_session_revoked_end_to_end(
    build_app: Callable[..., Flask], upstream: RunningServer, transmitter: RunningServer, clock: Clock
) -> None:
    """The issue's scenario over HTTP: a workload holds a token; the IdP pushes CAEP session-revoked;
    its next exchange fails (risk deny, machine-readable) and its earlier token is inactive at
    introspection; once the block lapses, a fresh exchange works and that new token is active."""
    from sts.core.client_secrets import hash_secret
    from tests.conftest import DEFAULT_CLIENTS, exchange_form

    secret = "deploy-api-introspection-secret-0123456789"
    resource_server = {
        "client_id": "deploy-api",
        "auth_method": "client_secret_post",
        "secret_hash": hash_secret(secret),
        "audiences": ["https://deploy.example.com"],
    }
    app = build_app(clients=[*DEFAULT_CLIENTS, resource_server])
    web = app.test_client()

    def exchange() -> TestResponse:
        subject = upstream.issuer.github_actions_token(audience=STS_ISSUER, now=clock.now)
        return web.post("/token", data=exchange_form(subject, audience="https://deploy.example.com"))

    def active(token: str) -> bool:
        body = web.post(
            "/introspect", data={"token": token, "client_id": "deploy-api", "client_secret": secret}
        )
        return bool(body.get_json()["active"])

    earlier = exchange()
    assert earlier.status_code == 200
    token = earlier.get_json()["access_token"]
    assert active(token)

    clock.now += 5
    event = {
        "https://schemas.openid.net/secevent/caep/event-type/session-revoked": {
            "event_timestamp": int(clock.now)
        }
    }
    pushed = push(web, sign(transmitter, set_claims(transmitter, clock, event, iss_sub(upstream=upstream))))
    assert pushed.status_code == 202, pushed.get_data(as_text=True)

    refused = exchange()
    assert refused.status_code == 400
    body = refused.get_json()
    assert body["error"] == "invalid_request" and body["risk"] == {
        "decision": "deny",
        "signals": ["shared_signal"],
    }
    assert not active(token), "the token issued before the event is revoked"

    clock.now += 3601  # the block (block_duration, 3600 s by default) has lapsed
    later = exchange()
    assert later.status_code == 200, later.get_json()
    assert active(later.get_json()["access_token"])
