"""Kubernetes TokenReview client: is this projected token still bound to a live pod?

A projected service-account token stays cryptographically valid after its
pod is deleted; only the API server knows.  ``POST
/apis/authentication.k8s.io/v1/tokenreviews`` answers with
``status.authenticated``, ``status.user.username`` and ``status.audiences`` (which must hold
one of the audiences asked for,
https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-review-v1/)::

    POST /apis/authentication.k8s.io/v1/tokenreviews
    Authorization: Bearer <reviewer's own service-account token>
    {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
     "spec": {"token": "<the token under review>", "audiences": ["https://sts.example.com"]}}

This costs one round trip per exchange, so it is enabled per issuer
(``token_review_url``).  The reviewer's credential is read from a file on
every call, since Kubernetes rotates projected tokens in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from ..core.ports import TokenReviewUnavailable
from .http_body import BodyUnreadable, Outbound, read_body
from .tracing import outbound_headers

PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
_MAX_BYTES = 256 * 1024
#: Reviews in flight at once per reviewer; while that many hang, more are refused at once (503).
#: Half of a worker's default 8 request threads: an API server that hangs holds no more of them
#: (as a key set's fetch, sts/adapters/jwks_cache.py).
_CONCURRENT_REVIEWS = 4


class HttpTokenReviewer:
    def __init__(
        self,
        api_url: str,
        *,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        timeout: float = 2.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = api_url.rstrip("/") + PATH
        self.token_file = token_file
        self.verify: bool | str = str(ca_file) if ca_file else True
        self.timeout = timeout
        self.session = session or requests.Session()
        #: Each review's helper thread (see :class:`~sts.adapters.http_body.Outbound`).
        self._outbound = Outbound(_CONCURRENT_REVIEWS)

    def review(self, token: str, audiences: tuple[str, ...]) -> str | None:
        headers = {"Content-Type": "application/json", "Accept": "application/json", **outbound_headers()}
        if self.token_file is not None:
            try:
                credential = self.token_file.read_text("utf-8").strip()
            except OSError as exc:
                raise TokenReviewUnavailable(f"reviewer token unreadable: {exc.strerror}") from None
            headers["Authorization"] = f"Bearer {credential}"
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }

        def post() -> bytes:
            with self.session.post(
                self.url,
                data=json.dumps(body),
                headers=headers,
                timeout=self.timeout,
                verify=self.verify,
                allow_redirects=False,
                stream=True,
            ) as response:
                if response.status_code != 201 and response.status_code != 200:
                    raise TokenReviewUnavailable(f"HTTP {response.status_code}")
                # Bounded in size and time: a huge or trickled answer must not hold the exchange.
                return read_body(response, max_bytes=_MAX_BYTES, timeout=self.timeout)

        try:
            # The whole answer, status line and headers included, within twice the timeout.
            content = self._outbound.run(post, 2 * self.timeout)
        except requests.RequestException as exc:
            raise TokenReviewUnavailable(type(exc).__name__) from None
        except BodyUnreadable as exc:
            raise TokenReviewUnavailable(str(exc)) from None
        try:
            document = json.loads(content)
        except (ValueError, RecursionError):
            raise TokenReviewUnavailable("malformed response") from None
        # Anything but the documented shape is the API's fault, not the token's: answer 503
        # (and never let an AttributeError on a stray type become a 500).
        if not isinstance(document, dict):
            raise TokenReviewUnavailable("malformed response")
        status = document.get("status") or {}
        if not isinstance(status, dict):
            raise TokenReviewUnavailable("malformed response")
        # An error beside authenticated (the API reference: "error indicates that the token
        # couldn't be checked") leaves the answer in doubt: not authenticated, fail closed.
        if status.get("authenticated") is not True or status.get("error"):
            return None
        user = status.get("user")
        if not isinstance(user, dict):
            raise TokenReviewUnavailable("malformed response")
        # The API reference (TokenReviewStatus.audiences): a client that sets spec.audiences should
        # find one of them in status.audiences; none there means the token was valid for the API
        # server's own audience only, or a server unaware of audiences: not authenticated for us
        # (an outside audit had both answers granted, as live posture evidence).
        answered = status.get("audiences")
        if not isinstance(answered, list) or not {a for a in answered if isinstance(a, str)} & set(audiences):
            return None
        username = user.get("username")
        return username if isinstance(username, str) else None
