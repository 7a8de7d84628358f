"""From a risk assessment to a decision: grant, narrow, step up, or deny.

Machines cannot answer an MFA prompt, so step-up happens through credential
renewal: the refusal says how fresh the attestation must be, and the
workload re-attests (a new OIDC/service-account token) and exchanges again.

Score bands (per rule, ``risk`` in the policy):

* below ``narrow_at``: issue as granted;
* from ``narrow_at``: issue narrowed: privileged scopes dropped;
* from ``step_up_at``: refuse, asking for attestation no older than
  ``step_up_max_age`` (once such attestation is presented, what risk remains
  is handled by narrowing);
* from ``deny_at``: refuse.

Unconfirmed drift is the exception in the step-up band, because fresh
attestation does not confirm a changed fact (:mod:`sts.core.drift`): the
workload is asked to step up only when it can present evidence the rule
accepts as confirmation (``acr_values`` naming the level that shows it);
otherwise the exchange is refused.  Either refusal says what would clear it
(``clears``: an operator's accept, the probation left, the evidence).

Lifetime shrinks as risk grows, so a token expires with its risk context:
``max(min_lifetime_factor, 1 - score / deny_at)`` of what would be granted.
In ``observe`` mode the decision is recorded but not enforced, except what
security events from other systems demand (blocks, re-attestation), which
always holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .risk import Assessment, RiskSettings

GRANT = "grant"
NARROW = "narrow"
STEP_UP = "step_up"
DENY = "deny"


@dataclass(frozen=True)
class RiskDecision:
    action: str
    score: int
    enforced: bool
    scopes: tuple[str, ...]
    lifetime_factor: float
    fired: tuple[str, ...]
    step_up_max_age: int
    #: The levels that would show evidence confirming unconfirmed drift (a step-up for drift).
    acr_values: tuple[str, ...] = ()
    #: What would clear unconfirmed drift (see :mod:`sts.core.drift`); empty without drift.
    clears: tuple[Mapping[str, Any], ...] = ()

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "action": self.action,
            "score": self.score,
            "enforced": self.enforced,
            "lifetime_factor": round(self.lifetime_factor, 3),
            "fired": list(self.fired),
        }
        if self.clears:
            out["acr_values"] = list(self.acr_values)
            out["clears"] = [dict(c) for c in self.clears]
        return out


def _band(score: int, cfg: RiskSettings, fresh: bool) -> str:
    if score >= cfg.deny_at:
        return DENY
    if score >= cfg.step_up_at:
        # Fresh attestation already presented: renewing again would change nothing.
        return NARROW if fresh else STEP_UP
    if score >= cfg.narrow_at:
        return NARROW
    return GRANT


def _drift_band(action: str, score: int, assessment: Assessment, cfg: RiskSettings) -> str:
    """In the step-up band, unconfirmed drift asks for evidence the workload can present, else refuses:
    renewing the attestation would only launder it."""
    if action == DENY or score < cfg.step_up_at or not assessment.drift.changed:
        return action
    if not any(s.name == "attestation_drift" for s in assessment.fired):
        return action
    return STEP_UP if assessment.drift.remedies else DENY


def decide(assessment: Assessment, cfg: RiskSettings, scopes: tuple[str, ...]) -> RiskDecision:
    score = assessment.score
    fired = tuple(s.name for s in assessment.fired)
    action = _drift_band(_band(score, cfg, assessment.fresh), score, assessment, cfg)
    enforced = cfg.mode == "enforce"
    if not enforced:
        # Security events from other systems are enforced even while the rule only observes,
        # but only as far as they demand on their own (a block, a re-attestation): the
        # observed signals must not turn them into a harsher refusal.
        events = sum(s.weight for s in assessment.fired if s.name == "shared_signal")
        demanded = _band(events, cfg, assessment.fresh)
        if demanded in (STEP_UP, DENY):
            action, enforced, fired = demanded, True, ("shared_signal",)
    factor = max(cfg.min_lifetime_factor, 1.0 - score / cfg.deny_at) if score else 1.0
    narrowed = tuple(s for s in scopes if s not in cfg.privileged_scopes) if action == NARROW else scopes
    drifted = "attestation_drift" in fired
    return RiskDecision(
        action,
        score,
        enforced,
        narrowed,
        factor,
        fired,
        cfg.step_up_max_age,
        acr_values=assessment.drift.acr_values if drifted else (),
        clears=assessment.drift.clears if drifted else (),
    )
