"""HTTP/1.1 proxy rules (RFC 9110 §7.6, RFC 9112): pure functions over raw header lists.

Everything here works on the bytes httptools hands us, so the hot path never decodes a header it
does not have to look at. The rules live apart from the protocol classes so they can be tested as
tables.
"""

from __future__ import annotations

from collections.abc import Set
from http import HTTPStatus
from typing import Final

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 plus the historical ones every proxy still strips.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"x-bgproxy-preview-token",  # preview routing's secret: never forwarded (core.preview)
    }
)
# Set by bgproxy itself; a client's copy is replaced unless the peer is a trusted proxy.
FORWARDING = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})

_NO_LENGTH = frozenset({100, 101, 102, 103, 204})
_REASON_OK = frozenset(range(0x20, 0x7F)) | {0x09} | frozenset(range(0x80, 0x100))


class Refusal(Exception):
    """A request bgproxy answers itself, before anything reaches an upstream."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


# What the data plane needs to know about a validated request, read with the HEAD_* indices. A
# plain tuple: a NamedTuple's constructor is a Python-level call on every request, while a Final
# index into a fixed-length tuple compiles to a direct load.
RequestHead = tuple[bytes, bool, bool, int, bytes]
HEAD_BYTES: Final = 0  # the head to send upstream
HEAD_CHUNKED: Final = 1  # the body is chunked
HEAD_HAS_BODY: Final = 2  # chunked, or a Content-Length above 0
HEAD_LENGTH: Final = 3  # Content-Length, or -1
HEAD_UPGRADE: Final = 4  # the lower-cased Upgrade protocol, or b""


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """The lower-cased option names listed in Connection headers."""
    tokens: set[bytes] = set()
    for value in values:
        for raw in value.split(b","):
            token = raw.strip().lower()
            if token:
                tokens.add(token)
    return tokens


# What a request header is to the proxy: one dict lookup per header on the hot path.
_HOST, _CONN, _TE, _CL, _EXPECT, _UPGRADE, _VIA, _XFF, _FWD, _HOP = range(10)
_REQUEST_KINDS = {name: _HOP for name in HOP_BY_HOP} | {name: _FWD for name in FORWARDING}
_REQUEST_KINDS |= {
    b"host": _HOST,
    b"connection": _CONN,
    b"transfer-encoding": _TE,
    b"content-length": _CL,
    b"expect": _EXPECT,
    b"upgrade": _UPGRADE,
    b"via": _VIA,
    b"x-forwarded-for": _XFF,
}
# Connection options that need no extra work: they are hop-by-hop already (or plain "close").
_PLAIN_OPTIONS = HOP_BY_HOP | {b"close"}
# Never removed because Connection names them, as HAProxy and nginx do: they carry the message's
# framing, routing or meaning, so removing one changes the message (Connection: Content-Length
# would let a body be read as a second request: smuggling). RFC 9110 §7.6.1 lists options, not these.
PROTECTED = frozenset(
    {
        b"content-length",
        b"host",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"content-location",
        b"location",
        b"set-cookie",
        b"cookie",
        b"authorization",
        b"www-authenticate",
        b"cache-control",
        b"expires",
        b"etag",
        b"last-modified",
        b"vary",
        b"date",
    }
)
_NOT_OPTIONS = _PLAIN_OPTIONS | PROTECTED
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close", b"upgrade", b"Upgrade"})


def _extra_options(conn_values: list[bytes]) -> Set[bytes]:
    """Header names a Connection header asks us to drop beyond the standard hop-by-hop ones."""
    for value in conn_values:
        if value not in _PLAIN_CONNECTION:
            return connection_tokens(conn_values) - _NOT_OPTIONS
    return _NO_OPTIONS  # the common case: "Connection: keep-alive"


_NO_OPTIONS: frozenset[bytes] = frozenset()


def _learn(cache: dict[bytes, int | None], kinds: dict[bytes, int], name: bytes) -> int | None:
    """A header name not seen before: look it up case-insensitively and remember the exact bytes.

    The caches are plain dicts (CPython specializes indexing of exact dicts, not of subclasses),
    bounded because names come from the network.
    """
    kind = kinds.get(name.lower())
    if len(cache) < 1024:
        cache[name] = kind
    return kind


_REQUEST_CACHE: dict[bytes, int | None] = {}


def _without(lines: list[bytes], dropped: Set[bytes]) -> list[bytes]:
    """Flat [name, ": ", value, CRLF, ...] minus the headers whose names are in `dropped`."""
    out: list[bytes] = []
    for i in range(0, len(lines), 4):
        if lines[i].lower() not in dropped:
            out += lines[i : i + 4]
    return out


def absolute_target(method: bytes, target: bytes) -> tuple[bytes, bytes]:
    """(authority, origin-form target) of an absolute-form target like ``http://a.example/p?q``.

    RFC 9112 §3.2.2: the target's authority replaces Host and the request goes on in origin form
    (an OPTIONS for the server as a whole becomes ``*``, §3.2.4). We rewrite rather than refuse
    (HAProxy refuses) because clients set up with an HTTP proxy legitimately send this form; what
    must never happen is forwarding a Host that disagrees with the target.
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise Refusal(400, "request target must be a path (origin-form) or an http:// URL (absolute-form)")
    end = len(rest)
    for mark in (b"/", b"?", b"#"):
        i = rest.find(mark)
        if 0 <= i < end:
            end = i
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise Refusal(400, "an absolute-form target needs a host and no user info")
    if not path.startswith(b"/"):  # empty, or only a query
        path = (b"*" if method == b"OPTIONS" and not path else b"/") + path
    return authority, path


def build_request_head(
    method: bytes,
    target: bytes,
    http_version: str,
    headers: Headers,
    client_ip: bytes,
    trusted_peer: bool,
    via: bytes,
) -> RequestHead:
    """Validate a request head and build the one to forward, or raise Refusal.

    llhttp has already refused CL+TE, duplicate or bad Content-Length, obs-fold and bad
    characters; this adds the rules a proxy needs on top of a parser. Hot path: one dict lookup
    per header, and the lists only the rare headers need are made when one shows up.
    """
    if method == b"CONNECT":
        raise Refusal(405, "CONNECT is not supported by this reverse proxy")
    authority = b""
    if target[:1] != b"/" and target != b"*":
        authority, target = absolute_target(method, target)
    host = b""
    hosts = 0
    conn_values: list[bytes] | None = None
    te_values: list[bytes] | None = None
    content_length = -1
    expect: bytes | None = None
    upgrade = b""
    xff = b""
    via_in = b""
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    kinds = _REQUEST_CACHE
    for name, value in headers:
        try:
            kind = kinds[name]
        except KeyError:
            kind = _learn(kinds, _REQUEST_KINDS, name)
        if kind is None:
            lines += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            hosts += 1
            host = authority or value
            lines += (name, b": ", host, b"\r\n")
        elif kind == _CL:
            content_length = int(value)
            lines += (name, b": ", value, b"\r\n")
        elif kind == _CONN:
            conn_values = [value] if conn_values is None else [*conn_values, value]
        elif kind == _TE:
            te_values = [value] if te_values is None else [*te_values, value]
        elif kind == _EXPECT:
            expect = value.strip().lower()
        elif kind == _UPGRADE:
            upgrade = value.strip().lower()
        elif kind == _VIA:
            via_in = value if not via_in else via_in + b", " + value
        elif trusted_peer:
            if kind == _XFF:
                xff = value if not xff else xff + b", " + value
            elif kind == _FWD:
                lines += (name, b": ", value, b"\r\n")

    if hosts != 1 and (hosts > 1 or http_version == "1.1"):
        raise Refusal(
            400,
            "HTTP/1.1 request needs exactly one Host header" if hosts == 0 else "more than one Host header",
        )
    chunked = False
    if te_values is not None:
        codings = [c.strip().lower() for v in te_values for c in v.split(b",")]
        if codings != [b"chunked"] or http_version == "1.0":
            raise Refusal(400, "Transfer-Encoding other than a single final chunked")
        chunked = True
    if expect is not None and expect != b"100-continue":
        raise Refusal(417, "only Expect: 100-continue is supported")

    if conn_values is not None:
        if upgrade and b"upgrade" not in connection_tokens(conn_values):
            upgrade = b""
        extra = _extra_options(conn_values)
        if extra:
            lines = lines[:4] + _without(lines[4:], extra)
    else:
        upgrade = b""

    if not hosts:
        host = authority or b"upstream"
        lines += (b"Host: ", host, b"\r\n")
    lines += (b"X-Forwarded-For: ", (xff + b", " + client_ip) if xff else client_ip, b"\r\n")
    if not trusted_peer:
        lines += (b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: ", host, b"\r\n")
    lines += (
        b"Via: ",
        (via_in + b", ") if via_in else b"",
        b"1.0 " if http_version == "1.0" else b"1.1 ",
        via,
        b"\r\n",
    )
    if expect is not None:
        lines.append(b"Expect: 100-continue\r\n")
    if upgrade:
        lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(b"\r\n")
    return (
        b"".join(lines),
        chunked,
        chunked or content_length > 0,
        content_length,
        upgrade,
    )


class ResponseFraming:
    """How a response body is delimited toward the client."""

    NONE: Final = 0  # no body (HEAD, 1xx, 204, 304)
    LENGTH: Final = 1  # Content-Length passed through
    CHUNKED: Final = 2  # we chunk it (upstream chunked or close-delimited, HTTP/1.1 client)
    CLOSE: Final = 3  # close-delimited (HTTP/1.0 client)


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    """`HTTP/1.1 200 OK\\r\\n`, cached: a handful of (status, reason) pairs cover real traffic."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, safe_reason(status, reason))
        if len(_STATUS_LINES) < 1024:  # bounded: reasons come from upstreams
            _STATUS_LINES[key] = line
    return line


def safe_reason(status: int, reason: bytes) -> bytes:
    """The upstream's reason phrase if it is clean, else the standard one (never CR/LF)."""
    if reason and all(b in _REASON_OK for b in reason):
        return reason
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


_RESPONSE_KINDS = {name: _HOP for name in HOP_BY_HOP} | {
    b"connection": _CONN,
    b"via": _VIA,
    b"content-length": _CL,
}


_RESPONSE_CACHE: dict[bytes, int | None] = {}


def build_response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    bodiless: bool,
    keep_alive: bool,
    client_http10: bool,
    via: bytes,
    upgrade: bytes = b"",
) -> tuple[bytes, int, bool]:
    """The response head for the client: hop-by-hop headers out, our framing and Via in.

    Returns (head, framing, keep_alive): a body we can only delimit by closing forces
    keep_alive off. `bodiless` is true for HEAD requests and 1xx/204/304 statuses.
    """
    has_length = False
    conn_values: list[bytes] = []
    via_in = b""
    lines = [status_line(status, reason)]
    kinds = _RESPONSE_CACHE
    for name, value in headers:
        try:
            kind = kinds[name]
        except KeyError:
            kind = _learn(kinds, _RESPONSE_KINDS, name)
        if kind is None:
            lines += (name, b": ", value, b"\r\n")
        elif kind == _CL:
            # A HEAD or 304 answer keeps the length it describes; 204 and 1xx have none.
            if status not in _NO_LENGTH:
                has_length = True
                lines += (name, b": ", value, b"\r\n")
        elif kind == _CONN:
            conn_values.append(value)
        elif kind == _VIA:
            via_in = value if not via_in else via_in + b", " + value
    if conn_values:
        extra = _extra_options(conn_values)
        if extra:
            lines = [lines[0], *_without(lines[1:], extra)]
    if bodiless or upgrade:
        framing = ResponseFraming.NONE
    elif has_length:
        framing = ResponseFraming.LENGTH
    elif client_http10:
        framing = ResponseFraming.CLOSE
        keep_alive = False
    else:
        framing = ResponseFraming.CHUNKED
    lines += (b"Via: ", (via_in + b", ") if via_in else b"", b"1.1 ", via, b"\r\n")
    if upgrade:
        lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    else:
        if framing == ResponseFraming.CHUNKED:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        if not keep_alive:
            lines.append(b"Connection: close\r\n")
        elif client_http10:
            lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), framing, keep_alive


def interim_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A 1xx response relayed to the client (100 Continue, 103 Early Hints)."""
    lines = [status_line(status, reason)]
    for name, value in headers:
        if name.lower() not in HOP_BY_HOP:
            lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)


def error_response(status: int, why: str, *, via: bytes, close: bool) -> bytes:
    """A short text/plain answer bgproxy gives itself, saying why."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}: {why}\n".encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
    ).encode()
    tail = b"Connection: close\r\n\r\n" if close else b"\r\n"
    return head + b"Via: 1.1 " + via + b"\r\n" + tail + body


def chunk(data: bytes) -> list[bytes]:
    """One chunk of a chunked body, as pieces for writelines (no copy of data)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


LAST_CHUNK = b"0\r\n\r\n"
