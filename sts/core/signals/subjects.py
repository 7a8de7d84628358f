"""Subjects of a SET: RFC 9493 subject identifiers (SSF 1.0 ``sub_id``), resolved to the identity
keys (``<issuer name>|<subject>``) whose state an event changes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ...protocol.security_events import (
    MAX_IDENTITIES,
    MAX_SUBJECT_CHARS,
    SetRefused,
    invalid_set,
    shown,
)
from ..attest import IssuerDirectory
from ..subject_state import ANY_ISSUER, identity_key

#: The members of an SSF 1.0 ``complex`` subject (§3.2) that may name the workload; others are ignored.
COMPLEX_MEMBERS: Final = ("user", "device", "session", "application", "tenant", "org_unit", "group")


@dataclass(frozen=True)
class SubjectScope:
    """What a subject identifier may be resolved to, for one transmitter."""

    issuers: IssuerDirectory
    #: Issuer names whose subjects the transmitter may name; None: every issuer.
    allowed: frozenset[str] | None = None


def _subject_text(value: object, member: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid_set("subject.malformed", f"{member} is not a non-empty string")
    if len(value) > MAX_SUBJECT_CHARS:
        raise invalid_set("subject.malformed", f"{member} longer than {MAX_SUBJECT_CHARS} characters")
    return value


def _scoped(issuer_name: str, subject: str, scope: SubjectScope) -> tuple[str, ...]:
    if scope.allowed is not None and issuer_name not in scope.allowed:
        raise SetRefused("access_denied", "subject.issuer_not_allowed", issuer_name)
    return (identity_key(issuer_name, subject),)


def _any_issuer(subject: str, scope: SubjectScope) -> tuple[str, ...]:
    """A subject named without an issuer: every issuer's, or every issuer the transmitter may name."""
    if scope.allowed is None:
        return (identity_key(ANY_ISSUER, subject),)
    return tuple(identity_key(name, subject) for name in sorted(scope.allowed))


def resolve_subject(sub_id: object, scope: SubjectScope, *, nested: bool = False) -> tuple[str, ...]:
    """The identity keys (``<issuer name>|<subject>``) an RFC 9493 subject identifier names.

    * ``iss_sub`` ``{iss, sub}``: the configured issuer with exactly that
      ``iss`` (this service's own issuer is ``self``); none is ``invalid_request``.
    * ``opaque`` ``{id}``, ``email`` ``{email}``: ``*|<value>``, which applies to the
      subject from every issuer.
    * ``uri`` ``{uri}``: a ``spiffe://`` ID goes to the issuer configured for its
      trust domain; any other URI (or an unknown trust domain) is ``*|<uri>``.
    * ``aliases`` ``{identifiers: [...]}``: every alias (RFC 9493 §3.2.6).
    * ``complex`` (SSF 1.0 §3.2): every member named in :data:`COMPLEX_MEMBERS`;
      at least one is required.

    The older SSE drafts' ``subject_type`` (``iss-sub``) is read as ``format``.
    Anything else is ``invalid_request``.
    """
    if not isinstance(sub_id, dict):
        raise invalid_set("subject.missing")
    fmt = sub_id.get("format", sub_id.get("subject_type"))
    if not isinstance(fmt, str):
        raise invalid_set("subject.missing_format")
    fmt = fmt.replace("-", "_")
    if fmt == "iss_sub":
        iss = _subject_text(sub_id.get("iss"), "iss")
        sub = _subject_text(sub_id.get("sub"), "sub")
        trusted = scope.issuers.by_iss(iss)
        if trusted is None:
            raise invalid_set("subject.unknown_issuer", shown(iss))
        return _scoped(trusted.policy.name, sub, scope)
    if fmt == "opaque":
        return _any_issuer(_subject_text(sub_id.get("id"), "id"), scope)
    if fmt == "email":
        return _any_issuer(_subject_text(sub_id.get("email"), "email"), scope)
    if fmt == "uri":
        uri = _subject_text(sub_id.get("uri"), "uri")
        spiffe = scope.issuers.by_spiffe_subject(uri)
        if spiffe is not None:
            return _scoped(spiffe.policy.name, uri, scope)
        return _any_issuer(uri, scope)
    if fmt in {"aliases", "complex"} and nested:
        raise invalid_set("subject.nested", fmt)
    if fmt == "aliases":
        identifiers = sub_id.get("identifiers")
        if not isinstance(identifiers, list) or not identifiers:
            raise invalid_set("subject.malformed", "aliases without identifiers")
        return unique_identities(
            key for item in identifiers for key in resolve_subject(item, scope, nested=True)
        )
    if fmt == "complex":
        members = [sub_id[m] for m in COMPLEX_MEMBERS if m in sub_id]
        if not members:
            raise invalid_set("subject.complex_without_known_member")
        return unique_identities(key for item in members for key in resolve_subject(item, scope, nested=True))
    raise invalid_set("subject.unknown_format", shown(fmt))


def unique_identities(keys: Iterable[str]) -> tuple[str, ...]:
    """``keys`` in order, each once; more than :data:`MAX_IDENTITIES` refuse the SET."""
    found = tuple(dict.fromkeys(keys))
    if len(found) > MAX_IDENTITIES:
        raise invalid_set("subject.too_many_identifiers")
    return found
