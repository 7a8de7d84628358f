"""Machine step-up end to end over HTTP (issue 10): drift that fresh tokens do not erase, assurance
levels, and resource-server challenges that ``StsAuth`` answers.

Real processes where the scenario has them: the CI drift scenario runs the STS
as ``sts serve`` (granian, its own process), each CI job as the ``sts-ci``
console script, and the operator as the ``sts baseline`` command, all sharing
the STS's SQLite database.  GitHub's OIDC token endpoint and the upstream
issuer's JWKS are served from this process over HTTP.  The other scenarios
serve the real STS (``create_app``) and a Flask resource server on loopback
ports, with ``StsAuth`` as the workload; probation moves the STS's clock,
which is a parameter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from flask import Flask, g
from sts_client import (
    ACR_ATTESTED,
    ACR_POP,
    ACR_POSTURE,
    CallableAttestation,
    ExchangeRefused,
    StepUpFailed,
    StsAuth,
    TokenExchangeClient,
    TokenVerifier,
)
from sts_client.dpop import DPoPKey
from sts_client.flask import require_token
from werkzeug.wrappers import Request, Response

from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.support.clients_support import Served, Sts, serve_sts
from tests.support.clock import Clock

DEPLOY = "https://deploy.example.com"
SUBJECT = "repo:acme/app:ref:refs/heads/main"
IDENTITY = f"upstream|{SUBJECT}"
REQUEST_TOKEN = "actions-runtime-request-token"
BIN = Path(sys.executable).parent


def rule(**extra: Any) -> dict[str, Any]:
    """The repository's rule: deploy:read by default, deploy:write and secrets:read when asked."""
    return {
        "name": "deploy",
        "issuer": "upstream",
        "subject": SUBJECT,
        "claims": {"repository_id": "123456"},
        "require_client_authentication": False,
        "grant": {
            "audiences": [DEPLOY],
            "scopes": ["deploy:read", "deploy:write", "secrets:read"],
            "default_scopes": ["deploy:read"],
            "max_lifetime": 300,
        },
        **extra,
    }


def policy(**extra: Any) -> dict[str, Any]:
    return {"version": 1, "rules": [rule(**extra)]}


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


# -- 1. the CI drift scenario, with real processes ------------------------------------------------


class OidcEndpoint:
    """GitHub's ``ACTIONS_ID_TOKEN_REQUEST_URL``: a freshly minted job token, on the runner it names."""

    def __init__(self, upstream: RunningServer) -> None:
        self.upstream = upstream
        self.runner_environment = "github-hosted"
        self.issued = 0
        self.served = Served(self.app)

    @Request.application
    def app(self, request: Request) -> Response:
        if request.headers.get("Authorization") != f"bearer {REQUEST_TOKEN}":
            return Response('{"message": "Bad credentials"}', status=401)
        self.issued += 1
        token = self.upstream.issuer.github_actions_token(
            audience=request.args["audience"], runner_environment=self.runner_environment, lifetime=900
        )
        return Response(json.dumps({"count": 1, "value": token}), mimetype="application/json")


@dataclasses.dataclass
class StsProcess:
    url: str
    config: Path
    process: subprocess.Popen[bytes]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The operator's ``sts`` command, in its own process, on the same configuration."""
        return subprocess.run(
            [str(BIN / "sts"), "--config", str(self.config), *args],
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("STS_", "GITHUB_", "GITLAB_"))}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(directory: Path, upstream: RunningServer, rules: dict[str, Any], url: str) -> Path:
    """An ``sts.yaml`` for ``url``, with one policy file, SQLite and keys in ``directory``."""
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "ci.yaml").write_text(yaml.safe_dump(rules))
    config = directory / "sts.yaml"
    port = int(url.rsplit(":", 1)[1])
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": url,
                "host": "127.0.0.1",
                "port": port,
                "workers": 1,
                "threads": 4,
                "database_url": f"sqlite:///{directory / 'sts.sqlite'}",
                "keys_dir": str(directory / "keys"),
                "policies_dir": str(directory / "policies"),
                "issuers": [
                    {
                        "name": "upstream",
                        "issuer": upstream.issuer.issuer_url,
                        "jwks_uri": upstream.jwks_uri,
                        "algorithms": ["RS256"],
                        "audiences": [url],
                        "max_token_age": 3600,
                    }
                ],
            }
        )
    )
    return config


@pytest.fixture
def sts_process(tmp_path: Path, upstream: RunningServer) -> Iterator[Callable[[dict[str, Any]], StsProcess]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(rules: dict[str, Any]) -> StsProcess:
        url = f"http://127.0.0.1:{_free_port()}"
        config = write_config(tmp_path, upstream, rules, url)
        process = subprocess.Popen(
            [str(BIN / "sts"), "--config", str(config), "serve"],
            env=_clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert process.poll() is None, "sts serve exited"
            assert time.monotonic() < deadline, "sts serve did not become ready"
            time.sleep(0.1)
        return StsProcess(url, config, process)

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def ci_job(sts: StsProcess, oidc: OidcEndpoint, workdir: Path) -> tuple[int, dict[str, str], str]:
    """One GitHub Actions job step running ``sts-ci exchange`` (its own process)."""
    (workdir / "github_env").write_text("")
    (workdir / "github_output").write_text("")
    env = {
        **_clean_env(),
        "GITHUB_ACTIONS": "true",
        "ACTIONS_ID_TOKEN_REQUEST_URL": f"{oidc.served.url}/token?api-version=2.0",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
        "GITHUB_ENV": str(workdir / "github_env"),
        "GITHUB_OUTPUT": str(workdir / "github_output"),
    }
    result = subprocess.run(
        [
            str(BIN / "sts-ci"),
            "exchange",
            "--sts",
            sts.url,
            "--audience",
            DEPLOY,
            "--scope",
            "deploy:read deploy:write",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    outputs = dict(
        line.split("=", 1) for line in (workdir / "github_output").read_text().splitlines() if "=" in line
    )
    return result.returncode, outputs, result.stderr


def test_ci_drift_is_not_a_full_grant_until_an_operator_accepts_it(
    sts_process: Callable[[dict[str, Any]], StsProcess], upstream: RunningServer, tmp_path: Path
) -> None:
    """The issue's attack: three jobs on GitHub-hosted runners, then a freshly minted token from a
    self-hosted runner.  Before: 200, full scopes and lifetime, baseline moved.  Now: refused, and
    the job log says what would clear it; the operator's accept restores the full grant."""
    sts = sts_process(policy(risk={}))
    oidc = OidcEndpoint(upstream)
    try:
        for _ in range(3):
            code, outputs, err = ci_job(sts, oidc, tmp_path)
            assert code == 0, err
            assert (outputs["scope"], outputs["expires_in"]) == ("deploy:read deploy:write", "300")

        oidc.runner_environment = "self-hosted"
        code, outputs, err = ci_job(sts, oidc, tmp_path)
        assert code == 1, err
        assert "token" not in outputs
        assert "changed since the STS first saw it" in err
        assert f"sts baseline accept '{IDENTITY}'" in err
        assert "2 more run(s) with a fresh token" in err
        # A second fresh token from the same runner is no better: nothing is laundered.  (A
        # second later: an attestation counts once, and its iat has whole seconds.)
        time.sleep(1.1)
        code, _, err = ci_job(sts, oidc, tmp_path)
        assert code == 1 and "1 more run(s)" in err

        shown = sts.cli("baseline", "show", IDENTITY)
        assert shown.returncode == 0, shown.stderr
        runner = json.loads(shown.stdout)["facts"]["runner_environment"]
        assert runner["value"] == "github-hosted" and runner["confirmed"] is False
        assert runner["pending"]["value"] == "self-hosted" and runner["pending"]["fresh_exchanges"] == 2

        accepted = sts.cli("baseline", "accept", IDENTITY)
        assert accepted.returncode == 0, accepted.stderr
        assert 'accepted runner_environment="self-hosted"' in accepted.stdout

        code, outputs, err = ci_job(sts, oidc, tmp_path)
        assert code == 0, err
        assert (outputs["scope"], outputs["expires_in"]) == ("deploy:read deploy:write", "300")
    finally:
        oidc.served.stop()


# -- 2. probation -----------------------------------------------------------------------------------


@pytest.fixture
def start_sts(
    make_settings: Callable[..., Settings], upstream: RunningServer
) -> Iterator[Callable[..., Sts]]:
    started: list[Sts] = []

    def start(rules: dict[str, Any], **overrides: Any) -> Sts:
        sts = serve_sts(make_settings, upstream, rules, **overrides)
        started.append(sts)
        return sts

    yield start
    for sts in started:
        sts.served.stop()


def test_probation_confirms_the_new_value_after_n_fresh_exchanges_over_t(
    start_sts: Callable[..., Sts], upstream: RunningServer
) -> None:
    clock = Clock(float(int(time.time())))
    sts = start_sts(policy(risk={"probation_exchanges": 3, "probation_period": 3600}), clock=clock)
    client = TokenExchangeClient(sts.url)

    def exchange(runner: str) -> Any:
        token = upstream.issuer.github_actions_token(
            audience=sts.url, runner_environment=runner, now=clock.now, lifetime=600
        )
        return client.exchange(token, audience=DEPLOY, scope="deploy:read deploy:write")

    assert exchange("github-hosted").scope == "deploy:read deploy:write"
    start = clock.now
    progress = []
    for moved in (0, 1800, 1801):
        clock.now = start + moved
        with pytest.raises(ExchangeRefused) as refused:
            exchange("self-hosted")
        assert refused.value.risk is not None and refused.value.signals == ["attestation_drift"]
        probation = next(c for c in refused.value.clears if c["by"] == "probation")
        progress.append((probation["exchanges_left"], probation["not_before"]))
    # Three fresh exchanges, but not yet spread over an hour: one more, after the hour.
    assert progress == [(2, start + 3600), (1, start + 3600), (1, start + 3600)]

    clock.now = start + 3600
    issued = exchange("self-hosted")
    assert (issued.scope, issued.expires_in) == ("deploy:read deploy:write", 300)
    record = sts.audit(1)[0]
    assert record["outcome"] == "granted"
    drift = next(s for s in record["details"]["risk"]["signals"] if s["name"] == "attestation_drift")
    assert drift["evidence"]["confirmed"] == {"runner_environment": "probation"}
    runner = record["details"]["risk"]["baseline"]["facts"]["runner_environment"]
    assert runner == {"value": "self-hosted", "confirmed": True, "how": "probation"}
    # The old value is drift now.
    clock.now += 10
    with pytest.raises(ExchangeRefused):
        exchange("github-hosted")


def test_drift_asks_for_the_evidence_the_rule_accepts_and_that_evidence_confirms_it(
    start_sts: Callable[..., Sts], upstream: RunningServer
) -> None:
    """``drift_evidence: [pop_key_continuity]``: the workload's own DPoP key vouches for the change."""
    sts = start_sts(
        policy(risk={"drift_evidence": ["pop_key_continuity"], "stable_facts": ["runner_environment"]})
    )
    key = DPoPKey()  # the key the workload keeps
    bound = TokenExchangeClient(sts.url, dpop_key=key)
    bearer = TokenExchangeClient(sts.url)

    def token(runner: str) -> str:
        return upstream.issuer.github_actions_token(audience=sts.url, runner_environment=runner)

    assert bound.exchange(token("github-hosted"), audience=DEPLOY).token_type == "DPoP"
    with pytest.raises(ExchangeRefused) as refused:
        bearer.exchange(token("self-hosted"), audience=DEPLOY)
    assert refused.value.is_step_up
    assert refused.value.acr_values == (ACR_POP, ACR_POSTURE)
    assert [c["by"] for c in refused.value.clears] == ["operator_accept", "probation", "pop_key_continuity"]
    issued = bound.exchange(token("self-hosted"), audience=DEPLOY, acr_values=ACR_POP)
    assert issued.token_type == "DPoP"
    record = sts.audit(1)[0]
    assert record["details"]["assurance"]["presented"] == ACR_POP
    assert record["details"]["risk"]["baseline"]["facts"]["runner_environment"]["how"] == "pop_key_continuity"


# -- 3. resource servers ask, workloads answer -----------------------------------------------------


@dataclasses.dataclass
class ResourceServer:
    served: Served
    seen: list[int]

    @property
    def url(self) -> str:
        return self.served.url


@pytest.fixture
def start_rs() -> Iterator[Callable[[TokenVerifier], ResourceServer]]:
    started: list[Served] = []

    def start(verifier: TokenVerifier) -> ResourceServer:
        app = Flask("deploy-api")
        seen: list[int] = []

        def body() -> dict[str, Any]:
            token = g.token
            return {"acr": token.acr, "auth_time": token.auth_time, "jkt": token.jkt}

        @app.get("/deployments")
        @require_token(verifier, scopes="deploy:read")
        def deployments() -> dict[str, Any]:
            return body()

        @app.post("/releases")
        @require_token(verifier, scopes="deploy:read", acr_values=ACR_POP)
        def releases() -> dict[str, Any]:
            return body()

        @app.post("/rollbacks")
        @require_token(verifier, scopes="deploy:read", max_age=60)
        def rollbacks() -> dict[str, Any]:
            return body()

        @app.get("/secrets")
        @require_token(verifier, scopes="deploy:read", acr_values=ACR_POSTURE, max_age=60)
        def secrets() -> dict[str, Any]:
            return body()

        @app.after_request
        def record(response: Any) -> Any:
            seen.append(response.status_code)
            return response

        served = Served(app)
        started.append(served)
        return ResourceServer(served, seen)

    yield start
    for served in started:
        served.stop()


class Platform:
    """The workload's platform: GitHub Actions tokens, the first ``stale`` of them ``age`` seconds old."""

    def __init__(self, upstream: RunningServer, sts_url: str, *, stale: int = 0, age: int = 600) -> None:
        self.upstream, self.sts_url, self.stale, self.age = upstream, sts_url, stale, age
        self.issued_at: list[int] = []

    def __call__(self) -> str:
        age = self.age if len(self.issued_at) < self.stale else 0
        now = time.time() - age
        self.issued_at.append(int(now))
        return self.upstream.issuer.github_actions_token(audience=self.sts_url, now=now, lifetime=age + 300)


def test_route_needing_proof_of_possession_makes_sts_auth_renew_with_dpop(
    start_sts: Callable[..., Sts],
    start_rs: Callable[[TokenVerifier], ResourceServer],
    upstream: RunningServer,
) -> None:
    sts = start_sts(policy())
    metadata = requests.get(f"{sts.url}/.well-known/oauth-authorization-server", timeout=10).json()
    assert metadata["acr_values_supported"] == [ACR_ATTESTED, ACR_POP, ACR_POSTURE]
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))
    auth = StsAuth(sts.url, DEPLOY, attestation=CallableAttestation(Platform(upstream, sts.url)))
    session = requests.Session()

    listed = session.get(f"{rs.url}/deployments", auth=auth, timeout=10)
    assert listed.status_code == 200 and listed.json()["acr"] == ACR_ATTESTED
    assert auth.dpop_key is None and auth.token().token_type == "Bearer"

    released = session.post(f"{rs.url}/releases", json={"version": "1.2.3"}, auth=auth, timeout=10)
    assert released.status_code == 200, released.text
    assert [r.status_code for r in released.history] == [401]
    challenge = released.history[0].headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer error="insufficient_user_authentication"')
    assert f'acr_values="{ACR_POP} {ACR_POSTURE}"' in challenge
    assert auth.dpop_key is not None
    assert released.json() == {
        "acr": ACR_POP,
        "auth_time": released.json()["auth_time"],
        "jkt": auth.dpop_key.jkt,
    }
    assert auth.token().token_type == "DPoP" and auth.exchanges == 2
    assert rs.seen == [200, 401, 200]
    record = sts.audit(1)[0]
    assert record["details"]["assurance"]["presented"] == ACR_POP
    assert record["details"]["assurance"]["evidence"]["key"] == "first"
    # The key is the identity's now: the next renewal with it continues it.
    auth.renew()
    assert sts.audit(1)[0]["details"]["assurance"]["evidence"]["key"] == "continues"


def test_route_needing_attestation_under_60_s_makes_sts_auth_renew_with_a_fresh_platform_token(
    start_sts: Callable[..., Sts],
    start_rs: Callable[[TokenVerifier], ResourceServer],
    upstream: RunningServer,
) -> None:
    sts = start_sts(policy())
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))
    platform = Platform(upstream, sts.url, stale=1)
    auth = StsAuth(sts.url, DEPLOY, attestation=CallableAttestation(platform))

    done = requests.post(f"{rs.url}/rollbacks", auth=auth, timeout=10)
    assert done.status_code == 200, done.text
    challenge = done.history[0].headers["WWW-Authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge and 'max_age="60"' in challenge
    assert done.json()["auth_time"] == platform.issued_at[1] >= platform.issued_at[0] + 599
    assert auth.exchanges == 2 and rs.seen == [401, 200]


def test_sts_policy_needing_pop_and_fresh_attestation_for_a_scope_is_answered_by_sts_auth(
    start_sts: Callable[..., Sts],
    start_rs: Callable[[TokenVerifier], ResourceServer],
    upstream: RunningServer,
) -> None:
    """``assurance``: secrets:read needs proof of possession and attestation under 60 s; the STS asks
    (RFC 9470 at the token endpoint) and StsAuth renews with a DPoP key and a fresh token."""
    requirement = {"scopes": ["secrets:read"], "acr": ACR_POP, "max_attestation_age": 60}
    sts = start_sts(policy(assurance=[requirement]))
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))
    platform = Platform(upstream, sts.url, stale=1)
    auth = StsAuth(
        sts.url, DEPLOY, scope="deploy:read secrets:read", attestation=CallableAttestation(platform)
    )

    resp = requests.get(f"{rs.url}/deployments", auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.history == []  # the step-up happened at the STS, before the call
    assert resp.json()["acr"] == ACR_POP and auth.token().token_type == "DPoP"
    assert auth.exchanges == 2
    refused, granted = sorted(sts.audit(2), key=lambda r: r["outcome"] != "refused")
    assert refused["error"] == "insufficient_user_authentication"
    assert refused["reasons"][-1] == "assurance.level_too_low"
    assert refused["details"]["assurance"] == {
        "presented": ACR_ATTESTED,
        "required": ACR_POP,
        "max_age": 60,
        "because": ["scope secrets:read"],
        "attestation_age": refused["details"]["assurance"]["attestation_age"],
        "evidence": {"key": "none", "posture_token": False, "live_review": False, "carried": None},
    }
    assert refused["details"]["assurance"]["attestation_age"] >= 599
    assert granted["details"]["assurance"]["presented"] == ACR_POP


def test_route_needing_posture_is_answered_with_a_dpop_key_and_a_posture_token(
    start_sts: Callable[..., Sts],
    start_rs: Callable[[TokenVerifier], ResourceServer],
    upstream: RunningServer,
) -> None:
    sts = start_sts(policy(risk={"posture_fact": "device_posture", "stable_facts": []}))
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))

    def posture() -> str:
        now = int(time.time())
        claims = {"iss": upstream.issuer.issuer_url, "sub": SUBJECT, "aud": sts.url, "iat": now,
                  "exp": now + 300, "device_posture": "compliant"}  # fmt: skip
        return upstream.issuer.mint(claims)

    auth = StsAuth(
        sts.url,
        DEPLOY,
        attestation=CallableAttestation(Platform(upstream, sts.url)),
        posture=CallableAttestation(posture),
    )
    resp = requests.get(f"{rs.url}/secrets", auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    assert [r.status_code for r in resp.history] == [401]
    assert resp.json()["acr"] == ACR_POSTURE
    assert sts.audit(1)[0]["details"]["assurance"]["evidence"]["posture_token"] is True


def test_a_requirement_that_cannot_be_met_fails_with_a_clear_error_after_one_attempt(
    start_sts: Callable[..., Sts],
    start_rs: Callable[[TokenVerifier], ResourceServer],
    upstream: RunningServer,
) -> None:
    sts = start_sts(policy(assurance=[{"scopes": ["secrets:read"], "acr": ACR_POSTURE}]))
    rs = start_rs(TokenVerifier(sts.url, DEPLOY))

    # A route that needs posture evidence, from a workload with no posture token source.
    auth = StsAuth(sts.url, DEPLOY, attestation=CallableAttestation(Platform(upstream, sts.url)))
    with pytest.raises(StepUpFailed) as failed:
        requests.get(f"{rs.url}/secrets", auth=auth, timeout=10)
    message = str(failed.value)
    assert f"acr_values={ACR_POSTURE}" in message and "max_age=60" in message
    assert "no posture token source is configured" in message
    assert failed.value.asked.asked_by == f"the resource server {rs.url}"
    assert auth.exchanges == 1 and rs.seen == [401]

    # A route that needs attestation under 60 s, from a platform that only has old tokens.
    stale = Platform(upstream, sts.url, stale=10)
    auth = StsAuth(sts.url, DEPLOY, attestation=CallableAttestation(stale))
    with pytest.raises(StepUpFailed) as failed:
        requests.post(f"{rs.url}/rollbacks", auth=auth, timeout=10)
    assert "max_age=60" in str(failed.value) and "the renewed token does not reach it" in str(failed.value)
    assert auth.exchanges == 2 and rs.seen == [401, 401]  # one renewal; no retry that could not help

    # The STS's own requirement (secrets:read needs posture): one exchange, then the reason.
    auth = StsAuth(
        sts.url, DEPLOY, scope="secrets:read", attestation=CallableAttestation(Platform(upstream, sts.url))
    )
    with pytest.raises(StepUpFailed) as failed:
        auth.token()
    assert failed.value.asked.asked_by == "the STS"
    assert failed.value.asked.acr_values == (ACR_POSTURE,)
    assert "no posture token source is configured" in str(failed.value)
    assert failed.value.error == "insufficient_user_authentication"  # the STS's own answer is kept
    assert auth.exchanges == 1


def test_baseline_commands_and_policy_explain_show_the_session_and_the_levels(
    tmp_path: Path, upstream: RunningServer
) -> None:
    """The operator's side, in process: show, accept one fact, reset; and the levels a request reaches."""
    from click.testing import CliRunner

    from sts.adapters.sql.engines import make_engine
    from sts.adapters.sql.key_value import SqlBaselineStore
    from sts.core.baseline import BASELINE_TTL, Baseline, PendingFact
    from sts.migrations import upgrade

    requirement = {"scopes": ["secrets:read"], "acr": ACR_POP, "max_attestation_age": 60}
    config = write_config(tmp_path, upstream, policy(assurance=[requirement]), "http://127.0.0.1:8080")
    engine = make_engine(f"sqlite:///{tmp_path / 'sts.sqlite'}")
    upgrade(engine)
    store = SqlBaselineStore(engine, clock=time.time)
    pending = {
        "runner_environment": PendingFact("self-hosted", 1.0, 2.0, 1, 2.0),
        "node": PendingFact("n2", 1.0, 2.0, 0, None),
    }
    store.save(IDENTITY, Baseline(count=4, facts={"runner_environment": "github-hosted", "node": "n1"},
                                  pending=pending), BASELINE_TTL)  # fmt: skip

    def cli(*args: str) -> Any:
        from sts.cli import main

        return CliRunner().invoke(main, ["--config", str(config), *args])

    shown = json.loads(cli("baseline", "show", IDENTITY).output)
    assert shown["facts"]["node"] == {
        "value": "n1",
        "confirmed": False,
        "how": "first_seen",
        "pending": {"value": "n2", "fresh_exchanges": 0, "since": None},
    }
    assert shown["pending"]["runner_environment"]["fresh_count"] == 1
    assert cli("baseline", "accept", IDENTITY, "--fact", "missing").exit_code != 0
    assert cli("baseline", "accept", "no-separator").exit_code != 0
    result = cli("baseline", "accept", IDENTITY, "--fact", "node")
    assert result.exit_code == 0 and result.output == f'accepted node="n2" for {IDENTITY}\n'
    after = store.load(IDENTITY)
    assert after.facts == {"runner_environment": "github-hosted", "node": "n2"}
    assert (
        set(after.pending) == {"runner_environment"} and after.confirmed["node"]["how"] == "operator_accept"
    )
    assert cli("baseline", "reset", IDENTITY).exit_code == 0
    assert store.load(IDENTITY) == Baseline()
    assert cli("baseline", "accept", IDENTITY).exit_code != 0  # nothing pending

    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"sub": SUBJECT, "repository_id": "123456"}))
    explain = ["policy", "explain", "--claims", str(claims), "--issuer", "upstream", "--audience", DEPLOY]
    lines = cli(*explain, "--scope", "deploy:read secrets:read").output.splitlines()
    assert (
        f"required: at least {ACR_POP}, attestation at most 60 s old (because: scope secrets:read)" in lines
    )
    assert (
        f"this request reaches {ACR_ATTESTED}: step-up: insufficient_user_authentication, "
        f"acr_values={ACR_POP} {ACR_POSTURE}"
    ) in lines
    assert (
        f"this request reaches {ACR_POP}: met"
        in cli(*explain, "--scope", "secrets:read", "--with-key").output
    )
    assert "required: nothing beyond attestation" in cli(*explain, "--scope", "deploy:read").output


def test_sts_ci_explains_a_level_it_cannot_present_without_retrying(
    start_sts: Callable[..., Sts], upstream: RunningServer, tmp_path: Path
) -> None:
    import io

    from sts_client.ci import EXIT_REFUSED, main

    sts = start_sts(policy(assurance=[{"scopes": ["deploy:write"], "acr": ACR_POP}]))
    oidc = OidcEndpoint(upstream)
    requests_seen: list[str] = []
    oidc.served.server.app = lambda environ, start: (requests_seen.append("token"), oidc.app(environ, start))[
        1
    ]
    try:
        (tmp_path / "github_env").write_text("")
        (tmp_path / "github_output").write_text("")
        env = {
            "GITHUB_ACTIONS": "true",
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"{oidc.served.url}/token?api-version=2.0",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
            "GITHUB_ENV": str(tmp_path / "github_env"),
            "GITHUB_OUTPUT": str(tmp_path / "github_output"),
        }
        err = io.StringIO()
        args = ["exchange", "--sts", sts.url, "--audience", DEPLOY, "--scope", "deploy:write"]
        code = main(args, environ=env, stdout=io.StringIO(), stderr=err)
    finally:
        oidc.served.stop()
    assert code == EXIT_REFUSED
    log = err.getvalue()
    assert "insufficient_user_authentication" in log
    assert f"the policy needs assurance level {ACR_POP}" in log
    assert "a token bound to the workload's own key" in log
    assert "StsAuth with dpop=True" in log
    assert oidc.issued == 1  # a new job token cannot reach the level: not asked for twice
