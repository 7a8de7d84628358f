"""``sts-ci``: exchange a CI job's OIDC token for an STS access token and hand it to later steps.

::

    sts-ci exchange --sts https://sts.example.com --audience https://deploy.example.com \\
        [--scope deploy:write] [--output-name STS_TOKEN] [--id-token-audience AUD] \\
        [--id-token-var STS_ID_TOKEN] [--dotenv sts.env]

GitHub Actions (``GITHUB_ACTIONS=true``; the job needs ``permissions:
id-token: write``): the job's OIDC token is requested from the runtime for
``--id-token-audience`` (default: the STS URL); the issued token is masked
(``::add-mask::`` on stdout) before anything else, then written as
``NAME=<token>`` to ``$GITHUB_ENV`` (later steps see ``$NAME``) and as
``token=<token>`` to ``$GITHUB_OUTPUT`` (``steps.<id>.outputs.token``).

GitLab CI (``GITLAB_CI=true``): the id token is read from the variable named
by ``--id-token-var`` (declare it under ``id_tokens:``); the issued token is
written as ``NAME=<token>`` to a dotenv file for ``artifacts: reports:
dotenv``.  The token is never printed.

Exit status: 0 issued; 1 the STS refused (the OAuth error, what it means and
what to change are printed); 2 usage; 3 the CI environment is not usable (no
CI detected, no id token, output files not writable); 4 the STS could not be
reached or is temporarily unavailable (retry).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO

import requests
from joserfc import jws
from joserfc.errors import JoseError

from .assurance import ACR_ATTESTED, rank
from .attestation import AttestationSource, GitHubActionsAttestation, GitLabCIAttestation
from .errors import AttestationUnavailable, ExchangeRefused, StsUnavailable
from .exchange import IssuedToken, TokenExchangeClient, access_token_only

__all__ = ["EXIT_ENVIRONMENT", "EXIT_OK", "EXIT_REFUSED", "EXIT_UNAVAILABLE", "explain_refusal", "main"]

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_ENVIRONMENT: Final = 3
EXIT_UNAVAILABLE: Final = 4

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Environment(Exception):
    """The CI environment is not usable; the message says how to fix it."""


def _subject_of(token: str) -> str:
    """The ``sub`` of the job's own token, for messages (unverified: it only names the job)."""
    try:
        payload = json.loads(jws.extract_compact(token.encode("ascii")).payload)
    except (JoseError, ValueError, UnicodeError):
        return "this job"
    sub = payload.get("sub") if isinstance(payload, dict) else None
    return str(sub) if isinstance(sub, str) and sub else "this job"


def explain_refusal(refusal: ExchangeRefused, *, subject: str, audience: str, scope: str | None) -> list[str]:
    """What a refusal means and what to change, in plain words; never just "forbidden"."""
    error = refusal.error
    meaning: str
    change: str
    level = _level_beyond_attestation(refusal)
    if refusal.is_step_up and level is not None:
        meaning = (
            f"the policy needs assurance level {level} for this audience or scope: "
            f"{_LEVEL_MEANING.get(level, 'a level this helper does not know')}; "
            "a token handed to later job steps as a variable cannot be bound to a key"
        )
        change = (
            "ask only for scopes that do not need it, or call the service from a step that uses the "
            "sts_client library (StsAuth with dpop=True, and posture= for posture evidence)"
        )
    elif refusal.is_step_up:
        meaning = "fresh attestation required: the job's token is older than the STS accepts now"
        signals = ", ".join(refusal.signals)
        if signals:
            meaning += f" (signals: {signals})"
        change = "re-run the job, so it starts with a fresh token"
    elif refusal.risk is not None and refusal.clears:
        meaning = (
            f"something stable about {subject} changed since the STS first saw it (for example the "
            "runner environment: a self-hosted runner where GitHub-hosted ones ran) and nobody has "
            "confirmed the change; a fresh token does not confirm it"
            f" (signals: {', '.join(refusal.signals) or 'unnamed'})"
        )
        change = _how_to_confirm(refusal.clears)
    elif refusal.risk is not None:
        meaning = f"refused for risk (signals: {', '.join(refusal.signals) or 'unnamed'})"
        change = "ask the platform team to check the audit record for this job; re-running will not help"
    elif error == "invalid_target":
        meaning = f"no policy grants this audience ({audience}) to {subject}"
        change = "check the audience or ask the platform team to add a rule"
    elif error == "invalid_scope":
        meaning = f"none of the scopes asked for ({scope or 'the default'}) may be granted to {subject}"
        change = "ask for a scope the policy rule allows, or ask the platform team to allow it"
    elif error == "invalid_request":
        meaning = (
            f"the STS did not accept the job's token for {subject}: it failed validation "
            "(issuer, audience, expiry) or no policy rule accepts this identity"
        )
        change = (
            "check --id-token-audience (the job's token must be issued for an audience the STS trusts) "
            "and that a policy rule matches this repository/ref; ask the platform team otherwise"
        )
    elif error == "invalid_client":
        meaning = "the policy rule requires client authentication, and none (or a wrong one) was given"
        change = "ask the platform team whether this job should use client credentials"
    elif error == "unauthorized_client":
        meaning = "the client is not allowed by the matching policy rule"
        change = "ask the platform team to list the client in the rule"
    elif error == "invalid_dpop_proof" or error == "use_dpop_nonce":
        meaning = "the STS did not accept the proof of possession"
        change = "report this as a bug in sts-ci"
    else:
        meaning = f"the STS refused the exchange ({error})"
        change = "ask the platform team, quoting the error"
    lines = [f"sts-ci: the STS refused the token exchange: {error} (HTTP {refusal.status})"]
    if refusal.description:
        lines.append(f"  the STS said: {refusal.description}")
    lines += [f"  what it means: {meaning}", f"  what to change: {change}"]
    return lines


_LEVEL_MEANING: Final = {
    "urn:workload-sts:acr:pop": "a token bound to the workload's own key (DPoP or a client certificate)",
    "urn:workload-sts:acr:posture": "a key-bound token plus posture evidence (a posture token)",
}


def _level_beyond_attestation(refusal: ExchangeRefused) -> str | None:
    """The least level a step-up names, when it is more than a fresh token can reach."""
    known = sorted((v for v in refusal.acr_values if rank(v) >= 0), key=rank)
    if known and rank(known[0]) > rank(ACR_ATTESTED):
        return known[0]
    if refusal.acr_values and not known:
        return refusal.acr_values[0]
    return None


def _one_line(text: str) -> str:
    """``text`` with every character that is not printable (line breaks included) as ``?``."""
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def _how_to_confirm(clears: list[dict[str, object]]) -> str:
    """What would confirm a changed fact, from the refusal's ``clears``, in plain words."""
    ways = []
    for clear in clears:
        by = clear.get("by")
        if by == "operator_accept":
            # Printed into the job log: no control characters from the answer (they could start a line).
            identity = "".join(c if c.isprintable() else "?" for c in str(clear.get("identity") or ""))
            identity = identity[:300] or "ISSUER|SUBJECT"
            ways.append(
                f"if the change is expected, ask the platform team to run: sts baseline accept '{identity}'"
            )
        elif by == "probation":
            left = clear.get("exchanges_left")
            when = clear.get("not_before")
            at = "later"
            if isinstance(when, int) and not isinstance(when, bool):
                # A time far beyond any calendar (a broken or hostile answer) stays "later".
                with contextlib.suppress(OverflowError, OSError, ValueError):
                    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
            ways.append(
                f"otherwise it is confirmed after {left} more run(s) with a fresh token, "
                f"the last one not before {at}"
            )
        elif isinstance(by, str):
            ways.append(f"or present {by.replace('_', ' ')} (not possible from sts-ci)")
    return "; ".join(ways) or "ask the platform team to check the audit record for this job"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sts-ci", description="Exchange a CI job's OIDC token at the STS.")
    commands = parser.add_subparsers(dest="command", required=True)
    exchange = commands.add_parser("exchange", help="exchange the job's token and export the access token")
    exchange.add_argument("--sts", required=True, help="the STS issuer URL")
    exchange.add_argument("--audience", required=True, help="the audience to ask a token for")
    exchange.add_argument("--scope", help="space-separated scopes (default: the rule's default scopes)")
    exchange.add_argument("--output-name", default="STS_TOKEN", help="variable name for the token")
    exchange.add_argument(
        "--id-token-audience", help="GitHub: audience of the job's OIDC token (default: the STS URL)"
    )
    exchange.add_argument(
        "--id-token-var", default="STS_ID_TOKEN", help="GitLab: variable holding the id token"
    )
    exchange.add_argument("--dotenv", default="sts.env", help="GitLab: dotenv file to write")
    exchange.add_argument("--timeout", type=float, default=15.0, help="seconds per HTTP request")
    return parser


def _append(path_value: str | None, variable: str, line: str) -> None:
    if not path_value:
        raise _Environment(f"${variable} is not set; is this a GitHub Actions step?")
    try:
        with open(path_value, "a", encoding="utf-8") as handle:
            handle.write(line)
    except OSError as exc:
        raise _Environment(f"cannot write ${variable} ({type(exc).__name__})") from None


def _write_dotenv(path: Path, line: str) -> None:
    """Write the token's line to ``path``, mode 0600 (also a file that was there, looser), and
    never through a symbolic link (another file, perhaps one the job publishes, would hold it)."""
    try:
        # (O_NONBLOCK: a FIFO without a reader fails at once instead of hanging the job.)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        descriptor = os.open(path, flags, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise IsADirectoryError(path)  # (a FIFO, a device: not a file to leave a token in)
            os.fchmod(descriptor, 0o600)  # before anything is written to it
            handle.truncate()
            handle.write(line)
    except OSError as exc:
        raise _Environment(f"cannot write the dotenv file {path} ({type(exc).__name__})") from None


def _exchange(
    source: AttestationSource, client: TokenExchangeClient, args: argparse.Namespace, on_token: list[str]
) -> IssuedToken:
    """Exchange the job's token; on a step-up refusal, once more with a new one when the platform can."""
    subject_token = source.fetch()
    on_token.append(subject_token)
    try:
        # Handed on as an access token: never one the STS says is not (an outside audit).
        return access_token_only(client.exchange(subject_token, audience=args.audience, scope=args.scope))
    except ExchangeRefused as refusal:
        # A new token answers a demand for fresh attestation, never one for a key or posture.
        if not refusal.is_step_up or not source.renewable or _level_beyond_attestation(refusal):
            raise
    subject_token = source.fetch()
    on_token.append(subject_token)
    return access_token_only(client.exchange(subject_token, audience=args.audience, scope=args.scope))


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    env = os.environ if environ is None else environ
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else EXIT_USAGE
    if not _NAME.fullmatch(args.output_name):
        print(f"sts-ci: --output-name must be a variable name, not {args.output_name!r}", file=err)
        return EXIT_USAGE

    github = env.get("GITHUB_ACTIONS") == "true"
    gitlab = env.get("GITLAB_CI") == "true"
    session = requests.Session()
    source: AttestationSource
    if github:
        source = GitHubActionsAttestation(
            args.id_token_audience or args.sts, session=session, environ=env, timeout=args.timeout
        )
    elif gitlab:
        source = GitLabCIAttestation(args.id_token_var, environ=env)
    else:
        print(
            "sts-ci: neither GitHub Actions (GITHUB_ACTIONS=true) nor GitLab CI (GITLAB_CI=true) detected;"
            " run this in a CI job, or use the sts_client library directly",
            file=err,
        )
        return EXIT_ENVIRONMENT

    subject_tokens: list[str] = []

    def mask_subject_tokens() -> None:
        # GitHub's toolkit masks the job's OIDC token too (core.getIDToken); so do we.
        if github:
            for token in subject_tokens:
                print(f"::add-mask::{token}", file=out)
            subject_tokens.clear()

    try:
        client = TokenExchangeClient(args.sts, session=session, timeout=args.timeout)
        issued = _exchange(source, client, args, subject_tokens)
    except ValueError as exc:
        print(f"sts-ci: {exc}", file=err)
        return EXIT_USAGE
    except AttestationUnavailable as exc:
        mask_subject_tokens()
        print(f"sts-ci: cannot get the job's token: {exc}", file=err)
        return EXIT_ENVIRONMENT
    except ExchangeRefused as refusal:
        subject = _subject_of(subject_tokens[-1]) if subject_tokens else "this job"
        mask_subject_tokens()
        for line in explain_refusal(refusal, subject=subject, audience=args.audience, scope=args.scope):
            # One line each, whatever the STS answered: a line break in its error text would start
            # a line of its own, which the runner reads as a workflow command (``::stop-commands::``).
            print(_one_line(line), file=err)
        return EXIT_REFUSED
    except StsUnavailable as exc:
        mask_subject_tokens()
        print(_one_line(f"sts-ci: the STS is unavailable: {exc}"), file=err)
        later = f"in {exc.retry_after} s" if exc.retry_after is not None else "later"
        print(f"  what to change: nothing in the job; retry {later}, or tell the platform team", file=err)
        return EXIT_UNAVAILABLE
    mask_subject_tokens()

    name = args.output_name
    summary = f"scope {issued.scope or '-'}, expires in {issued.expires_in} s"
    try:
        if github:
            # Mask first: from here on the runner replaces the token with *** in every log line.
            print(f"::add-mask::{issued.access_token}", file=out)
            _append(env.get("GITHUB_ENV"), "GITHUB_ENV", f"{name}={issued.access_token}\n")
            _append(
                env.get("GITHUB_OUTPUT"),
                "GITHUB_OUTPUT",
                f"token={issued.access_token}\nexpires_in={issued.expires_in}\nscope={issued.scope or ''}\n",
            )
            print(
                f"sts-ci: token for {args.audience} ({summary}) in ${name} and steps.<id>.outputs.token",
                file=out,
            )
        else:
            path = Path(args.dotenv)
            _write_dotenv(path, f"{name}={issued.access_token}\n")
            print(
                f"sts-ci: token for {args.audience} ({summary}) written as {name} to {path};"
                f" publish it with `artifacts: reports: dotenv: {path}`",
                file=out,
            )
    except _Environment as exc:
        print(f"sts-ci: {exc}", file=err)
        return EXIT_ENVIRONMENT
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
