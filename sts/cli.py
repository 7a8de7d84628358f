"""The ``sts`` command: serve, keys, policy, clients, audit, config, dev.

Every command reads the same settings (``--config`` / ``STS_CONFIG`` /
``./sts.yaml``, then ``STS_*`` variables) and exits non-zero with a clear
message when they are invalid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .core.subject_state import STATE_TTL
from .errors import ConfigurationError, OAuthError
from .settings import Settings, load_settings


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    try:
        return load_settings(
            ctx.obj.get("config"), overrides={k: v for k, v in overrides.items() if v is not None}
        )
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Configuration file (default: $STS_CONFIG, else ./sts.yaml when present).",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """Workload token-exchange broker (OAuth 2.0 Token Exchange, RFC 8693)."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


# -- serve ---------------------------------------------------------------------------------------


@main.command()
@click.option("--host", default=None, help="Listen address (setting host).")
@click.option("--port", type=int, default=None, help="Listen port (setting port).")
@click.option("--workers", type=int, default=None, help="Worker processes (setting workers).")
@click.option("--threads", type=int, default=None, help="Threads per worker (setting threads).")
@click.option("--metrics-listen", default=None, help="HOST:PORT of /metrics (setting metrics_listen).")
@click.pass_context
def serve(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    workers: int | None,
    threads: int | None,
    metrics_listen: str | None,
) -> None:
    """Run the service (granian; keys and database are created on first start)."""
    from .adapters import metrics_exposition as metrics
    from .adapters.log_format import configure_logging

    settings = _settings(
        ctx, host=host, port=port, workers=workers, threads=threads, metrics_listen=metrics_listen
    )
    configure_logging(settings.log_level, settings.log_format)
    # Before any metric exists: every worker writes its values where this process's listener
    # adds them up (prometheus_client's multiprocess mode), in a directory of this instance.
    metrics_dir, owned = metrics.enable_multiprocess() if settings.metrics_address else (None, False)
    try:
        _serve(settings, metrics_dir)
    finally:
        if metrics_dir is not None and owned:
            metrics.remove_directory(metrics_dir)


def _serve(settings: Settings, metrics_dir: Path | None) -> None:
    from . import serving
    from .adapters import metrics_exposition as metrics
    from .app import create_app, prepare
    from .http.responses import request_id

    if serving.port_in_use(settings.host, settings.port):
        raise click.ClickException(f"{settings.host}:{settings.port} is already in use")
    listener: metrics.MetricsServer | None = None
    if settings.metrics_address is not None and metrics_dir is not None:
        collector = metrics.ExpositionCollector(directory=metrics_dir)
        try:
            listener = metrics.MetricsServer(
                *settings.metrics_address, metrics.exposition_registry(collector)
            )
        except OSError as exc:
            raise click.ClickException(f"metrics_listen {settings.metrics_listen}: {exc.strerror}") from None
    try:
        try:
            prepare(settings)
            # Build once in the parent too, so a bad policy or key stops the start here, with its message.
            checked = create_app(settings)
        except ConfigurationError as exc:
            raise click.ClickException(str(exc)) from None
        # The workers open their own pools; the check's connections must not be inherited by them.
        runtime = checked.extensions["sts"]
        runtime.engine.dispose()
        if runtime.redis_client is not None:
            runtime.redis_client.close()
        if listener is not None:
            # The signing keys' ages are read, when scraped, from this process's copy of the key ring.
            collector.key_entries = functools.partial(_key_entries, runtime.keyring)
            # A first scrape imports what scrapes need before the workers are forked from this process.
            metrics.prometheus_text(collector)
            listener.start()
            click.echo(
                f"sts: metrics on http://{settings.metrics_listen}{metrics.METRICS_PATH} "
                f"(worker values in {metrics_dir})",
                err=True,
            )

        click.echo(
            f"sts: serving {settings.issuer} on http://{settings.host}:{settings.port} "
            f"({settings.workers} workers x {settings.threads} threads, store={settings.store})",
            err=True,
        )
        serving.serve(
            functools.partial(create_app, settings),
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            limits=serving.Limits(
                threads=settings.threads,
                header_read_timeout=settings.header_read_timeout,
                body_read_timeout=settings.body_read_timeout,
                max_body_bytes=settings.max_body_bytes,
                max_connections=settings.max_connections,
            ),
            log_level=settings.log_level,
            request_id=request_id,
        )
    finally:
        if listener is not None:
            listener.stop()


def _key_entries(keyring: Any) -> list[Any]:
    keyring.reload_if_changed(time.time())
    return list(keyring.entries())


# -- config --------------------------------------------------------------------------------------


@main.group()
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
    from .adapters.keyring import METADATA_FILE, KeyRing
    from .app import build_policy

    settings = _settings(ctx)
    try:
        policy = build_policy(settings)
        if (settings.keys_dir / METADATA_FILE).exists():
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
        else:
            keys_line = f"keys: none yet in {settings.keys_dir}; the first start creates them"
        _check_dpop_nonce_secret(settings)
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"settings ok: issuer {settings.issuer}, {len(settings.issuers)} issuer(s), "
        f"{len(settings.clients)} client(s), {len(policy.rules)} rule(s)"
    )
    click.echo(keys_line)


def _check_dpop_nonce_secret(settings: Settings) -> None:
    """The check ``create_app`` makes of an existing DPoP nonce secret, without creating one."""
    path = settings.keys_dir / "dpop-nonce.secret"
    if not settings.dpop_nonce or not path.exists():
        return
    try:
        size = len(path.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read the DPoP nonce secret: {exc.strerror}") from None
    if size < 32:
        raise ConfigurationError(f"{path}: DPoP nonce secret is truncated; delete it to create a new one")


# -- keys ----------------------------------------------------------------------------------------


@main.group()
def keys() -> None:
    """Signing keys: list, rotate (publish-before-use), prune."""


def _keyring(settings: Settings, create: bool = True) -> Any:
    from .adapters.keyring import KeyRing

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
    ring = _keyring(_settings(ctx))
    for entry in ring.entries():
        # KeyEntry is a slotted dataclass: it has no __dict__ for vars().
        click.echo(json.dumps(dataclasses.asdict(entry), default=str))


@keys.command("rotate")
@click.option("--force", is_flag=True, help="Rotate even if the next key was published only recently.")
@click.pass_context
def keys_rotate(ctx: click.Context, force: bool) -> None:
    """Promote the published next key to active; retire the current one; publish a new next key."""
    settings = _settings(ctx)
    ring = _keyring(settings)
    try:
        ring.rotate(
            time.time(),
            max_token_lifetime=settings.max_lifetime,
            min_published=settings.key_rotation_min_published,
            force=force,
        )
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    for entry in ring.entries():
        click.echo(f"{entry.state:8} {entry.kid} {entry.alg}")


@keys.command("prune")
@click.pass_context
def keys_prune(ctx: click.Context) -> None:
    """Remove retired keys whose tokens have all expired."""
    ring = _keyring(_settings(ctx))
    for entry in ring.prune(time.time()):
        click.echo(f"removed {entry.kid}")


@keys.command("jwks")
@click.pass_context
def keys_jwks(ctx: click.Context) -> None:
    """Print the public JWK Set."""
    click.echo(json.dumps(_keyring(_settings(ctx)).public_jwks(), indent=2))


# -- policy --------------------------------------------------------------------------------------


@main.group()
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
    from .adapters.policy_files import load_policies, names_used, policy_files

    if standalone and not files:
        raise click.UsageError("--standalone checks the FILES given; name them")
    settings = _settings(ctx)
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
    from .adapters.policy_files import policy_schema

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
    from .app import build_issuers, build_policy
    from .core.attest import VerifiedToken, verify_token
    from .core.audit import token_hash
    from .core.policy import PolicyRequest, evaluate, trace
    from .core.profiles import ProfileViolation, get_profile
    from .protocol.token_exchange import TOKEN_TYPE_JWT, parse_scope

    settings = _settings(ctx)
    try:
        compiled = build_policy(settings)
        if token_file is not None:
            token = token_file.read().strip()
            facts = verify_token(
                token,
                TOKEN_TYPE_JWT,
                build_issuers(settings, time.time),
                now=time.time(),
                leeway=settings.leeway,
            )
        elif claims_file is not None and issuer_name:
            claims = json.load(claims_file)
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
                expires_at=float(claims.get("exp", time.time() + 300)),
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
    from .core.assurance import KEY_CONTINUES, KEY_NONE, Evidence, explain

    evidence = Evidence(key=KEY_CONTINUES if with_key or with_posture else KEY_NONE, live_review=with_posture)
    posture_fact = grant.risk.posture_fact if grant.risk else None
    requested = tuple(acr_values.split()) if acr_values else ()
    for line in explain(
        grant.assurance, grant.audiences, grant.scopes, requested, evidence, posture_fact=posture_fact
    ):
        click.echo(line)


# -- clients -------------------------------------------------------------------------------------


@main.group()
def clients() -> None:
    """Client registry helpers."""


@clients.command("secret")
@click.option("--slow", is_flag=True, help="Hash with PBKDF2 (for a secret you chose yourself).")
@click.option(
    "--stdin", "from_stdin", is_flag=True, help="Read the secret from stdin instead of generating one."
)
def clients_secret(slow: bool, from_stdin: bool) -> None:
    """Generate a client secret and the secret_hash to put in the configuration."""
    from .core.client_secrets import generate_secret, hash_secret

    secret = sys.stdin.readline().rstrip("\n") if from_stdin else generate_secret()
    if not from_stdin:
        click.echo(f"client_secret: {secret}")
    click.echo(f"secret_hash: {hash_secret(secret, slow=slow or from_stdin)}")


# -- audit ---------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The audit trail."""


@audit.command("tail")
@click.option("-n", "limit", default=20, show_default=True)
@click.option("--outcome", type=click.Choice(["granted", "refused", "error"]), default=None)
@click.option("--subject", default=None)
@click.pass_context
def audit_tail(ctx: click.Context, limit: int, outcome: str | None, subject: str | None) -> None:
    """Print the newest decisions as JSON lines, newest first."""
    from sqlalchemy.exc import SQLAlchemyError

    from .adapters import sql
    from .migrations import SchemaError, ensure

    settings = _settings(ctx)
    filters = {k: v for k, v in {"outcome": outcome, "subject": subject}.items() if v}
    try:
        engine = sql.make_engine(settings.database_url)
        ensure(engine, migrate=settings.database_migrate_on_start)
        records = sql.SqlAuditSink(engine).recent(limit, **filters)
    except SchemaError as exc:
        raise click.ClickException(f"setting database_url: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot read the audit trail ({type(exc).__name__})"
        ) from None
    for record in records:
        click.echo(json.dumps(record, sort_keys=True))


def _audit_filter_options(command: Any) -> Any:
    """The filter every ``sts audit`` query shares with the review page (sts.core.audit_filter)."""
    options = [
        click.option("--issuer", help="Upstream issuer name (with --subject: one identity)."),
        click.option("--subject", help="Subject (the token's sub)."),
        click.option("--client", "client_id", help="Client id."),
        click.option("--audience", help="A requested or granted audience (or resource)."),
        click.option("--outcome", type=click.Choice(["granted", "refused", "error"])),
        click.option("--signal", help="A risk signal that fired, e.g. attestation_drift."),
        click.option("--rule", help="Policy rule name."),
        click.option("--error", help="OAuth error code, e.g. insufficient_user_authentication (step-ups)."),
        click.option("--since", help="ISO-8601 time, or an age: 90m, 24h, 7d, 2w."),
        click.option("--until", help="ISO-8601 time, or an age (exclusive)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _audit_filter(values: dict[str, Any]) -> Any:
    from .core.audit_filter import FilterError, filter_from_params

    params = {k: v for k, v in values.items() if isinstance(v, str)}
    try:
        return filter_from_params(params, time.time())
    except FilterError as exc:
        raise click.UsageError(str(exc)) from None


def _audit_query(ctx: click.Context) -> Any:
    from .adapters import audit_query, sql
    from .migrations import SchemaError, ensure

    settings = _settings(ctx)
    engine = sql.make_engine(settings.database_url)
    try:
        ensure(engine, migrate=settings.database_migrate_on_start)
    except SchemaError as exc:
        raise click.ClickException(f"setting database_url: {exc}") from None
    return audit_query.AuditQuery(engine)


def _audit_failed(exc: Exception) -> click.ClickException:
    return click.ClickException(f"setting database_url: cannot read the audit trail ({type(exc).__name__})")


@audit.command("query")
@_audit_filter_options
@click.option("-n", "limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=int, default=None, help="Only records with an id below this (the next page).")
@click.pass_context
def audit_query_cmd(ctx: click.Context, /, limit: int, before: int | None, **filters: Any) -> None:
    """Decisions matching the filters, newest first, as JSON lines (with their "id").

    Pages by id: when more match, the command to show them is printed on stderr.
    """
    from sqlalchemy.exc import SQLAlchemyError

    wanted = _audit_filter(filters)
    try:
        query = _audit_query(ctx)
        if wanted.signal or wanted.audience:
            query.refresh(budget=5.0)
        page = query.page(wanted, limit=limit, before=before)
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    for row in page.rows:
        click.echo(json.dumps(row, sort_keys=True, default=str))
    if page.older is not None:
        click.echo(f"more: add --before {page.older}", err=True)


@audit.command("export")
@_audit_filter_options
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A new file to write (default: stdout).")  # fmt: skip
@click.pass_context
def audit_export(ctx: click.Context, /, output: Path | None, **filters: Any) -> None:
    """Stream decisions matching the filters, oldest first, as JSON lines for a SIEM.

    One object per line: the audit record plus its "id".  Read in batches by id, so
    memory stays constant however many records match.
    """
    from sqlalchemy.exc import SQLAlchemyError

    wanted = _audit_filter(filters)
    try:
        query = _audit_query(ctx)
        if wanted.signal or wanted.audience:
            query.refresh(budget=5.0)
        out = sys.stdout if output is None else _new_file(output)
        count = 0
        try:
            for row in query.export(wanted):
                out.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                count += 1
        finally:
            if output is not None:
                out.close()
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    if output is not None:
        click.echo(f"exported {count} record(s) to {output}", err=True)


def _new_file(path: Path) -> Any:
    import os

    try:
        return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8")
    except FileExistsError:
        raise click.ClickException(f"{path}: already exists (never overwritten)") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot be created ({exc.strerror})") from None


@audit.command("prune")
@click.option("--older-than", "days", type=click.IntRange(min=1), required=True,
              help="Remove records older than this many days (at least 1).")  # fmt: skip
@click.option("--archive", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write them to this new file (JSON lines, fsynced) before deleting.")  # fmt: skip
@click.option("--delete", "delete_only", is_flag=True, help="Delete without an archive.")
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.pass_context
def audit_prune(
    ctx: click.Context, days: int, archive: Path | None, delete_only: bool, dry_run: bool
) -> None:
    """Retention: archive (or delete) records older than N days, oldest first.

    What goes is always a contiguous oldest run of records (by id), so what remains
    can still be verified from its first record on.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from .adapters.audit_query import PruneAborted
    from .adapters.sql import PruneWouldBreakChain
    from .core.audit_filter import format_time

    if (archive is not None and delete_only) or (not dry_run and archive is None and not delete_only):
        raise click.UsageError("give exactly one of --archive FILE or --delete")
    if archive is not None and archive.exists():
        raise click.ClickException(f"{archive}: already exists (never overwritten)")
    cutoff = time.time() - days * 86400
    try:
        result = _audit_query(ctx).prune(cutoff=cutoff, archive=None if dry_run else archive, dry_run=dry_run)
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    except OSError as exc:
        raise click.ClickException(f"{archive}: not written ({exc.strerror}); nothing deleted") from None
    except PruneAborted as exc:
        raise click.ClickException(f"the trail changed while archiving ({exc}); nothing deleted") from None
    except PruneWouldBreakChain as exc:
        raise click.ClickException(f"{exc}; nothing deleted") from None
    older = f"{result.records} record(s) older than {format_time(cutoff)}"
    if dry_run:
        click.echo(f"would remove {older} (ids below {result.boundary_id})")
    elif result.archive is not None:
        click.echo(f"archived {older} to {result.archive}, then deleted them")
    else:
        click.echo(f"deleted {older}")


@audit.command("summarize")
@click.pass_context
def audit_summarize(ctx: click.Context) -> None:
    """Bring the summaries behind signal and audience filters, charts and the graph up to date.

    The review page and the queries do this a little at a time; run it once after an
    upgrade on a large trail (thousands of records a second), or from cron.
    """
    from sqlalchemy.exc import SQLAlchemyError

    try:
        status = _audit_query(ctx).refresh(budget=None)
    except SQLAlchemyError as exc:
        raise _audit_failed(exc) from None
    click.echo(f"summaries up to record {status.last_id} ({status.behind} newer record(s) not yet settled)")


def _audit_engine(settings: Settings) -> Any:
    from sqlalchemy.exc import SQLAlchemyError

    from .adapters import sql
    from .migrations import SchemaError, ensure

    try:
        engine = sql.make_engine(settings.database_url)
        ensure(engine, migrate=settings.database_migrate_on_start)
    except SchemaError as exc:
        raise click.ClickException(f"setting database_url: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot open the audit trail ({type(exc).__name__})"
        ) from None
    return engine


@audit.command("verify")
@click.option(
    "--checkpoint",
    "checkpoint_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A checkpoint from `sts audit checkpoint`: every chain must still reach the head it saw "
    "(repeatable).",
)
@click.option(
    "--jwks",
    "jwks_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Check checkpoint signatures with this JWK Set (default: the keys the key ring publishes).",
)
@click.option(
    "--allow-unchained",
    is_flag=True,
    help="Accept records without a chain written after chaining began (by an older version).",
)
@click.pass_context
def audit_verify(
    ctx: click.Context, checkpoint_files: tuple[Path, ...], jwks_file: Path | None, allow_unchained: bool
) -> None:
    """Recompute the audit trail's hash chains; report the first broken link of each chain.

    Exits 0 when every record is as it was written, 1 when a record was changed,
    deleted or moved, or (with --checkpoint) the newest records were deleted.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from .adapters import audit_integrity
    from .core.audit_chain import AuditTrailBroken, CheckpointInvalid

    settings = _settings(ctx)
    checkpoints = []
    if checkpoint_files:
        key_for = _checkpoint_keys(settings, jwks_file)
        for path in checkpoint_files:
            try:
                checkpoint = audit_integrity.read_checkpoint(path.read_text(), key_for, settings.issuer)
            except (CheckpointInvalid, OSError, UnicodeError) as exc:
                raise click.ClickException(f"{path}: not a valid checkpoint: {exc}") from None
            checkpoints.append((path, checkpoint))
    engine = _audit_engine(settings)
    try:
        report, unchained = audit_integrity.verify_trail(engine, [c.heads for _, c in checkpoints])
    except AuditTrailBroken as exc:
        for link in exc.report.broken:
            click.echo(f"BROKEN {link}")
        click.echo(f"audit trail does NOT verify: {len(exc.report.broken)} broken chain(s)")
        ctx.exit(1)
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot read the audit trail ({type(exc).__name__})"
        ) from None
    finally:
        engine.dispose()
    click.echo(f"ok: {report.records} record(s) in {len(report.heads)} chain(s) verify")
    for path, checkpoint in checkpoints:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(checkpoint.issued_at or 0))
        click.echo(f"ok: every chain reaches the head checkpoint {path} saw ({when}, key {checkpoint.kid})")
    if report.pruned_past_checkpoint:
        pruned = len(set(report.pruned_past_checkpoint))
        click.echo(f"note: {pruned} chain(s) pruned past a checkpoint's head (not checkable there)")
    if unchained.before:
        click.echo(f"note: {unchained.before} record(s) written before chaining began are not covered")
    if unchained.after:
        click.echo(
            f"{'note' if allow_unchained else 'BROKEN'}: {unchained.after} record(s) without a chain "
            f"written after chaining began (first: record id {unchained.first_after}); not by this version"
        )
        if not allow_unchained:
            ctx.exit(1)


def _checkpoint_keys(settings: Settings, jwks_file: Path | None) -> Any:
    """``key_for(kid, alg)`` over the JWK Set given, else over what the key ring publishes."""
    from .adapters.jwks import StaticJWKS
    from .adapters.keyring import SUPPORTED_ALGORITHMS

    try:
        if jwks_file is not None:
            document, source = json.loads(jwks_file.read_text()), str(jwks_file)
        else:
            document, source = _keyring(settings, create=False).public_jwks(), "the key ring"
        return StaticJWKS(document, algorithms=list(SUPPORTED_ALGORITHMS), source=source).key_for
    except (ConfigurationError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@audit.command("checkpoint")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the checkpoint to this new file (default: standard output).",
)
@click.pass_context
def audit_checkpoint(ctx: click.Context, output: Path | None) -> None:
    """Sign every audit chain's head with the service's signing key: a JWS to keep elsewhere.

    `sts audit verify --checkpoint FILE` then detects the deletion of any record
    the checkpoint covers, the newest ones included.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from .adapters import audit_integrity

    settings = _settings(ctx)
    signer = _keyring(settings, create=False).signer()
    engine = _audit_engine(settings)
    try:
        token, chains = audit_integrity.sign_checkpoint(engine, signer, settings.issuer, time.time())
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"setting database_url: cannot read the audit trail ({type(exc).__name__})"
        ) from None
    finally:
        engine.dispose()
    if output is None:
        click.echo(token)
    else:
        try:
            with output.open("x", encoding="ascii") as out:
                out.write(token + "\n")
        except OSError as exc:
            raise click.ClickException(f"{output}: {exc.strerror}") from None
    click.echo(f"checkpoint of {chains} chain(s) signed with key {signer.kid}", err=True)


# -- db ----------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """The audit and state database: schema migrations (Alembic, shipped in the package)."""


def _database(ctx: click.Context) -> Any:
    from .adapters import sql

    return sql.make_engine(_settings(ctx).database_url)


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Upgrade the schema to REVISION (default: head, this version's newest).

    Safe while the service runs and when several instances upgrade at once: the
    upgrade holds a database lock and commits whole or not at all.  A database made
    by 0.1.0 (no alembic_version table) is recognised and stamped first.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from .adapters.readiness import describe, where
    from .migrations import SchemaError, upgrade

    engine = _database(ctx)
    try:
        done = upgrade(engine, revision)
    except SchemaError as exc:
        raise click.ClickException(f"database {where(engine)}: {exc}") from None
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database {where(engine)}: {describe(exc)}") from None
    finally:
        engine.dispose()
    if done.after == done.before:
        click.echo(f"database {where(engine)}: schema already at {done.after}")
    else:
        start = done.before or ("the schema of 0.1.0, made before migrations," if done.stamped else "empty")
        click.echo(f"database {where(engine)}: schema upgraded from {start} to {done.after}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema's revision; exit 1 unless it is this version's newest (head)."""
    from sqlalchemy.exc import SQLAlchemyError

    from .adapters.readiness import describe, where
    from .migrations import state

    engine = _database(ctx)
    try:
        is_current, text = state(engine)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"database {where(engine)}: {describe(exc)}") from None
    finally:
        engine.dispose()
    click.echo(f"database {where(engine)}: {text}")
    if not is_current:
        ctx.exit(1)


@db.command("history")
def db_history() -> None:
    """List the schema revisions this version knows, oldest first."""
    from .migrations import history

    for revision, _down, title in history():
        click.echo(f"{revision}  {title}")


# -- dev -----------------------------------------------------------------------------------------


@main.group()
def dev() -> None:
    """DEVELOPMENT ONLY: a fake upstream issuer of workload tokens. Never trust it in production."""


_DEV_KEY_DIR = Path("keys") / "dev-issuer"


@dev.command("issuer")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback only.")
@click.option("--port", default=8081, show_default=True)
@click.option(
    "--key-dir", type=click.Path(file_okay=False, path_type=Path), default=_DEV_KEY_DIR, show_default=True
)
def dev_issuer(host: str, port: int, key_dir: Path) -> None:
    """Serve the development issuer's JWKS (and /mint/* endpoints) on loopback."""
    from werkzeug.serving import run_simple

    from .dev.issuer import DevIssuer, require_loopback_host

    try:
        require_loopback_host(host)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    issuer = DevIssuer.load_or_create(key_dir, f"http://{host}:{port}")
    click.echo(
        f"DEVELOPMENT issuer {issuer.issuer_url} (kid {issuer.kid}); never trust it in production", err=True
    )
    run_simple(host, port, issuer.wsgi_app(), threaded=True)


def _flag(value: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``); anything else is not a flag."""
    if value.lower() in {"true", "1", "yes"}:
        return True
    if value.lower() in {"false", "0", "no"}:
        return False
    raise ValueError(value)


#: The token builders' options that are not strings (``sts.dev.issuer.DevIssuer``), read from
#: ``--claim NAME=VALUE`` as their type; any other NAME is a string option or an extra claim.
_TYPED_CLAIM_OPTIONS: dict[str, Callable[[str], Any]] = {
    "lifetime": int,
    "warnafter": int,
    "now": float,
    "immutable_sub": _flag,
    "ref_protected": _flag,
}


def _claim_options(claims: tuple[str, ...]) -> dict[str, Any]:
    """``--claim NAME=VALUE`` pairs, each value of the type its builder option takes."""
    options: dict[str, Any] = {}
    for claim in claims:
        name, equals, value = claim.partition("=")
        if not equals:
            continue
        convert = _TYPED_CLAIM_OPTIONS.get(name)
        try:
            options[name] = convert(value) if convert is not None else value
        except ValueError:
            raise click.BadParameter(f"{name}: not a valid {name} value", param_hint="--claim") from None
    return options


@dev.command("token")
@click.argument("kind", type=click.Choice(["github-actions", "kubernetes", "gitlab", "spiffe"]))
@click.option("--issuer-url", default="http://127.0.0.1:8081", show_default=True)
@click.option(
    "--key-dir", type=click.Path(file_okay=False, path_type=Path), default=_DEV_KEY_DIR, show_default=True
)
@click.option("--audience", default="http://127.0.0.1:8080", show_default=True)
@click.option("--claim", "claims", multiple=True, help="Extra or overriding claim NAME=VALUE (repeatable).")
def dev_token(kind: str, issuer_url: str, key_dir: Path, audience: str, claims: tuple[str, ...]) -> None:
    """Print a workload token of KIND signed by the development issuer's key."""
    from .dev.issuer import DevIssuer

    issuer = DevIssuer.load_or_create(key_dir, issuer_url)
    extra = _claim_options(claims)
    if kind == "github-actions":
        token = issuer.github_actions_token(audience=audience, **extra)
    elif kind == "kubernetes":
        token = issuer.kubernetes_token(audience=[audience], **extra)
    elif kind == "gitlab":
        token = issuer.gitlab_token(audience=audience, **extra)
    else:
        token = issuer.spiffe_svid(
            extra.pop("spiffe_id", "spiffe://example.org/payments/api"), audience, **extra
        )
    click.echo(token)


# -- revoke --------------------------------------------------------------------------------------


@main.group()
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
    """
    from .app import create_app
    from .core.delegation import SELF_ISSUER
    from .core.subject_state import ANY_ISSUER, identity_key

    settings = _settings(ctx)
    known = [i.name for i in settings.issuers] + [SELF_ISSUER, ANY_ISSUER]
    if issuer_name not in known:
        # A name that matches no issuer would revoke nothing, silently.
        raise click.BadParameter(
            f"{issuer_name!r} is not a configured issuer; choose one of {', '.join(map(repr, known))}",
            param_hint="ISSUER_NAME",
        )
    if not subject:
        raise click.BadParameter("the subject must not be empty", param_hint="SUBJECT")
    try:
        runtime = create_app(settings).extensions["sts"]
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    now = time.time()

    def change(state: Any) -> Any:
        later = max(now, state.revoked_before or 0)
        changes: dict[str, Any] = {"revoked_before": later}
        if block:
            changes["blocked_until"] = max(now + block, state.blocked_until or 0)
        return state.with_event("operator.revoke", now, **changes)

    key = identity_key(issuer_name, subject)
    runtime.subject_states.update(key, change, STATE_TTL)
    click.echo(
        f"revoked tokens issued to {key} before {int(now)}" + (f"; blocked for {block}s" if block else "")
    )


# -- baseline ------------------------------------------------------------------------------------


@main.group()
def baseline() -> None:
    """Behaviour baselines: show an identity's, confirm changed facts, or start it afresh.

    IDENTITY is ISSUER_NAME|SUBJECT, as the audit record's risk section names it
    (for example 'github|repo:acme/app:ref:refs/heads/main').
    """


def _baseline_store(ctx: click.Context, identity: str) -> Any:
    if "|" not in identity or identity.startswith("|") or identity.endswith("|"):
        raise click.UsageError("IDENTITY must be ISSUER_NAME|SUBJECT")
    from .app import create_app

    settings = _settings(ctx)
    try:
        return create_app(settings).extensions["sts"].baselines
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None


def _load_baseline(store: Any, identity: str) -> Any:
    from .core.ports import StoreUnavailable

    try:
        return store.load(identity)
    except StoreUnavailable as exc:
        raise click.ClickException(f"the store is unavailable: {exc}") from None


def _save_baseline(store: Any, identity: str, value: Any) -> None:
    from .core.baseline import BASELINE_TTL
    from .core.ports import StoreUnavailable

    try:
        store.save(identity, value, BASELINE_TTL)
    except StoreUnavailable as exc:
        raise click.ClickException(f"the store is unavailable: {exc}") from None


@baseline.command("show")
@click.argument("identity")
@click.pass_context
def baseline_show(ctx: click.Context, identity: str) -> None:
    """Print IDENTITY's baseline as JSON: each stable fact, confirmed or pending (with its probation)."""
    from .core.drift import session_summary

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
    from .core.baseline import accept_pending

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
        click.echo(f"accepted {name}={json.dumps(current.pending[name].value)} for {identity}")


@baseline.command("reset")
@click.argument("identity")
@click.pass_context
def baseline_reset(ctx: click.Context, identity: str) -> None:
    """Forget IDENTITY's baseline: it learns afresh, and the next facts seen become its baseline."""
    from .core.baseline import Baseline

    store = _baseline_store(ctx, identity)
    _save_baseline(store, identity, Baseline())
    click.echo(f"reset the baseline of {identity}: it is learning again")
