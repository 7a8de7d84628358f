"""IP networks written in settings and policies, read as the addresses they are compared with.

A dual-stack listener (``host: "::"``) sees an IPv4 peer as ``::ffff:10.1.2.3`` (RFC 4291
§2.5.5.2); the service compares such a peer as the IPv4 address it maps.  A network written in
the IPv4-mapped form (``::ffff:10.0.0.0/104``) is therefore the IPv4 network it maps, wherever it
is written (``trusted_proxies``, a rule's ``risk.networks``): else it matched no peer at all.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(value: str) -> Network:
    """``value`` as a network (host bits ignored), an IPv4-mapped one as the IPv4 network it maps.
    Raises ``ValueError`` for what is not a network."""
    network = ipaddress.ip_network(value, strict=False)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None  # within ::ffff:0:0/96
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network
