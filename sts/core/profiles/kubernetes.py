"""Kubernetes projected service-account tokens.

``sub`` is ``system:serviceaccount:NAMESPACE:NAME`` and the ``kubernetes.io``
claim holds namespace, service account, and (for pod-bound tokens) pod and
node, each with a uid.  Legacy secret-based tokens (``iss:
kubernetes/serviceaccount``, flat ``kubernetes.io/serviceaccount/*``
claims, no ``exp``) never expire and are refused.  Clusters may silently
extend a projected token's expiry; ``warnafter`` marks the expiry the pod
asked for, and the issuer's ``max_token_age`` (3600 s unless configured)
bounds the age whatever ``exp`` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..claims import numeric_date_value
from .base import ProfileOptions, refuse

NAME = "kubernetes"
LEGACY_ISSUER = "kubernetes/serviceaccount"
DEFAULT_MAX_TOKEN_AGE = 3600


def _named(obj: Any, what: str) -> tuple[str, str | None]:
    if not isinstance(obj, Mapping) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise refuse(NAME, f"malformed_{what}")
    uid = obj.get("uid")
    if uid is not None and not isinstance(uid, str):
        raise refuse(NAME, f"malformed_{what}")
    return obj["name"], uid


class KubernetesProfile:
    name = NAME

    def check_options(self, issuer_name: str, options: ProfileOptions) -> None:
        return None

    def facts(self, subject: str, claims: Mapping[str, Any], options: ProfileOptions) -> dict[str, Any]:
        if claims.get("iss") == LEGACY_ISSUER or any(
            k.startswith("kubernetes.io/serviceaccount/") for k in claims
        ):
            raise refuse(NAME, "legacy_token")
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, Mapping):
            raise refuse(NAME, "missing_kubernetes_claim")
        namespace = k8s.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise refuse(NAME, "malformed_namespace")
        sa_name, sa_uid = _named(k8s.get("serviceaccount"), "serviceaccount")
        if subject != f"system:serviceaccount:{namespace}:{sa_name}":
            raise refuse(NAME, "sub_mismatch")
        if claims.get("iat") is None:
            raise refuse(NAME, "missing_iat")
        facts: dict[str, Any] = {
            "namespace": namespace,
            "service_account": sa_name,
            "service_account_uid": sa_uid,
            "pod": None,
            "pod_uid": None,
            "node": None,
            "node_uid": None,
        }
        if "pod" in k8s:
            facts["pod"], facts["pod_uid"] = _named(k8s["pod"], "pod")
        if "node" in k8s:
            facts["node"], facts["node_uid"] = _named(k8s["node"], "node")
        if "warnafter" in k8s:
            # A NumericDate like exp (:mod:`..claims`): a finite JSON number a float can hold.
            if numeric_date_value(k8s["warnafter"]) is None:
                raise refuse(NAME, "malformed_warnafter")
            facts["warnafter"] = k8s["warnafter"]
        return facts
