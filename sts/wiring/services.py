"""The services the blueprints are given: the token exchange (``/token``), introspection and
revocation (``/introspect``, ``/revoke``) and the Shared Signals receiver (``/ssf/events``),
each built from the settings and the stores, keys and audit sink it uses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..adapters.keyring import KeyRing
from ..adapters.metrics import Metrics
from ..adapters.published_keys import OwnTokenKeys
from ..adapters.signing_keys import SUPPORTED_ALGORITHMS as SIGNING_ALGORITHMS
from ..adapters.tracing import Tracing
from ..core.clients import AssertionAudience, RegisteredClient
from ..core.dpop import DPoPConfig, allowed_algorithms
from ..core.exchange import ExchangeConfig, TokenExchange
from ..core.introspection import OwnTokenVerifier
from ..core.policy.index import PolicySet
from ..core.ports import AuditSink, SingleUseLedger
from ..core.rate_limit import RateLimiter
from ..core.signals.receiver import SignalReceiver
from ..core.token_status import TokenStatus
from ..settings import Settings
from .metadata import introspection_endpoint, revocation_endpoint
from .secret_files import dpop_nonce_secret
from .stores import Stores
from .trust import build_issuers, build_token_reviewers, build_transmitters


def build_exchange(
    settings: Settings,
    *,
    keyring: KeyRing,
    clients: Mapping[str, RegisteredClient],
    policy: PolicySet,
    stores: Stores,
    ledger: SingleUseLedger,
    audit: AuditSink,
    limits: RateLimiter,
    tracing: Tracing,
    metrics: Metrics,
    clock: Callable[[], float],
) -> TokenExchange:
    """The RFC 8693 pipeline, signing with the key ring's active key (reloaded when it changes)."""

    def current_signer() -> Any:
        keyring.reload_if_changed(clock())
        return keyring.signer()

    return TokenExchange(
        ExchangeConfig(
            issuer=settings.issuer,
            token_endpoint=settings.token_endpoint,
            leeway=settings.leeway,
            max_assertion_lifetime=settings.max_client_assertion_lifetime,
            dpop=DPoPConfig(
                algorithms=allowed_algorithms(settings.dpop_algorithms),
                max_age=settings.dpop_max_age,
                leeway=settings.leeway,
                nonce_secret=dpop_nonce_secret(settings.keys_dir) if settings.dpop_nonce else None,
            ),
        ),
        clients=clients,
        issuers=build_issuers(settings, clock, keyring, metrics),
        policy=policy,
        replay=stores.replay,
        ledger=ledger,
        signer=current_signer,
        audit=audit,
        clock=clock,
        token_reviewers=build_token_reviewers(settings, metrics),
        subject_states=stores.subject_states,
        baselines=stores.baselines,
        revoked_tokens=stores.revoked,
        limits=limits,
        stages=tracing,
    )


def build_token_status(
    settings: Settings,
    *,
    keyring: KeyRing,
    clients: Mapping[str, RegisteredClient],
    stores: Stores,
    audit: AuditSink,
    limits: RateLimiter,
    clock: Callable[[], float],
) -> TokenStatus:
    """Introspection (RFC 7662) and revocation (RFC 7009) of the tokens this service issued."""
    own_keys = OwnTokenKeys(keyring, clock)
    return TokenStatus(
        verifier=OwnTokenVerifier(
            issuer=settings.issuer,
            algorithms=frozenset(SIGNING_ALGORITHMS),
            keys=own_keys.key_for,
            leeway=settings.leeway,
        ),
        clients=clients,
        client_audiences={c.client_id: c.audiences for c in settings.clients},
        issuer_names=frozenset(i.name for i in settings.issuers),
        issuer_of={i.issuer: i.name for i in settings.issuers},
        replay=stores.replay,
        states=stores.subject_states,
        revoked=stores.revoked,
        audit=audit,
        assertion_audience=AssertionAudience(settings.issuer, settings.token_endpoint),
        clock=clock,
        leeway=settings.leeway,
        max_assertion_lifetime=settings.max_client_assertion_lifetime,
        endpoint_urls={
            "introspect": introspection_endpoint(settings),
            "revoke": revocation_endpoint(settings),
        },
        limits=limits,
    )


def build_signal_receiver(
    settings: Settings,
    *,
    exchange: TokenExchange,
    stores: Stores,
    limits: RateLimiter,
    metrics: Metrics,
    clock: Callable[[], float],
) -> SignalReceiver:
    """The Shared Signals receiver (RFC 8935 push delivery), for the configured transmitters."""
    return SignalReceiver(
        build_transmitters(settings, clock, metrics),
        issuers=exchange.issuers,
        replay=stores.replay,
        states=stores.subject_states,
        # The exchange's sink: the audit trail, with each decision counted.
        audit=exchange.audit,
        clock=clock,
        leeway=settings.leeway,
        limits=limits,
    )
