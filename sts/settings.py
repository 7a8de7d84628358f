"""Settings: declared once, read from one YAML file plus ``STS_*`` variables, validated, frozen.

Order of precedence: built-in defaults < configuration file < environment.
The file is named by ``--config`` or ``STS_CONFIG``; without either,
``./sts.yaml`` is used when it exists.  Every scalar setting ``name`` can be
overridden by the variable ``STS_NAME`` (``STS_ISSUER``, ``STS_PORT``...).
Secrets come only from the environment (``STS_KEY_PASSPHRASE``).

A bad setting raises :class:`~sts.errors.ConfigurationError` naming it, and
the service does not start.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml

from .errors import ConfigurationError

TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
SPIFFE_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


@dataclass(frozen=True)
class IssuerSettings:
    """A trusted upstream issuer of subject (and actor) tokens."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    max_token_age: int | None = None
    max_token_lifetime: int | None = None
    token_types: tuple[str, ...] = (TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN)
    typ: tuple[str | None, ...] = (None, "JWT")
    require_jti: bool = False
    jwks_max_stale: int = 3600
    profile: str = "generic"
    claim_mappings: Mapping[str, str] = field(default_factory=dict)
    trust_domain: str | None = None
    token_review_url: str | None = None
    token_review_token_file: Path | None = None
    token_review_ca_file: Path | None = None
    #: Trusted to assert delegation: an ``act`` chain in its tokens is carried into ours (another STS).
    trusted_delegation: bool = False


@dataclass(frozen=True)
class ClientSettings:
    """A registered client: how it authenticates (RFC 6749 §2.3, RFC 7523 §2.2)."""

    client_id: str
    auth_method: str
    secret_hash: str | None = None
    jwks: Mapping[str, Any] | None = None
    jwks_file: Path | None = None
    jwks_uri: str | None = None
    algorithms: tuple[str, ...] = ("ES256", "RS256", "PS256", "EdDSA")
    audiences: tuple[str, ...] = ()


@dataclass(frozen=True)
class TransmitterSettings:
    """A Shared Signals transmitter whose Security Event Tokens (RFC 8417) this service accepts."""

    name: str
    issuer: str
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    #: The ``aud`` the SETs must name; None means this service's own ``issuer``.
    audience: str | None = None
    #: How long a ``session-revoked`` event blocks the subject (seconds).
    block_duration: int = 3600
    #: Refuse SETs issued (``iat``) longer ago than this (seconds).
    max_age: int = 86400
    #: Names of the configured issuers whose subjects this transmitter may name; None means all.
    subject_issuers: tuple[str, ...] | None = None
    jwks_max_stale: int = 3600


@dataclass(frozen=True)
class ReviewUser:
    """An operator who may sign in to the review page; the hash is made by ``sts clients secret``."""

    username: str
    password_hash: str = field(repr=False)


@dataclass(frozen=True)
class ReviewSettings:
    """The review page (``/review/``): off unless enabled, with its own users."""

    enabled: bool = False
    users: tuple[ReviewUser, ...] = ()
    session_lifetime: int = 8 * 3600
    new_edge_days: int = 7


@dataclass(frozen=True)
class LimitSettings:
    """A sustained rate of ``requests`` per ``period`` seconds, with up to ``burst`` at once."""

    requests: int
    period: float
    burst: int


#: The endpoints that have limits, and the scopes each one knows.
RATE_LIMIT_SCOPES: Mapping[str, tuple[str, ...]] = {
    "token": ("global", "network", "client", "identity"),
    "introspect": ("global", "network", "client"),
    "revoke": ("global", "network", "client"),
    "ssf": ("global", "network", "client"),
}

#: Flood guards, on by default: far above what a well-behaved fleet sends (every replica of a
#: Kubernetes workload shares its identity, a node's pods share a /24), low enough that one
#: network or one stolen token cannot monopolise the service.  Quotas are the operator's to set.
DEFAULT_RATE_LIMITS: Mapping[str, Mapping[str, LimitSettings]] = {
    "token": {"network": LimitSettings(200, 1, 2000), "identity": LimitSettings(100, 1, 2000)},
    "introspect": {"network": LimitSettings(1000, 1, 10000), "client": LimitSettings(1000, 1, 10000)},
    "revoke": {"network": LimitSettings(50, 1, 500), "client": LimitSettings(50, 1, 500)},
    "ssf": {"network": LimitSettings(50, 1, 500), "client": LimitSettings(50, 1, 5000)},
}


@dataclass(frozen=True)
class RateLimitSettings:
    """``rate_limits``: per endpoint, per scope; ``enabled: false`` turns every limit off."""

    enabled: bool = True
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    limits: Mapping[str, Mapping[str, LimitSettings]] = field(default_factory=lambda: DEFAULT_RATE_LIMITS)


@dataclass(frozen=True)
class TracingSettings:
    """``tracing``: OpenTelemetry spans, exported over OTLP/HTTP (or printed, for a look)."""

    enabled: bool = False
    exporter: str = "otlp"
    #: OTLP/HTTP traces URL; None: the exporter's own default (``OTEL_EXPORTER_OTLP_*`` variables).
    endpoint: str | None = None
    service_name: str = "workload-sts"
    sample_ratio: float = 1.0


@dataclass(frozen=True)
class Settings:
    issuer: str = "http://127.0.0.1:8080"
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 2
    threads: int = 8
    #: Seconds to receive a request line and headers (also how long an idle keep-alive connection stays).
    header_read_timeout: int = 10
    #: Seconds to receive a request body, once its headers are in.
    body_read_timeout: int = 10
    #: Connections served at once by all workers together; more wait in the listen queue.
    max_connections: int = 1024
    #: ``HOST:PORT`` of the Prometheus ``/metrics`` listener (one per instance); None serves none.
    metrics_listen: str | None = None
    database_url: str = "sqlite:///var/sts.sqlite"
    #: PostgreSQL pools; None derives them from ``threads`` (see ``sts.app.database_pool``).
    database_pool_size: int | None = None
    database_max_overflow: int | None = None
    database_pool_timeout: int = 5
    database_startup_timeout: int = 10
    #: Upgrade the schema at start (under a database lock); off: not ready until ``sts db upgrade``.
    database_migrate_on_start: bool = True
    store: str = "embedded"
    redis_url: str = "redis://127.0.0.1:6379/0"
    keys_dir: Path = Path("keys")
    signing_alg: str = "ES256"
    key_rotation_min_published: int = 3600
    policies_dir: Path = Path("policies")
    default_lifetime: int = 300
    max_lifetime: int = 3600
    leeway: int = 30
    max_body_bytes: int = 16384
    max_client_assertion_lifetime: int = 3600
    log_level: str = "INFO"
    log_format: str = "text"
    trusted_proxies: tuple[str, ...] = ()
    # Ed25519 (RFC 9864) and its deprecated name EdDSA.
    dpop_algorithms: tuple[str, ...] = ("ES256", "ES384", "RS256", "PS256", "Ed25519", "EdDSA")
    dpop_max_age: int = 300
    dpop_nonce: bool = False
    mtls_client_cert_header: str | None = None
    issuers: tuple[IssuerSettings, ...] = ()
    clients: tuple[ClientSettings, ...] = ()
    transmitters: tuple[TransmitterSettings, ...] = ()
    review: ReviewSettings = field(default_factory=ReviewSettings)
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    key_passphrase: bytes | None = field(default=None, repr=False)
    config_file: Path | None = None

    @property
    def token_endpoint(self) -> str:
        return self.issuer.rstrip("/") + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/jwks.json"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``metrics_listen`` as ``(host, port)`` (an IPv6 host without its brackets), or None."""
        return split_listen_address(self.metrics_listen) if self.metrics_listen else None


def split_listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as ``(host, port)``; raises :class:`ConfigurationError`."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") if host.startswith("[") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigurationError(f"{value!r} is not HOST:PORT with a port from 1 to 65535")
    return host, int(port)


_SCALARS = {
    f.name: f.type
    for f in fields(Settings)
    if f.name
    not in {
        "issuers",
        "clients",
        "transmitters",
        "review",
        "key_passphrase",
        "config_file",
        "trusted_proxies",
        "dpop_algorithms",
        "rate_limits",
        "tracing",
    }
}
_INT_SETTINGS = {
    "port",
    "workers",
    "threads",
    "database_pool_size",
    "database_max_overflow",
    "database_pool_timeout",
    "database_startup_timeout",
    "header_read_timeout",
    "body_read_timeout",
    "max_connections",
    "key_rotation_min_published",
    "default_lifetime",
    "max_lifetime",
    "leeway",
    "max_body_bytes",
    "max_client_assertion_lifetime",
    "dpop_max_age",
}
_BOOL_SETTINGS = {"dpop_nonce", "database_migrate_on_start"}
_PATH_SETTINGS = {"keys_dir", "policies_dir"}


def _schema() -> dict[str, Any]:
    text = resources.files("sts.schemas").joinpath("config.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


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


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for name in _SCALARS:
        var = "STS_" + name.upper()
        if var in environ:
            value: Any = environ[var]
            if name in _BOOL_SETTINGS:
                if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ConfigurationError(f"{var}: {value!r} is not a boolean")
                value = value.lower() in {"true", "1", "yes"}
            elif name in _INT_SETTINGS:
                try:
                    value = int(value)
                except ValueError:
                    raise ConfigurationError(f"{var}: {value!r} is not an integer") from None
            raw[name] = value
    return raw


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, validate and freeze the settings.

    ``overrides`` (used by tests and the CLI) win over the environment, which
    wins over the file.
    """
    env = os.environ if environ is None else environ
    path: Path | None = None
    if config_file is not None:
        path = Path(config_file)
    elif env.get("STS_CONFIG"):
        path = Path(env["STS_CONFIG"])
    elif Path("sts.yaml").is_file():
        path = Path("sts.yaml")

    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise ConfigurationError(f"config file {path}: cannot be read ({exc.strerror})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"config file {path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigurationError(f"config file {path}: must be a mapping of settings")
        raw.update(loaded or {})
        base = path.resolve().parent
    raw.update(_env_overrides(env))
    if overrides:
        raw.update(overrides)

    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(raw), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        source = f"config file {path}" if path else "settings"
        raise ConfigurationError(f"{source}: setting {where}: {err.message}")

    kwargs: dict[str, Any] = {k: v for k, v in raw.items() if k in _SCALARS}
    for name in _PATH_SETTINGS & kwargs.keys():
        kwargs[name] = _resolve(base, kwargs[name])
    for name in _PATH_SETTINGS - kwargs.keys():
        kwargs[name] = _resolve(base, str(getattr(Settings, name)))
    if "database_url" not in kwargs:
        kwargs["database_url"] = "sqlite:///" + str(_resolve(base, "var/sts.sqlite"))
    for name in ("trusted_proxies", "dpop_algorithms"):
        if name in raw:
            kwargs[name] = tuple(raw[name])
    kwargs["issuers"] = tuple(_issuer(base, i) for i in raw.get("issuers", ()))
    kwargs["clients"] = tuple(_client(base, c) for c in raw.get("clients", ()))
    kwargs["transmitters"] = tuple(_transmitter(base, t) for t in raw.get("transmitters", ()))
    kwargs["review"] = _review(raw.get("review") or {})
    kwargs["rate_limits"] = _rate_limits(raw.get("rate_limits") or {})
    kwargs["tracing"] = TracingSettings(**(raw.get("tracing") or {}))
    passphrase = env.get("STS_KEY_PASSPHRASE")
    kwargs["key_passphrase"] = passphrase.encode("utf-8") if passphrase else None
    kwargs["config_file"] = path
    settings = Settings(**kwargs)
    _check(settings)
    return settings


def _issuer(base: Path, raw: Mapping[str, Any]) -> IssuerSettings:
    values = dict(raw)
    for key in ("algorithms", "audiences", "token_types", "typ"):
        if key in values:
            values[key] = tuple(values[key])
    if "jwks_file" in values:
        values["jwks_file"] = _resolve(base, values["jwks_file"])
    for key in ("token_review_token_file", "token_review_ca_file"):
        if key in values:
            values[key] = _resolve(base, values[key])
    profile = values.get("profile", "generic")
    if profile == "kubernetes":
        # Clusters may silently extend a projected token's expiry: bound its age ourselves.
        values.setdefault("max_token_age", 3600)
    if profile == "spiffe":
        # JWT-SVID: typ absent, JWT or JOSE.
        values.setdefault("typ", (None, "JWT", "JOSE"))
    return IssuerSettings(**values)


def _client(base: Path, raw: Mapping[str, Any]) -> ClientSettings:
    values = dict(raw)
    for key in ("algorithms", "audiences"):
        if key in values:
            values[key] = tuple(values[key])
    if "jwks_file" in values:
        values["jwks_file"] = _resolve(base, values["jwks_file"])
    return ClientSettings(**values)


def _rate_limits(raw: Mapping[str, Any]) -> RateLimitSettings:
    """The defaults, with each limit the file names replaced (``null`` removes one)."""
    limits = {endpoint: dict(scopes) for endpoint, scopes in DEFAULT_RATE_LIMITS.items()}
    for endpoint in RATE_LIMIT_SCOPES:
        for scope, spec in (raw.get(endpoint) or {}).items():
            if spec is None:
                limits[endpoint].pop(scope, None)
            else:
                requests = int(spec["requests"])
                limits[endpoint][scope] = LimitSettings(
                    requests, float(spec["period"]), int(spec.get("burst", requests))
                )
    return RateLimitSettings(
        enabled=bool(raw.get("enabled", True)),
        ipv4_prefix=int(raw.get("ipv4_prefix", 24)),
        ipv6_prefix=int(raw.get("ipv6_prefix", 56)),
        limits=limits,
    )


def _transmitter(base: Path, raw: Mapping[str, Any]) -> TransmitterSettings:
    values = dict(raw)
    for key in ("algorithms", "subject_issuers"):
        if key in values:
            values[key] = tuple(values[key])
    if "jwks_file" in values:
        values["jwks_file"] = _resolve(base, values["jwks_file"])
    return TransmitterSettings(**values)


def _review(raw: Mapping[str, Any]) -> ReviewSettings:
    values = dict(raw)
    values["users"] = tuple(ReviewUser(**u) for u in values.get("users", ()))
    return ReviewSettings(**values)


def _check_review(review: ReviewSettings) -> None:
    """Users are checked here; their hashes when the page is built (sts.app), as clients' are."""
    if review.enabled and not review.users:
        raise ConfigurationError("setting review.users: at least one user is needed when review.enabled")
    names: set[str] = set()
    for user in review.users:
        if user.username in names:
            raise ConfigurationError(f"setting review.users.{user.username}: duplicate username")
        names.add(user.username)


def _check(s: Settings) -> None:
    """Cross-field rules the JSON Schema cannot express."""
    for proxy in s.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigurationError(f"setting trusted_proxies: {proxy!r} is not a network") from None
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
        wildcard = {"0.0.0.0", "::"} & {metrics_host, s.host.strip("[]")}
        if metrics_port == s.port and (metrics_host == s.host.strip("[]") or wildcard):
            raise ConfigurationError("setting metrics_listen: must not be the service's own address")
    if s.default_lifetime > s.max_lifetime:
        raise ConfigurationError("setting default_lifetime: must not exceed max_lifetime")
    if s.store == "redis" and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(f"setting redis_url: {s.redis_url!r} is not a redis:// URL")
    if not s.database_url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        raise ConfigurationError("setting database_url: only sqlite and postgresql URLs are supported")
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
    ids: set[str] = set()
    for client in s.clients:
        where = f"clients.{client.client_id}"
        if client.client_id in ids:
            raise ConfigurationError(f"setting {where}: duplicate client_id")
        ids.add(client.client_id)
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
    _check_transmitters(s, names)
    _check_review(s.review)


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
