"""``sts revoke``: revocation visible to every instance sharing the store."""

from __future__ import annotations

import time
from typing import Any

import click

from ..core.ports import StoreUnavailable
from ..core.subject_state import STATE_TTL
from .context import settings_from
from .database import open_shared_state


@click.group()
def revoke() -> None:
    """Revocation visible to every instance sharing the store."""


@revoke.command("subject")
@click.argument("issuer_name")
@click.argument("subject")
@click.option("--block", type=click.IntRange(1, STATE_TTL), default=None,
              help=f"Also refuse new exchanges for this many seconds (1 to {STATE_TTL}).")  # fmt: skip
@click.pass_context
def revoke_subject(ctx: click.Context, issuer_name: str, subject: str, block: int | None) -> None:
    """Revoke every token issued so far to SUBJECT of ISSUER_NAME.

    ISSUER_NAME is the ``name`` of a configured issuer, ``self`` (tokens this
    service issued, re-exchanged) or ``*`` (the subject of every issuer).
    Only the store is opened: a database that does not exist ends the command, and no
    signing key is created (an outside audit saw both made by a revocation).
    """
    from ..core.delegation import SELF_ISSUER
    from ..core.subject_state import ANY_ISSUER, identity_key

    settings = settings_from(ctx)
    known = [i.name for i in settings.issuers] + [SELF_ISSUER, ANY_ISSUER]
    if issuer_name not in known:
        # A name that matches no issuer would revoke nothing, silently.
        raise click.BadParameter(
            f"{issuer_name!r} is not a configured issuer; choose one of {', '.join(map(repr, known))}",
            param_hint="ISSUER_NAME",
        )
    if not subject:
        raise click.BadParameter("the subject must not be empty", param_hint="SUBJECT")
    stores = open_shared_state(settings)
    now = time.time()

    def change(state: Any) -> Any:
        later = max(now, state.revoked_before or 0)
        changes: dict[str, Any] = {"revoked_before": later}
        if block:
            changes["blocked_until"] = max(now + block, state.blocked_until or 0)
        return state.with_event("operator.revoke", now, **changes)

    key = identity_key(issuer_name, subject)
    try:
        stores.subject_states.update(key, change, STATE_TTL)
    except StoreUnavailable as exc:
        raise click.ClickException(f"nothing revoked: the store is unavailable ({exc})") from None
    click.echo(
        f"revoked tokens issued to {key} before {int(now)}" + (f"; blocked for {block}s" if block else "")
    )
