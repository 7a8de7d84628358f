"""A day in the life of two workloads, made of real exchanges, for the review page's tests.

``make_decisions`` drives ``POST /token`` (through a Flask test client or over
HTTP) with tokens from the development issuer, at the times of a clock the app
shares: ten days ago the deploy job learns its baseline; today it is granted,
narrowed (new network, privileged scope), asked to step up (a privileged scope
alone, on a token two minutes old), refused for drift (a self-hosted runner) and
refused a foreign audience; a reports job appears for the first
time (a new edge), and a token whose subject carries markup is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sts.core.client_secrets import hash_secret
from sts.dev.issuer import DevIssuer
from tests.conftest import STS_ISSUER, exchange_form
from tests.support.clock import Clock

DEPLOY = "https://deploy.example.com"
REPORTS = "https://reports.example.com"
APP = "repo:acme/app:ref:refs/heads/main"
REPORTS_JOB = "repo:acme/reports:ref:refs/heads/main"
MARKUP_REPO = 'acme/<img src=x onerror="alert(1)">'
REVIEWER, PASSWORD = "alice", "correct horse battery staple 9f2c"
HOME, AWAY = "10.1.2.3", "192.0.2.77"
DAY = 86400.0


def review_policy() -> dict[str, Any]:
    return {
        "version": 1,
        "rules": [
            {
                "name": "deploy",
                "issuer": "upstream",
                "subject": APP,
                "require_client_authentication": False,
                "risk": {"privileged_scopes": ["deploy:write"]},
                "grant": {
                    "audiences": [DEPLOY],
                    "scopes": ["deploy:read", "deploy:write"],
                    "default_scopes": ["deploy:read"],
                    "max_lifetime": 300,
                },
            },
            {
                "name": "reports",
                "issuer": "upstream",
                "subject": REPORTS_JOB,
                "require_client_authentication": False,
                "grant": {"audiences": [REPORTS], "scopes": ["reports:read"], "max_lifetime": 300},
            },
        ],
    }


def review_settings(**extra: Any) -> dict[str, Any]:
    """Settings overrides: the review page on, one user, proxies on loopback trusted (so a test
    can set the client address with X-Forwarded-For)."""
    return {
        "review": {
            "enabled": True,
            "users": [{"username": REVIEWER, "password_hash": hash_secret(PASSWORD)}],
        },
        "trusted_proxies": ["127.0.0.0/8"],
        **extra,
    }


Post = Callable[[dict[str, Any], dict[str, str]], tuple[int, dict[str, Any]]]


def make_decisions(post: Post, issuer: DevIssuer, clock: Clock, audience: str = STS_ISSUER) -> dict[str, Any]:
    """Run the scenario; returns what was issued and refused, for the tests to look for."""

    def token(age: float = 0, **claims: Any) -> str:
        return issuer.github_actions_token(
            audience=audience, now=clock.now - age, lifetime=int(age) + 600, **claims
        )

    def exchange(subject_token: str, source: str = HOME, **params: Any) -> tuple[int, dict[str, Any]]:
        params.setdefault("audience", DEPLOY)
        return post(exchange_form(subject_token, **params), {"X-Forwarded-For": source})

    issued: list[str] = []
    today = clock.now
    clock.now = today - 10 * DAY
    for _ in range(5):
        status, body = exchange(token(), scope="deploy:read")
        assert status == 200, body
        issued.append(body["access_token"])
        clock.now += 60
    clock.now = today - 3600
    status, body = exchange(token(), scope="deploy:read")
    assert status == 200, body
    issued.append(body["access_token"])
    clock.now = today - 1800
    status, narrowed = exchange(token(), source=AWAY, scope="deploy:read deploy:write")
    assert status == 200 and narrowed["scope"] == "deploy:read", narrowed
    issued.append(narrowed["access_token"])
    clock.now = today - 1200
    # A privileged scope alone, on a token two minutes old: narrowed to nothing, fresh attestation asked.
    status, step_up = exchange(token(age=120), scope="deploy:write")
    assert status == 400 and step_up["error"] == "insufficient_user_authentication", step_up
    clock.now = today - 1000
    # A self-hosted runner where the baseline says GitHub-hosted: drift, refused until confirmed.
    status, drift = exchange(token(runner_environment="self-hosted"), scope="deploy:read")
    assert status == 400 and drift["risk"]["signals"] == ["attestation_drift"], drift
    clock.now = today - 900
    status, refused = exchange(token(), audience="https://elsewhere.example.com")
    assert status == 400 and refused["error"] == "invalid_target", refused
    clock.now = today - 600
    status, reports = exchange(token(repository="acme/reports"), audience=REPORTS)
    assert status == 200, reports
    issued.append(reports["access_token"])
    clock.now = today - 300
    status, markup = exchange(token(repository=MARKUP_REPO))
    assert status == 400, markup
    clock.now = today
    return {"issued": issued, "decisions": 12, "granted": 8, "refused": 4}
