"""Settings: declared once, here, as frozen dataclasses with their defaults.

Every setting ``name`` of :class:`Settings` is read from the configuration
file or the variable ``STS_NAME`` by :func:`sts.settings.load.load_settings`,
validated against ``sts/schemas/config.schema.json`` and then by the
cross-field rules of :mod:`sts.settings.checks`, and frozen.  What is derived
from the settings (the token endpoint's URL, the metrics listener's address)
is derived here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError

TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
SPIFFE_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
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
    #: Ed25519 (RFC 9864) and its deprecated name EdDSA (RFC 8037), as for DPoP proofs.
    algorithms: tuple[str, ...] = ("ES256", "RS256", "PS256", "Ed25519", "EdDSA")
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
    #: Seconds over which one key's refusals are written as two audit records, not one each
    #: (:mod:`sts.adapters.coalesced_refusals`); 0 writes every refusal.
    coalesce_refusals: float = 10.0


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
    #: Of ``threads``, how many run Python at once; the others run while one waits on the network.
    active_threads: int = 1
    #: Seconds to receive a request line and headers (also how long an idle keep-alive connection stays).
    header_read_timeout: int = 10
    #: Seconds to receive a request body, once its headers are in.
    body_read_timeout: int = 10
    #: Seconds a request may wait for a free request thread; longer: ``503`` before the application.
    request_queue_timeout: int = 10
    #: Connections served at once by all workers together; more wait in the listen queue.
    max_connections: int = 1024
    #: ``HOST:PORT`` of the Prometheus ``/metrics`` listener (one per instance); None serves none.
    metrics_listen: str | None = None
    database_url: str = "sqlite:///var/sts.sqlite"
    #: PostgreSQL pools; None derives them from ``threads`` (see ``sts.wiring.stores.database_pool``).
    database_pool_size: int | None = None
    database_max_overflow: int | None = None
    database_pool_timeout: int = 5
    #: PostgreSQL: seconds a request's statement may go unanswered (cancelled, then cut); 0: no deadline.
    database_deadline: int = 5
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
