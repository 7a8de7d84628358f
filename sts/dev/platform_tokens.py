"""What each platform's workload token looks like: GitHub Actions, Kubernetes, GitLab CI, SPIFFE.

The claims and headers the real issuers send (see "Real workload tokens" in
the project standards), built by :class:`PlatformTokens` and signed by the
subclass's :meth:`~PlatformTokens.mint` (:class:`sts.dev.issuer.DevIssuer`).
Every method takes ``now`` so tests control time, and ``**extra`` claims that
are merged last: they add or override claims, and a claim given as ``None`` is
removed (to craft, say, a Kubernetes token without ``exp``).
"""

from __future__ import annotations

import secrets
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


class PlatformTokens(ABC):
    """Builds each platform's token shape over :meth:`mint` and :attr:`issuer_url`."""

    @property
    @abstractmethod
    def issuer_url(self) -> str:
        """The ``iss`` of the tokens (GitLab's instance host is taken from it too)."""

    @abstractmethod
    def mint(self, claims: Mapping[str, Any], *, header: Mapping[str, Any] | None = None) -> str:
        """Sign exactly ``claims``, with ``header`` merged over ``{"alg", "kid"}``."""

    def github_actions_token(
        self,
        *,
        audience: str,
        repository: str = "acme/app",
        repository_id: str = "123456",
        owner: str = "acme",
        owner_id: str = "7890",
        ref: str = "refs/heads/main",
        environment: str | None = None,
        event_name: str = "push",
        runner_environment: str = "github-hosted",
        workflow: str = "deploy.yml",
        actor: str = "octocat",
        actor_id: str = "583231",
        repository_visibility: str = "private",
        immutable_sub: bool = False,
        now: float | None = None,
        lifetime: int = 300,
        **extra: Any,
    ) -> str:
        """A GitHub Actions OIDC token (header ``typ: JWT``; ids are strings).

        ``sub`` follows GitHub's precedence: ``repo:OWNER/REPO:environment:ENV``
        when the job targets an environment, else ``repo:OWNER/REPO:pull_request``
        for ``pull_request`` events, else ``repo:OWNER/REPO:ref:REF``.  With
        ``immutable_sub`` the prefix is ``repo:OWNER@OWNER_ID/REPO@REPO_ID``.
        """
        owner_part, slash, repo_name = repository.partition("/")
        if not slash or not owner_part or not repo_name:
            raise ValueError("repository must be OWNER/REPO")
        prefix = (
            f"repo:{owner}@{owner_id}/{repo_name}@{repository_id}" if immutable_sub else f"repo:{repository}"
        )
        if environment is not None:
            sub = f"{prefix}:environment:{environment}"
        elif event_name == "pull_request":
            sub = f"{prefix}:pull_request"
        else:
            sub = f"{prefix}:ref:{ref}"
        iat, exp = _lifetime(now, lifetime)
        sha = secrets.token_hex(20)
        workflow_ref = f"{repository}/.github/workflows/{workflow}@{ref}"
        claims: dict[str, Any] = {
            "jti": str(uuid.uuid4()),
            "sub": sub,
            "aud": audience,
            "ref": ref,
            "sha": sha,
            "repository": repository,
            "repository_owner": owner,
            "repository_owner_id": owner_id,
            "repository_id": repository_id,
            "repository_visibility": repository_visibility,
            "run_id": str(1_000_000_000 + secrets.randbelow(9_000_000_000)),
            "run_number": "42",
            "run_attempt": "1",
            "runner_environment": runner_environment,
            "actor": actor,
            "actor_id": actor_id,
            "workflow": workflow,
            "head_ref": "",
            "base_ref": "",
            "event_name": event_name,
            "ref_type": "tag" if ref.startswith("refs/tags/") else "branch",
            "workflow_ref": workflow_ref,
            "workflow_sha": sha,
            "job_workflow_ref": workflow_ref,
            "job_workflow_sha": sha,
            "iss": self.issuer_url,
            "nbf": iat,
            "exp": exp,
            "iat": iat,
        }
        if environment is not None:
            claims["environment"] = environment
        return self.mint(_merge_claims(claims, extra), header={"typ": "JWT"})

    def kubernetes_token(
        self,
        *,
        audience: str | list[str],
        namespace: str = "payments",
        service_account: str = "api",
        pod: str | None = "api-7d9f",
        node: str = "node-a",
        service_account_uid: str | None = None,
        pod_uid: str | None = None,
        now: float | None = None,
        lifetime: int = 600,
        warnafter: int | None = None,
        **extra: Any,
    ) -> str:
        """A Kubernetes projected service-account token (TokenRequest API).

        No ``typ`` header, as real clusters send.  ``aud`` is always a list.
        Object uids are stable per name (so two tokens for one service account
        agree) unless given; pass a new ``service_account_uid`` to model a
        service account deleted and re-created under the same name.
        ``pod=None`` gives a token bound to no pod (``kubectl create token``).
        ``warnafter`` is an absolute timestamp: set it (with a long
        ``lifetime``) to model a cluster that silently extended the expiry.
        """
        iat, exp = _lifetime(now, lifetime)
        details: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account,
                "uid": service_account_uid or self._stable_uid("serviceaccount", namespace, service_account),
            },
        }
        if pod is not None:
            details["pod"] = {"name": pod, "uid": pod_uid or self._stable_uid("pod", namespace, pod)}
            details["node"] = {"name": node, "uid": self._stable_uid("node", "", node)}
        if warnafter is not None:
            details["warnafter"] = warnafter
        claims: dict[str, Any] = {
            "aud": [audience] if isinstance(audience, str) else list(audience),
            "exp": exp,
            "iat": iat,
            "iss": self.issuer_url,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": details,
            "nbf": iat,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        return self.mint(_merge_claims(claims, extra))

    def gitlab_token(
        self,
        *,
        audience: str,
        project_path: str = "acme/app",
        project_id: str = "4242",
        namespace_id: str = "77",
        ref: str = "main",
        ref_type: str = "branch",
        ref_protected: bool = True,
        pipeline_source: str = "push",
        environment: str | None = None,
        runner_environment: str = "gitlab-hosted",
        user_login: str = "dev-user",
        user_id: str = "1001",
        now: float | None = None,
        lifetime: int = 300,
        **extra: Any,
    ) -> str:
        """A GitLab CI ``id_tokens`` token (header ``typ: JWT``; ids are strings).

        ``sub`` is ``project_path:GROUP/PROJECT:ref_type:TYPE:ref:REF``.  For a
        merge request from a fork, pass the fork's ``project_path`` and
        ``project_id``: real GitLab names the fork there too.
        """
        namespace_path, slash, _ = project_path.rpartition("/")
        if not slash or not namespace_path:
            raise ValueError("project_path must be GROUP/PROJECT")
        iat, exp = _lifetime(now, lifetime)
        sha = secrets.token_hex(20)
        ref_path = f"refs/tags/{ref}" if ref_type == "tag" else f"refs/heads/{ref}"
        instance_host = urlsplit(self.issuer_url).netloc
        claims: dict[str, Any] = {
            "namespace_id": namespace_id,
            "namespace_path": namespace_path,
            "project_id": project_id,
            "project_path": project_path,
            "user_id": user_id,
            "user_login": user_login,
            "pipeline_id": str(100_000 + secrets.randbelow(900_000)),
            "pipeline_source": pipeline_source,
            "job_id": str(1_000_000 + secrets.randbelow(9_000_000)),
            "ref": ref,
            "ref_type": ref_type,
            "ref_path": ref_path,
            "ref_protected": "true" if ref_protected else "false",
            "runner_id": 1,
            "runner_environment": runner_environment,
            "sha": sha,
            "project_visibility": "private",
            "ci_config_ref_uri": f"{instance_host}/{project_path}//.gitlab-ci.yml@{ref_path}",
            "ci_config_sha": sha,
            "jti": str(uuid.uuid4()),
            "iss": self.issuer_url,
            "iat": iat,
            # GitLab back-dates nbf by a few seconds for clock skew.
            "nbf": iat - 5,
            "exp": exp,
            "sub": f"project_path:{project_path}:ref_type:{ref_type}:ref:{ref}",
            "aud": audience,
        }
        if environment is not None:
            claims["environment"] = environment
            claims["environment_protected"] = "false"
        return self.mint(_merge_claims(claims, extra), header={"typ": "JWT"})

    def spiffe_svid(
        self,
        spiffe_id: str,
        audience: str | list[str],
        *,
        now: float | None = None,
        lifetime: int = 300,
        **extra: Any,
    ) -> str:
        """A SPIFFE JWT-SVID: ``sub`` is the SPIFFE ID, ``aud`` a list, ``exp`` and ``iat``; ``typ: JWT``.

        No ``iss``, as SPIRE sends by default; add one through ``extra``.
        """
        parts = urlsplit(spiffe_id)
        if parts.scheme != "spiffe" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("spiffe_id must look like spiffe://trust-domain/path")
        iat, exp = _lifetime(now, lifetime)
        claims: dict[str, Any] = {
            "sub": spiffe_id,
            "aud": [audience] if isinstance(audience, str) else list(audience),
            "exp": exp,
            "iat": iat,
        }
        return self.mint(_merge_claims(claims, extra), header={"typ": "JWT"})

    def _stable_uid(self, kind: str, namespace: str, name: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.issuer_url}#{kind}/{namespace}/{name}"))


def _lifetime(now: float | None, lifetime: int) -> tuple[int, int]:
    issued_at = int(time.time() if now is None else now)
    return issued_at, issued_at + lifetime


def _merge_claims(claims: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**claims, **extra}
    return {name: value for name, value in merged.items() if value is not None}
