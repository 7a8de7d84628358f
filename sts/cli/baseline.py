"""``sts baseline``: behaviour baselines (show, accept, reset)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from ..core.terminal_text import printable
from ..errors import ConfigurationError
from .context import settings_from
from .database import open_shared_state


@click.group()
def baseline() -> None:
    """Behaviour baselines: show an identity's, confirm changed facts, or start it afresh.

    IDENTITY is ISSUER_NAME|SUBJECT, as the audit record's risk section names it
    (for example 'github|repo:acme/app:ref:refs/heads/main'; 'self:github|...' for
    that workload's tokens of ours, re-exchanged).
    """


def _baseline_store(ctx: click.Context, identity: str) -> Any:
    """The baseline store, once IDENTITY names a configured issuer (or ``self:<issuer>``, this
    service's own tokens first issued for that issuer's workload and re-exchanged, or ``self``), as
    ``sts revoke subject`` checks: an unknown name showed an empty baseline and "reset" one that
    never existed, exit 0 (an outside audit).  Only the store is opened: a database that does not
    exist ends the command, and no signing key is created."""
    from ..core.delegation import SELF_ISSUER

    if "|" not in identity or identity.startswith("|") or identity.endswith("|"):
        raise click.UsageError("IDENTITY must be ISSUER_NAME|SUBJECT")
    settings = settings_from(ctx)
    issuer_name = identity.split("|", 1)[0]
    # ``self:<issuer>``: our own tokens re-exchanged, first issued for that issuer's workload.
    names = [i.name for i in settings.issuers]
    known = [*names, SELF_ISSUER, *(f"{SELF_ISSUER}:{name}" for name in names)]
    refusal = click.BadParameter(
        f"{issuer_name!r} is not a configured issuer; choose one of {', '.join(map(repr, known))} "
        "(or 'self:<issuer>' of an issuer since removed, while a baseline is kept under it)",
        param_hint="IDENTITY",
    )
    if issuer_name in known:
        return open_shared_state(settings).baselines
    if not issuer_name.startswith(f"{SELF_ISSUER}:") or issuer_name == f"{SELF_ISSUER}:{SELF_ISSUER}":
        raise refusal
    # A token of ours outlives its issuer's removal from the settings: its re-exchanges keep their
    # baseline under that name, which a drift refusal tells the operator to accept (an outside
    # re-check had it refused here).  Taken when the store holds something under it.
    from ..adapters.sql.engines import DatabaseMissing, make_engine

    try:
        make_engine(settings.database_url, existing=True).dispose()
    except DatabaseMissing:  # no database: nothing is held under it
        raise refusal from None
    except ConfigurationError as exc:  # a SQLite file refused, as open_database says it
        raise click.ClickException(f"setting database_url: {exc}") from None
    store = open_shared_state(settings).baselines  # a store that cannot answer says so
    held = _load_baseline(store, identity)
    if held.count == 0 and not held.pending and not held.failures:
        raise refusal
    return store


def _load_baseline(store: Any, identity: str) -> Any:
    from ..core.ports import StoreUnavailable

    try:
        return store.load(identity)
    except StoreUnavailable as exc:
        raise click.ClickException(f"the store is unavailable: {exc}") from None


def _save_baseline(store: Any, identity: str, value: Any, *, clear_failures: bool = False) -> None:
    """Save ``value``; ``clear_failures``: forget the recent refusals too (kept apart from it)."""
    from ..core.baseline import BASELINE_TTL
    from ..core.ports import StoreUnavailable

    try:
        store.save(identity, value, BASELINE_TTL)
        if clear_failures:
            store.save_failures(identity, (), BASELINE_TTL)
    except StoreUnavailable as exc:
        raise click.ClickException(f"the store is unavailable: {exc}") from None


@baseline.command("show")
@click.argument("identity")
@click.pass_context
def baseline_show(ctx: click.Context, identity: str) -> None:
    """Print IDENTITY's baseline as JSON: each stable fact, confirmed or pending (with its probation)."""
    from ..core.drift import session_summary

    current = _load_baseline(_baseline_store(ctx, identity), identity)
    summary = session_summary(current, ())
    summary.update(
        identity=identity,
        first_seen=current.first_seen,
        last_seen=current.last_seen,
        confirmed={name: dict(how) for name, how in current.confirmed.items()},
        pending={name: p.as_dict() for name, p in current.pending.items()},
        networks=list(current.networks),
        audiences=list(current.audiences),
        scopes=list(current.scopes),
        recent_failures=len(current.failures),
    )
    click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))


@baseline.command("accept")
@click.argument("identity")
@click.option("--fact", "facts", multiple=True, help="Accept only this pending fact (repeatable).")
@click.pass_context
def baseline_accept(ctx: click.Context, identity: str, facts: tuple[str, ...]) -> None:
    """Confirm IDENTITY's pending (changed) facts: they become its baseline, and drift stops firing."""
    from ..core.baseline import accept_pending

    store = _baseline_store(ctx, identity)
    current = _load_baseline(store, identity)
    unknown = sorted(set(facts) - set(current.pending))
    if unknown:
        raise click.ClickException(f"nothing pending for {', '.join(unknown)} of {identity}")
    if not current.pending:
        raise click.ClickException(f"{identity} has no pending facts to accept")
    chosen = facts or tuple(sorted(current.pending))
    _save_baseline(store, identity, accept_pending(current, time.time(), chosen))
    for name in chosen:
        # The fact's name is read from the store: escaped, as every stored value printed as text.
        click.echo(f"accepted {printable(name)}={json.dumps(current.pending[name].value)} for {identity}")


@baseline.command("reset")
@click.argument("identity")
@click.pass_context
def baseline_reset(ctx: click.Context, identity: str) -> None:
    """Forget IDENTITY's baseline and recent refusals: it learns afresh, and the next facts seen
    become its baseline."""
    from ..core.baseline import Baseline

    store = _baseline_store(ctx, identity)
    _save_baseline(store, identity, Baseline(), clear_failures=True)
    click.echo(f"reset the baseline of {identity}: it is learning again")
