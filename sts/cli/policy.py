"""``sts policy``: check (lint), schema, explain (dry run)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigurationError, OAuthError
from .context import settings_from


def _claim_time(value: Any) -> float:
    """A what-if claim's time: a number, else a usage error (``"exp": "soon"`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise click.UsageError("--claims: exp must be a number")
    try:
        return float(value)
    except OverflowError:
        raise click.UsageError("--claims: exp must be a number a float can hold") from None


def _read_input(stream: Any, option: str) -> str:
    """A text option's file (or stdin) read whole; not UTF-8 is a usage error, not a traceback."""
    try:
        return str(stream.read())
    except UnicodeDecodeError as exc:
        raise click.UsageError(f"{option}: not UTF-8 (byte {exc.start})") from None


@click.group()
def policy() -> None:
    """Policies: check (lint), explain (dry run), schema."""


@policy.command("check")
@click.option(
    "--standalone",
    is_flag=True,
    help="Check FILES on their own: the issuer and client names they use are taken as defined.",
)
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def policy_check(ctx: click.Context, standalone: bool, files: tuple[Path, ...]) -> None:
    """Lint the configured policies directory, or the FILES given, against the configuration.

    With --standalone, FILES written for another configuration (policies/examples/) are
    checked on their own: schema, patterns, CEL conditions and lifetimes, with the issuer
    and client names they refer to taken as defined.  A start still needs those names in
    its configuration.
    """
    from ..adapters.policy_files import load_policies, names_used, policy_files

    if standalone and not files:
        raise click.UsageError("--standalone checks the FILES given; name them")
    settings = settings_from(ctx)
    try:
        paths = list(files) or policy_files(settings.policies_dir)
        if standalone:
            issuers, clients = names_used(paths)
        else:
            issuers = frozenset(i.name for i in settings.issuers)
            clients = frozenset(c.client_id for c in settings.clients)
        compiled = load_policies(
            paths,
            issuers=issuers | {"self"},
            clients=clients,
            max_lifetime=settings.max_lifetime,
            default_lifetime=settings.default_lifetime,
        )
    except ConfigurationError as exc:
        message = str(exc)
        if files and not standalone and (": unknown issuer " in message or ": unknown client" in message):
            message += (
                "; to check files written for another configuration, name it with --config, "
                "or check them on their own with --standalone"
            )
        raise click.ClickException(message) from None
    for rule in compiled.rules:
        click.echo(f"ok  {rule.source}: {rule.name}")
    click.echo(f"{len(compiled.rules)} rule(s) in {len(paths)} file(s): no problems")
    if standalone:
        click.echo(
            f"standalone: issuers {', '.join(sorted(issuers)) or 'none'} and clients "
            f"{', '.join(sorted(clients)) or 'none'} taken as defined; a start needs them configured"
        )


@policy.command("schema")
def policy_schema_cmd() -> None:
    """Print the JSON Schema of policy files."""
    from ..adapters.policy_files import policy_schema

    click.echo(json.dumps(policy_schema(), indent=2))


@policy.command("explain")
@click.option("--token", "token_file", type=click.File("r"), help="A subject token (file, or - for stdin).")
@click.option(
    "--claims",
    "claims_file",
    type=click.File("r"),
    help="Claims as JSON instead of a token (not verified: a what-if).",
)
@click.option("--issuer", "issuer_name", help="Issuer name for --claims.")
@click.option("--audience", multiple=True)
@click.option("--resource", multiple=True)
@click.option("--scope", default=None)
@click.option("--client-id", default=None, help="Explain as if this client had authenticated.")
@click.option("--acr-values", default=None, help="Levels asked for, as the request's acr_values.")
@click.option("--with-key", is_flag=True, help="As if a DPoP proof or certificate with the identity's key.")
@click.option("--with-posture", is_flag=True, help="As if with the key and good posture evidence.")
@click.pass_context
def policy_explain(
    ctx: click.Context,
    token_file: Any,
    claims_file: Any,
    issuer_name: str | None,
    audience: tuple[str, ...],
    resource: tuple[str, ...],
    scope: str | None,
    client_id: str | None,
    acr_values: str | None,
    with_key: bool,
    with_posture: bool,
) -> None:
    """Dry-run a request: which rule applies, why each other rule does not, and the assurance
    levels it would reach."""
    from ..core.attest import VerifiedToken, verify_token
    from ..core.audit import token_hash
    from ..core.policy.evaluate import evaluate, trace
    from ..core.policy.rules import PolicyRequest
    from ..core.profiles import ProfileViolation, get_profile
    from ..protocol.token_exchange import TOKEN_TYPE_JWT, parse_scope
    from ..wiring.trust import build_issuers, build_policy

    settings = settings_from(ctx)
    try:
        compiled = build_policy(settings)
        if token_file is not None:
            token = _read_input(token_file, "--token").strip()
            facts = verify_token(
                token,
                TOKEN_TYPE_JWT,
                build_issuers(settings, time.time),
                now=time.time(),
                leeway=settings.leeway,
            )
        elif claims_file is not None and issuer_name:
            try:
                claims = json.loads(_read_input(claims_file, "--claims"))
            except (ValueError, RecursionError) as exc:
                # Not JSON, an integer of thousands of digits, or nesting deeper than Python's stack.
                raise click.UsageError(f"--claims: not a usable JSON object ({type(exc).__name__})") from None
            if not isinstance(claims, dict):
                raise click.UsageError("--claims must hold a JSON object")
            subject = str(claims.get("sub", ""))
            trusted = build_issuers(settings, time.time).by_name(issuer_name)
            if trusted is None:
                raise click.UsageError(f"unknown issuer {issuer_name!r}")
            # The issuer's attestation profile turns claims into facts, as a real exchange would.
            profile = trusted.policy.profile
            try:
                profile_facts = get_profile(profile).facts(subject, claims, trusted.policy.profile_options)
            except ProfileViolation as exc:
                raise click.ClickException(f"the claims break the {profile} profile: {exc.reason}") from None
            facts = VerifiedToken(
                issuer_name=issuer_name,
                issuer="(what-if)",
                subject=subject,
                claims=claims,
                token_type=TOKEN_TYPE_JWT,
                issued_at=claims.get("iat"),
                expires_at=_claim_time(claims.get("exp", time.time() + 300)),
                not_before=None,
                jti=claims.get("jti"),
                sha256=token_hash(json.dumps(claims)),
                typ=None,
                facts=profile_facts,
                profile=profile,
            )
        else:
            raise click.UsageError("give --token, or --claims with --issuer")
        request = PolicyRequest(tuple(audience), tuple(resource), parse_scope(scope), client_id)
    except (ConfigurationError, OAuthError) as exc:
        raise click.ClickException(str(exc)) from None
    for t in trace(compiled, facts, request):
        click.echo(f"{'APPLIES ' if t.applies else 'no      '} {t.rule}  ({t.source}): {t.reason}")
    try:
        grant = evaluate(compiled, facts, request)
    except OAuthError as exc:
        click.echo(f"decision: refuse with {exc.error} ({exc.reason})")
        sys.exit(1)
    click.echo(
        f"decision: grant by rule {grant.rule}: aud={list(grant.audiences)} scope={list(grant.scopes)} "
        f"max_lifetime={grant.max_lifetime}s{' (scope narrowed)' if grant.scope_narrowed else ''}"
    )
    from ..core.assurance import KEY_CONTINUES, KEY_NONE, Evidence, explain

    evidence = Evidence(key=KEY_CONTINUES if with_key or with_posture else KEY_NONE, live_review=with_posture)
    posture_fact = grant.risk.posture_fact if grant.risk else None
    requested = tuple(acr_values.split()) if acr_values else ()
    for line in explain(
        grant.assurance, grant.audiences, grant.scopes, requested, evidence, posture_fact=posture_fact
    ):
        click.echo(line)
