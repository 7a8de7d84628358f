"""``keyring.json``: which key of the ring is ``next``, ``active`` or ``retired``, and since when.

The file, as written::

    {
      "format": 1,
      "keys": [
        {"kid": "<RFC 7638 thumbprint>", "alg": "ES256", "state": "active",
         "created_at": 1700000000.0, "activated_at": 1700000000.0,
         "retired_at": null, "publish_until": null},
        ...
      ]
    }

Reading validates every entry and the ring's invariants
(:func:`sts.core.key_rotation.ring_problem`); a bad file is a
:class:`~sts.errors.ConfigurationError` naming it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TypeAlias

from sts.core.key_rotation import KEY_STATES, KeyEntry, ring_problem
from sts.errors import ConfigurationError

from .keyring_files import KID_PATTERN, check_owner, refuse_orphaned_keys, write_file_atomically
from .signing_keys import SUPPORTED_ALGORITHMS

METADATA_FILE: Final = "keyring.json"
METADATA_FORMAT: Final = 1

# (st_dev, st_ino, st_mtime_ns, st_size) of keyring.json.  Every write replaces
# the file, so the inode changes even when the mtime resolution is coarse.
FileId: TypeAlias = tuple[int, int, int, int]


def file_id(info: os.stat_result) -> FileId:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


def read_metadata(directory: Path) -> tuple[list[KeyEntry], FileId]:
    """Read and validate ``keyring.json`` (the caller holds a lock); return its entries and identity."""
    path = directory / METADATA_FILE
    try:
        # The directory's owner could replace every file in it (see check_owner).
        check_owner(directory, directory.stat(), "key directory")
    except FileNotFoundError:
        pass  # no key ring there: said below
    except OSError as exc:
        raise ConfigurationError(f"cannot look at key directory {directory}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        refuse_orphaned_keys(directory, METADATA_FILE)  # keys without their ring: say so
        raise ConfigurationError(
            f"no key ring in {directory} ({METADATA_FILE} is missing); initialise it first"
        ) from None
    except OSError as exc:
        raise ConfigurationError(f"cannot open {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            check_owner(path, info, "key ring file")  # the file read, not a link to it
            identity = file_id(info)
            raw = fh.read()
    except OSError as exc:  # a directory in its place, an I/O error: one line, not a traceback
        raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from None
    return parse_metadata(raw, path), identity


def write_metadata(directory: Path, entries: Sequence[KeyEntry]) -> None:
    """Replace ``keyring.json`` atomically with ``entries`` (the caller holds the exclusive lock)."""
    document = {
        "format": METADATA_FORMAT,
        "keys": [
            {
                "kid": e.kid,
                "alg": e.alg,
                "state": e.state,
                "created_at": e.created_at,
                "activated_at": e.activated_at,
                "retired_at": e.retired_at,
                "publish_until": e.publish_until,
            }
            for e in entries
        ],
    }
    data = (json.dumps(document, indent=2) + "\n").encode("utf-8")
    write_file_atomically(directory / METADATA_FILE, data)


def parse_metadata(raw: bytes, path: Path) -> list[KeyEntry]:
    """Validate ``keyring.json``: known format, well-formed entries, one active key, at most one next."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != METADATA_FORMAT:
        raise ConfigurationError(f'{path}: expected an object with "format": {METADATA_FORMAT}')
    items = document.get("keys")
    if not isinstance(items, list):
        raise ConfigurationError(f'{path}: "keys" must be a list')
    entries = [_parse_entry(item, path, index) for index, item in enumerate(items)]
    problem = ring_problem(entries)
    if problem is not None:
        raise ConfigurationError(f"{path}: {problem}")
    return entries


def _parse_entry(item: object, path: Path, index: int) -> KeyEntry:
    where = f"{path}: keys[{index}]"
    if not isinstance(item, dict):
        raise ConfigurationError(f"{where} must be an object")
    kid, alg, state = item.get("kid"), item.get("alg"), item.get("state")
    if not isinstance(kid, str) or not KID_PATTERN.fullmatch(kid):
        raise ConfigurationError(f"{where}: kid must be an RFC 7638 SHA-256 thumbprint")
    if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS:
        raise ConfigurationError(f"{where}: unsupported alg {alg!r}")
    if state not in KEY_STATES:
        raise ConfigurationError(f"{where}: state must be next, active or retired")

    def timestamp(name: str, required: bool) -> float | None:
        value = item.get(name)
        if value is None and not required:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigurationError(f"{where}: {name} must be a number of seconds")
        return float(value)

    created_at = timestamp("created_at", True)
    assert created_at is not None
    return KeyEntry(
        kid=kid,
        alg=alg,
        state=state,
        created_at=created_at,
        activated_at=timestamp("activated_at", state == "active"),
        retired_at=timestamp("retired_at", state == "retired"),
        publish_until=timestamp("publish_until", state == "retired"),
    )
