"""A differential fuzzer: mutated requests and responses through the real protocol classes.

Request heads and bodies are made by mutating valid requests (framing headers, chunk sizes and
extensions, line endings, header names, Connection lists, targets); response heads the same way.
They go through bgproxy's ClientConnection and UpstreamConnection over in-memory transports
(bench.memory) to a recording upstream that answers every request it can parse with a numbered
body. The invariants:

- the upstream sees exactly the requests bgproxy accepted, in order, with the client's bodies: a
  prefix of what llhttp reads from the client's bytes, never an extra (smuggled) request;
- a client only ever receives its own responses: numbered bodies in order, never a byte of another
  exchange or of what an upstream sent past a response's end;
- every refusal is a 4xx with a body saying why, and ends the connection; nothing hangs: a client
  whose connection stays open had every complete request answered.

`make test` runs a bounded number of examples; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs many more.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.memory import MemoryTransport, client_connection, make_runtime, pooled_connection
from bgproxy.dataplane.runtime import Runtime
from bgproxy.dataplane.upstream import UpstreamConnection

settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY"


@dataclass
class Message:
    method: bytes = b""
    status: int = 0
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Reader:
    """Collects whole messages with httptools; ``error`` is set where llhttp gave up."""

    def __init__(self, response: bool) -> None:
        self.parser = httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        self.response = response
        self.done: list[Message] = []
        self.cur = Message()
        self.error = False
        self.partial = False  # bytes of a message that is not complete yet

    def feed(self, data: bytes) -> Reader:
        if data and not self.error:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self.error = True
            except httptools.HttpParserError:
                self.error = True
        return self

    def on_message_begin(self) -> None:
        self.cur = Message()
        self.partial = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.cur.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.response:
            self.cur.status = self.parser.get_status_code()  # type: ignore[union-attr]
        else:
            self.cur.method = self.parser.get_method()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.cur.body += body

    def on_message_complete(self) -> None:
        self.done.append(self.cur)
        self.partial = False


# ------------------------------------------------------------------------------------------ strategies

TARGETS = [
    b"/",
    b"/a?b=1",
    b"http://h.example/x",
    b"HTTP://h.example",
    b"*",
    b"http://u@h/",
    b"ftp://h/",
    b"x",
]
CONNECTION = [
    b"keep-alive",
    b"close",
    b"Content-Length",
    b"host",
    b"Transfer-Encoding",
    b"x-a",
    b"te",
    b"upgrade",
]
TE_VALUES = [
    b"chunked",
    b"Chunked",
    b"gzip, chunked",
    b"chunked, gzip",
    b" chunked",
    b"identity",
    b"chunked,",
]


def chunked(body: bytes, cuts: list[int], ext: bytes, upper: bool) -> bytes:
    out, start = b"", 0
    for cut in [*sorted(c % (len(body) + 1) for c in cuts), len(body)]:
        piece = body[start:cut]
        start = cut
        if piece:
            size = b"%X" % len(piece) if upper else b"%x" % len(piece)
            out += size + ext + b"\r\n" + piece + b"\r\n"
    return out + b"0\r\n\r\n"


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["get", "length", "chunked"]))
    method = b"GET" if kind == "get" else draw(st.sampled_from([b"POST", b"PUT", b"PATCH"]))
    target = draw(st.sampled_from(TARGETS)) if draw(st.integers(0, 3)) == 0 else b"/p"
    body = b"" if kind == "get" else draw(st.binary(min_size=1, max_size=30))
    headers: list[tuple[bytes, bytes]] = [(b"Host", b"h.example")]
    payload = body
    if kind == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif kind == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        ext = draw(st.sampled_from([b"", b";a=1", b";a", b" ;x=y", b";\x00"]))
        payload = chunked(body, draw(st.lists(st.integers(0, 40), max_size=3)), ext, draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.integers(0, 8))
        if mutation == 0:  # a second, maybe different, length
            headers.append((b"Content-Length", b"%d" % draw(st.sampled_from([len(body), 0, 3, 100]))))
        elif mutation == 1:
            headers.append((b"Transfer-Encoding", draw(st.sampled_from(TE_VALUES))))
        elif mutation == 2:
            tokens = draw(st.lists(st.sampled_from(CONNECTION), min_size=1, max_size=3))
            headers.append((b"Connection", b", ".join(tokens)))
        elif mutation == 3:
            headers.append((b"Host", b"other.example"))
        elif mutation == 4:
            headers = [h for h in headers if h[0] != b"Host"]
        elif mutation == 5:
            name = draw(
                st.sampled_from([b"Content-Length ", b"X_A", b"X-A\x01", b"Transfer-Encoding\t", b""])
            )
            headers.append((name, b"1"))
        elif mutation == 6:
            headers.append((b"Expect", draw(st.sampled_from([b"100-continue", b"nothing"]))))
        elif mutation == 7:
            headers.append((b"X-Forwarded-For", b"6.6.6.6"))
        else:
            headers.append((b"Keep-Alive", b"timeout=1"))
    endings = draw(
        st.lists(st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"]), min_size=1, max_size=1)
    )
    eol = endings[0] if draw(st.integers(0, 5)) == 0 else b"\r\n"
    lines = [method + b" " + target + b" HTTP/1.1", *(n + b": " + v for n, v in headers)]
    return eol.join(lines) + eol + eol + payload


@st.composite
def responses(draw: st.DrawFn, token: bytes) -> bytes:
    kind = draw(st.sampled_from(["length", "chunked", "204", "304", "interim"]))
    extra = [
        (b"Connection", draw(st.sampled_from([b"keep-alive", b"Content-Length", b"x-b, content-length"])))
    ]
    if kind == "length":
        head, body = [(b"Content-Length", b"%d" % len(token))], token
    elif kind == "chunked":
        ext = draw(st.sampled_from([b"", b";e=1"]))
        head, body = (
            [(b"Transfer-Encoding", b"chunked")],
            chunked(token, draw(st.lists(st.integers(0, 9))), ext, False),
        )
    elif kind == "interim":
        head, body = [(b"Content-Length", b"%d" % len(token))], token
    else:
        head, body = [], b""
    status = {"204": b"204 No Content", "304": b"304 Not Modified"}.get(kind, b"200 OK")
    out = b"HTTP/1.1 " + status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in [*extra, *head])
    out += b"\r\n" + body
    if kind == "interim":
        out = b"HTTP/1.1 100 Continue\r\n\r\n" + out
    tail = draw(st.sampled_from([b"", b"", b"", STRAY, b"STRAY junk", b"\r\n", b"HTTP/1.1 200"]))
    return out + tail


# ------------------------------------------------------------------------------------------ the harness


class Upstreams:
    """A few pooled connections to the blue upstream; answers each complete request it reads."""

    def __init__(self, runtime: Runtime, n: int) -> None:
        self.conns: list[tuple[UpstreamConnection, MemoryTransport, Reader]] = []
        for _ in range(n):
            conn, wire = pooled_connection(runtime, "blue")
            self.conns.append((conn, wire, Reader(response=False)))
        self.seen: list[Message] = []  # every complete request the upstream read, in order

    def pump(self, answer: Callable[[int], bytes]) -> None:
        """Read what bgproxy sent; answer each new complete request (which may send the next)."""
        progress = True
        while progress:
            progress = False
            for conn, wire, reader in self.conns:
                answered = len(reader.done)
                reader.feed(wire.take())
                for request in reader.done[answered:]:
                    number = len(self.seen)
                    self.seen.append(request)
                    if not (wire.closed or wire.aborted):
                        conn.data_received(answer(number))
                        progress = True


def token(number: int) -> bytes:
    return b"<answer %04d>" % number


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def simple_answer(number: int) -> bytes:
    body = token(number)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 400), max_size=4))
async def test_requests_reach_the_upstream_exactly_as_accepted(stream: list[bytes], cuts: list[int]) -> None:
    runtime = make_runtime()
    upstreams = Upstreams(runtime, 4)
    client, downstream = client_connection(runtime)
    data = b"".join(stream)
    for piece in split(data, cuts):
        if downstream.closed or downstream.aborted:
            break
        client.data_received(piece)
        upstreams.pump(simple_answer)

    reference = Reader(response=False).feed(data)  # what llhttp reads from the client's bytes
    sent = [(m.method, m.body) for m in upstreams.seen]
    assert sent == [(m.method, m.body) for m in reference.done[: len(sent)]], "an extra or altered request"

    got = Reader(response=True).feed(downstream.take())
    assert not got.error
    answers = [r for r in got.done if r.status == 200]
    assert [r.body for r in answers] == [token(i) for i in range(len(answers))]
    refusals = [r for r in got.done if r.status != 200]
    if refusals:
        [refusal] = refusals
        assert 400 <= refusal.status < 500 and refusal.body.startswith(b"%d " % refusal.status)
        assert got.done[-1] is refusal and downstream.closed
    if not (downstream.closed or downstream.aborted):
        assert len(answers) == len(reference.done), "a complete request was left unanswered"


@given(st.integers(1, 3).flatmap(lambda n: st.tuples(*(responses(token(i)) for i in range(n)))))
async def test_a_client_only_ever_receives_its_own_response(answers: tuple[bytes, ...]) -> None:
    runtime = make_runtime()
    upstreams = Upstreams(runtime, len(answers) + 1)
    client, downstream = client_connection(runtime)
    client.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(len(answers))))
    upstreams.pump(lambda number: answers[number])

    output = downstream.take()
    assert b"STRAY" not in output
    got = Reader(response=True).feed(output)
    assert not got.error
    finals = [r for r in got.done if r.status >= 200]
    for number, response in enumerate(finals):
        assert response.body in (token(number), b""), f"response {number} carries another exchange's bytes"
        assert response.status in (200, 204, 304)
    assert len(finals) == len(answers)  # out-of-sync connections are replaced, nothing is lost
