"""Reading a request off the wire (:mod:`sts.http.wire`): header lookups straight from the WSGI
environ give what Werkzeug's ``headers.getlist`` gives, for every header the endpoints read."""

from __future__ import annotations

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from sts.http.wire import header_values

NAMES = ["Authorization", "DPoP", "X-Forwarded-For", "traceparent", "X-Client-Cert", "User-Agent"]


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("DPoP", "a.b.c")],
        [("DPoP", "a.b.c"), ("DPoP", "d.e.f")],  # joined with a comma, as WSGI servers do
        [("Authorization", "Basic eA=="), ("authorization", "Basic eQ==")],
        [("X-Forwarded-For", "203.0.113.7, 10.0.0.1"), ("x-forwarded-for", "10.0.0.2")],
        [("Traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"), ("User-Agent", "")],
        [("X-Client-Cert", "%2D%2D%2D"), ("X-Client_Cert", "dropped by granian, kept here")],
    ],
)
def test_header_values_are_what_getlist_gives(headers: list[tuple[str, str]]) -> None:
    environ = EnvironBuilder(path="/token", method="POST", headers=headers).get_environ()
    request = Request(environ)
    for name in NAMES:
        assert header_values(environ, name) == request.headers.getlist(name), name
