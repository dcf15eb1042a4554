"""The HTTP/1.1 proxy rules of bgproxy.dataplane.http1 as tables: head in, exact bytes out.

No sockets and no parser: each row is the header list httptools would hand over, and the bytes
bgproxy would send on. Runs against the compiled module when the package is built with mypyc.
"""

from __future__ import annotations

import pytest

from bgproxy.dataplane.http1 import (
    HEAD_BYTES,
    HEAD_CHUNKED,
    HEAD_HAS_BODY,
    HEAD_LENGTH,
    HEAD_UPGRADE,
    LAST_CHUNK,
    Headers,
    Refusal,
    ResponseFraming,
    build_request_head,
    build_response_head,
    chunk,
    connection_tokens,
    error_response,
    interim_head,
    safe_reason,
    status_line,
)

IP = b"10.0.0.1"
VIA = b"bgproxy"
HOST = [(b"Host", b"a.example")]
ADDED = (
    b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a.example\r\n"
    b"Via: 1.1 bgproxy\r\n"
)


def request(
    headers: Headers, *, method: bytes = b"GET", version: str = "1.1", trusted: bool = False
) -> bytes:
    return build_request_head(method, b"/p?q=1", version, headers, IP, trusted, VIA)[HEAD_BYTES]


# ---------------------------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    ("headers", "head"),
    [
        pytest.param(HOST, b"Host: a.example\r\n" + ADDED, id="plain"),
        pytest.param(
            [*HOST, (b"Accept", b"*/*"), (b"X-Custom", b"1")],
            b"Host: a.example\r\nAccept: */*\r\nX-Custom: 1\r\n" + ADDED,
            id="end-to-end headers keep their order and case",
        ),
        pytest.param(
            [
                *HOST,
                (b"Connection", b"keep-alive"),
                (b"Keep-Alive", b"timeout=5"),
                (b"TE", b"trailers"),
                (b"Proxy-Authorization", b"Basic eA=="),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Trailer", b"X"),
            ],
            b"Host: a.example\r\n" + ADDED,
            id="hop-by-hop headers are dropped",
        ),
        pytest.param(
            [*HOST, (b"Connection", b"close, X-Secret"), (b"X-Secret", b"s"), (b"X-Kept", b"k")],
            b"Host: a.example\r\nX-Kept: k\r\n" + ADDED,
            id="Connection options are dropped",
        ),
        pytest.param(
            [
                *HOST,
                (b"X-Forwarded-For", b"6.6.6.6"),
                (b"X-Forwarded-Proto", b"https"),
                (b"X-Forwarded-Host", b"evil"),
                (b"Forwarded", b"for=6.6.6.6"),
            ],
            b"Host: a.example\r\n" + ADDED,
            id="an untrusted peer's forwarding headers are replaced",
        ),
        pytest.param(
            [*HOST, (b"Via", b"1.1 edge"), (b"via", b"1.0 old")],
            b"Host: a.example\r\n" + ADDED.replace(b"Via: ", b"Via: 1.1 edge, 1.0 old, "),
            id="Via is appended to",
        ),
        pytest.param(
            [*HOST, (b"Content-Length", b"5")],
            b"Host: a.example\r\nContent-Length: 5\r\n" + ADDED,
            id="Content-Length passes",
        ),
        pytest.param(
            [*HOST, (b"Transfer-Encoding", b"chunked")],
            b"Host: a.example\r\n" + ADDED + b"Transfer-Encoding: chunked\r\n",
            id="chunked is re-stated after our headers",
        ),
        pytest.param(
            [*HOST, (b"Expect", b"100-continue"), (b"Content-Length", b"9")],
            b"Host: a.example\r\nContent-Length: 9\r\n" + ADDED + b"Expect: 100-continue\r\n",
            id="Expect 100-continue",
        ),
        pytest.param(
            [*HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket"), (b"Sec-WebSocket-Key", b"k")],
            b"Host: a.example\r\nSec-WebSocket-Key: k\r\n"
            + ADDED
            + b"Connection: upgrade\r\nUpgrade: websocket\r\n",
            id="an Upgrade named by Connection",
        ),
        pytest.param(
            [*HOST, (b"Upgrade", b"websocket")],
            b"Host: a.example\r\n" + ADDED,
            id="an Upgrade that Connection does not name is dropped",
        ),
    ],
)
def test_request_head(headers: Headers, head: bytes) -> None:
    assert request(headers) == b"GET /p?q=1 HTTP/1.1\r\n" + head + b"\r\n"


def test_trusted_peer_forwarding_headers_are_extended() -> None:
    headers = [
        *HOST,
        (b"X-Forwarded-For", b"1.2.3.4"),
        (b"X-Forwarded-Proto", b"https"),
        (b"Forwarded", b"for=1"),
    ]
    assert request(headers, trusted=True) == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-Proto: https\r\nForwarded: for=1\r\n"
        b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\nVia: 1.1 bgproxy\r\n\r\n"
    )


def test_http10_without_host_gets_one_and_says_1_0_in_via() -> None:
    assert request([], version="1.0") == (
        b"GET /p?q=1 HTTP/1.1\r\nHost: upstream\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: upstream\r\nVia: 1.0 bgproxy\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        (HOST, (False, False, -1, b"")),
        ([*HOST, (b"Content-Length", b"0")], (False, False, 0, b"")),
        ([*HOST, (b"Content-Length", b"12")], (False, True, 12, b"")),
        ([*HOST, (b"Transfer-Encoding", b"chunked")], (True, True, -1, b"")),
        ([*HOST, (b"Connection", b"upgrade"), (b"Upgrade", b" h2c ")], (False, False, -1, b"h2c")),
    ],
)
def test_request_framing(headers: Headers, framing: tuple[bool, bool, int, bytes]) -> None:
    req = build_request_head(b"POST", b"/", "1.1", headers, IP, False, VIA)
    assert (req[HEAD_CHUNKED], req[HEAD_HAS_BODY], req[HEAD_LENGTH], req[HEAD_UPGRADE]) == framing


@pytest.mark.parametrize(
    ("method", "version", "headers", "status", "why"),
    [
        (b"CONNECT", "1.1", HOST, 405, "CONNECT is not supported"),
        (b"GET", "1.1", [], 400, "needs exactly one Host header"),
        (b"GET", "1.1", [*HOST, (b"host", b"b.example")], 400, "more than one Host header"),
        (b"GET", "1.0", [*HOST, *HOST], 400, "more than one Host header"),
        (b"POST", "1.1", [*HOST, (b"Transfer-Encoding", b"gzip, chunked")], 400, "Transfer-Encoding other"),
        (b"POST", "1.1", [*HOST, (b"Transfer-Encoding", b"chunked, gzip")], 400, "Transfer-Encoding other"),
        (
            b"POST",
            "1.1",
            [*HOST, (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
            400,
            "Transfer-Encoding other",
        ),
        (b"POST", "1.0", [*HOST, (b"Transfer-Encoding", b"chunked")], 400, "Transfer-Encoding other"),
        (b"GET", "1.1", [*HOST, (b"Expect", b"something-else")], 417, "only Expect: 100-continue"),
    ],
)
def test_request_refusals(method: bytes, version: str, headers: Headers, status: int, why: str) -> None:
    with pytest.raises(Refusal) as refused:
        build_request_head(method, b"/", version, headers, IP, False, VIA)
    assert refused.value.status == status
    assert why in refused.value.why


def test_connection_tokens() -> None:
    assert connection_tokens([b"Keep-Alive, X-A", b" ,x-b ,", b""]) == {b"keep-alive", b"x-a", b"x-b"}


# ---------------------------------------------------------------------------------------------- responses


def response(
    status: int, headers: Headers, *, bodiless: bool = False, keep: bool = True, http10: bool = False
) -> tuple[bytes, int, bool]:
    reason = b"OK" if status == 200 else b"X"
    return build_response_head(status, reason, headers, bodiless, keep, http10, VIA)


LENGTH = [(b"Content-Length", b"2"), (b"Server", b"s")]
OK = b"HTTP/1.1 200 OK\r\n"
LENGTH_OUT = b"Content-Length: 2\r\nServer: s\r\n"
VIA_OUT = b"Via: 1.1 bgproxy\r\n"


@pytest.mark.parametrize(
    ("args", "kwargs", "head", "framing", "keep"),
    [
        pytest.param((200, LENGTH), {}, OK + LENGTH_OUT + VIA_OUT, ResponseFraming.LENGTH, True, id="length"),
        pytest.param(
            (200, [(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), *LENGTH]),
            {},
            OK + LENGTH_OUT + VIA_OUT,
            ResponseFraming.LENGTH,
            True,
            id="hop-by-hop out",
        ),
        pytest.param(
            (200, [(b"Transfer-Encoding", b"chunked")]),
            {},
            OK + VIA_OUT + b"Transfer-Encoding: chunked\r\n",
            ResponseFraming.CHUNKED,
            True,
            id="chunked in, chunked out",
        ),
        pytest.param(
            (200, []),
            {},
            OK + VIA_OUT + b"Transfer-Encoding: chunked\r\n",
            ResponseFraming.CHUNKED,
            True,
            id="close-delimited in, chunked out",
        ),
        pytest.param(
            (200, []),
            {"http10": True},
            OK + VIA_OUT + b"Connection: close\r\n",
            ResponseFraming.CLOSE,
            False,
            id="no length to an HTTP/1.0 client: close",
        ),
        pytest.param(
            (200, LENGTH),
            {"http10": True},
            OK + LENGTH_OUT + VIA_OUT + b"Connection: keep-alive\r\n",
            ResponseFraming.LENGTH,
            True,
            id="HTTP/1.0 keep-alive said aloud",
        ),
        pytest.param(
            (200, LENGTH),
            {"keep": False},
            OK + LENGTH_OUT + VIA_OUT + b"Connection: close\r\n",
            ResponseFraming.LENGTH,
            False,
            id="closing",
        ),
        pytest.param(
            (204, [(b"Content-Length", b"0")]),
            {"bodiless": True},
            b"HTTP/1.1 204 X\r\n" + VIA_OUT,
            ResponseFraming.NONE,
            True,
            id="204 has no length",
        ),
        pytest.param(
            (304, [(b"Content-Length", b"10")]),
            {"bodiless": True},
            b"HTTP/1.1 304 X\r\nContent-Length: 10\r\nVia: 1.1 bgproxy\r\n",
            ResponseFraming.NONE,
            True,
            id="304 keeps the length it describes",
        ),
        pytest.param(
            (200, [(b"Content-Length", b"100")]),
            {"bodiless": True},
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nVia: 1.1 bgproxy\r\n",
            ResponseFraming.NONE,
            True,
            id="answer to HEAD",
        ),
        pytest.param(
            (200, [(b"Via", b"1.1 app"), *LENGTH]),
            {},
            OK + LENGTH_OUT + b"Via: 1.1 app, 1.1 bgproxy\r\n",
            ResponseFraming.LENGTH,
            True,
            id="Via appended",
        ),
        pytest.param(
            (200, [(b"Connection", b"X-Internal"), (b"X-Internal", b"1"), *LENGTH]),
            {},
            OK + LENGTH_OUT + VIA_OUT,
            ResponseFraming.LENGTH,
            True,
            id="Connection options out",
        ),
    ],
)
def test_response_head(
    args: tuple[int, Headers], kwargs: dict[str, bool], head: bytes, framing: int, keep: bool
) -> None:
    assert response(*args, **kwargs) == (head + b"\r\n", framing, keep)


def test_switching_protocols_head() -> None:
    headers = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", b"abc")]
    head = build_response_head(101, b"Switching Protocols", headers, True, True, False, VIA, b"websocket")
    assert head == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc\r\nVia: 1.1 bgproxy\r\n"
        b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        ResponseFraming.NONE,
        True,
    )


@pytest.mark.parametrize(
    ("status", "reason", "line"),
    [
        (200, b"OK", b"HTTP/1.1 200 OK\r\n"),
        (200, b"Fine Thanks", b"HTTP/1.1 200 Fine Thanks\r\n"),
        (200, b"", b"HTTP/1.1 200 OK\r\n"),
        (200, b"OK\r\nSet-Cookie: x=1", b"HTTP/1.1 200 OK\r\n"),  # never a CR or LF from upstream
        (404, b"Nope\x00", b"HTTP/1.1 404 Not Found\r\n"),
        (599, b"\n", b"HTTP/1.1 599 Unknown\r\n"),
    ],
)
def test_status_line_never_carries_control_characters(status: int, reason: bytes, line: bytes) -> None:
    assert status_line(status, reason) == line
    assert safe_reason(status, reason) == line[13:-2]


def test_interim_heads_drop_hop_by_hop() -> None:
    assert interim_head(100, b"Continue", []) == b"HTTP/1.1 100 Continue\r\n\r\n"
    hints = [(b"Link", b"</a.css>; rel=preload"), (b"Connection", b"keep-alive")]
    assert interim_head(103, b"Early Hints", hints) == (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    )


def test_error_response_says_why() -> None:
    body = b"502 Bad Gateway: blue upstream 127.0.0.1:1 refused\n"
    assert error_response(502, "blue upstream 127.0.0.1:1 refused", via=VIA, close=True) == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nCache-Control: no-store\r\nVia: 1.1 bgproxy\r\nConnection: close\r\n\r\n"
        % len(body)
        + body
    )
    kept = error_response(503, "x", via=VIA, close=False)
    assert b"Connection" not in kept and kept.endswith(b"\r\n\r\n503 Service Unavailable: x\n")


def test_chunks() -> None:
    assert chunk(b"hello") == [b"5\r\n", b"hello", b"\r\n"]
    assert b"".join(chunk(b"x" * 300)).startswith(b"12c\r\n")
    assert LAST_CHUNK == b"0\r\n\r\n"


# ---------------------------------------------------------------------------------------------- hardening


@pytest.mark.parametrize("option", [b"Content-Length", b"HOST", b"content-type, x-drop", b"Cookie"])
def test_connection_never_removes_headers_that_carry_the_message(option: bytes) -> None:
    headers = [*HOST, (b"Content-Length", b"3"), (b"Content-Type", b"a/b"), (b"Cookie", b"c=1"),
               (b"X-Drop", b"x"), (b"Connection", option)]  # fmt: skip
    kept = b"Host: a.example\r\nContent-Length: 3\r\nContent-Type: a/b\r\nCookie: c=1\r\n"
    drop = b"X-Drop: x\r\n" if b"x-drop" not in option.lower() else b""
    assert request(headers) == b"GET /p?q=1 HTTP/1.1\r\n" + kept + drop + ADDED + b"\r\n"
    head, framing, _ = response(200, [(b"Connection", option), (b"Content-Length", b"2")])
    assert (framing, b"\r\nContent-Length: 2\r\n" in head) == (ResponseFraming.LENGTH, True)


@pytest.mark.parametrize(
    ("method", "target", "line", "host"),
    [
        (b"GET", b"http://b.example/x?y", b"GET /x?y", b"b.example"),
        (b"GET", b"http://b.example", b"GET /", b"b.example"),
        (b"GET", b"http://b.example?y", b"GET /?y", b"b.example"),
        (b"OPTIONS", b"http://b.example", b"OPTIONS *", b"b.example"),
        (b"OPTIONS", b"http://b.example/", b"OPTIONS /", b"b.example"),
        (b"GET", b"HTTPS://[::1]:8443/a", b"GET /a", b"[::1]:8443"),
    ],
)
def test_absolute_form(method: bytes, target: bytes, line: bytes, host: bytes) -> None:
    head = build_request_head(method, target, "1.1", HOST, IP, False, VIA)[HEAD_BYTES]
    assert head.startswith(line + b" HTTP/1.1\r\nHost: " + host + b"\r\n")
    assert b"\r\nX-Forwarded-Host: " + host + b"\r\n" in head


@pytest.mark.parametrize("target", [b"ftp://b/", b"http://", b"http://u:p@b/", b"b.example/x", b"*x"])
def test_targets_neither_origin_nor_absolute_form_are_refused(target: bytes) -> None:
    with pytest.raises(Refusal) as refused:
        build_request_head(b"GET", target, "1.1", HOST, IP, False, VIA)
    assert refused.value.status == 400
