"""Verification keys of trusted issuers, from a JWK Set given in the configuration or a file.

Three adapters for :class:`sts.core.ports.IssuerKeys`:

* :class:`StaticJWKS` holds a JWK Set (RFC 7517 §5) given in the
  configuration (a client's inline ``jwks``).
* :class:`FileJWKS` reads a JWK Set from a file once, at start.
* :class:`sts.adapters.jwks_cache.HttpJWKS` fetches it from an issuer's
  ``jwks_uri`` (:mod:`sts.adapters.jwks_fetch`), caches it as the response
  allows and refreshes it on a rotation.

All three load a key set through the same filter,
:func:`sts.adapters.jwks_acceptance.index_key_set`: only public, asymmetric
signature keys are kept (no private or symmetric keys, RSA of at least 2048
bits with exponent 65537, ``use: sig``, ``key_ops`` with ``verify``), and a key
is chosen only by ``kid`` and an allow-listed algorithm that fits it, never
from the token's own headers (RFC 8725 §3.1, §3.10).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from joserfc.jwk import Key

from sts.core.ports import UnknownKeyId
from sts.errors import ConfigurationError

from .jwks_acceptance import BadKeySet, allowed_algorithms, check_request, index_key_set, quote_untrusted

__all__ = ["FileJWKS", "StaticJWKS"]


class StaticJWKS:
    """Keys from a JWK Set given as a parsed JSON object (for example inline in the configuration).

    Used for a client registered with its ``jwks`` (RFC 7591 §2) rather than
    a ``jwks_uri``.  A document that is not a JWK Set, or holds no usable key
    for ``algorithms``, raises :class:`~sts.errors.ConfigurationError` naming
    ``source``, so the service refuses to start.
    """

    def __init__(
        self, jwks: Mapping[str, Any], *, algorithms: Collection[str], source: str = "inline JWKS"
    ) -> None:
        self._source = source
        self._algorithms = allowed_algorithms(algorithms, source)
        document: object = jwks
        if isinstance(jwks, Mapping) and isinstance(jwks.get("keys"), list | tuple):
            # Configuration loaders may hand over frozen mappings and tuples.
            entries = [dict(entry) if isinstance(entry, Mapping) else entry for entry in jwks["keys"]]
            document = {**jwks, "keys": entries}
        try:
            index = index_key_set(document, self._algorithms, source)
        except BadKeySet as exc:
            raise ConfigurationError(f"{source}: not a JWK Set: {exc}") from exc
        if index.usable == 0:
            raise ConfigurationError(
                f"{source}: no usable public signature key for {sorted(self._algorithms)}"
                " (see the warnings logged above)"
            )
        self._index = index

    def key_for(self, kid: str | None, alg: str) -> Key:
        """Return the key for ``kid`` usable with ``alg``; raise :class:`UnknownKeyId` if there is none."""
        check_request(kid, alg, self._algorithms)
        key = self._index.keys.get((kid, alg))
        if key is None:
            raise UnknownKeyId(f"{self._source}: no {alg} key with kid {quote_untrusted(kid)}")
        return key


#: The key-set files this process read (path to bytes), and those it reads from instead of the files
#: (see :func:`use_file_snapshot`).
_READ: dict[str, bytes] = {}
_SNAPSHOT: dict[str, bytes] = {}


def files_read() -> dict[str, bytes]:
    """The key-set files read so far by this process, as read: ``sts serve``'s main process gives
    them to its workers (:func:`use_file_snapshot`)."""
    return dict(_READ)


def use_file_snapshot(files: Mapping[str, bytes]) -> None:
    """Read these key-set files from ``files`` rather than from disk: a worker of ``sts serve``
    (one replacing a worker that died too) trusts the keys its main process read at start, not
    whatever the files hold by then, so one instance trusts one key set (as with its policies)."""
    _SNAPSHOT.clear()
    _SNAPSHOT.update(files)


class FileJWKS(StaticJWKS):
    """An issuer's keys from a local JWK Set file, read once at construction (under ``sts serve``,
    once by the main process: see :func:`use_file_snapshot`).

    For issuers whose keys are distributed out of band (a SPIFFE trust bundle,
    an air-gapped cluster's service-account keys).  A file that cannot be
    read, is not a JWK Set, or holds no usable key for ``algorithms`` raises
    :class:`~sts.errors.ConfigurationError` naming the path, so the service
    refuses to start.
    """

    def __init__(self, path: Path, *, algorithms: Collection[str]) -> None:
        self._path = Path(path)
        source = str(self._path)
        allowed_algorithms(algorithms, source)
        body = _SNAPSHOT.get(source)
        if body is None:
            try:
                body = self._path.read_bytes()
            except OSError as exc:
                raise ConfigurationError(f"{source}: cannot read JWKS file: {exc.strerror or exc}") from exc
        _READ[source] = body
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ConfigurationError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise ConfigurationError(f"{source}: not a JWK Set: not a JSON object")
        super().__init__(document, algorithms=algorithms, source=source)

    @property
    def path(self) -> Path:
        return self._path
