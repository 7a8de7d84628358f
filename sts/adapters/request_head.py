"""Checks of a request's head that ``sts serve`` makes before the application sees it.

Pure functions of the header values, for :mod:`sts.serving`, which answers ``400`` itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

#: A ``Host`` value (RFC 9112 §3.2, RFC 3986 §3.2.2): ``uri-host [ ":" port ]``, an IP literal
#: in brackets or a reg-name (unreserved, percent-encoded, sub-delims), possibly empty.
_HOST = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|\[[vV][0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+\]"
    r"|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)


def host_is_valid(hosts: Sequence[str], http_version: str) -> bool:
    """RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without ``Host``, and to
    any with more than one ``Host`` line or an invalid value (hyper lets all three through).
    ``hosts``: every ``Host`` line's value."""
    if len(hosts) > 1:
        return False
    if not hosts:
        return http_version != "1.1"
    return _HOST.fullmatch(hosts[0]) is not None
