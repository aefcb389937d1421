"""Property tests: hostile request heads, framings and bodies against a running gateway.

Hypothesis generates the input; each example is written verbatim on a fresh
connection to one gateway process started for the module, so an example
costs a few milliseconds. The gateway runs in mixed mode: it issues sessions
for ``wf_a`` (whose "ChatKit server" is a path on the fake upstream) and
forwards every other workflow to the fake hosted API, learning those
sessions; the admin API is on. The fake upstream runs in a thread of its own,
because the examples are plain blocking code.

Whatever the input, these hold:

- the gateway never answers 5xx from its own code (the only exception is
  501 for a transfer coding it does not implement, which RFC 9112 6.1 asks
  for); an upstream's answer is recognised by the ``Via`` header the gateway
  adds to everything it forwards;
- every refusal is an error body in OpenAI's shape;
- nothing reaches the gateway's log as an error or a traceback;
- a request whose framing could be read two ways (RFC 9112 6.3: Content-Length
  beside Transfer-Encoding, disagreeing lengths, malformed sizes) is never
  forwarded, and a request that is forwarded arrives with exactly the body
  that was sent.

The number of examples comes from the Hypothesis profile (tests/conftest.py):
a few per property in the suite, many more with ``scripts/fuzz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.settings import Settings, load_settings
from tests.fake_upstream import FakeUpstream
from tests.harness import GatewayProcess, free_port
from tests.processes import http_request

API_KEY = "ckgk_fuzz-issuer-key-0123456789"
HOSTED_KEY = "sk-fuzz-hosted"
ADMIN_TOKEN = "admin-token-fuzz-0123456789"
#: High enough that no example is ever rate limited for volume alone.
LIMIT = 1_000_000_000
#: How long one example may take to be answered: a hang is a failure.
ANSWER_TIMEOUT = 10.0


# -- the gateway and its upstream, once per module ------------------------------------


class ThreadedFake:
    """The fake upstream on an event loop in its own thread, for blocking tests."""

    def __init__(self) -> None:
        self.fake = FakeUpstream()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> FakeUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.start(), self._loop).result(10)
        return self.fake

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass(frozen=True)
class Target:
    gateway: GatewayProcess
    admin_port: int
    hosted_secret: str  # a learned session's client secret
    issued_secret: str  # an issued session's client secret (wf_a)

    def log_length(self) -> int:
        return len(self.gateway.output())

    def assert_nothing_logged_since(self, offset: int) -> None:
        new = self.gateway.output()[offset:]
        assert "Traceback" not in new, new
        assert " ERROR " not in new, new
        assert " CRITICAL " not in new, new


def _create(port: int, key: str, workflow: str) -> str:
    body = json.dumps(
        {
            "user": "fuzz-user",
            "workflow": {"id": workflow},
            "rate_limits": {"max_requests_per_1_minute": LIMIT},
        }
    ).encode()
    status, _, answer = http_request(
        port,
        "POST",
        "/v1/chatkit/sessions",
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        body,
    )
    assert status == 200, answer
    secret: str = json.loads(answer)["client_secret"]
    return secret


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    admin_port = free_port()
    with ThreadedFake() as fake:
        gateway = GatewayProcess(
            fake.url,
            env={
                "GATEWAY_WORKFLOWS": json.dumps(
                    {"wf_a": {"upstream": f"{fake.url}/v1/chatkit/server-a"}}
                ),
                "GATEWAY_ISSUER_API_KEYS": API_KEY,
                "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                "GATEWAY_ADMIN_PORT": str(admin_port),
                # An example the generator got wrong (a head never finished)
                # is answered 408 soon rather than holding the run.
                "GATEWAY_CLIENT_HEADER_TIMEOUT": "2",
                "GATEWAY_CLIENT_BODY_TIMEOUT": "2",
            },
        )
        with gateway:
            yield Target(
                gateway,
                admin_port,
                hosted_secret=_create(gateway.port, HOSTED_KEY, "wf_hosted"),
                issued_secret=_create(gateway.port, API_KEY, "wf_a"),
            )


# -- talking to it ----------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name), None)

    @property
    def forwarded(self) -> bool:
        """Whether this is an upstream's answer (the gateway adds Via to those)."""
        return self.header(b"via") is not None

    def echo(self) -> dict[str, Any] | None:
        """What the fake upstream saw, when this is its echo of client traffic."""
        if not self.forwarded or self.status != 200:
            return None
        try:
            document = json.loads(self.body)
        except ValueError:
            return None
        if isinstance(document, dict) and document.get("object") == "chatkit.echo":
            return document
        return None


def exchange(port: int, request: bytes) -> Reply:
    """Write ``request`` on a fresh connection; read the one answer until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=ANSWER_TIMEOUT) as sock:
        # Refused before everything was written: the answer is still there.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return parse(bytes(received))


def parse(raw: bytes) -> Reply:
    head, separator, rest = raw.partition(b"\r\n\r\n")
    assert separator, f"no complete answer: {raw[:300]!r}"
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    reply = Reply(status, headers, b"")
    length = reply.header(b"content-length")
    if length is not None:
        body = rest[: int(length)]
    elif b"chunked" in (reply.header(b"transfer-encoding") or b""):
        body = _dechunk(rest)
    else:
        body = rest
    return Reply(status, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def assert_well_behaved(reply: Reply, *, head: bool = False) -> None:
    """The properties every answer has, whatever was asked (``head``: to HEAD,
    whose answers carry no body)."""
    if not reply.forwarded:
        own_5xx = reply.status >= 500
        if own_5xx:
            assert reply.status == 501, (reply.status, reply.body)
    if reply.status >= 400 and not head:
        document = json.loads(reply.body)
        error = document["error"]
        assert set(error) == {"message", "type", "param", "code"}, document
        assert isinstance(error["message"], str)
        assert isinstance(error["type"], str)
        if reply.status == 501:
            assert error["code"] == "transfer_coding_not_implemented"


# -- strategies: the request head -------------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
tokens = st.text(alphabet=TCHAR, min_size=1, max_size=16)
methods = st.one_of(
    st.sampled_from(
        ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get"]
    ),
    tokens,
)
KNOWN_TARGETS = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/chatkit/conversation",
    "/v1/chatkit/sessions",
    "/v1/chatkit/sessions/cksess_x/cancel",
    "/v1/chatkit/threads?limit=5",
    "/chatkit",
    "/chatkit/upload/a",
    "*",
    "http://gateway/v1/chatkit/conversation",
    "/v1/chatkit/%2e%2e/sessions",
    "/v1/chatkit/../../admin/revoke",
    "//v1/chatkit/conversation",
    "/v1/chatkit/conversation#frag",
]
# Visible ASCII and obs-text, never a space, CR or LF (which end the target).
target_bytes = st.binary(min_size=1, max_size=48).map(
    lambda b: b"/" + bytes(c for c in b if c > 0x20 and c != 0x7F)
)
targets = st.one_of(st.sampled_from([t.encode() for t in KNOWN_TARGETS]), target_bytes)
# Header values: anything but CR and LF (those end the line), obs-text included.
values = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
odd_names = st.binary(min_size=1, max_size=12).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b":", b"") or b"x"
)
#: Names the gateway acts on or passes on with care: codings, credentials, CORS,
#: identity, forwarding, tracing (a second Authorization beside the test's own too).
KNOWN_NAMES = [
    b"Content-Encoding",
    b"Accept-Encoding",
    b"Content-Type",
    b"Authorization",
    b"Origin",
    b"Access-Control-Request-Method",
    b"Access-Control-Request-Headers",
    b"Upgrade",
    b"Te",
    b"Trailer",
    b"Keep-Alive",
    b"Proxy-Authorization",
    b"X-Request-Id",
    b"X-ChatKit-User",
    b"X_ChatKit_Session_Id",
    b"X-Forwarded-For",
    b"X-Forwarded-Host",
    b"Forwarded",
    b"Traceparent",
    b"OpenAI-Beta",
]
header_names = st.one_of(st.sampled_from(KNOWN_NAMES), tokens.map(str.encode), odd_names)
known_values = st.sampled_from(
    [b"gzip", b"br, gzip;q=0.5", b"chunked", b"h2c", b"application/json; charset=utf-16", b"*"]
)
headers = st.lists(st.tuples(header_names, st.one_of(known_values, values)), max_size=6)
#: Left to the framing strategies (or fixed), so a generated head always ends.
_FRAMING_NAMES = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"connection", b"expect"}
)


@dataclass(frozen=True)
class Framing:
    """Framing headers and the bytes after the head; ``ambiguous`` if a reader
    could take the body to be something else (RFC 9112 6.3)."""

    name: str
    headers: list[bytes]
    payload: bytes
    ambiguous: bool


def _chunks(body: bytes, cuts: list[int], extension: bool, upper: bool) -> bytes:
    pieces, start = [], 0
    for cut in sorted({c % (len(body) + 1) for c in cuts} | {len(body)}):
        if cut > start:
            pieces.append(body[start:cut])
            start = cut
    out = bytearray()
    for piece in pieces:
        size = f"{len(piece):X}" if upper else f"{len(piece):x}"
        out += size.encode() + (b";ext=1" if extension else b"") + b"\r\n" + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


@st.composite
def framings(draw: st.DrawFn, body: bytes) -> Framing:
    kind = draw(
        st.sampled_from(
            [
                "length",
                "chunked",
                "both",
                "two_lengths",
                "same_lengths",
                "bad_length",
                "bad_chunk_size",
                "coding_before_chunked",
                "chunked_not_last",
            ]
        )
    )
    chunked = _chunks(
        body,
        draw(st.lists(st.integers(0, 1 << 16), max_size=4)),
        draw(st.booleans()),
        draw(st.booleans()),
    )
    length = str(len(body)).encode()
    if kind == "length":
        return Framing(kind, [b"Content-Length: " + length], body, False)
    if kind == "chunked":
        return Framing(kind, [b"Transfer-Encoding: chunked"], chunked, False)
    if kind == "both":  # the classic request-smuggling head
        cl = draw(st.sampled_from([length, str(len(chunked)).encode(), b"0"]))
        order = [b"Content-Length: " + cl, b"Transfer-Encoding: chunked"]
        return Framing(kind, order if draw(st.booleans()) else order[::-1], chunked, True)
    if kind == "two_lengths":
        return Framing(
            kind,
            [b"Content-Length: " + length, b"Content-Length: " + str(len(body) + 1).encode()],
            body + b"x",
            True,
        )
    if kind == "same_lengths":
        # Repeated identical values may be read as one (RFC 9110 8.6) or refused.
        return Framing(
            kind, [b"Content-Length: " + length, b"Content-Length: " + length], body, False
        )
    if kind == "bad_length":
        bad = draw(
            st.sampled_from([b"+" + length, b"0x" + length, length + b", " + length, b"-1", b""])
        )
        return Framing(kind, [b"Content-Length: " + bad], body, True)
    if kind == "bad_chunk_size":
        size = draw(st.sampled_from([b"0x1", b"+1", b"-1", b"1 1", b"fffffffffffffffffff1"]))
        return Framing(kind, [b"Transfer-Encoding: chunked"], size + b"\r\nx\r\n0\r\n\r\n", True)
    if kind == "coding_before_chunked":  # a coding the gateway does not implement: 501
        return Framing(kind, [b"Transfer-Encoding: gzip, chunked"], chunked, True)
    # chunked not the final coding: the length is unknowable (RFC 9112 6.3)
    return Framing(kind, [b"Transfer-Encoding: chunked, identity"], chunked, True)


def request_bytes(method: bytes, target: bytes, fields: list[bytes], payload: bytes = b"") -> bytes:
    head = method + b" " + target + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
    return head + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + payload


# -- properties: the request head and its framing -------------------------------------


def _authorization(target: Target, which: str) -> list[bytes]:
    secrets = {"hosted": target.hosted_secret, "issued": target.issued_secret}
    if which == "garbage":
        return [b"Authorization: Bearer \xff\x00 x"]
    if which in secrets:
        return [b"Authorization: Bearer " + secrets[which].encode()]
    return []


@given(
    method=methods,
    path=targets,
    fields=headers,
    body=st.binary(max_size=64),
    authorization=st.sampled_from(["none", "hosted", "issued", "garbage"]),
)
def test_any_request_head_is_answered_in_shape(
    target: Target,
    method: str,
    path: bytes,
    fields: list[tuple[bytes, bytes]],
    body: bytes,
    authorization: str,
) -> None:
    extra = [n + b": " + v for n, v in fields if n.lower() not in _FRAMING_NAMES]
    framing = [b"Content-Length: " + str(len(body)).encode()] if body else []
    request = request_bytes(
        method.encode(), path, [*_authorization(target, authorization), *extra, *framing], body
    )
    offset = target.log_length()

    reply = exchange(target.gateway.port, request)

    assert_well_behaved(reply, head=method == "HEAD")
    target.assert_nothing_logged_since(offset)


@given(
    method=methods,
    path=st.one_of(
        st.sampled_from([b"/admin/revoke", b"/admin/sessions/cksess_x", b"/admin/revocations"]),
        targets,
    ),
    fields=headers,
    body=st.binary(max_size=64),
    authorized=st.booleans(),
)
def test_any_request_head_to_the_admin_listener_is_answered_in_shape(
    target: Target,
    method: str,
    path: bytes,
    fields: list[tuple[bytes, bytes]],
    body: bytes,
    authorized: bool,
) -> None:
    extra = [n + b": " + v for n, v in fields if n.lower() not in _FRAMING_NAMES]
    token = [b"Authorization: Bearer " + ADMIN_TOKEN.encode()] if authorized else []
    framing = [b"Content-Length: " + str(len(body)).encode()] if body else []
    request = request_bytes(method.encode(), path, [*token, *extra, *framing], body)
    offset = target.log_length()

    reply = exchange(target.admin_port, request)

    assert not reply.forwarded  # the admin API forwards nothing
    assert_well_behaved(reply, head=method == "HEAD")
    target.assert_nothing_logged_since(offset)


@given(
    data=st.data(),
    body=st.binary(max_size=256),
    fields=headers,
    route=st.sampled_from(["hosted", "issued"]),
)
def test_a_framing_that_reads_two_ways_is_never_forwarded(
    target: Target,
    data: st.DataObject,
    body: bytes,
    fields: list[tuple[bytes, bytes]],
    route: str,
) -> None:
    framing = data.draw(framings(body))
    path, secret = (
        (b"/v1/chatkit/conversation", target.hosted_secret)
        if route == "hosted"
        else (b"/chatkit", target.issued_secret)
    )
    extra = [n + b": " + v for n, v in fields if n.lower() not in _FRAMING_NAMES]
    request = request_bytes(
        b"POST",
        path,
        [b"Authorization: Bearer " + secret.encode(), *extra, *framing.headers],
        framing.payload,
    )
    offset = target.log_length()

    reply = exchange(target.gateway.port, request)

    assert_well_behaved(reply)
    echo = reply.echo()
    if framing.ambiguous:
        assert echo is None, (framing, reply)
    elif echo is not None:
        # Forwarded: with exactly the body that was sent, however it was framed.
        assert echo["body_bytes"] == len(body), (framing, echo)
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest(), framing
    target.assert_nothing_logged_since(offset)


@given(
    names=st.lists(
        st.sampled_from(["Authorization", "X-ChatKit-User", "Content-Length", "X-Anything"]),
        min_size=1,
        max_size=3,
    ),
    body=st.binary(max_size=32),
    authorized_in_head=st.booleans(),
)
def test_a_trailer_never_changes_what_the_upstream_sees(
    target: Target, names: list[str], body: bytes, authorized_in_head: bool
) -> None:
    # RFC 9110 6.5.1: trailer fields must not be merged into the header
    # section, least of all one that authenticates.
    credential = b"Authorization: Bearer " + target.hosted_secret.encode()
    trailers = b"".join(
        (credential if name == "Authorization" else f"{name}: trailer-mark".encode()) + b"\r\n"
        for name in names
    )
    payload = _chunks(body, [], False, False)[: -len(b"\r\n")] + trailers + b"\r\n"
    head = [credential] if authorized_in_head else []
    request = request_bytes(
        b"POST", b"/v1/chatkit/conversation", [*head, b"Transfer-Encoding: chunked"], payload
    )
    offset = target.log_length()

    reply = exchange(target.gateway.port, request)

    assert_well_behaved(reply)
    if not authorized_in_head:
        assert reply.status in (400, 401), reply  # a trailer never authenticates
    echo = reply.echo()
    if echo is not None:
        assert "trailer-mark" not in json.dumps(echo["headers"]), echo["headers"]
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    target.assert_nothing_logged_since(offset)


# -- properties: JSON bodies ------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    # Every code point, lone surrogates included: valid JSON escapes, not text.
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def encoded(document: Any, style: str) -> bytes:
    """JSON text of ``document``, ASCII-escaped or raw; raw surrogates become
    the bytes a careless encoder writes (not UTF-8)."""
    if style == "ascii":
        return json.dumps(document).encode()
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


DEEP_MARK = "deep-nesting-"


def deepen(body: bytes) -> bytes:
    """``"deep-nesting-N"`` replaced by an object nested N arrays deep."""
    marker = b'"' + DEEP_MARK.encode()
    start = body.find(marker)
    if start < 0:
        return body
    end = body.index(b'"', start + 1)
    depth = int(body[start + len(marker) : end])
    return body[:start] + b"[" * depth + b"{}" + b"]" * depth + body[end + 1 :]


create_bodies = st.fixed_dictionaries(
    {
        "user": st.one_of(json_scalars, st.text(min_size=1, max_size=20)),
        "workflow": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"id": st.sampled_from(["wf_a", "wf_hosted", "", "wf_" + "x" * 200])},
                optional={
                    "version": json_scalars,
                    "state_variables": st.dictionaries(
                        st.text(max_size=8), json_values, max_size=4
                    ),
                    "tracing": json_values,
                },
            ),
        ),
    },
    optional={
        "expires_after": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"anchor": st.just("created_at"), "seconds": st.integers(-5, 10_000)}
            ),
        ),
        "rate_limits": st.one_of(
            json_values,
            st.fixed_dictionaries({"max_requests_per_1_minute": st.integers(-5, 1 << 40)}),
        ),
        "chatkit_configuration": json_values,
        # Nesting deeper than json.dumps can write: spliced in as text (deepen()).
        "metadata": st.integers(0, 2000).map(lambda depth: f"{DEEP_MARK}{depth}"),
    },
)


def _client_status(target: Target, secret: str, *, issued: bool) -> int:
    """A client request with ``secret``: on the workflow's server route when the
    gateway issued it, else on the hosted API's."""
    path = "/chatkit" if issued else "/v1/chatkit/conversation"
    status, _, _ = http_request(
        target.gateway.port,
        "POST",
        path,
        {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        b'{"type": "threads.list", "params": {}}',  # a read: an envelope /chatkit admits
    )
    return status


def _post(port: int, path: bytes, body: bytes, authorization: str) -> bytes:
    return request_bytes(
        b"POST",
        path,
        [
            b"Authorization: " + authorization.encode(),
            b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(),
        ],
        body,
    )


@given(document=create_bodies, style=st.sampled_from(["ascii", "raw"]), key=st.booleans())
def test_any_session_create_body_is_answered_in_shape(
    target: Target, document: dict[str, Any], style: str, key: bool
) -> None:
    body = deepen(encoded(document, style))
    workflow = document.get("workflow")
    issued = isinstance(workflow, dict) and workflow.get("id") == "wf_a"
    authorization = f"Bearer {API_KEY if issued else HOSTED_KEY}" if key else "Bearer nope"
    offset = target.log_length()

    reply = exchange(
        target.gateway.port,
        _post(target.gateway.port, b"/v1/chatkit/sessions", body, authorization),
    )

    assert_well_behaved(reply)
    if reply.status == 200:
        session = json.loads(reply.body)
        if not reply.forwarded:  # issued here: the answer names what was asked
            assert session["user"] == document["user"]
        # Issued or learned, the secret handed out works at once.
        assert _client_status(target, session["client_secret"], issued=not reply.forwarded) == 200
    target.assert_nothing_logged_since(offset)


ENVELOPE_TYPES = [
    "threads.create",
    "threads.add_user_message",
    "threads.get_by_id",
    "threads.list",
    "items.list",
    "threads.update",
    "attachments.create",
    "input.transcribe",
    "threads.custom_action",
]
envelopes = st.one_of(
    st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(ENVELOPE_TYPES), json_scalars)},
        optional={"params": json_values, "metadata": json_values},
    ),
    json_values,
)


@given(
    document=envelopes,
    style=st.sampled_from(["ascii", "raw"]),
    suffix=st.sampled_from([b"", b" ", b"\x00", b"}", b"[" * 1000]),
)
def test_any_chatkit_envelope_is_answered_in_shape_and_forwarded_as_sent(
    target: Target, document: Any, style: str, suffix: bytes
) -> None:
    body = encoded(document, style) + suffix
    offset = target.log_length()

    reply = exchange(
        target.gateway.port,
        _post(target.gateway.port, b"/chatkit", body, f"Bearer {target.issued_secret}"),
    )

    assert_well_behaved(reply)
    echo = reply.echo()
    if echo is not None:  # forwarded to the workflow's server: byte for byte
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    target.assert_nothing_logged_since(offset)


@given(
    body=st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "session_id": st.one_of(json_scalars, st.from_regex(r"\Acksess_[a-z0-9]{0,8}\Z")),
                "client_secret": json_scalars,
            },
        ).map(lambda d: encoded(d, "raw")),
        json_values.map(lambda d: encoded(d, "ascii")),
        st.binary(max_size=64),
    ),
    session_id=st.text(max_size=20),
    tail=st.text(max_size=8),
)
def test_any_admin_request_is_answered_in_shape(
    target: Target, body: bytes, session_id: str, tail: str
) -> None:
    port = target.admin_port
    offset = target.log_length()
    authorization = f"Bearer {ADMIN_TOKEN}"

    revoke = exchange(port, _post(port, b"/admin/revoke", body, authorization))
    lookup = exchange(
        port,
        request_bytes(
            b"GET",
            b"/admin/sessions/" + quote(session_id, safe="").encode(),
            [b"Authorization: " + authorization.encode()],
        ),
    )
    audit = exchange(
        port,
        request_bytes(
            b"GET",
            b"/admin/revocations?tail=" + quote(tail, safe="").encode(),
            [b"Authorization: " + authorization.encode()],
        ),
    )

    for reply in (revoke, lookup, audit):
        assert reply.status in (200, 202, 400, 404), (reply.status, reply.body)
        assert_well_behaved(reply)
    target.assert_nothing_logged_since(offset)


# -- properties: settings -------------------------------------------------------------------

#: Settings that name files to read are left out: their values are paths.
FUZZED_SETTINGS = sorted(name for name in Settings.model_fields if not name.endswith("_file"))
SECRET_SETTINGS = frozenset(
    name for name, field in Settings.model_fields.items() if "SecretStr" in str(field.annotation)
)
MARK = "MARKsecretMARK"
# Environment values cannot hold NUL; anything else can be set.
env_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
env_values = st.one_of(
    env_text,
    st.integers(-(1 << 70), 1 << 70).map(str),
    st.floats().map(str),
    st.sampled_from(["", " ", "true", "none", "*", "{}", "[]", '{"a": {}}', "0", "-1", "1e999"]),
    # JSON settings (workflows, routes, upstreams) nested past the parser, or read two ways.
    st.sampled_from(["[" * 5000 + "]" * 5000, '{"a": "http://x", "a": "http://y"}']),
)


@given(values=st.dictionaries(st.sampled_from(FUZZED_SETTINGS), env_values, min_size=1, max_size=1))
def test_any_setting_value_loads_or_stops_with_one_line_naming_it(
    values: dict[str, str],
) -> None:
    ((name, value),) = values.items()
    if name in SECRET_SETTINGS:
        value = MARK + value
    variable = "GATEWAY_" + name.upper()
    try:
        load_settings({variable: value}, report_ignored=False)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert message.startswith(variable) or variable in message, message
        assert MARK not in message, "a secret setting's value is in its error"
