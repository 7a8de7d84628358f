"""Signed checkpoints of the audit trail's hash chains: what they claim, and what the trail must
then still show.

A checkpoint (``sts audit checkpoint``) is a JWT (RFC 7519) signed with the service's key, naming
every chain's head (``seq``, hash, record id), the record after each chain's anchor, and what the
trail records of itself (:class:`TrailFacts`).  Whoever can write to the audit database cannot
sign: what a checkpoint claims decides where the database, anchors and cutoffs included, could
have been edited (see docs/audit.md, Checkpoints).

This module is pure: it computes and checks, and reads or writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .audit_chain import CHAIN_ID, HASH, BrokenLink, ChainStart

#: The ``typ`` of a checkpoint JWT (RFC 8725 §3.11: explicit typing, so that a checkpoint is
#: never mistaken for an access token).
CHECKPOINT_TYP = "audit-checkpoint+jwt"


@dataclass(frozen=True)
class TrailFacts:
    """What the trail records of itself (``audit_trail``), or what a checkpoint signed of it.

    ``prechain_records`` records without a chain were written before chaining began, the highest
    id among them ``prechain_highest_id`` (None: none were); every record with an id below
    ``pruned_below`` was removed by a prune (None: no prune recorded one).
    """

    prechain_records: int
    prechain_highest_id: int | None
    pruned_below: int | None = None


def checkpoint_claims(
    issuer: str,
    now: float,
    heads: Mapping[str, tuple[int, str]],
    ids: Mapping[str, int] | None = None,
    *,
    firsts: Mapping[str, tuple[int, int]] | None = None,
    trail: TrailFacts | None = None,
) -> dict[str, Any]:
    """The claims of a checkpoint: who signed it, when, and every chain's head at that time, with
    the head's record ``id`` where a record holds it (``ids``; not where only the anchor does).

    ``firsts`` (chain id → its anchor's ``seq`` and the id of the record after it, where one is
    there) and ``trail`` sign what an anchor moved by hand and a record made up without a chain
    would otherwise change unseen, in the same database (an outside audit): ``anchor`` and
    ``first`` in each chain, and ``trail`` (the records from before chaining, the last prune's
    cutoff id).  Signed as a JWT (RFC 7519) with ``typ`` :data:`CHECKPOINT_TYP`; it has no
    ``aud`` or ``exp``: it is evidence, kept as long as the records it covers.
    """
    chains: dict[str, dict[str, Any]] = {}
    for chain_id, (seq, digest) in sorted(heads.items()):
        chains[chain_id] = {"seq": seq, "hash": digest}
        if ids is not None and chain_id in ids:
            chains[chain_id]["id"] = ids[chain_id]
        if firsts is not None and chain_id in firsts:
            chains[chain_id]["anchor"], chains[chain_id]["first"] = firsts[chain_id]
    claims: dict[str, Any] = {"iss": issuer, "iat": int(now), "chains": chains}
    if trail is not None:
        claims["trail"] = {
            "prechain_records": trail.prechain_records,
            "prechain_highest_id": trail.prechain_highest_id,
            "pruned_below": trail.pruned_below,
        }
    return claims


def checkpoint_ids(claims: Mapping[str, Any]) -> dict[str, int]:
    """The record ids of the heads a checkpoint names (checkpoints signed before they carried ids
    have none); call after :func:`checkpoint_heads` has checked the claims' shape."""
    ids: dict[str, int] = {}
    for chain_id, head in claims["chains"].items():
        record_id = head.get("id")
        if record_id is not None:
            if type(record_id) is not int or record_id < 1:
                raise CheckpointInvalid(f"malformed record id of chain {chain_id[:40]!r}")
            ids[chain_id] = record_id
    return ids


def checkpoint_firsts(claims: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Each chain's anchor ``seq`` and the id of the record after it, as a checkpoint signed them
    (checkpoints signed before December 2026 have none); after :func:`checkpoint_heads`."""
    firsts: dict[str, tuple[int, int]] = {}
    for chain_id, head in claims["chains"].items():
        anchor, first = head.get("anchor"), head.get("first")
        if anchor is None and first is None:
            continue
        if type(anchor) is not int or type(first) is not int or anchor < 0 or first < 1:
            raise CheckpointInvalid(f"malformed anchor of chain {chain_id[:40]!r}")
        firsts[chain_id] = (anchor, first)
    return firsts


def checkpoint_trail(claims: Mapping[str, Any]) -> TrailFacts | None:
    """What a checkpoint signed of the trail (None: signed before checkpoints carried it)."""
    trail = claims.get("trail")
    if trail is None:
        return None
    if not isinstance(trail, dict):
        raise CheckpointInvalid("malformed trail")
    records, highest, below = (
        trail.get("prechain_records"),
        trail.get("prechain_highest_id"),
        trail.get("pruned_below"),
    )
    if (
        type(records) is not int
        or records < 0
        or any(value is not None and type(value) is not int for value in (highest, below))
    ):
        raise CheckpointInvalid("malformed trail")
    return TrailFacts(records, highest, below)


def prune_inconsistencies(
    starts: Iterable[ChainStart],
    heads: Mapping[str, tuple[int, str]],
    ids: Mapping[str, int],
    lowest_record_id: int | None,
    firsts: Mapping[str, tuple[int, int]] | None = None,
) -> list[BrokenLink]:
    """What pruning cannot explain, given one checkpoint (its heads and their record ids, and the
    ids of the records after the anchors it saw: ``firsts``, chain id → ``(anchor seq, id)``).

    Pruning deletes an oldest prefix of the whole trail, by record id (``sts audit prune``).  So a
    chain whose anchor moved past a record the checkpoint saw lost every record up to the one now
    at its anchor, and so did the whole trail: no record of any chain at or below that record's id
    can remain.  That id is unknown (the record is gone), but within a chain ids rise with ``seq``:
    it is at least the id the checkpoint saw at a ``seq`` at or before the anchor, plus the
    ``seq`` between them.  A record still there at or below it means the anchor was moved by hand
    (anchors are not signed): the records were deleted or moved to another chain.  An outside
    audit deleted a chain's two oldest records, kept an older record of another chain, and moved
    the anchor past them: only the checkpoint's head was compared then, which was not pruned.
    """
    found = []
    anchors = {s.chain_id: s.anchor_seq for s in starts}
    for chain_id, (pin_seq, _hash) in heads.items():
        anchor = anchors.get(chain_id)
        if anchor is None or lowest_record_id is None:
            continue
        known = []
        if chain_id in ids:
            known.append((pin_seq, ids[chain_id], "head"))
        if firsts is not None and chain_id in firsts:
            seen_anchor, first_id = firsts[chain_id]
            known.append((seen_anchor + 1, first_id, "record after its anchor"))
        passed = [point for point in known if point[0] <= anchor]
        if not passed:
            continue
        seq, record_id, what = max(passed)
        removed_up_to = record_id + (anchor - seq)
        if lowest_record_id <= removed_up_to:
            problem = (
                f"the checkpoint's {what} (seq {seq}, record id {record_id}) is behind the chain's anchor "
                f"(seq {anchor}), yet record id {lowest_record_id} is still there: not what pruning does "
                f"(a prune to seq {anchor} removes every record up to id {removed_up_to} at least; "
                "anchor moved by hand)"
            )
            found.append(BrokenLink(chain_id, seq, None, problem))
    return found


def compares_ids(
    heads: Mapping[str, tuple[int, str]],
    ids: Mapping[str, int],
    firsts: Mapping[str, tuple[int, int]],
    anchors: Mapping[str, int],
    *,
    sqlite: bool,
    lowest_chained_id: int | None,
) -> bool:
    """Whether the ids of the records left are held to what one checkpoint saw: by
    :func:`prune_inconsistencies`, and by :func:`below_cutoff` with the cutoff it signed.

    Always, unless the ids really started again, which SQLite does (no ``AUTOINCREMENT``) after a
    prune of every record: the next record is numbered 1, at or below every id a checkpoint signed.
    That takes SQLite (``sqlite``), every chain the checkpoint names pruned past the head it saw
    (``anchors``: chain id → anchor seq), and a chained record left whose id (``lowest_chained_id``,
    the lowest) is at or below the lowest id it signed, its heads' (``ids``) and the records after
    its anchors' (``firsts``): the id of a record it saw that is gone, or a lower one, was given
    again.  An outside audit moved one chain's anchor a few records past a checkpoint's head, with
    records of another chain left above every id it signed: that alone exempted it (every chain
    named "pruned past").  A checkpoint that signed no id (older ones) is compared, as before,
    while a chain it names is not pruned past the head it saw; and so is one of PostgreSQL, whose
    ids never start again.
    """
    covers = any(anchors.get(chain_id, -1) < seq for chain_id, (seq, _hash) in heads.items())
    signed = [*ids.values(), *(first for _anchor, first in firsts.values())]
    if not signed:
        return covers
    if covers or not sqlite or lowest_chained_id is None:
        return True
    # SQLite numbers from 1: an id below it was not given by a prune of every record.
    return not 1 <= lowest_chained_id <= min(signed)


def below_cutoff(pruned_below: int | None, lowest_record_id: int | None, source: str) -> list[BrokenLink]:
    """A record still there with an id below a prune's cutoff (which removes every record below
    it, in every chain): the records after it were deleted by hand and anchors moved to look
    pruned (an outside audit).  ``source`` says where the cutoff comes from."""
    if pruned_below is None or lowest_record_id is None or lowest_record_id >= pruned_below:
        return []
    problem = (
        f"record id {lowest_record_id} is still there, below the cutoff ({source}: id {pruned_below}) "
        "of a prune, which removes every record below it: not what pruning does (records deleted "
        "by hand and anchors moved)"
    )
    return [BrokenLink("(trail)", None, lowest_record_id, problem)]


def prechain_edited(recorded: TrailFacts, signed: Iterable[TrailFacts]) -> list[BrokenLink]:
    """The records written before chaining as ``audit_trail`` counts them (``recorded``) against
    what checkpoints signed of them (``signed``): revision 0011 counted them once, and nothing
    changes the count since (a prune leaves it; fewer of them left than it says is how ``sts audit
    verify`` tells they were pruned).  Raised by hand, it made up a prune, which relaxes the check
    of the oldest hours' counts (an outside audit): only a checkpoint can tell."""
    mine = (recorded.prechain_records, recorded.prechain_highest_id)
    others = sorted({(s.prechain_records, s.prechain_highest_id) for s in signed} - {mine}, key=str)
    if not others:
        return []
    problem = (
        f"audit_trail says {mine[0]} record(s) were written before chaining (highest id {mine[1]}), "
        f"a checkpoint signed {others[0][0]} (highest id {others[0][1]}): counted once, so edited"
    )
    return [BrokenLink("(trail)", None, None, problem)]


class CheckpointInvalid(Exception):
    """A checkpoint that is not one of ours, or not well formed."""


def checkpoint_heads(claims: Mapping[str, Any], issuer: str) -> dict[str, tuple[int, str]]:
    """The chain heads of a checkpoint whose signature has been verified; checks its shape and issuer."""
    if claims.get("iss") != issuer:
        raise CheckpointInvalid(f"issued by {str(claims.get('iss'))[:100]!r}, not by {issuer!r}")
    chains = claims.get("chains")
    if not isinstance(chains, dict):
        raise CheckpointInvalid("no chains")
    heads: dict[str, tuple[int, str]] = {}
    for chain_id, head in chains.items():
        seq = head.get("seq") if isinstance(head, dict) else None
        digest = head.get("hash") if isinstance(head, dict) else None
        if (
            not CHAIN_ID.fullmatch(chain_id)
            or type(seq) is not int
            or seq < 0
            or not isinstance(digest, str)
            or not HASH.fullmatch(digest)
        ):
            raise CheckpointInvalid(f"malformed head of chain {chain_id[:40]!r}")
        heads[chain_id] = (seq, digest)
    return heads
