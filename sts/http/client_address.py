"""The client's address, for the unusual-network signal and the audit record.

Taken from the connection, unless the connection comes from a configured
trusted proxy: then from ``X-Forwarded-For``, walking from the right and
skipping trusted proxies, so the first untrusted hop is the client.  A
client cannot forge its way past a trusted proxy, because the proxy appends
the address it saw; anything further left is the client's own claim.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``value`` names (a bracketed IPv6 address too), or None.  Remembered for the
    most recent values: every request parses its peer's address, and most come from a few."""
    value = value.strip()
    if value.startswith("[") and "]" in value:
        value = value[1 : value.index("]")]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``str(address)``, remembered like :func:`_parse` (equal addresses have one text: an IPv4 and
    an IPv6 address are never equal, and IPv6 addresses compare their scope ids too)."""
    return str(address)


def client_address(
    remote_addr: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """The address to attribute the request to."""
    peer = _parse(remote_addr or "")
    if peer is None:
        return remote_addr
    if not trusted or not any(peer in net for net in trusted):
        return _text(peer)
    hops = [h for header in forwarded_for for h in header.split(",")]
    current = peer
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            # A malformed entry: stop at the last hop we could vouch for.
            return _text(current)
        current = address
        if not any(address in net for net in trusted):
            return _text(address)
    return _text(current)


def is_trusted_proxy(remote_addr: str | None, trusted: Sequence[Network]) -> bool:
    """The connection itself comes from a configured trusted proxy."""
    if not trusted:
        return False
    peer = _parse(remote_addr or "")
    return peer is not None and any(peer in net for net in trusted)
