"""The issued lifetime (sts/core/exchange/issue.py): nothing left is expired, whatever the risk."""

from __future__ import annotations

import dataclasses

import pytest

from sts.core.attest import VerifiedToken
from sts.core.exchange.issue import token_lifetime
from sts.core.policy.rules import Grant
from sts.core.stepup import RiskDecision
from sts.errors import InvalidRequest
from sts.protocol.token_exchange import TokenExchangeRequest

NOW = 1_800_000_000.0
SUBJECT = VerifiedToken(
    issuer_name="k8s", issuer="https://k8s.example", subject="system:serviceaccount:a:b", claims={},
    token_type="urn:ietf:params:oauth:token-type:jwt", issued_at=NOW - 600, expires_at=NOW + 3600,
    not_before=None, jti=None, sha256="0" * 64, typ="jwt",
)  # fmt: skip
GRANT = Grant(rule="r", audiences=("a",), scopes=(), max_lifetime=300, scope_narrowed=False)
REQUEST = TokenExchangeRequest("t", "jwt", None, None, ("a",), (), None, None, None)


def _decision(factor: float) -> RiskDecision:
    return RiskDecision("narrow", 50, True, (), factor, ("stale_posture",), 0)


def test_narrowing_shortens_what_is_left() -> None:
    assert token_lifetime(SUBJECT, GRANT, REQUEST, _decision(1.0), NOW) == 300
    assert token_lifetime(SUBJECT, GRANT, REQUEST, _decision(0.5), NOW) == 150


@pytest.mark.parametrize("factor", [1.0, 0.5], ids=["granted-band", "narrowed-band"])
def test_a_subject_with_nothing_left_is_expired_in_every_band(factor: float) -> None:
    """Narrowing lifts what it shrinks to at least a second: applied first, it granted a second to a
    token past what its issuer intended (an outside audit)."""
    spent = dataclasses.replace(SUBJECT, valid_until=NOW - 120)
    with pytest.raises(InvalidRequest) as refused:
        token_lifetime(spent, GRANT, REQUEST, _decision(factor), NOW)
    assert refused.value.reason == "subject_token.expired"


def test_a_posture_tokens_profile_fact_outweighs_a_raw_claim_of_the_same_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As for the subject token (``facts.get(fact, claims.get(fact))``): the posture token's raw
    top-level claim outvoted the fact its profile derived (an outside audit: a look-alike
    ``compliance`` claim passed a rule whose mapped fact said noncompliant)."""
    from sts.core.exchange import risk_and_assurance
    from sts.core.risk import RiskSettings

    posture = dataclasses.replace(
        SUBJECT, jti="posture-1", claims={"compliance": "compliant"}, facts={"compliance": "noncompliant"}
    )
    monkeypatch.setattr(risk_and_assurance, "verify_token", lambda *_args, **_kwargs: posture)
    stage = risk_and_assurance.RiskAndAssurance(None, leeway=0, subject_states=None, baselines=None)  # type: ignore[arg-type]
    claims, problem = stage._posture("token", SUBJECT, RiskSettings(posture_fact="compliance"), NOW)
    assert problem is None and claims is not None and claims["compliance"] == "noncompliant"
