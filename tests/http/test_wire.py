"""Reading a request off the wire (:mod:`sts.http.wire`): header lookups straight from the WSGI
environ give what Werkzeug's ``headers.getlist`` gives, for every header the endpoints read; the
form read straight from the body gives what Werkzeug's ``request.form`` gives."""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.wrappers import Request

from sts.http.wire import FormLimits, form_pairs, header_values, parse_form

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


# -- the form: read straight from a body the server read whole, as Werkzeug's parser reads it ------

FORM_TYPE = "application/x-www-form-urlencoded"
LIMITS = FormLimits(max_content_length=64, max_form_memory_size=32, max_form_parts=3)
BODIES = [
    b"",
    b"grant_type=x&subject_token=eyJ.eyJ.sig&scope=a+b%20c",
    b"audience=a&audience=b&audience=",  # repeated and blank values, in order
    b"a&&=x&b=&=&c==d",  # no '=', empty pairs and names, '=' in a value
    b"a=1;b=2&c=%3B",  # ';' separates nothing
    b"name=%FF%FEz&%C3%A9=%C3%A9",  # percent-encoded bytes that are not UTF-8 stay encoded
    b"name=\xff",  # a body that is not UTF-8 is no form
    b"name=%zz%4",  # malformed percent-encodings are kept as they are
    "é=ü&x=€".encode(),
    b"x=" + b"y" * 62,  # exactly the cap
    b"x=" + b"y" * 63,  # one byte over it
    b"a=1&b=2&c=3&d=4&e=5",  # more parts than max_form_parts: not a limit on this parser
]


def _environ(
    body: bytes, *, served: bool, length: str | None, content_type: str = FORM_TYPE
) -> dict[str, Any]:
    """``served``: the environ :class:`sts.serving.WSGIOverRSGI` builds (the body in memory, read
    whole); else the one Werkzeug's test client builds (a stream to be limited by its length)."""
    environ = EnvironBuilder(path="/token", method="POST", data=body, content_type=content_type).get_environ()
    if served:
        environ["wsgi.input"] = io.BytesIO(body)
        environ["wsgi.input_terminated"] = True
    if length is None:
        environ.pop("CONTENT_LENGTH", None)
    else:
        environ["CONTENT_LENGTH"] = length
    return environ


def _form_or_error(read: Callable[[], Any]) -> object:
    try:
        return read()
    except Exception as exc:  # The exception's type is the outcome compared.
        return type(exc)


class _LimitedRequest(Request):
    max_content_length = LIMITS.max_content_length
    max_form_memory_size = LIMITS.max_form_memory_size
    max_form_parts = LIMITS.max_form_parts


@pytest.mark.parametrize("body", BODIES)
@pytest.mark.parametrize("served", [True, False])
@pytest.mark.parametrize("length", ["declared", None, "3", "1000", "junk"])
@pytest.mark.parametrize(
    "content_type", [FORM_TYPE, FORM_TYPE + "; charset=utf-8", "APPLICATION/X-WWW-FORM-URLENCODED"]
)
def test_the_form_is_what_werkzeug_reads(
    body: bytes, served: bool, length: str | None, content_type: str
) -> None:
    """:func:`parse_form` gives ``request.form`` (every value, in order) or raises what reading it
    raises, for the body the server hands over whole and for a stream, whatever ``Content-Length``
    says (absent, short, over the cap, not a number)."""
    declared = str(len(body)) if length == "declared" else length

    def environ() -> dict[str, Any]:
        return _environ(body, served=served, length=declared, content_type=content_type)

    ours = _form_or_error(lambda: parse_form(environ(), LIMITS))
    theirs = _form_or_error(lambda: _LimitedRequest(environ()).form.to_dict(flat=False))
    assert ours == theirs


def test_a_served_form_body_is_read_without_werkzeugs_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body :class:`sts.serving.WSGIOverRSGI` hands over is parsed directly; any other goes to
    Werkzeug's parser, as before."""
    from werkzeug.formparser import FormDataParser

    parsed: list[str] = []
    real = FormDataParser.parse

    def counted(self: FormDataParser, *args: Any, **kwargs: Any) -> Any:
        parsed.append("werkzeug")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FormDataParser, "parse", counted)
    body = b"a=1&a=2"
    assert parse_form(_environ(body, served=True, length=str(len(body))), LIMITS) == {"a": ["1", "2"]}
    assert parsed == []
    assert parse_form(_environ(body, served=False, length=str(len(body))), LIMITS) == {"a": ["1", "2"]}
    assert parsed == ["werkzeug"]


FORM_TEXTS = [
    "",
    "&",
    "&&a=1&&",
    "a",
    "a=",
    "=a",
    "=",
    "a=1=2",
    "a+b=c+d",
    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange",
    "audience=%E2%82%AC&audience=%E2%82&scope=%ZZ%2",
    "scope=%FF%FE+x&resource=%25%2525",
    "subject_token_type=" + "%41" * 600,
    "client_secret=s%3Dcret&subject_token=eyJ.eyJ.sig",
    "n%61me=v%61lue&%2B=%2B&+=+",
    "audience=a;b&scope=a%20b%2Bc",
]


@pytest.mark.parametrize("text", FORM_TEXTS)
def test_form_pairs_are_what_parse_qsl_gives(text: str) -> None:
    expected = parse_qsl(text, keep_blank_values=True, errors="werkzeug.url_quote")
    assert form_pairs(text) == expected
    assert form_pairs(text) == expected  # the second time from what was remembered


def test_form_pairs_are_what_parse_qsl_gives_for_random_forms() -> None:
    rng = random.Random(12)
    alphabet = ["a", "b", "=", "&", "+", "%", "%3A", "%2B", "%E2%82%AC", "%E2", "%zz", "%4", " ", "é", ";"]
    names = ["scope", "audience", "grant_type", "subject_token", "client_secret", "x"]
    for _ in range(3000):
        fields = [
            rng.choice(names) + "=" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
            if rng.random() < 0.7
            else "".join(rng.choice(alphabet) for _ in range(rng.randrange(8)))
            for _ in range(rng.randrange(5))
        ]
        text = "&".join(fields)
        assert form_pairs(text) == parse_qsl(text, keep_blank_values=True, errors="werkzeug.url_quote"), text


@pytest.mark.parametrize("path", ["/token", "/introspect", "/revoke"])
def test_a_query_string_that_is_no_utf8_is_refused_not_a_500(client: Any, path: str) -> None:
    """A WSGI server that passes such bytes on (granian refuses them first) got a 500 from a
    UnicodeDecodeError (an outside fuzzing run): any query parameter is refused, 400."""
    environ = {"QUERY_STRING": b"x=%ff\xff\xfe".decode("latin1")}
    response = client.post(path, data={"grant_type": "x"}, environ_overrides=environ)
    assert response.status_code in (400, 401), response.get_json()
    assert response.get_json()["error"] in ("invalid_request", "invalid_client")


def test_parse_query_reads_bytes_that_are_no_utf8() -> None:
    from sts.http.wire import parse_query

    query = b"a=1&b=\xff\xfe".decode("latin1")  # as a WSGI server passes raw bytes (PEP 3333)
    assert parse_query({"QUERY_STRING": query}) == {"a": ["1"], "b": ["\ufffd\ufffd"]}
