"""``sts config check``: validate settings, keys and policies as a start would."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigurationError
from ..settings import Settings
from .context import settings_from


@click.group()
def config() -> None:
    """Configuration."""


@config.command("check")
@click.pass_context
def config_check(ctx: click.Context) -> None:
    """Validate settings, keys and policies, as a start would (without creating or changing anything).

    The key ring is loaded as ``sts serve`` loads it, so a truncated or damaged
    key file, or a missing or wrong ``STS_KEY_PASSPHRASE``, fails here rather
    than at the start.  A directory without ``keyring.json`` is reported: the
    first start creates the keys there.
    """
    import time

    from ..adapters.keyring import KeyRing
    from ..adapters.keyring_files import check_creatable, refuse_orphaned_keys
    from ..adapters.keyring_metadata import METADATA_FILE
    from ..wiring.review import check_review_users
    from ..wiring.trust import build_clients, build_issuers, build_policy, build_transmitters

    settings = settings_from(ctx)
    try:
        policy = build_policy(settings)
        # The key sources, as a start builds them: a jwks_file (or a client's inline jwks) is read
        # and checked now; a jwks_uri only checked as a URL (it is fetched at the first token).
        build_issuers(settings, time.time)
        build_transmitters(settings, time.time)
        build_clients(settings, time.time)
        if settings.review.enabled:
            check_review_users(settings)
        if _exists(settings.keys_dir / METADATA_FILE):
            # Read-only: create=False never writes a key or keyring.json.
            ring = KeyRing.open(
                settings.keys_dir,
                passphrase=settings.key_passphrase,
                create_alg=settings.signing_alg,
                create=False,
            )
            signer = ring.signer()
            keys_line = (
                f"keys ok: {len(ring.entries())} key(s) in {settings.keys_dir}, "
                f"active {signer.kid} ({signer.alg})"
            )
            published = {key.get("alg") for key in ring.public_jwks(time.time()).get("keys", [])}
        else:
            check_creatable(settings.keys_dir)  # as the first start would find it
            refuse_orphaned_keys(settings.keys_dir, METADATA_FILE)  # ... and refuse it
            keys_line = f"keys: none yet in {settings.keys_dir}; the first start creates them"
            published = {settings.signing_alg}
        _check_dpop_nonce_secret(settings)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"settings ok: issuer {settings.issuer}, {len(settings.issuers)} issuer(s), "
        f"{len(settings.clients)} client(s), {len(policy.rules)} rule(s)"
    )
    click.echo(keys_line)
    if "RS256" not in published:
        # Not an error: RFC 8414 metadata and the verifiers that read jwks_uri are content.
        click.echo(
            "note: no RS256 key is published, so /.well-known/openid-configuration lists only "
            f"{', '.join(sorted(a for a in published if isinstance(a, str)))} as "
            "id_token_signing_alg_values_supported; OpenID Connect Discovery 1.0 §3 asks for RS256 "
            "there, and strict OpenID Provider validators (Authlib's) refuse the document without "
            "it: set signing_alg: RS256 (new keys) if a relying party checks it so"
        )


def _check_dpop_nonce_secret(settings: Settings) -> None:
    """The check ``create_app`` makes of an existing DPoP nonce secret, without creating one."""
    path = settings.keys_dir / "dpop-nonce.secret"
    if settings.dpop_nonce and path.exists():
        from ..wiring.secret_files import read_secret

        read_secret(path, what="DPoP nonce secret")


def _exists(path: Path) -> bool:
    """Whether ``path`` exists; one that cannot even be looked at (a directory on the way this user
    may not enter) is a ConfigurationError, one line, not a traceback."""
    try:
        return path.exists()
    except OSError as exc:
        raise ConfigurationError(f"cannot look at {path}: {exc.strerror}") from None
