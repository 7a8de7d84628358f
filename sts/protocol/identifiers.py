"""Random identifiers in their wire forms: UUIDs (RFC 9562 §5.4, version 4), W3C Trace Context
trace and span ids, JWT ids.

Each is made from the operating system's randomness (``os.urandom``), as ``uuid.uuid4``,
``secrets.token_hex`` and ``secrets.token_urlsafe`` make them, with the same text; but the bytes
are drawn from a buffer of each thread, refilled with one ``os.urandom`` call for many
identifiers, instead of one system call each (an exchange takes five: its request id, trace and
span ids, audit event id and the issued token's ``jti``).  Each byte is handed out once.  A
forked child never uses what its parent drew: every buffer is refilled after a fork.

For identifiers only, never for keys, secrets or nonces (``secrets`` makes those): the bytes of
identifiers still to come are in the process's memory until they are used.
"""

from __future__ import annotations

import base64
import os
import threading

#: How many random bytes one refill draws: an exchange takes 72.
POOL_BYTES = 4096


class _Pool(threading.local):
    """A thread's random bytes: ``data[offset:]`` is still to be handed out."""

    def __init__(self) -> None:
        self.data = b""
        self.offset = 0
        self.generation = -1


_pool = _Pool()
#: Changed in a forked child, so that each of its threads refills its buffer before using it.
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_forked)


def random_bytes(count: int) -> bytes:
    """``count`` bytes from ``os.urandom``, none of them handed out before (in this process)."""
    pool = _pool
    start = pool.offset
    end = start + count
    if end > len(pool.data) or pool.generation != _generation:
        pool.data = os.urandom(max(POOL_BYTES, count))
        pool.generation = _generation
        start, end = 0, count
    pool.offset = end
    return pool.data[start:end]


def uuid4_text() -> str:
    """A random UUID as ``str(uuid.uuid4())`` writes it: the version (4) and variant (RFC 9562)
    bits set in 16 random bytes, lower-case hex in the 8-4-4-4-12 form."""
    raw = bytearray(random_bytes(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def random_hex(count: int) -> str:
    """``count`` random bytes in lower-case hex, as ``secrets.token_hex(count)``."""
    return random_bytes(count).hex()


def random_urlsafe(count: int) -> str:
    """``count`` random bytes in unpadded base64url, as ``secrets.token_urlsafe(count)``."""
    return base64.urlsafe_b64encode(random_bytes(count)).rstrip(b"=").decode("ascii")
