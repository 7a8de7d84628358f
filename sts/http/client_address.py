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
from collections.abc import Iterable, Sequence

from ..core.networks import Network, parse_network

__all__ = ["Network", "client_address", "is_trusted_proxy", "trusted_networks"]


@functools.lru_cache(maxsize=4096)
def _parse(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``value`` names (a bracketed IPv6 address too), or None.  Remembered for the
    most recent values: every request parses its peer's address, and most come from a few."""
    value = value.strip()
    if value.startswith("[") and "]" in value:
        value = value[1 : value.index("]")]
    # An IPv6 zone (``fe80::1%eth0``, RFC 4007 §11) names an interface of the sender's, not an
    # address: left out, so that no text of the sender's choosing (``ipaddress`` takes any after
    # the ``%``) reaches the audit record, the log or a rate-limit key (an outside red team).
    if ":" in value:
        value = value.partition("%")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    # ``::ffff:10.1.2.3`` (RFC 4291 §2.5.5.2) is how a dual-stack listener (``host: "::"``) sees an
    # IPv4 peer: the IPv4 address, as the risk signals and rate limits read it.  Else IPv4
    # ``trusted_proxies`` matched no proxy there, and its forwarded certificate (the token's
    # binding) and client address were dropped unannounced (an outside audit).
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``str(address)``, remembered like :func:`_parse` (equal addresses have one text: an IPv4 and
    an IPv6 address are never equal, and IPv6 addresses compare their scope ids too)."""
    return str(address)


def trusted_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """The ``trusted_proxies`` setting's networks, an IPv4-mapped one (``::ffff:10.0.0.0/104``) as
    the IPv4 network it maps: peers are compared as IPv4 addresses (:func:`_parse`)."""
    return tuple(parse_network(value) for value in values)


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
