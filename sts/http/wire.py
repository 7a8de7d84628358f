"""Reading a form request off the wire: one path for ``/token``, ``/introspect`` and ``/revoke``.

Each of them takes an ``application/x-www-form-urlencoded`` POST (RFC 6749 §3.2, RFC 7662
§2.1, RFC 7009 §2.1).  The request is read into a :class:`~sts.protocol.wire.WireRequest`
here, the same way for all three; what it means is decided in :mod:`sts.core`.  A request
that cannot even be read (a body over ``max_body_bytes`` or unparseable, a repeated
``Authorization`` header, RFC 6749 §2.3) is refused here, and recorded first by the
endpoint's ``refuse_early``, so it is audited on every endpoint alike.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, unquote

from flask import g, request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length, get_input_stream

from ..errors import InvalidRequest, OAuthError
from ..protocol.wire import FORM_CONTENT_TYPE, WireRequest
from .client_cert import UnreadableCertificate, certificate_thumbprint

#: Records a request refused before it could be read (its audit record), e.g.
#: :meth:`sts.core.exchange.TokenExchange.refuse_early`.
RefuseEarly = Callable[[WireRequest, OAuthError], None]


def header_values(environ: Mapping[str, Any], name: str) -> list[str]:
    """Every value of the request header ``name`` (``"X-Forwarded-For"``), as
    ``request.headers.getlist(name)`` gives them, from the WSGI environ directly.

    A WSGI server puts each header in the environ once (PEP 3333: ``HTTP_X_FORWARDED_FOR``),
    repeated fields joined with commas (RFC 9110 §5.3), so there is at most one value.  Looked up
    by its key here because ``getlist`` reads every header of the request to find it, and the
    token endpoint asks for four on every request.
    """
    value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return [] if value is None else [value]


@dataclass(frozen=True, slots=True)
class FormLimits:
    """The body limits Flask's request applies (``MAX_CONTENT_LENGTH``, ``MAX_FORM_MEMORY_SIZE``,
    ``MAX_FORM_PARTS``)."""

    max_content_length: int | None
    max_form_memory_size: int | None
    max_form_parts: int | None


def _multi(items: Iterable[tuple[str, Any]] = ()) -> dict[str, list[Any]]:
    """The form as ``MultiDict.to_dict(flat=False)`` gives it, built directly."""
    values: dict[str, list[Any]] = {}
    for name, value in items:
        values.setdefault(name, []).append(value)
    return values


def content_coding(environ: Mapping[str, Any]) -> str | None:
    """The request's ``Content-Encoding`` codings (cut to 60 characters), when any is not
    ``identity``, else None.  A coded body (gzip...) is not decoded here; read as it is, it would be
    another body than the one a proxy that decodes it saw (RFC 9110 §8.4): every endpoint that
    reads a body refuses it, unread (outside checks: ``/token``, then the SET receiver)."""
    encodings = [
        v.strip().lower() for value in header_values(environ, "Content-Encoding") for v in value.split(",")
    ]
    if all(coding in ("", "identity") for coding in encodings):
        return None
    return ",".join(encodings)[:60]


def parse_form(environ: Mapping[str, Any], limits: FormLimits) -> dict[str, list[str]]:
    """The request's form, every value of each parameter in order: what Flask's ``request.form``
    holds, parsed by the same Werkzeug parser with the same limits, without building a request.

    Raises :class:`~werkzeug.exceptions.RequestEntityTooLarge` for a body over the limits and
    :class:`~werkzeug.exceptions.BadRequest` for one that cannot be read, as ``request.form`` does.
    Only a form content type is parsed; any other body is no form (``{}``).
    """
    content_type = environ.get("CONTENT_TYPE")
    if not content_type:
        return {}  # Werkzeug's ``want_form_data_parsed``: no Content-Type, no form.
    if content_type == FORM_CONTENT_TYPE:
        body = _whole_body(environ, limits.max_content_length)
        if body is not None:
            return _parse_urlencoded(body)
    mimetype, options = parse_options_header(content_type)
    parser = FormDataParser(
        max_form_memory_size=limits.max_form_memory_size,
        max_content_length=limits.max_content_length,
        max_form_parts=limits.max_form_parts,
        cls=cast("type[MultiDict[str, Any]]", _multi),
    )
    wsgi_environ = cast("dict[str, Any]", environ)
    stream = get_input_stream(wsgi_environ, max_content_length=limits.max_content_length)
    _, form, _ = parser.parse(stream, mimetype.lower(), get_content_length(wsgi_environ), options)
    return cast("dict[str, list[str]]", form)


def _whole_body(environ: Mapping[str, Any], max_content_length: int | None) -> bytes | None:
    """The body the server read whole (``wsgi.input_terminated``, in memory: what
    :class:`sts.serving.WSGIOverRSGI` and :class:`~sts.http.body_limit.BodyLimit` hand over),
    when it fits ``max_content_length``; None for any other body, which is read by Werkzeug.

    Werkzeug reads such a stream to its end through a :class:`~werkzeug.wsgi.LimitedStream` capped at
    ``max_content_length``; a body within the cap comes out whole, as it does here.  A declared
    ``Content-Length`` over the cap is refused first, as :func:`~werkzeug.wsgi.get_input_stream`
    refuses it.
    """
    stream = environ.get("wsgi.input")
    if type(stream) is not io.BytesIO or "wsgi.input_terminated" not in environ:
        return None
    declared = get_content_length(cast("dict[str, Any]", environ))
    if declared is not None and max_content_length is not None and declared > max_content_length:
        raise RequestEntityTooLarge()
    if max_content_length is not None and stream.getbuffer().nbytes - stream.tell() > max_content_length:
        return None
    return stream.read()


def _parse_urlencoded(body: bytes) -> dict[str, list[str]]:
    """The form in an ``application/x-www-form-urlencoded`` body, as Werkzeug's
    ``FormDataParser`` parses it (``_parse_urlencoded``): the body decoded as UTF-8, then
    :func:`urllib.parse.parse_qsl` keeping blank values, bytes that are not UTF-8 in a
    percent-encoding kept percent-encoded (``werkzeug.url_quote``); a body that is not UTF-8 is no
    form (``{}``: the parser is silent on a ``ValueError``)."""
    try:
        items = form_pairs(body.decode())
    except ValueError:
        return {}
    return _multi(items)


#: The codec error handler Werkzeug registers and its form parser decodes with (bytes that are not
#: UTF-8 in a percent-encoding stay percent-encoded).
_URL_QUOTE = "werkzeug.url_quote"
#: Parameters whose values name a grant, token types or targets, never a credential.  Clients send
#: the same few of them on every request, percent-encoded (``urn%3Aietf%3A...``); their decoded
#: text is remembered (:func:`_decoded`), up to :data:`_REMEMBERED_LENGTH` characters each.
_REMEMBERED_PARAMETERS = frozenset(
    {
        "grant_type",
        "subject_token_type",
        "actor_token_type",
        "requested_token_type",
        "audience",
        "resource",
        "scope",
        "client_assertion_type",
        "token_type_hint",
    }
)
_REMEMBERED_LENGTH = 512


@functools.lru_cache(maxsize=256)
def _decoded(text: str) -> str:
    """``unquote`` of a remembered parameter's value: a function of the text alone."""
    return unquote(text, errors=_URL_QUOTE)


def form_pairs(text: str) -> list[tuple[str, str]]:
    """``parse_qsl(text, keep_blank_values=True, errors="werkzeug.url_quote")``, step for step:
    split on ``&``, empty fields skipped, each split at its first ``=`` (no ``=``: a blank value),
    ``+`` read as a space, then percent-decoded; only the decoding of a remembered parameter's value
    (:data:`_REMEMBERED_PARAMETERS`) is looked up instead of done again."""
    pairs: list[tuple[str, str]] = []
    for field in text.split("&") if text else ():
        if not field:
            continue
        name, _, value = field.partition("=")
        name = unquote(name.replace("+", " "), errors=_URL_QUOTE)
        value = value.replace("+", " ")
        if "%" in value:
            if name in _REMEMBERED_PARAMETERS and len(value) <= _REMEMBERED_LENGTH:
                value = _decoded(value)
            else:
                value = unquote(value, errors=_URL_QUOTE)
        pairs.append((name, value))
    return pairs


def parse_query(environ: Mapping[str, Any]) -> dict[str, list[str]]:
    """The query parameters, as ``request.args.to_dict(flat=False)`` gives them."""
    query = environ.get("QUERY_STRING")
    if not query:
        return {}  # The usual case: nothing to parse.
    # Bytes that are no UTF-8 are replaced, as werkzeug does: they raised UnicodeDecodeError, a 500,
    # under WSGI servers that pass them on (an outside fuzzing run; granian refuses them first).
    text = query.encode("latin1", "replace").decode("utf-8", "replace")
    return _multi(parse_qsl(text, keep_blank_values=True, errors="werkzeug.url_quote"))


def read_request(mtls_header: str | None, refuse_early: RefuseEarly) -> WireRequest:
    """The current Flask request as the pipeline takes it (:func:`read_wire`)."""
    return read_wire(
        request.environ,
        FormLimits(request.max_content_length, request.max_form_memory_size, request.max_form_parts),
        request_id=g.request_id,
        source_ip=g.get("client_address", request.remote_addr),
        via_trusted_proxy=g.get("via_trusted_proxy", False),
        trace_id=g.get("trace_id"),
        mtls_header=mtls_header,
        refuse_early=refuse_early,
    )


def read_wire(
    environ: Mapping[str, Any],
    limits: FormLimits,
    *,
    request_id: str,
    source_ip: str | None,
    via_trusted_proxy: bool,
    trace_id: str | None,
    mtls_header: str | None,
    refuse_early: RefuseEarly,
) -> WireRequest:
    """The request in ``environ`` as the pipeline takes it; raises the :class:`OAuthError` to send,
    after ``refuse_early`` has recorded it, when the request cannot be read."""
    problem: OAuthError | None = None
    form: dict[str, list[str]] = {}
    coded = content_coding(environ)
    if coded is not None:
        problem = InvalidRequest("request.content_encoding", coded)
    else:
        try:
            form = parse_form(environ, limits)
        except RequestEntityTooLarge:
            problem = InvalidRequest("request.body_too_large")
        except BadRequest:
            problem = InvalidRequest("request.malformed_body")
    authorizations = header_values(environ, "Authorization")
    if len(authorizations) > 1:
        problem = problem or InvalidRequest("request.repeated_authorization_header")
    certificate = None
    if via_trusted_proxy:
        try:
            certificate = forwarded_certificate(environ, mtls_header)
        except UnreadableCertificate as exc:
            # Fail closed: never a token left unbound because its certificate could not be read.
            problem = problem or InvalidRequest(
                "request.client_certificate_unreadable",
                str(exc),
                description="The client certificate the proxy forwarded is not one certificate.",
            )
    wire = WireRequest(
        form=form,
        query=parse_query(environ),
        content_type=environ.get("CONTENT_TYPE"),
        authorization=authorizations[0] if authorizations else None,
        request_id=request_id,
        source_ip=source_ip,
        user_agent=environ.get("HTTP_USER_AGENT"),
        # WSGI servers join repeated header fields with commas (RFC 9110 §5.3), and a JWS never
        # holds one: split them again so that two proofs count as two (RFC 9449 §4.3 step 1).
        dpop=tuple(part for value in header_values(environ, "DPoP") for part in value.split(",")),
        client_cert_thumbprint=certificate,
        trace_id=trace_id,
    )
    if problem is not None:
        refuse_early(wire, problem)
        raise problem
    return wire


def forwarded_certificate(environ: Mapping[str, Any], header: str | None) -> str | None:
    """The client certificate's ``x5t#S256`` forwarded in ``header`` (RFC 8705 §3), None without
    one; raises :class:`UnreadableCertificate` for a header that holds anything but one certificate.
    Call only for a connection from a trusted proxy."""
    if not header:
        return None  # No header configured.
    values = header_values(environ, header)
    return certificate_thumbprint(values[0]) if values else None
