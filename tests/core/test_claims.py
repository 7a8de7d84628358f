"""The claims module (:mod:`sts.core.claims`) and the compact-JWS parser (:mod:`sts.core.jose`).

Every kind of token the service reads goes through both: subject, actor and
posture tokens, client assertions, SETs, our own access tokens, DPoP proofs.
Each case is a row of a table, named for what it shows; the end-to-end tests
of each token kind (test_jwt_attacks, test_client_auth, test_shared_signals,
test_dpop, test_risk_e2e) show that the endpoints use these rules.

Sources: RFC 7519 §2 (NumericDate), §4.1 (registered claims), §7.2 (UTF-8);
RFC 7515 §5.2 (UTF-8 header), §4.1.9 (``typ``), §4.1.11 (``crit``); RFC 8259
§8.1 (no byte-order mark); RFC 8725 §3.8-§3.11; NIST SP 800-56B Rev. 2
§6.2.1 (RSA public exponent).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from joserfc.jwk import RSAKey

from sts.core.claims import (
    CheckedClaims,
    ClaimInvalid,
    ClaimRules,
    check_claims,
    normalise_typ,
    numeric_date_value,
)
from sts.core.jose import JWSInvalid, parse_compact, peek, rsa_key_problem
from tests.support.crafted_jose import NOT_UTF8, b64url, json_bytes

NOW = 1_700_000_000.0
ISS = "https://issuer.example"
AUD = "https://sts.example"
LEEWAY = 30
#: A claim given this value is left out of the token (``None`` is JSON ``null``, a present claim).
ABSENT: Any = object()

RULES = ClaimRules(leeway=LEEWAY, issuer=ISS, accepted_audiences=frozenset({AUD}))


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISS,
        "sub": "repo:acme/app:ref:refs/heads/main",
        "aud": AUD,
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + 300,
        "jti": "jti-0001",
    }
    base.update(changes)
    return {name: value for name, value in base.items() if value is not ABSENT}


def rules(**changes: Any) -> ClaimRules:
    return dataclasses.replace(RULES, **changes)


# ---------------------------------------------------------------------------
# check_claims: (claims, rules, expected reason or None for accepted)
# ---------------------------------------------------------------------------

CASES: dict[str, tuple[dict[str, Any], ClaimRules, str | None]] = {
    "well-formed": (claims(), RULES, None),
    "only-the-required-claims": (claims(iat=ABSENT, nbf=ABSENT, jti=ABSENT), RULES, None),
    # NumericDate: a present time claim is a finite JSON number (RFC 7519 §2).
    "exp-absent": (claims(exp=ABSENT), RULES, "missing_exp"),
    "exp-absent-not-required": (claims(exp=ABSENT), rules(require_exp=False), None),
    "exp-null": (claims(exp=None), RULES, "malformed_exp"),
    "exp-null-not-required": (claims(exp=None), rules(require_exp=False), "malformed_exp"),
    "nbf-null": (claims(nbf=None), RULES, "malformed_nbf"),
    "iat-null": (claims(iat=None), RULES, "malformed_iat"),
    "exp-string": (claims(exp=str(int(NOW) + 300)), RULES, "malformed_exp"),
    "exp-true": (claims(exp=True), RULES, "malformed_exp"),
    "nbf-false": (claims(nbf=False), RULES, "malformed_nbf"),
    "exp-nan": (claims(exp=float("nan")), RULES, "malformed_exp"),
    "exp-infinity": (claims(exp=float("inf")), RULES, "malformed_exp"),
    "exp-integer-too-large-for-a-float": (claims(exp=10**400), RULES, "malformed_exp"),
    "nbf-integer-too-small-for-a-float": (claims(nbf=-(10**400)), RULES, "malformed_nbf"),
    "iat-integer-too-large-for-a-float": (claims(iat=10**400), RULES, "malformed_iat"),
    "exp-list": (claims(exp=[int(NOW) + 300]), RULES, "malformed_exp"),
    "exp-object": (claims(exp={"t": 1}), RULES, "malformed_exp"),
    "exp-fractional": (claims(exp=NOW + 300.5), RULES, None),
    # exp, nbf, iat against the clock, with leeway (RFC 7519 §4.1.4-§4.1.6).
    "expired-beyond-leeway": (claims(exp=int(NOW) - LEEWAY), RULES, "expired"),
    "expired-within-leeway": (claims(exp=int(NOW) - LEEWAY + 1), RULES, None),
    "nbf-beyond-leeway": (claims(nbf=int(NOW) + LEEWAY + 1), RULES, "not_yet_valid"),
    "nbf-within-leeway": (claims(nbf=int(NOW) + LEEWAY), RULES, None),
    "iat-beyond-leeway": (claims(iat=int(NOW) + LEEWAY + 1), RULES, "issued_in_future"),
    "iat-within-leeway": (claims(iat=int(NOW) + LEEWAY), RULES, None),
    "iat-required-absent": (claims(iat=ABSENT), rules(require_iat=True), "missing_iat"),
    "max-age-without-iat": (claims(iat=ABSENT), rules(max_age=60), "missing_iat"),
    "max-age-exceeded": (claims(iat=int(NOW) - 61), rules(max_age=60), "too_old"),
    "max-age-at-the-edge": (claims(iat=int(NOW) - 60), rules(max_age=60), None),
    "lifetime-from-iat-too-long": (claims(exp=int(NOW) + 301), rules(max_lifetime=300), "lifetime_too_long"),
    "lifetime-from-iat-at-the-edge": (claims(exp=int(NOW) + 300), rules(max_lifetime=300), None),
    "lifetime-from-nbf-too-long": (
        claims(iat=ABSENT, exp=int(NOW) + 301),
        rules(max_lifetime=300),
        "lifetime_too_long",
    ),
    "lifetime-without-iat-or-nbf": (
        claims(iat=ABSENT, nbf=ABSENT),
        rules(max_lifetime=300),
        "lifetime_too_long",
    ),
    "expiry-too-far-ahead": (
        claims(exp=int(NOW) + 300 + LEEWAY + 1),
        rules(max_remaining=300),
        "lifetime_too_long",
    ),
    "expiry-ahead-within-leeway": (claims(exp=int(NOW) + 300 + LEEWAY), rules(max_remaining=300), None),
    # aud: a string or a non-empty array of strings naming us (RFC 7519 §4.1.3, RFC 8725 §3.9).
    "aud-absent": (claims(aud=ABSENT), RULES, "missing_aud"),
    "aud-absent-not-required": (claims(aud=ABSENT), rules(require_aud=False, accepted_audiences=None), None),
    "aud-null": (claims(aud=None), RULES, "malformed_aud"),
    "aud-empty-list": (claims(aud=[]), RULES, "malformed_aud"),
    "aud-list-with-a-number": (claims(aud=[AUD, 7]), RULES, "malformed_aud"),
    "aud-number": (claims(aud=42), RULES, "malformed_aud"),
    "aud-list-naming-us": (claims(aud=["https://other.example", AUD]), RULES, None),
    "aud-of-another-service": (claims(aud="https://other.example"), RULES, "audience_mismatch"),
    "aud-with-a-trailing-slash": (claims(aud=AUD + "/"), RULES, "audience_mismatch"),
    "aud-shape-only": (claims(aud="https://downstream.example"), rules(accepted_audiences=None), None),
    "aud-shape-only-malformed": (claims(aud=[]), rules(accepted_audiences=None), "malformed_aud"),
    # iss: exact (RFC 8725 §3.8).
    "iss-absent": (claims(iss=ABSENT), RULES, "missing_iss"),
    "iss-null": (claims(iss=None), RULES, "malformed_iss"),
    "iss-number": (claims(iss=42), RULES, "malformed_iss"),
    "iss-other": (claims(iss="https://other.example"), RULES, "issuer_mismatch"),
    "iss-with-a-trailing-slash": (claims(iss=ISS + "/"), RULES, "issuer_mismatch"),
    "iss-upper-case": (claims(iss=ISS.upper()), RULES, "issuer_mismatch"),
    "iss-absent-not-required": (claims(iss=ABSENT), rules(issuer=None), None),
    "iss-number-not-required": (claims(iss=42), rules(issuer=None), "malformed_iss"),
    # sub and jti: non-empty strings (RFC 7519 §4.1.2, §4.1.7).
    "sub-absent": (claims(sub=ABSENT), RULES, "missing_sub"),
    "sub-empty": (claims(sub=""), RULES, "malformed_sub"),
    "sub-number": (claims(sub=12345), RULES, "malformed_sub"),
    "sub-null": (claims(sub=None), RULES, "malformed_sub"),
    "sub-absent-not-required": (claims(sub=ABSENT), rules(require_sub=False), None),
    "sub-number-not-required": (claims(sub=12345), rules(require_sub=False), "malformed_sub"),
    "jti-absent-required": (claims(jti=ABSENT), rules(require_jti=True), "missing_jti"),
    "jti-empty": (claims(jti=""), RULES, "malformed_jti"),
    "jti-number": (claims(jti=12345), RULES, "malformed_jti"),
    "jti-shorter-than-the-minimum": (claims(jti="1234567"), rules(min_jti_length=8), "malformed_jti"),
    "jti-longer-than-the-maximum": (claims(jti="j" * 257), rules(max_jti_length=256), "jti_too_long"),
    "jti-at-the-maximum": (claims(jti="j" * 256), rules(max_jti_length=256), None),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_check_claims(case: tuple[dict[str, Any], ClaimRules, str | None]) -> None:
    token_claims, token_rules, reason = case
    if reason is None:
        assert isinstance(check_claims(token_claims, token_rules, now=NOW), CheckedClaims)
    else:
        with pytest.raises(ClaimInvalid) as caught:
            check_claims(token_claims, token_rules, now=NOW)
        assert caught.value.reason == reason


def test_checked_claims_are_returned_as_numbers_and_strings() -> None:
    checked = check_claims(claims(aud=[AUD, "https://b.example"], exp=int(NOW) + 300), RULES, now=NOW)
    assert checked == CheckedClaims(
        audiences=(AUD, "https://b.example"),
        exp=NOW + 300,
        nbf=NOW,
        iat=NOW,
        sub="repo:acme/app:ref:refs/heads/main",
        jti="jti-0001",
    )
    assert all(isinstance(value, float) for value in (checked.exp, checked.nbf, checked.iat))


NUMERIC_DATES: dict[str, tuple[object, float | None]] = {
    "integer": (1700000000, 1700000000.0),
    "float": (1700000000.5, 1700000000.5),
    "negative": (-1, -1.0),
    "zero": (0, 0.0),
    "true": (True, None),
    "null": (None, None),
    "string": ("1700000000", None),
    "nan": (float("nan"), None),
    "minus-infinity": (float("-inf"), None),
    "too-large-for-a-float": (10**400, None),
}


@pytest.mark.parametrize("case", NUMERIC_DATES.values(), ids=NUMERIC_DATES.keys())
def test_numeric_date_value(case: tuple[object, float | None]) -> None:
    value, expected = case
    assert numeric_date_value(value) == expected


TYPS: dict[str, tuple[object, str | None]] = {
    "absent": (None, None),
    "jwt": ("JWT", "jwt"),
    "media-type-written-out": ("application/at+jwt", "at+jwt"),
    "mixed-case": ("Application/SecEvent+JWT", "secevent+jwt"),
    "not-a-string": (["jwt"], "\x00invalid"),
}


@pytest.mark.parametrize("case", TYPS.values(), ids=TYPS.keys())
def test_normalise_typ(case: tuple[object, str | None]) -> None:
    value, expected = case
    assert normalise_typ(value) == expected


# ---------------------------------------------------------------------------
# parse_compact: UTF-8 JSON objects only (RFC 7515 §5.2, RFC 7519 §7.2)
# ---------------------------------------------------------------------------

HEADER = {"alg": "ES256", "kid": "k1", "typ": "JWT"}
PAYLOAD = {"iss": ISS, "sub": "café", "exp": 1}
SIGNATURE = b64url(b"\x01" * 64)


def compact(header: bytes, payload: bytes) -> str:
    """Header and payload as given; the signature is not looked at by the parser."""
    return f"{b64url(header)}.{b64url(payload)}.{SIGNATURE}"


PARSES: dict[str, tuple[str, str | None]] = {
    "utf8": (compact(json_bytes(HEADER), json_bytes(PAYLOAD)), None),
    "utf8-non-ascii-written-out": (
        compact(json_bytes(HEADER), '{"iss":"https://issuer.example","sub":"café"}'.encode()),
        None,
    ),
    **{
        f"payload-{name}": (compact(json_bytes(HEADER), json_bytes(PAYLOAD, encoding)), "jws.not_utf8")
        for name, encoding in NOT_UTF8.items()
    },
    **{
        f"header-{name}": (compact(json_bytes(HEADER, encoding), json_bytes(PAYLOAD)), "jws.not_utf8")
        for name, encoding in NOT_UTF8.items()
    },
    "payload-latin1": (
        compact(json_bytes(HEADER), '{"sub":"café"}'.encode("latin-1")),
        "jws.not_utf8",
    ),
    "payload-cesu8-surrogates": (
        compact(json_bytes(HEADER), b'{"sub":"\xed\xa0\xbd\xed\xb8\x80"}'),
        "jws.not_utf8",
    ),
    "payload-overlong-utf8": (compact(json_bytes(HEADER), b'{"sub":"\xc0\xaf"}'), "jws.not_utf8"),
    "payload-array": (compact(json_bytes(HEADER), b"[1,2]"), "jws.malformed"),
    "payload-not-json": (compact(json_bytes(HEADER), b"hello"), "jws.malformed"),
    "header-array": (compact(b'["ES256"]', json_bytes(PAYLOAD)), "jws.malformed"),
    "header-without-alg": (compact(json_bytes({"kid": "k1"}), json_bytes(PAYLOAD)), "jws.malformed"),
    "header-alg-not-a-string": (
        compact(json_bytes({"alg": ["ES256"]}), json_bytes(PAYLOAD)),
        "jws.missing_alg",
    ),
    "header-crit": (
        compact(json_bytes({**HEADER, "crit": ["x"], "x": 1}), json_bytes(PAYLOAD)),
        "jws.crit_not_understood",
    ),
    "four-segments": (compact(json_bytes(HEADER), json_bytes(PAYLOAD)) + ".x", "jws.not_compact_jws"),
    "padded-base64": (
        f"{b64url(json_bytes(HEADER))}=.{b64url(json_bytes(PAYLOAD))}.{SIGNATURE}",
        "jws.malformed",
    ),
    "not-ascii": (compact(json_bytes(HEADER), json_bytes(PAYLOAD)) + "é", "jws.malformed"),
}


@pytest.mark.parametrize("case", PARSES.values(), ids=PARSES.keys())
def test_parse_compact(case: tuple[str, str | None]) -> None:
    token, reason = case
    if reason is None:
        parsed = parse_compact(token)
        assert parsed.header == HEADER
        assert parsed.claims["sub"] == "café"
    else:
        with pytest.raises(JWSInvalid) as caught:
            parse_compact(token)
        assert caught.value.reason == reason


def test_peek_also_refuses_a_kid_that_is_not_a_string() -> None:
    token = compact(json_bytes({**HEADER, "kid": 7}), json_bytes(PAYLOAD))
    parse_compact(token)
    with pytest.raises(JWSInvalid) as caught:
        peek(token)
    assert caught.value.reason == "jws.malformed_kid"


# ---------------------------------------------------------------------------
# rsa_key_problem: 2048-16384 bits, e = 65537 (RFC 7518 §3.3; NIST SP 800-56B)
# ---------------------------------------------------------------------------

RSA_2048 = RSAKey.generate_key(2048).as_dict(private=False)


def _uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


RSA_KEYS: dict[str, tuple[dict[str, Any], str | None]] = {
    "2048-bits-e-65537": (RSA_2048, None),
    "e-3": ({**RSA_2048, "e": _uint(3)}, "RSA public exponent 3 (only 65537 is accepted)"),
    "e-1": ({**RSA_2048, "e": _uint(1)}, "RSA public exponent 1 (only 65537 is accepted)"),
    "e-17": ({**RSA_2048, "e": _uint(17)}, "RSA public exponent 17 (only 65537 is accepted)"),
    "e-2**32+1": ({**RSA_2048, "e": _uint(2**32 + 1)}, "RSA public exponent huge (only 65537 is accepted)"),
    "e-65537-with-a-leading-zero": ({**RSA_2048, "e": b64url(b"\x00\x01\x00\x01")}, None),
    "e-missing": ({k: v for k, v in RSA_2048.items() if k != "e"}, "RSA public exponent malformed"),
    "e-not-base64url": ({**RSA_2048, "e": "AQ+B"}, "RSA public exponent malformed"),
    "n-1024-bits": ({**RSA_2048, "n": _uint(2**1023 + 1)}, "RSA modulus of 1024 bits"),
    "n-16385-bits": ({**RSA_2048, "n": _uint(2**16384 + 1)}, "RSA modulus of 16385 bits"),
    "n-missing": ({k: v for k, v in RSA_2048.items() if k != "n"}, "malformed RSA modulus"),
    "n-zero": ({**RSA_2048, "n": "AA"}, "malformed RSA modulus"),
}


@pytest.mark.parametrize("case", RSA_KEYS.values(), ids=RSA_KEYS.keys())
def test_rsa_key_problem(case: tuple[dict[str, Any], str | None]) -> None:
    jwk, problem = case
    found = rsa_key_problem(jwk)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem), found
