"""Attestation sources: where a workload gets the credential it exchanges at the STS.

Each source's :meth:`~AttestationSource.fetch` returns the workload's current
token from its platform; it is called for every exchange, so a renewal (after
a step-up demand) always presents what the platform has now:

* :class:`FileAttestation`: a file the platform keeps fresh -- a Kubernetes
  projected service-account token, or the JWT-SVID a SPIFFE helper writes.
* :class:`GitHubActionsAttestation`: a new OIDC token from the job's token
  request endpoint (needs ``permissions: id-token: write``).
* :class:`GitLabCIAttestation`: an ``id_tokens`` token from its environment
  variable (fixed for the job: it cannot be renewed within the job).
* :class:`CallableAttestation`: anything else.

Tokens are credentials: none of these log them or put them in messages.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import quote

import requests

from .discovery import DiscoveryError, check_endpoint_url, get_json
from .errors import AttestationUnavailable

__all__ = [
    "AttestationSource",
    "CallableAttestation",
    "FileAttestation",
    "GitHubActionsAttestation",
    "GitLabCIAttestation",
]

_MAX_TOKEN_BYTES = 64 * 1024


@runtime_checkable
class AttestationSource(Protocol):
    """Gives the workload's current credential (a JWT) each time it is asked."""

    #: Whether asking again can give a newer credential (so a step-up can be answered).
    renewable: bool

    def fetch(self) -> str:
        """The credential; raises :class:`~sts_client.errors.AttestationUnavailable`."""
        ...


def _checked(token: str, where: str) -> str:
    token = token.strip()
    if not token:
        raise AttestationUnavailable(f"{where} is empty")
    if len(token) > _MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        raise AttestationUnavailable(f"{where} does not hold a single token")
    return token


#: Seconds a token file that was not found is waited for before one more read (see ``fetch``).
_SWAP_WAIT = 0.05


class FileAttestation:
    """A token file, read again on every fetch (the kubelet or a SPIFFE helper rewrites it).

    Kubernetes (``serviceAccountToken`` projection)::

        FileAttestation("/var/run/secrets/tokens/sts-token")
    """

    renewable = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileAttestation({str(self.path)!r})"

    def fetch(self) -> str:
        try:
            try:
                raw = self._read()
            except FileNotFoundError:
                # The kubelet swaps its ``..data`` link to a new directory, then removes the old
                # one: a read that resolved the old path in between finds nothing.  Once more,
                # after the swap (an outside audit saw 10 in 21,564 reads during rotation).
                time.sleep(_SWAP_WAIT)
                raw = self._read()
            text = raw.decode("ascii")
        except (OSError, UnicodeError) as exc:
            raise AttestationUnavailable(
                f"cannot read the token file {self.path}: {type(exc).__name__}"
            ) from None
        return _checked(text, f"the token file {self.path}")

    def _read(self) -> bytes:
        # A regular file (symlinks followed, as the kubelet's ``..data`` swap needs), read up to
        # just past the largest token taken: not a FIFO that blocks, nor /dev/zero, nor a huge
        # file read whole before the size check (an outside audit).
        if not stat.S_ISREG(self.path.stat().st_mode):
            raise AttestationUnavailable(f"the token file {self.path} is not a regular file")
        with self.path.open("rb") as file:
            return file.read(_MAX_TOKEN_BYTES + 1)


class GitHubActionsAttestation:
    """A fresh GitHub Actions OIDC token for ``audience``, requested from the job's runtime.

    The runner gives a job that has ``permissions: id-token: write`` two
    environment variables; the request is::

        GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=https%3A%2F%2Fsts.example.com
        Authorization: bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN

        {"value": "eyJhbGciOiJSUzI1NiIs..."}
    """

    renewable = True

    def __init__(
        self,
        audience: str,
        *,
        session: requests.Session | None = None,
        environ: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.audience = audience
        self._session = session or requests.Session()
        self._environ = environ
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"GitHubActionsAttestation(audience={self.audience!r})"

    def fetch(self) -> str:
        environ = os.environ if self._environ is None else self._environ
        url = environ.get("ACTIONS_ID_TOKEN_REQUEST_URL")
        request_token = environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
        if not url or not request_token:
            raise AttestationUnavailable(
                "ACTIONS_ID_TOKEN_REQUEST_URL / ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set: "
                "give the job `permissions: id-token: write`"
            )
        try:
            # The job's request token goes only over TLS (or to a loopback host), as every URL here.
            check_endpoint_url(url, "ACTIONS_ID_TOKEN_REQUEST_URL")
        except ValueError as exc:
            raise AttestationUnavailable(str(exc)) from None
        separator = "&" if "?" in url else "?"
        full = f"{url}{separator}audience={quote(self.audience, safe='')}"
        try:
            status, body, _ = get_json(
                self._session,
                full,
                timeout=self._timeout,
                headers={"Authorization": f"bearer {request_token}"},
            )
        except DiscoveryError as exc:
            raise AttestationUnavailable(f"the GitHub OIDC token request failed: {exc}") from None
        except UnicodeError:
            # requests sends header values in ISO-8859-1: a request token outside it is not the runner's.
            raise AttestationUnavailable("ACTIONS_ID_TOKEN_REQUEST_TOKEN is not a usable token") from None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("value"), str):
            raise AttestationUnavailable(f"the GitHub OIDC token request answered HTTP {status}")
        return _checked(body["value"], "the GitHub OIDC token")


class GitLabCIAttestation:
    """A GitLab CI ``id_tokens`` token, from the environment variable it is exposed in.

    ``.gitlab-ci.yml``::

        deploy:
          id_tokens:
            STS_ID_TOKEN:
              aud: https://sts.example.com

    GitLab creates these tokens when the job starts, so asking again gives
    the same token (``renewable`` is False): a job whose token is too old
    for the STS must be re-run.
    """

    renewable = False

    def __init__(self, variable_name: str = "STS_ID_TOKEN", *, environ: Mapping[str, str] | None = None):
        self.variable_name = variable_name
        self._environ = environ

    def __repr__(self) -> str:
        return f"GitLabCIAttestation({self.variable_name!r})"

    def fetch(self) -> str:
        environ = os.environ if self._environ is None else self._environ
        value = environ.get(self.variable_name)
        if not value:
            raise AttestationUnavailable(
                f"the variable {self.variable_name} is not set: declare it under `id_tokens:` in the job"
            )
        return _checked(value, f"the variable {self.variable_name}")


class CallableAttestation:
    """Any function returning the current credential, e.g. a SPIFFE Workload API client call."""

    def __init__(self, fn: Callable[[], str], *, renewable: bool = True) -> None:
        self._fn = fn
        self.renewable = renewable

    def __repr__(self) -> str:
        return f"CallableAttestation({getattr(self._fn, '__name__', 'fn')})"

    def fetch(self) -> str:
        token = self._fn()
        if not isinstance(token, str):
            raise AttestationUnavailable("the attestation function did not return a string")
        return _checked(token, "the token from the attestation function")
