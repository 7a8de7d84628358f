"""The token-exchange request (RFC 8693 §2.1) from the workload's side, with DPoP when asked.

::

    POST /token HTTP/1.1
    Host: sts.example.com
    Content-Type: application/x-www-form-urlencoded
    DPoP: eyJ0eXAiOiJkcG9wK2p3dCIs...           (only with a DPoP key)

    grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange
    &subject_token=eyJhbGciOiJSUzI1NiIs...
    &subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt
    &audience=https%3A%2F%2Fdeploy.example.com&scope=deploy%3Awrite

    HTTP/1.1 200 OK
    Cache-Control: no-store

    {"access_token": "eyJ0eXAiOiJhdCtqd3Qi...", "issued_token_type":
     "urn:ietf:params:oauth:token-type:access_token", "token_type": "DPoP",
     "expires_in": 300, "scope": "deploy:write"}

An OAuth error becomes :class:`~sts_client.errors.ExchangeRefused` (the
step-up refusal included: ``is_step_up``); an STS that cannot be reached or
answers ``temporarily_unavailable``/5xx becomes
:class:`~sts_client.errors.StsUnavailable`.  With DPoP (RFC 9449 §8), a
``use_dpop_nonce`` answer is retried once with the nonce from its
``DPoP-Nonce`` header, and any ``DPoP-Nonce`` the server sends is used for
the next proof.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import requests

from .discovery import DiscoveryError, check_endpoint_url, fetch_metadata, get_json
from .dpop import DPoPKey
from .errors import ExchangeRefused, StsUnavailable
from .introspection import basic_credentials

__all__ = ["ACCESS_TOKEN_TYPE", "JWT_TOKEN_TYPE", "IssuedToken", "TokenExchangeClient", "origin_of"]

TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"
#: A token we hand on must be a token68-like string: never something that could break a header or a file.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: RFC 6749 §3.3 ``scope``: scope-tokens (%x21 / %x23-5B / %x5D-7E) one space apart, or empty.
_SCOPE = re.compile(r"(?:[\x21\x23-\x5b\x5d-\x7e]+(?: [\x21\x23-\x5b\x5d-\x7e]+)*)?")
#: Used when the STS does not say how long the token lives (RFC 8693 only recommends expires_in).
_ASSUMED_LIFETIME: Final = 60
#: The longest lifetime taken from an answer's ``expires_in`` (seconds).
_MAX_LIFETIME: Final = 86400


def origin_of(url: str) -> str:
    """``scheme://host[:port]``: the unit DPoP server nonces are kept per."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower().rpartition('@')[2]}"


@dataclass(frozen=True)
class IssuedToken:
    """An access token from the STS.  Its ``repr`` never shows the token."""

    access_token: str = field(repr=False)
    token_type: str
    expires_in: int
    issued_at: float
    scope: str | None = None
    issued_token_type: str = ACCESS_TOKEN_TYPE

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.expires_in

    @property
    def is_dpop(self) -> bool:
        return self.token_type.lower() == "dpop"


def access_token_only(issued: IssuedToken) -> IssuedToken:
    """``issued``, when it may be presented as an access token; RFC 8693 §2.2.1: ``N_A`` says the
    token is not one, so it never is (:class:`StsUnavailable`)."""
    if issued.token_type.lower() == "n_a":
        raise StsUnavailable("the STS issued a token that is not an access token (token_type N_A)")
    return issued


class TokenExchangeClient:
    """Exchanges workload credentials at one STS.

    ``sts_url`` is the STS's issuer identifier; the token endpoint comes from
    its metadata (RFC 8414) unless given.  ``client_credentials`` is an
    optional ``(client_id, secret)`` sent as ``client_secret_basic``.
    """

    def __init__(
        self,
        sts_url: str,
        *,
        session: requests.Session | None = None,
        token_endpoint: str | None = None,
        client_credentials: tuple[str, str] | None = None,
        dpop_key: DPoPKey | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_endpoint_url(sts_url, "sts_url")
        if token_endpoint is not None:
            check_endpoint_url(token_endpoint, "token_endpoint")
        self.sts_url = sts_url
        self._session = session or requests.Session()
        self._token_endpoint = token_endpoint
        self._authorization = basic_credentials(*client_credentials) if client_credentials else None
        self.dpop_key = dpop_key
        self._timeout = timeout
        self._clock = clock
        self._nonces: dict[str, str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenExchangeClient({self.sts_url!r}, dpop={self.dpop_key is not None})"

    def token_endpoint(self) -> str:
        with self._lock:
            if self._token_endpoint is None:
                try:
                    metadata = fetch_metadata(self.sts_url, session=self._session, timeout=self._timeout)
                except DiscoveryError as exc:
                    raise StsUnavailable(f"cannot read the STS metadata: {exc}") from None
                if metadata.token_endpoint is None:
                    raise StsUnavailable("the STS metadata names no token_endpoint")
                self._token_endpoint = metadata.token_endpoint
            return self._token_endpoint

    def exchange(
        self,
        subject_token: str,
        *,
        audience: str | Sequence[str] | None = None,
        resource: str | Sequence[str] | None = None,
        scope: str | Sequence[str] | None = None,
        subject_token_type: str = JWT_TOKEN_TYPE,
        requested_token_type: str | None = None,
        actor_token: str | None = None,
        actor_token_type: str = JWT_TOKEN_TYPE,
        posture_token: str | None = None,
        acr_values: str | Sequence[str] | None = None,
    ) -> IssuedToken:
        """One token exchange; raises :class:`ExchangeRefused` or :class:`StsUnavailable`.

        ``posture_token`` is the STS's extension parameter (posture evidence about the
        same subject); ``acr_values`` asks for an assurance level (RFC 9470).
        """
        form: list[tuple[str, str]] = [
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", subject_token),
            ("subject_token_type", subject_token_type),
        ]
        for name, values in (("audience", audience), ("resource", resource)):
            for value in [values] if isinstance(values, str) else list(values or ()):
                form.append((name, value))
        if scope:
            form.append(("scope", scope if isinstance(scope, str) else " ".join(scope)))
        if requested_token_type:
            form.append(("requested_token_type", requested_token_type))
        if actor_token is not None:
            form += [("actor_token", actor_token), ("actor_token_type", actor_token_type)]
        if posture_token is not None:
            form.append(("posture_token", posture_token))
        if acr_values:
            form.append(("acr_values", acr_values if isinstance(acr_values, str) else " ".join(acr_values)))
        endpoint = self.token_endpoint()
        status, body, headers = self._post(endpoint, form)
        if self.dpop_key is not None and status == 400 and _error_of(body) == "use_dpop_nonce":
            # RFC 9449 §8: the server wants a nonce in the proof; the answer carried it.  Once.
            if not headers.get("DPoP-Nonce"):
                raise ExchangeRefused(status, body if isinstance(body, dict) else {})
            status, body, headers = self._post(endpoint, form)
        if status == 200 and isinstance(body, dict):
            return self._issued(body)
        error = _error_of(body)
        if error is not None and status in (400, 401, 403) and error != "temporarily_unavailable":
            # RFC 6749 §5.2: an OAuth error response is 400 (401 for invalid_client).
            raise ExchangeRefused(status, body)
        wait = retry_after(headers)
        if error is not None:
            raise StsUnavailable(
                f"the STS answered {error} (HTTP {status})", status=status, error=error, retry_after=wait
            )
        raise StsUnavailable(
            f"the STS answered HTTP {status} without an OAuth response", status=status, retry_after=wait
        )

    def _post(self, endpoint: str, form: list[tuple[str, str]]) -> tuple[int, Any, Any]:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        origin = origin_of(endpoint)
        if self.dpop_key is not None:
            with self._lock:
                nonce = self._nonces.get(origin)
            headers["DPoP"] = self.dpop_key.proof("POST", endpoint, nonce=nonce, now=self._clock())
        try:
            status, body, response_headers = get_json(
                self._session, endpoint, timeout=self._timeout, method="POST", headers=headers, data=form
            )
        except DiscoveryError as exc:
            raise StsUnavailable(str(exc)) from None
        fresh_nonce = response_headers.get("DPoP-Nonce")
        if self.dpop_key is not None and fresh_nonce:
            with self._lock:
                self._nonces[origin] = fresh_nonce
        return status, body, response_headers

    def _issued(self, body: dict[str, Any]) -> IssuedToken:
        token = body.get("access_token")
        token_type = body.get("token_type")
        if not isinstance(token, str) or not _TOKEN_CHARS.fullmatch(token) or not isinstance(token_type, str):
            raise StsUnavailable("the STS answered 200 without a usable access_token and token_type")
        if token_type.lower() not in ("bearer", "dpop", "n_a"):
            raise StsUnavailable("the STS issued a token of an unknown token_type")
        if token_type.lower() == "dpop" and self.dpop_key is None:
            raise StsUnavailable("the STS issued a DPoP-bound token without being asked")
        expires_in = body.get("expires_in")
        lifetime = (
            # At most a day: an infinite or 400-digit lifetime from a broken STS is no reason to
            # keep a token forever (nor to fail in int() or float()).  NaN is not > 0.
            int(min(expires_in, _MAX_LIFETIME))
            if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0
            else _ASSUMED_LIFETIME
        )
        scope = body.get("scope")
        if scope is not None and (not isinstance(scope, str) or not _SCOPE.fullmatch(scope)):
            # RFC 6749 §3.3: scope-tokens of %x21 / %x23-5B / %x5D-7E, one space apart; anything else
            # (a line break, say) would be carried into logs and CI outputs as it is.
            raise StsUnavailable("the STS answered 200 with a malformed scope")
        issued_type = body.get("issued_token_type")
        return IssuedToken(
            access_token=token,
            token_type=token_type,
            expires_in=lifetime,
            issued_at=self._clock(),
            scope=scope if isinstance(scope, str) else None,
            issued_token_type=issued_type if isinstance(issued_type, str) else ACCESS_TOKEN_TYPE,
        )


def retry_after(headers: Any) -> int | None:
    """``Retry-After`` as delay-seconds (RFC 9110 §10.2.3; the STS sends no HTTP-date), capped at a
    day; None when absent or not a number."""
    value = headers.get("Retry-After") if headers is not None else None
    if not isinstance(value, str) or not value.strip().isdigit() or not value.strip().isascii():
        return None
    return min(int(value.strip()), 86400)


def _error_of(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return None
