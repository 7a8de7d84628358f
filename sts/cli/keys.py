"""``sts keys``: the signing keys (list, rotate, prune, jwks)."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import click

from ..errors import ConfigurationError
from ..settings import Settings
from .context import settings_from


@click.group()
def keys() -> None:
    """Signing keys: list, rotate (publish-before-use), prune."""


def open_keyring(settings: Settings, create: bool = True) -> Any:
    from ..adapters.keyring import KeyRing

    try:
        return KeyRing.open(
            settings.keys_dir,
            passphrase=settings.key_passphrase,
            create_alg=settings.signing_alg,
            create=create,
        )
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """Show every key with its state (next, active, retired) and dates."""
    ring = open_keyring(settings_from(ctx), create=False)  # reading creates nothing
    for entry in ring.entries():
        # KeyEntry is a slotted dataclass: it has no __dict__ for vars().
        click.echo(json.dumps(dataclasses.asdict(entry), default=str))


@keys.command("rotate")
@click.option("--force", is_flag=True, help="Rotate even if the next key was published only recently.")
@click.pass_context
def keys_rotate(ctx: click.Context, force: bool) -> None:
    """Promote the published next key to active; retire the current one; publish a new next key
    of the configured ``signing_alg`` (after a change of it, the rotation after this one signs
    with the new algorithm, its key published a whole rotation before)."""
    settings = settings_from(ctx)
    ring = open_keyring(settings)
    try:
        ring.rotate(
            time.time(),
            max_token_lifetime=settings.max_lifetime,
            min_published=settings.key_rotation_min_published,
            force=force,
            next_alg=settings.signing_alg,
        )
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    for entry in ring.entries():
        click.echo(f"{entry.state:8} {entry.kid} {entry.alg}")


@keys.command("prune")
@click.pass_context
def keys_prune(ctx: click.Context) -> None:
    """Remove retired keys whose tokens have all expired."""
    ring = open_keyring(settings_from(ctx), create=False)
    try:
        removed = ring.prune(time.time())
    except ConfigurationError as exc:  # a read-only keys_dir (a Kubernetes Secret), say
        raise click.ClickException(str(exc)) from None
    for entry in removed:
        click.echo(f"removed {entry.kid}")


@keys.command("jwks")
@click.pass_context
def keys_jwks(ctx: click.Context) -> None:
    """Print the public JWK Set, as jwks_uri serves it now (without retired keys past their
    publication)."""
    ring = open_keyring(settings_from(ctx), create=False)
    click.echo(json.dumps(ring.public_jwks(time.time()), indent=2))
