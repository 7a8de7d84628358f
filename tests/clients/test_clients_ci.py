"""``sts-ci`` in simulated GitHub Actions and GitLab CI jobs, against the real STS over HTTP.

GitHub's OIDC token request endpoint is played by a local HTTP server that
mints development-issuer tokens for the audience asked; GitLab's ``id_tokens``
are environment variables.  Outputs are checked where the CI platforms read
them: ``$GITHUB_ENV``, ``$GITHUB_OUTPUT``, the ``::add-mask::`` line on stdout,
and the dotenv file.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sts_client import TokenVerifier
from sts_client.ci import EXIT_ENVIRONMENT, EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE, main
from werkzeug.wrappers import Request, Response

from sts.dev.issuer import DevIssuer, RunningServer
from sts.settings import Settings
from tests.conftest import DEFAULT_POLICY
from tests.support.clients_support import Served, Sts, serve_sts

DEPLOY = "https://deploy.example.com"
GITHUB_SUBJECT = "repo:acme/app:ref:refs/heads/main"
REQUEST_TOKEN = "actions-runtime-request-token"
GITLAB_RULE = {
    "name": "gitlab-deploy",
    "issuer": "upstream",
    "subject": "project_path:acme/app:ref_type:branch:ref:main",
    "claims": {"project_id": "4242"},
    "require_client_authentication": False,
    "grant": {"audiences": [DEPLOY], "scopes": ["deploy:read"], "default_scopes": ["deploy:read"]},
}
STEP_UP_RISK = {"networks": ["10.0.0.0/8"], "weights": {"unusual_network": 60}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningServer]:
    with DevIssuer.serve_ephemeral(alg="RS256") as server:
        yield server


@pytest.fixture
def sts(make_settings: Callable[..., Settings], upstream: RunningServer) -> Iterator[Sts]:
    served = serve_sts(
        make_settings, upstream, {"version": 1, "rules": [*DEFAULT_POLICY["rules"], GITLAB_RULE]}
    )
    yield served
    served.served.stop()


@pytest.fixture
def stepping_up_sts(make_settings: Callable[..., Settings], upstream: RunningServer) -> Iterator[Sts]:
    rules = [{**DEFAULT_POLICY["rules"][0], "risk": STEP_UP_RISK}, {**GITLAB_RULE, "risk": STEP_UP_RISK}]
    served = serve_sts(make_settings, upstream, {"version": 1, "rules": rules})
    yield served
    served.served.stop()


class OidcEndpoint:
    """GitHub's ``ACTIONS_ID_TOKEN_REQUEST_URL``: a token for the audience asked, for the request token."""

    def __init__(self, upstream: RunningServer, *, age: int = 0) -> None:
        self.upstream = upstream
        self.age = age
        self.audiences: list[str] = []
        self.served = Served(self.app)

    @Request.application
    def app(self, request: Request) -> Response:
        if request.headers.get("Authorization") != f"bearer {REQUEST_TOKEN}":
            return Response('{"message": "Bad credentials"}', status=401)
        if request.args.get("api-version") != "2.0":
            return Response("{}", status=400)
        audience = request.args["audience"]
        self.audiences.append(audience)
        token = self.upstream.issuer.github_actions_token(
            audience=audience, now=time.time() - self.age, lifetime=self.age + 300
        )
        return Response(json.dumps({"count": 1, "value": token}), mimetype="application/json")


@pytest.fixture
def oidc(upstream: RunningServer) -> Iterator[OidcEndpoint]:
    endpoint = OidcEndpoint(upstream)
    yield endpoint
    endpoint.served.stop()


def github_env(tmp_path: Path, oidc: OidcEndpoint) -> dict[str, str]:
    (tmp_path / "github_env").write_text("EARLIER=1\n")
    (tmp_path / "github_output").write_text("")
    return {
        "GITHUB_ACTIONS": "true",
        "ACTIONS_ID_TOKEN_REQUEST_URL": f"{oidc.served.url}/token?api-version=2.0",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN,
        "GITHUB_ENV": str(tmp_path / "github_env"),
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
    }


def run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(args, environ=env, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- GitHub Actions ---------------------------------------------------------------------------------


def test_github_actions_exchange_masks_and_exports_the_token(
    sts: Sts, oidc: OidcEndpoint, tmp_path: Path
) -> None:
    env = github_env(tmp_path, oidc)
    code, out, err = run(
        [
            "exchange",
            "--sts",
            sts.url,
            "--audience",
            DEPLOY,
            "--scope",
            "deploy:write",
            "--output-name",
            "DEPLOY",
        ],
        env,
    )
    assert (code, err) == (EXIT_OK, "")
    assert oidc.audiences == [sts.url]  # the job's token is asked for the STS by default

    env_lines = (tmp_path / "github_env").read_text().splitlines()
    assert env_lines[0] == "EARLIER=1"  # appended, not overwritten
    assert env_lines[1].startswith("DEPLOY=") and len(env_lines) == 2
    token = env_lines[1].removeprefix("DEPLOY=")
    outputs = dict(line.split("=", 1) for line in (tmp_path / "github_output").read_text().splitlines())
    assert outputs["token"] == token
    assert outputs["scope"] == "deploy:write" and int(outputs["expires_in"]) > 0

    # The token is masked before anything else that could carry it; it appears nowhere else.
    lines = out.splitlines()
    mask = lines.index(f"::add-mask::{token}")
    assert all(token not in line for line in lines[:mask] + lines[mask + 1 :])
    assert lines[0].startswith("::add-mask::")  # the job's own OIDC token is masked too
    assert "DEPLOY" in lines[-1] and "steps.<id>.outputs.token" in lines[-1]

    verified = TokenVerifier(sts.url, DEPLOY).verify(
        "GET", "https://deploy.example.com/x", {"Authorization": f"Bearer {token}"}
    )
    assert verified.subject == GITHUB_SUBJECT and verified.scopes == {"deploy:write"}


def test_github_refusal_explains_what_to_change(sts: Sts, oidc: OidcEndpoint, tmp_path: Path) -> None:
    env = github_env(tmp_path, oidc)
    code, out, err = run(["exchange", "--sts", sts.url, "--audience", "https://elsewhere.example.com"], env)
    assert code == EXIT_REFUSED
    assert "invalid_target" in err
    assert f"no policy grants this audience (https://elsewhere.example.com) to {GITHUB_SUBJECT}" in err
    assert "check the audience or ask the platform team to add a rule" in err
    assert "forbidden" not in err.lower()
    assert (tmp_path / "github_env").read_text() == "EARLIER=1\n"
    assert (tmp_path / "github_output").read_text() == ""
    assert all(line.startswith("::add-mask::") for line in out.splitlines())


def test_github_wrong_id_token_audience(sts: Sts, oidc: OidcEndpoint, tmp_path: Path) -> None:
    env = github_env(tmp_path, oidc)
    code, _, err = run(
        [
            "exchange",
            "--sts",
            sts.url,
            "--audience",
            DEPLOY,
            "--id-token-audience",
            "https://not-the-sts.example",
        ],
        env,
    )
    assert oidc.audiences == ["https://not-the-sts.example"]
    assert code == EXIT_REFUSED
    assert "invalid_request" in err and "--id-token-audience" in err


def test_github_step_up_is_retried_with_a_new_token_then_explained(
    stepping_up_sts: Sts, oidc: OidcEndpoint, tmp_path: Path
) -> None:
    oidc.age = 600  # this runtime only hands out old tokens
    env = github_env(tmp_path, oidc)
    code, _, err = run(["exchange", "--sts", stepping_up_sts.url, "--audience", DEPLOY], env)
    assert code == EXIT_REFUSED
    assert len(oidc.audiences) == 2  # renewed once, then gave up
    assert "insufficient_user_authentication" in err
    assert "fresh attestation required" in err and "re-run the job" in err
    assert "unusual_network" in err
    # A runtime handing out fresh tokens passes the same STS (narrowed, but issued).
    oidc.age = 0
    assert run(["exchange", "--sts", stepping_up_sts.url, "--audience", DEPLOY], env)[0] == EXIT_OK


def test_github_without_id_token_permission(sts: Sts, tmp_path: Path) -> None:
    code, _, err = run(
        ["exchange", "--sts", sts.url, "--audience", DEPLOY],
        {"GITHUB_ACTIONS": "true", "GITHUB_ENV": str(tmp_path / "e"), "GITHUB_OUTPUT": str(tmp_path / "o")},
    )
    assert code == EXIT_ENVIRONMENT
    assert "id-token: write" in err


# -- GitLab CI --------------------------------------------------------------------------------------


def test_gitlab_writes_a_dotenv_and_never_prints_the_token(
    sts: Sts, upstream: RunningServer, tmp_path: Path
) -> None:
    dotenv = tmp_path / "deploy.env"
    env = {"GITLAB_CI": "true", "ID_TOKEN_1": upstream.issuer.gitlab_token(audience=sts.url)}
    code, out, err = run(
        [
            "exchange",
            "--sts",
            sts.url,
            "--audience",
            DEPLOY,
            "--id-token-var",
            "ID_TOKEN_1",
            "--dotenv",
            str(dotenv),
        ],
        env,
    )
    assert (code, err) == (EXIT_OK, "")
    name, _, token = dotenv.read_text().rstrip("\n").partition("=")
    assert name == "STS_TOKEN" and token.count(".") == 2
    assert token not in out and env["ID_TOKEN_1"] not in out
    assert "::add-mask::" not in out
    assert "artifacts: reports: dotenv" in out
    assert stat.S_IMODE(dotenv.stat().st_mode) == 0o600
    verified = TokenVerifier(sts.url, DEPLOY).verify(
        "GET", "https://deploy.example.com/", [("Authorization", f"Bearer {token}")]
    )
    assert verified.subject == "project_path:acme/app:ref_type:branch:ref:main"


def test_gitlab_dotenv_is_made_private_and_never_written_through_a_link(
    sts: Sts, upstream: RunningServer, tmp_path: Path
) -> None:
    """``--dotenv`` names a file that may be there already: readable by others (0644), it is made
    0600 before the token goes in; a symbolic link (to a file the job publishes, say) is refused."""
    env = {"GITLAB_CI": "true", "ID_TOKEN_1": upstream.issuer.gitlab_token(audience=sts.url)}
    command = ["exchange", "--sts", sts.url, "--audience", DEPLOY, "--id-token-var", "ID_TOKEN_1", "--dotenv"]
    there = tmp_path / "there.env"
    there.write_text("OLD=1\nOLDER=2\n")
    there.chmod(0o644)
    code, _, err = run([*command, str(there)], env)
    assert (code, err) == (EXIT_OK, "")
    assert stat.S_IMODE(there.stat().st_mode) == 0o600
    assert there.read_text().startswith("STS_TOKEN=") and "OLD" not in there.read_text()

    public = tmp_path / "public.txt"
    public.write_text("release notes\n")
    link = tmp_path / "link.env"
    link.symlink_to(public)
    env["ID_TOKEN_1"] = upstream.issuer.gitlab_token(audience=sts.url)
    code, _, err = run([*command, str(link)], env)
    assert code == EXIT_ENVIRONMENT and "cannot write the dotenv file" in err
    assert public.read_text() == "release notes\n"


def test_gitlab_stale_token_step_up_says_re_run_the_job(
    stepping_up_sts: Sts, upstream: RunningServer, tmp_path: Path
) -> None:
    stale = upstream.issuer.gitlab_token(audience=stepping_up_sts.url, now=time.time() - 600, lifetime=900)
    dotenv = tmp_path / "sts.env"
    code, out, err = run(
        ["exchange", "--sts", stepping_up_sts.url, "--audience", DEPLOY, "--dotenv", str(dotenv)],
        {"GITLAB_CI": "true", "STS_ID_TOKEN": stale},
    )
    assert code == EXIT_REFUSED
    assert "fresh attestation required" in err and "re-run the job" in err
    assert not dotenv.exists()
    assert stale not in out + err
    refused = [r for r in stepping_up_sts.audit(5) if r["outcome"] == "refused"]
    assert len(refused) == 1  # a GitLab id token cannot be renewed within the job: asked once


def test_gitlab_without_the_id_token_variable(sts: Sts) -> None:
    code, _, err = run(["exchange", "--sts", sts.url, "--audience", DEPLOY], {"GITLAB_CI": "true"})
    assert code == EXIT_ENVIRONMENT
    assert "STS_ID_TOKEN" in err and "id_tokens" in err


# -- environment and usage --------------------------------------------------------------------------


def test_outside_ci_and_unreachable_sts_and_bad_names(upstream: RunningServer, tmp_path: Path) -> None:
    code, _, err = run(["exchange", "--sts", "https://sts.example.com", "--audience", DEPLOY], {})
    assert code == EXIT_ENVIRONMENT and "GITHUB_ACTIONS" in err and "GITLAB_CI" in err

    closed = Served()
    closed.stop()  # a port nothing listens on any more
    env = {"GITLAB_CI": "true", "STS_ID_TOKEN": upstream.issuer.gitlab_token(audience=closed.url)}
    code, _, err = run(["exchange", "--sts", closed.url, "--audience", DEPLOY, "--timeout", "2"], env)
    assert code == EXIT_UNAVAILABLE
    assert "unavailable" in err and "retry later" in err

    code, _, err = run(
        ["exchange", "--sts", "https://sts.example.com", "--audience", DEPLOY, "--output-name", "A=B\nX"], env
    )
    assert code == 2 and "variable name" in err
    code, _, err = run(["exchange", "--sts", "http://sts.example.com", "--audience", DEPLOY], env)
    assert code == 2 and "https" in err


def test_the_console_script_is_installed(sts: Sts, upstream: RunningServer, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "sts-ci"
    assert script.exists(), "run scripts/bootstrap: it installs clients/python"
    env: dict[str, Any] = {
        "PATH": os.environ.get("PATH", ""),
        "GITLAB_CI": "true",
        "STS_ID_TOKEN": upstream.issuer.gitlab_token(audience=sts.url),
    }
    result = subprocess.run(
        [
            str(script),
            "exchange",
            "--sts",
            sts.url,
            "--audience",
            DEPLOY,
            "--dotenv",
            str(tmp_path / "out.env"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert (tmp_path / "out.env").read_text().startswith("STS_TOKEN=ey")


def run_against(answer: Callable[[], Response], tmp_path: Path, oidc: OidcEndpoint) -> tuple[int, str, str]:
    """sts-ci against a stand-in STS: its metadata, and ``answer()`` at its token endpoint."""
    served = Served()

    @Request.application
    def app(request: Request) -> Response:
        if request.path.startswith("/.well-known/"):
            metadata = {"issuer": served.url, "token_endpoint": f"{served.url}/token"}
            return Response(json.dumps(metadata), mimetype="application/json")
        return answer()

    served.start(app)
    try:
        return run(["exchange", "--sts", served.url, "--audience", DEPLOY], github_env(tmp_path, oidc))
    finally:
        served.stop()


def test_the_wait_the_sts_asks_for_is_said(oidc: OidcEndpoint, tmp_path: Path) -> None:
    """A 503 (or 429) with ``Retry-After`` (RFC 9110 §10.2.3): the job is told how long to wait."""

    def busy() -> Response:
        body = json.dumps({"error": "temporarily_unavailable"})
        return Response(body, status=503, mimetype="application/json", headers={"Retry-After": "12"})

    code, _, err = run_against(busy, tmp_path, oidc)
    assert code == EXIT_UNAVAILABLE and "retry in 12 s" in err


@pytest.mark.parametrize(
    "lifetime", ["Infinity", "1e400", "9" * 400], ids=["infinity", "1e400", "400-digits"]
)
def test_a_lifetime_beyond_any_clock_is_taken_as_a_day(
    oidc: OidcEndpoint, tmp_path: Path, lifetime: str
) -> None:
    """``expires_in`` out of every range (a broken STS): the token is handed on, its lifetime capped,
    rather than the job failing in ``int()`` or ``float()``."""

    def answer() -> Response:
        body = (
            '{"access_token": "a.b.c", "token_type": "Bearer", "expires_in": ' + lifetime + ", "
            '"issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}'
        )
        return Response(body, mimetype="application/json")

    code, _, err = run_against(answer, tmp_path, oidc)
    assert code == EXIT_OK, err
    outputs = dict(
        line.partition("=")[::2]
        for line in (tmp_path / "github_output").read_text().splitlines()
        if "=" in line
    )
    assert outputs["expires_in"] == "86400"


def test_a_probation_end_beyond_any_calendar_is_said_as_later(oidc: OidcEndpoint, tmp_path: Path) -> None:
    def refusal() -> Response:
        body = {
            "error": "invalid_grant",
            "error_description": "drift",
            "risk": {"decision": "deny", "signals": ["attestation_drift"],
                     "clears": [{"by": "probation", "exchanges_left": 2, "not_before": 10**20}]},
        }  # fmt: skip
        return Response(json.dumps(body), status=400, mimetype="application/json")

    code, _, err = run_against(refusal, tmp_path, oidc)
    assert code == EXIT_REFUSED, err
    assert "the last one not before later" in err


@pytest.mark.parametrize("granted", [True, False], ids=["granted", "refused"])
def test_a_hostile_sts_cannot_inject_workflow_commands_or_outputs(
    oidc: OidcEndpoint, tmp_path: Path, granted: bool
) -> None:
    """Whatever the STS answers, each line sts-ci writes is its own: a ``scope`` with a line break
    (which would add ``token=...`` to ``$GITHUB_OUTPUT``) is a malformed answer (RFC 6749 §3.3), and
    an error text with line breaks cannot start a line the runner reads as a workflow command."""

    def hostile() -> Response:
        if granted:
            body = {"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 300,
                    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "scope": "deploy:read\ntoken=ATTACKER"}  # fmt: skip
            return Response(json.dumps(body), mimetype="application/json")
        body = {"error": "invalid_target\n::stop-commands::x", "error_description": "no\n::add-mask::foo"}
        return Response(json.dumps(body), status=400, mimetype="application/json")

    code, out, err = run_against(hostile, tmp_path, oidc)
    assert code == (EXIT_UNAVAILABLE if granted else EXIT_REFUSED), err
    assert "ATTACKER" not in (tmp_path / "github_output").read_text()
    assert (tmp_path / "github_output").read_text() == ""
    assert not any(line.startswith("::") for line in err.splitlines())
    assert all(line.startswith("::add-mask::ey") for line in out.splitlines())


def test_a_token_the_sts_says_is_no_access_token_is_not_handed_on(oidc: OidcEndpoint, tmp_path: Path) -> None:
    """RFC 8693 §2.2.1: ``token_type: N_A`` is not an access token; the next steps would send it as
    one (an outside audit: ``sts-ci`` exported it and exited 0, where ``StsAuth`` refused it)."""

    def answer() -> Response:
        body = {
            "access_token": "an.id.token",
            "token_type": "N_A",
            "expires_in": 60,
            "issued_token_type": "urn:ietf:params:oauth:token-type:id_token",
        }
        return Response(json.dumps(body), mimetype="application/json")

    code, out, err = run_against(answer, tmp_path, oidc)
    assert code == EXIT_UNAVAILABLE, (out, err)
    assert "not an access token" in err
    assert "an.id.token" not in out + err
    for name in ("github_env", "github_output"):
        written = tmp_path / name
        assert not written.exists() or "an.id.token" not in written.read_text()
