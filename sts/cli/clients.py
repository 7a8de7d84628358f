"""``sts clients``: client registry helpers."""

from __future__ import annotations

import sys

import click


@click.group()
def clients() -> None:
    """Client registry helpers."""


#: The shortest secret ``--stdin`` hashes (client secrets and reviewers' passwords): a chosen
#: secret is hashed slowly (PBKDF2), but one of a few characters falls to a guess all the same.
#: NIST SP 800-63B-4 §3.1.1.2 asks at least 15 characters of a password used alone.
MIN_CHOSEN_SECRET = 15


@clients.command("secret")
@click.option("--slow", is_flag=True, help="Hash with PBKDF2 (for a secret you chose yourself).")
@click.option(
    "--stdin", "from_stdin", is_flag=True, help="Read the secret from stdin instead of generating one."
)
def clients_secret(slow: bool, from_stdin: bool) -> None:
    """Generate a client secret and the secret_hash to put in the configuration."""
    from ..core.client_secrets import generate_secret, hash_secret

    if from_stdin:
        try:
            secret = sys.stdin.readline().rstrip("\r\n")
            secret.encode("utf-8")  # stdin may decode bytes that are not UTF-8 as surrogates
        except (UnicodeDecodeError, UnicodeEncodeError):
            raise click.UsageError("--stdin: the secret is not UTF-8") from None
        if len(secret) < MIN_CHOSEN_SECRET:
            # An empty line (or none) would be hashed as a secret anyone can guess.
            raise click.UsageError(f"--stdin: at least {MIN_CHOSEN_SECRET} characters, on one line")
    else:
        secret = generate_secret()
    if not from_stdin:
        click.echo(f"client_secret: {secret}")
    click.echo(f"secret_hash: {hash_secret(secret, slow=slow or from_stdin)}")
