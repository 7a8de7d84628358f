"""``sts dev``: DEVELOPMENT ONLY, the fake upstream issuer and its tokens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


@click.group()
def dev() -> None:
    """DEVELOPMENT ONLY: a fake upstream issuer of workload tokens. Never trust it in production."""


_DEV_KEY_DIR = Path("keys") / "dev-issuer"


@dev.command("issuer")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback only.")
@click.option("--port", default=8081, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--key-dir", type=click.Path(file_okay=False, path_type=Path), default=_DEV_KEY_DIR, show_default=True
)
def dev_issuer(host: str, port: int, key_dir: Path) -> None:
    """Serve the development issuer's JWKS (and /mint/* endpoints) on loopback."""
    from werkzeug.serving import run_simple

    from ..dev.issuer import DevIssuer, require_loopback_host

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
    from ..dev.issuer import DevIssuer

    try:
        issuer = DevIssuer.load_or_create(key_dir, issuer_url)
    except ValueError as exc:  # an empty --issuer-url, say
        raise click.UsageError(str(exc)) from None
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
