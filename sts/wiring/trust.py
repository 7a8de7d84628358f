"""Whom this service trusts: upstream issuers (and itself), clients, Shared Signals
transmitters, each with its key source, and the compiled policy over them."""

from __future__ import annotations

from collections.abc import Callable

from ..adapters.jwks import FileJWKS, StaticJWKS
from ..adapters.jwks_cache import HttpJWKS
from ..adapters.keyring import KeyRing
from ..adapters.metered_ports import CountedIssuerKeys, CountedTokenReviewer
from ..adapters.metrics import Metrics
from ..adapters.policy_files import PolicySources, load_policies, policy_files
from ..adapters.published_keys import OwnTokenKeys
from ..adapters.signing_keys import SUPPORTED_ALGORITHMS as SIGNING_ALGORITHMS
from ..adapters.token_review import HttpTokenReviewer
from ..core.attest import IssuerDirectory, IssuerPolicy, TrustedIssuer
from ..core.client_secrets import check_hash_format
from ..core.clients import RegisteredClient
from ..core.delegation import SELF_ISSUER
from ..core.policy.index import PolicySet
from ..core.ports import IssuerKeys, TokenReviewer
from ..core.profiles import ProfileOptions, get_profile
from ..core.signals.verify import Transmitter, TransmitterPolicy
from ..errors import ConfigurationError
from ..protocol.client_auth import NONE
from ..protocol.token_exchange import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT
from ..settings import ClientSettings, IssuerSettings, Settings, TransmitterSettings


def issuer_keys(
    iss: IssuerSettings, clock: Callable[[], float], metrics: Metrics | None = None
) -> IssuerKeys:
    if iss.jwks_file is not None:
        return FileJWKS(iss.jwks_file, algorithms=iss.algorithms)
    assert iss.jwks_uri is not None
    keys = HttpJWKS(
        iss.jwks_uri,
        algorithms=iss.algorithms,
        max_stale=iss.jwks_max_stale,
        clock=clock,
        on_fetch=metrics.jwks_fetch_recorder(iss.name) if metrics else None,
    )
    return CountedIssuerKeys(keys, metrics, "issuer_keys", iss.name) if metrics else keys


def build_issuers(
    settings: Settings,
    clock: Callable[[], float],
    keyring: KeyRing | None = None,
    metrics: Metrics | None = None,
) -> IssuerDirectory:
    """The trusted issuers; with ``keyring``, this service itself too (``self``) for re-exchange."""
    trusted = []
    for iss in settings.issuers:
        profile = get_profile(iss.profile)
        options = ProfileOptions(claim_mappings=dict(iss.claim_mappings), trust_domain=iss.trust_domain)
        profile.check_options(iss.name, options)
        policy = IssuerPolicy(
            name=iss.name,
            issuer=iss.issuer,
            audiences=frozenset(iss.audiences),
            algorithms=frozenset(iss.algorithms),
            token_types=frozenset(iss.token_types),
            typ=frozenset(t.lower().removeprefix("application/") if t else None for t in iss.typ),
            max_token_age=iss.max_token_age,
            max_token_lifetime=iss.max_token_lifetime,
            require_jti=iss.require_jti,
            profile=iss.profile,
            profile_options=options,
            trusted_delegation=iss.trusted_delegation,
        )
        trusted.append(TrustedIssuer(policy, issuer_keys(iss, clock, metrics)))
    if keyring is not None:
        own = IssuerPolicy(
            name=SELF_ISSUER,
            issuer=settings.issuer,
            audiences=frozenset(),
            algorithms=frozenset(SIGNING_ALGORITHMS),
            token_types=frozenset({TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT}),
            # Only our RFC 9068 access tokens, never anything else we might sign.
            typ=frozenset({"at+jwt"}),
            # Every token we issue has a jti; revocation (RFC 7009) is looked up by it.
            require_jti=True,
            check_audience=False,
        )
        trusted.append(TrustedIssuer(own, OwnTokenKeys(keyring, clock)))
    return IssuerDirectory(trusted)


def build_token_reviewers(settings: Settings, metrics: Metrics | None = None) -> dict[str, TokenReviewer]:
    reviewers: dict[str, TokenReviewer] = {
        iss.name: HttpTokenReviewer(
            iss.token_review_url, token_file=iss.token_review_token_file, ca_file=iss.token_review_ca_file
        )
        for iss in settings.issuers
        if iss.token_review_url
    }
    if metrics is not None:
        reviewers = {name: CountedTokenReviewer(r, metrics, name) for name, r in reviewers.items()}
    return reviewers


def transmitter_keys(
    t: TransmitterSettings, clock: Callable[[], float], metrics: Metrics | None = None
) -> IssuerKeys:
    if t.jwks_file is not None:
        return FileJWKS(t.jwks_file, algorithms=t.algorithms)
    assert t.jwks_uri is not None
    source = f"transmitter:{t.name}"
    keys = HttpJWKS(
        t.jwks_uri,
        algorithms=t.algorithms,
        max_stale=t.jwks_max_stale,
        clock=clock,
        on_fetch=metrics.jwks_fetch_recorder(source) if metrics else None,
    )
    return CountedIssuerKeys(keys, metrics, "transmitter_keys", source) if metrics else keys


def build_transmitters(
    settings: Settings, clock: Callable[[], float], metrics: Metrics | None = None
) -> list[Transmitter]:
    """The Shared Signals transmitters, each with its key source (RFC 8935 §2)."""
    return [
        Transmitter(
            TransmitterPolicy(
                name=t.name,
                issuer=t.issuer,
                audience=t.audience or settings.issuer,
                algorithms=frozenset(t.algorithms),
                block_duration=t.block_duration,
                max_age=t.max_age,
                subject_issuers=frozenset(t.subject_issuers) if t.subject_issuers is not None else None,
            ),
            transmitter_keys(t, clock, metrics),
        )
        for t in settings.transmitters
    ]


def build_client(
    c: ClientSettings, clock: Callable[[], float], metrics: Metrics | None = None
) -> RegisteredClient:
    """A registered client: its key source (private_key_jwt), or its secret hash, checked."""
    keys: IssuerKeys | None = None
    if c.auth_method == "private_key_jwt":
        if c.jwks is not None:
            keys = StaticJWKS(dict(c.jwks), algorithms=c.algorithms, source=f"client {c.client_id}")
        elif c.jwks_file is not None:
            keys = FileJWKS(c.jwks_file, algorithms=c.algorithms)
        else:
            assert c.jwks_uri is not None
            source = f"client:{c.client_id}"
            keys = HttpJWKS(
                c.jwks_uri,
                algorithms=c.algorithms,
                clock=clock,
                on_fetch=metrics.jwks_fetch_recorder(source) if metrics else None,
            )
            if metrics is not None:
                keys = CountedIssuerKeys(keys, metrics, "client_keys", source)
    elif c.auth_method == NONE:
        pass  # a public client: nothing to check it by
    elif not check_hash_format(c.secret_hash or ""):
        raise ConfigurationError(
            f"setting clients.{c.client_id}.secret_hash: not a recognised hash "
            "(make one with `sts clients secret`)"
        )
    return RegisteredClient(c.client_id, c.auth_method, c.secret_hash, keys, frozenset(c.algorithms))


def build_clients(
    settings: Settings, clock: Callable[[], float], metrics: Metrics | None = None
) -> dict[str, RegisteredClient]:
    """The registered clients by ``client_id``."""
    return {c.client_id: build_client(c, clock, metrics) for c in settings.clients}


def build_policy(settings: Settings, sources: PolicySources | None = None) -> PolicySet:
    """The policy files of ``policies_dir`` (or their texts as read once, ``sources``), compiled
    against the configured issuers (and ``self``) and clients."""
    return load_policies(
        policy_files(settings.policies_dir) if sources is None else (),
        texts=sources,
        issuers=frozenset(i.name for i in settings.issuers) | {SELF_ISSUER},
        # A public client proves nothing, so no rule can name it (only authenticated clients).
        clients=frozenset(c.client_id for c in settings.clients if c.auth_method != NONE),
        max_lifetime=settings.max_lifetime,
        default_lifetime=settings.default_lifetime,
    )
