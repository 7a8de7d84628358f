"""The settings' cross-field rules: what the JSON Schema of the configuration cannot express.

Each rule raises :class:`~sts.errors.ConfigurationError` naming the setting it refuses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

from ..errors import ConfigurationError
from . import SPIFFE_ALGORITHMS, ReviewSettings, Settings, split_listen_address


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_https_url(value: str, what: str, *, allow_loopback_http: bool = True) -> None:
    """An https URL; plain http only on loopback, for development."""
    parts = urlsplit(value)
    if not parts.hostname or parts.scheme not in {"https", "http"}:
        raise ConfigurationError(f"{what}: {value!r} is not an absolute http(s) URL")
    if parts.scheme == "http" and not (allow_loopback_http and is_loopback_host(parts.hostname)):
        raise ConfigurationError(f"{what}: {value!r} must use https (plain http only on loopback)")
    if parts.fragment or parts.query:
        raise ConfigurationError(f"{what}: {value!r} must have no query or fragment")


def check_settings(s: Settings) -> None:
    """Cross-field rules the JSON Schema cannot express, in this order: the service's own
    settings, then the issuers, clients, transmitters and review page."""
    _check_service(s)
    issuer_names = _check_issuers(s)
    _check_clients(s)
    _check_transmitters(s, issuer_names)
    _check_review(s.review)


def _check_service(s: Settings) -> None:
    """Addresses, URLs and lifetimes of the service itself."""
    for proxy in s.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigurationError(f"setting trusted_proxies: {proxy!r} is not a network") from None
    try:
        # A bare address, as granian binds it: no name (``localhost`` got past the start's checks,
        # created the keys, then ended in a traceback: a review), no brackets, no IPv6 zone.
        if "%" in s.host:
            raise ValueError("zone")
        ipaddress.ip_address(s.host)
    except ValueError:
        raise ConfigurationError(
            f"setting host: {s.host!r} is not an IP address as granian binds it "
            "(127.0.0.1, ::1, 0.0.0.0, ::; no brackets, no %zone)"
        ) from None
    check_https_url(s.issuer, "setting issuer")
    if s.tracing.endpoint is not None:
        # Spans hold route names and ids, never tokens: plain http to a collector is allowed.
        parts = urlsplit(s.tracing.endpoint)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigurationError(
                f"setting tracing.endpoint: {s.tracing.endpoint!r} is not an http(s) URL"
            )
    if s.metrics_listen:
        try:
            metrics_host, metrics_port = split_listen_address(s.metrics_listen)
        except ConfigurationError as exc:
            raise ConfigurationError(f"setting metrics_listen: {exc}") from None
        if metrics_port == s.port:
            # Whatever the hosts: two names of one address (``localhost``, ``127.0.0.1``) were let
            # through, and the service then failed to bind with a traceback (an outside audit).
            raise ConfigurationError(
                f"setting metrics_listen: must not be on the service's own port ({s.port}); "
                f"{metrics_host or '*'}:{metrics_port} is"
            )
    if s.default_lifetime > s.max_lifetime:
        raise ConfigurationError("setting default_lifetime: must not exceed max_lifetime")
    if s.active_threads > s.threads:
        raise ConfigurationError("setting active_threads: must not exceed threads")
    if s.store == "redis" and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        # The scheme alone: the URL may hold a password (redis://:secret@host).
        scheme = s.redis_url.partition(":")[0][:20] if ":" in s.redis_url else "none"
        raise ConfigurationError(
            f"setting redis_url: the scheme {scheme!r} is not redis://, rediss:// or unix://"
        )
    if s.store == "redis" and not s.redis_url.startswith("unix://"):
        # As redis-py reads it (``parse_url``: urllib's port; a unix:// URL's netloc is not read).
        _check_port("redis_url", lambda: urlsplit(s.redis_url).port)
    if not s.database_url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        raise ConfigurationError("setting database_url: only sqlite and postgresql URLs are supported")
    if s.database_url.startswith("sqlite:") and "?" in s.database_url:
        # The driver takes none, and the path would be read with it (a new file named "x?mode=ro").
        raise ConfigurationError("setting database_url: a sqlite URL takes no query string")
    if s.database_url.startswith("sqlite:"):
        _check_sqlite_file(s.database_url)
    else:
        _check_port("database_url", lambda: _database_port(s.database_url))


def _database_port(url: str) -> int | None:
    """The port of a PostgreSQL URL as the engine reads it (SQLAlchemy's ``make_url``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).port
    except ArgumentError:
        # Its message holds the whole URL, password included: said here without it.
        raise ConfigurationError(
            "setting database_url: not a URL (postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME)"
        ) from None


def _check_port(setting: str, port_of: Callable[[], int | None]) -> None:
    """A URL's port, when it has one, is a number from 1 to 65535.

    The URLs are parsed only when a connection is made: a port that is not a number (or out of
    range) passed ``sts config check``, then every command that opened the database or the
    store ended in a ``ValueError`` traceback (an outside audit).  The message names the
    setting and never the URL, whose password it would show.
    """
    try:
        port = port_of()
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ConfigurationError(f"setting {setting}: the port is not a number from 1 to 65535")


def _check_sqlite_file(url: str) -> None:
    """A SQLite URL must name a file: every worker process, and every command, opens it.

    ``sqlite://`` (no path) made ``sts serve`` die with a ``TypeError`` traceback, and
    ``sqlite:///:memory:`` started a service that stayed not ready for ever: each connection of
    each process has a database of its own there, with no schema, no audit trail and no
    single-use record that another process sees (an outside audit).  ``file:`` URI names
    (``file::memory:``) are refused too: the driver is not opened in URI mode, so it would be a
    file of that odd name in the working directory, or with ``mode=memory``, memory again.
    """
    path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
    if not path.strip():
        raise ConfigurationError(
            f"setting database_url: {url!r} names no database file (sqlite:///PATH, or sqlite:////ABSOLUTE/PATH)"
        )
    if path.strip().lower() == ":memory:" or "mode=memory" in path:
        raise ConfigurationError(
            f"setting database_url: {url!r} is a database in memory, one per connection and process "
            "(no shared schema, audit trail or single-use records): name a file"
        )
    if path.startswith("file:"):
        raise ConfigurationError(
            f"setting database_url: {url!r}: SQLite URI names (file:...) are not supported: "
            "name the file's path"
        )


def _check_issuers(s: Settings) -> set[str]:
    """Trusted issuers: unique names, ``iss`` and trust domains, each profile's own options;
    returns their names."""
    names: set[str] = set()
    by_iss: dict[str, str] = {}
    by_trust_domain: dict[str, str] = {}
    for iss in s.issuers:
        where = f"issuers.{iss.name}"
        _check_unique("issuers", iss.name, iss.issuer, names, by_iss)
        if iss.jwks_uri:
            check_https_url(iss.jwks_uri, f"setting {where}.jwks_uri")
        if iss.profile == "spiffe":
            if not iss.trust_domain:
                raise ConfigurationError(f"setting {where}.trust_domain: required for the spiffe profile")
            # SVIDs without iss are routed by trust domain: a second entry would silently shadow the first.
            if iss.trust_domain in by_trust_domain:
                raise ConfigurationError(
                    f"setting {where}.trust_domain: {iss.trust_domain!r} is already the trust domain of "
                    f"issuers.{by_trust_domain[iss.trust_domain]}"
                )
            by_trust_domain[iss.trust_domain] = iss.name
            weak = set(iss.algorithms) - SPIFFE_ALGORITHMS
            if weak:
                raise ConfigurationError(
                    f"setting {where}.algorithms: {', '.join(sorted(weak))} not allowed for JWT-SVIDs"
                )
        elif iss.trust_domain:
            raise ConfigurationError(f"setting {where}.trust_domain: only for the spiffe profile")
        if iss.token_review_url:
            if iss.profile != "kubernetes":
                raise ConfigurationError(f"setting {where}.token_review_url: only for the kubernetes profile")
            check_https_url(iss.token_review_url, f"setting {where}.token_review_url")
        else:
            # Without the URL nothing is reviewed: a credential or CA alone would look like liveness
            # checking while doing none.
            for name in ("token_review_token_file", "token_review_ca_file"):
                if getattr(iss, name) is not None:
                    raise ConfigurationError(f"setting {where}.{name}: only with token_review_url")
        if iss.claim_mappings and iss.profile != "generic":
            raise ConfigurationError(f"setting {where}.claim_mappings: only for the generic profile")
        if iss.issuer.rstrip("/") == s.issuer.rstrip("/"):
            raise ConfigurationError(f"setting {where}.issuer: must not be this service's own issuer")
    return names


def _check_clients(s: Settings) -> None:
    """Clients: unique ids; a secret hash, or exactly one source of keys for private_key_jwt."""
    ids: set[str] = set()
    for client in s.clients:
        where = f"clients.{client.client_id}"
        if client.client_id in ids:
            raise ConfigurationError(f"setting {where}: duplicate client_id")
        ids.add(client.client_id)
        if client.auth_method == "none":
            # RFC 7591 §2: a public client, named by its client_id alone, which proves nothing.
            if client.secret_hash or client.jwks or client.jwks_file or client.jwks_uri or client.audiences:
                raise ConfigurationError(
                    f"setting {where}: a public client (auth_method none) "
                    "has no secret_hash, keys or audiences"
                )
            continue
        if client.auth_method.startswith("client_secret"):
            if not client.secret_hash:
                raise ConfigurationError(f"setting {where}.secret_hash: required for {client.auth_method}")
        else:
            sources = [x for x in (client.jwks, client.jwks_file, client.jwks_uri) if x]
            if len(sources) != 1:
                raise ConfigurationError(
                    f"setting {where}: private_key_jwt needs exactly one of jwks, jwks_file, jwks_uri"
                )
            if client.jwks_uri:
                check_https_url(client.jwks_uri, f"setting {where}.jwks_uri")


def _check_unique(kind: str, name: str, iss: str, names: set[str], by_iss: dict[str, str]) -> None:
    """Names are unique, and so is ``iss``: tokens (and SETs) are matched by their exact ``iss``,
    so a second entry with the same one would silently shadow the first."""
    if name in names:
        raise ConfigurationError(f"setting {kind}.{name}: duplicate {kind.removesuffix('s')} name")
    names.add(name)
    if iss in by_iss:
        raise ConfigurationError(
            f"setting {kind}.{name}.issuer: {iss!r} is already the issuer of {kind}.{by_iss[iss]}"
        )
    by_iss[iss] = name


def _check_transmitters(s: Settings, issuer_names: set[str]) -> None:
    """Transmitters are validated like issuers: unique names and ``iss``, https key URLs."""
    names: set[str] = set()
    by_iss: dict[str, str] = {}
    for t in s.transmitters:
        where = f"transmitters.{t.name}"
        _check_unique("transmitters", t.name, t.issuer, names, by_iss)
        if t.issuer.rstrip("/") == s.issuer.rstrip("/"):
            raise ConfigurationError(f"setting {where}.issuer: must not be this service's own issuer")
        if t.jwks_uri:
            check_https_url(t.jwks_uri, f"setting {where}.jwks_uri")
        if t.subject_issuers is not None:
            unknown = sorted(set(t.subject_issuers) - issuer_names - {"self"})
            if unknown:
                raise ConfigurationError(
                    f"setting {where}.subject_issuers: {', '.join(unknown)} not configured under issuers"
                )


def _check_review(review: ReviewSettings) -> None:
    """Users are checked here; their hashes when the page is built (sts.wiring.review), as clients' are."""
    if review.enabled and not review.users:
        raise ConfigurationError("setting review.users: at least one user is needed when review.enabled")
    names: set[str] = set()
    for user in review.users:
        if user.username in names:
            raise ConfigurationError(f"setting review.users.{user.username}: duplicate username")
        names.add(user.username)
