"""``sts clients``: client registry helpers."""

from __future__ import annotations

import sys

import click


@click.group()
def clients() -> None:
    """Client registry helpers."""


@clients.command("secret")
@click.option("--slow", is_flag=True, help="Hash with PBKDF2 (for a secret you chose yourself).")
@click.option(
    "--stdin", "from_stdin", is_flag=True, help="Read the secret from stdin instead of generating one."
)
def clients_secret(slow: bool, from_stdin: bool) -> None:
    """Generate a client secret and the secret_hash to put in the configuration."""
    from ..core.client_secrets import generate_secret, hash_secret

    secret = sys.stdin.readline().rstrip("\n") if from_stdin else generate_secret()
    if not from_stdin:
        click.echo(f"client_secret: {secret}")
    click.echo(f"secret_hash: {hash_secret(secret, slow=slow or from_stdin)}")
