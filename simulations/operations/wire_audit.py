"""Audit what crosses the wire between SuperNodes and the SuperLink, from outside Flower.

`WireRecorder` is a loopback TCP proxy: SuperNodes dial it instead of the SuperLink, and it
keeps every byte of every connection, in both directions. Flower 1.41's Fleet API is protobuf
over HTTP/1.1 (httpx on the SuperNode, uvicorn on the SuperLink); with TLS off for the audit,
the capture is readable:

- `http_exchanges` parses each connection's bytes with h11 into requests and responses, undoing
  the transfer encoding (chunked) and any content encoding (gzip, deflate), and refusing any
  other, so that nothing compressed is searched as if it were plain;
- `leaks` searches the raw bytes and every decoded body for secrets in each form a device could
  send them: UTF-8, UTF-16 (both byte orders), and a token-id sequence as 16-, 32- or 64-bit
  integers of either byte order;
- `pushed_replies` rebuilds, from the objects the SuperNodes pushed, each reply as Flower's
  SuperLink received it: its records, or its error.

A capture that finds nothing proves something only if it could have: audits pair every search
with a positive control, a string the coordinator legitimately sends.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import h11
import numpy as np
from flwr.app import Error, Message, RecordDict
from flwr.common.serde import message_from_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import (  # pylint: disable=no-name-in-module
    ObjectTree,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

PUSH_OBJECT = "/v1/fleet/push-object"
PUSH_MESSAGES = "/v1/fleet/push-messages"
PULL_OBJECT = "/v1/fleet/pull-object"
INTEGER_WIDTHS = (2, 4, 8)  # bytes: 16-, 32- and 64-bit token ids


class WireAuditError(RuntimeError):
    """The capture could not be read as the protocol it should be (and so cannot be audited)."""


@dataclass
class Connection:
    """The bytes one TCP connection carried: `upstream` from the SuperNode, `downstream` to it."""

    upstream: bytearray = field(default_factory=bytearray)
    downstream: bytearray = field(default_factory=bytearray)


class WireRecorder:
    """A TCP proxy on 127.0.0.1 that forwards to one address and records every byte.

    Use as a context manager; `forward_to(address)` starts it and returns the address clients
    should dial. Connections are pumped by daemon threads; closing stops them all.
    """

    def __init__(self, io_timeout: float = 600.0) -> None:
        self.connections: list[Connection] = []
        self._lock = threading.Lock()
        self._io_timeout = io_timeout  # a connection idle this long is dropped, so no thread waits forever
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()

    def __enter__(self) -> WireRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def forward_to(self, target: str) -> str:
        """Start listening; what connects is forwarded to `target` ("host:port"). Returns the
        proxy's own "host:port"."""
        if self._listener is not None:
            raise RuntimeError("the recorder already forwards")
        host, port = target.rsplit(":", 1)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._start(self._accept, (host, int(port)))
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            sockets = [s for s in [self._listener, *self._sockets] if s is not None]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5.0)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, target: tuple[str, int]) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(target, timeout=10.0)
            except OSError:
                client.close()
                continue
            connection = Connection()
            with self._lock:
                self.connections.append(connection)
                self._sockets += [client, server]
            for sock in (client, server):
                sock.settimeout(self._io_timeout)
            self._start(self._pump, client, server, connection.upstream)
            self._start(self._pump, server, client, connection.downstream)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        try:
            while chunk := source.recv(65536):
                with self._lock:
                    record += chunk
                sink.sendall(chunk)
        except OSError:  # reset, closed by `close`, or idle past the timeout
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class HttpExchange:
    """One request and its response, bodies decoded (transfer and content encodings undone)."""

    method: str
    path: str
    request_headers: tuple[tuple[str, str], ...]
    request_body: bytes
    status: int | None  # None: the connection ended before a response
    response_headers: tuple[tuple[str, str], ...]
    response_body: bytes


def http_exchanges(connection: Connection) -> list[HttpExchange]:
    """The HTTP/1.1 exchanges of one recorded connection, in order.

    Two h11 state machines replay the conversation, one per side: the server side reads the
    requests from the upstream bytes, the client side reads the responses from the downstream.
    A message cut off by the end of the capture (a stream still open when the recorder closed)
    is the last exchange, with the body received so far. Raises `WireAuditError` when the bytes
    are not HTTP/1.1 (TLS, say) or use a content encoding this audit cannot undo.
    """
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
    client = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    for side, data in ((server, connection.upstream), (client, connection.downstream)):
        side.receive_data(bytes(data))
        side.receive_data(b"")  # the capture is all there is: end of stream
    exchanges = []
    try:
        while True:
            request, request_body, request_complete = _read_message(server, h11.Request)
            if request is None:
                return exchanges
            response, response_body, response_complete = None, b"", False
            if request_complete:
                _replay(client, request, request_body)
                response, response_body, response_complete = _read_message(client, h11.Response)
            exchanges.append(HttpExchange(
                method=request.method.decode(), path=request.target.decode(),
                request_headers=_headers(request), request_body=_decoded(request, request_body),
                status=None if response is None else response.status_code,
                response_headers=() if response is None else _headers(response),
                response_body=b"" if response is None else _decoded(response, response_body),
            ))
            if not response_complete or server.their_state is h11.MUST_CLOSE:
                return exchanges
            _replay(server, response, response_body)
            server.start_next_cycle()
            client.start_next_cycle()
    except h11.ProtocolError as error:
        raise WireAuditError(f"not HTTP/1.1 (is TLS on?): {error}") from error


def _read_message(connection: h11.Connection, head: type) -> tuple[h11.Request | h11.Response | None, bytes, bool]:
    """The next message's head, its transfer-decoded body and whether it was complete;
    (None, b"", False) at the end of the capture."""
    message, body = None, bytearray()
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError:
            if message is None and connection.trailing_data[0]:
                raise  # bytes that are not an HTTP message
            return message, bytes(body), False  # cut off by the end of the capture, or nothing left
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return message, bytes(body), False
        if isinstance(event, head):
            message = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return message, bytes(body), True


def _replay(connection: h11.Connection, head: h11.Request | h11.Response, body: bytes) -> None:
    """Send a message the other side received through `connection`, to advance its state."""
    connection.send(head)
    if body or _has_body(head):
        connection.send(h11.Data(data=body))
    connection.send(h11.EndOfMessage())


def _has_body(message: h11.Request | h11.Response) -> bool:
    names = {name.lower() for name, _ in message.headers}
    return b"content-length" in names or b"transfer-encoding" in names


def _headers(message: h11.Request | h11.Response) -> tuple[tuple[str, str], ...]:
    return tuple((name.decode("latin-1"), value.decode("latin-1")) for name, value in message.headers)


def _decoded(message: h11.Request | h11.Response, body: bytes) -> bytes:
    """`body` with its content encodings undone, last applied first."""
    encodings = [value.decode("latin-1").strip().lower() for name, value in message.headers
                 if name.lower() == b"content-encoding" for value in value.split(b",")]
    for encoding in reversed([e for e in encodings if e not in ("", "identity")]):
        if encoding in ("gzip", "x-gzip"):
            body = zlib.decompress(body, wbits=zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:  # raw deflate, as some servers send it
                body = zlib.decompress(body, wbits=-zlib.MAX_WBITS)
        else:
            raise WireAuditError(f"content encoding {encoding!r} cannot be undone by this audit")
    return body


def secret_forms(text: str, token_ids: Iterable[Sequence[int]] = ()) -> dict[str, bytes]:
    """The byte strings that would betray `text` on the wire: its UTF-8 and UTF-16 (both
    orders) bytes, and each token-id sequence as unsigned integers of 16, 32 and 64 bits in
    both byte orders (16 bits only where every id fits)."""
    forms = {"utf-8": text.encode("utf-8"), "utf-16-le": text.encode("utf-16-le"),
             "utf-16-be": text.encode("utf-16-be")}
    for index, ids in enumerate(token_ids):
        if not ids:
            raise ValueError(f"token-id sequence {index} of {text!r} is empty")
        for width in INTEGER_WIDTHS:
            if max(ids) >= 1 << (8 * width):
                continue
            for order, name in (("<", "le"), (">", "be")):
                forms[f"ids-{index}-int{8 * width}-{name}"] = np.asarray(ids, dtype=f"{order}u{width}").tobytes()
    return forms


@dataclass(frozen=True)
class Leak:
    secret: str  # the name the caller gave the secret
    form: str  # "utf-8", "ids-0-int32-le", ...
    where: str  # "connection 3 upstream (raw)", "connection 3 exchange 5 response body (POST /v1/...)"


def searchable(connections: Sequence[Connection]) -> Iterator[tuple[str, bytes]]:
    """Every byte string of the capture worth searching, with where it came from: each
    connection's raw bytes per direction, and each decoded request and response body."""
    for number, connection in enumerate(connections):
        yield f"connection {number} upstream (raw)", bytes(connection.upstream)
        yield f"connection {number} downstream (raw)", bytes(connection.downstream)
        for index, exchange in enumerate(http_exchanges(connection)):
            what = f"connection {number} exchange {index} ({exchange.method} {exchange.path})"
            yield f"{what} request body", exchange.request_body
            yield f"{what} response body", exchange.response_body


def leaks(connections: Sequence[Connection], secrets: Mapping[str, Mapping[str, bytes]],
          direction: str | None = None) -> list[Leak]:
    """Where any form of any secret occurs in the capture. `secrets`: name -> `secret_forms`.
    `direction` "upstream" (what the SuperNodes sent: their raw bytes and request bodies) or
    "downstream" (what they received: raw bytes and response bodies) searches one way only."""
    found = []
    for where, data in searchable(connections):
        if direction is not None and _direction(where) != direction:
            continue
        for name, forms in secrets.items():
            found += [Leak(name, form, where) for form, needle in forms.items() if needle in data]
    return found


def _direction(where: str) -> str:
    return "upstream" if "upstream" in where or where.endswith("request body") else "downstream"


@dataclass(frozen=True)
class PushedReply:
    """A reply a SuperNode pushed, as the SuperLink receives it."""

    message_type: str  # "train", "evaluate", "query"
    content: RecordDict | None  # None for an error reply
    error: Error | None


def pushed_replies(connections: Sequence[Connection]) -> list[PushedReply]:
    """Every reply the SuperNodes pushed in the capture, rebuilt with Flower's own inflation
    from the objects that crossed the wire (pushed up, or pulled down where the SuperLink
    already held an identical object), so its records are exactly what the SuperLink stores."""
    objects: dict[str, bytes] = {}
    pushed: list[tuple[Message, ObjectTree]] = []
    for connection in connections:
        for exchange in http_exchanges(connection):
            if exchange.path == PUSH_OBJECT:
                request = PushObjectRequest.FromString(exchange.request_body)
                objects[request.object_id] = request.object_content
            elif exchange.path == PULL_OBJECT and exchange.status == 200:
                request = PullObjectRequest.FromString(exchange.request_body)
                response = PullObjectResponse.FromString(exchange.response_body)
                if response.object_found and response.object_available:
                    objects[request.object_id] = response.object_content
            elif exchange.path == PUSH_MESSAGES:
                request = PushMessagesRequest.FromString(exchange.request_body)
                pushed += zip(map(message_from_proto, request.messages_list), request.message_object_trees, strict=True)
    replies = []
    for message, tree in pushed:
        content = None
        if not message.has_error():
            (record_dict,) = tree.children  # a Message's one child is its RecordDict
            try:
                content = inflate_object_from_contents(record_dict.object_id, dict(objects))
            except KeyError as missing:
                raise WireAuditError(f"object {missing} of a {message.metadata.message_type} reply never "
                                     "crossed the captured wire") from None
        replies.append(PushedReply(message.metadata.message_type, content,
                                   message.error if message.has_error() else None))
    return replies
