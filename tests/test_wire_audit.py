"""The wire audit's own eyes: the recording proxy forwards real HTTP (httpx, as Flower's
SuperNode uses it) and keeps every byte; the parser undoes chunking and gzip, so a secret
hidden by either is still found; every integer encoding of token ids is found; bytes that are
not readable HTTP are refused rather than searched as if they were."""

from __future__ import annotations

import gzip
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from simulations.operations.wire_audit import (
    Connection,
    WireAuditError,
    WireRecorder,
    http_exchanges,
    leaks,
    secret_forms,
)

SECRET = "quokkazebrafinch"


class _ChunkedGzipHandler(BaseHTTPRequestHandler):
    """Answers a POST with its body echoed inside a gzip stream, sent in 5-byte chunks, so the
    secret is split across chunks and compressed on the wire."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        payload = gzip.compress(b"echo: " + body)
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(payload), 5):
            chunk = payload[start:start + 5]
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *_args) -> None:
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedGzipHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_recorder_keeps_both_directions_and_the_parser_undoes_chunks_and_gzip(http_server):
    with WireRecorder() as recorder:
        address = recorder.forward_to(http_server)
        with httpx.Client(timeout=10.0) as client:  # one keep-alive connection, two exchanges
            replies = [client.post(f"http://{address}/v1/fleet/push-object", content=body).content
                       for body in (b"first", SECRET.encode())]
        recorder.close()
    assert replies == [b"echo: first", f"echo: {SECRET}".encode()]
    (connection,) = recorder.connections
    exchanges = http_exchanges(connection)
    assert [(e.method, e.path, e.status) for e in exchanges] == [("POST", "/v1/fleet/push-object", 200)] * 2
    assert exchanges[1].response_body == f"echo: {SECRET}".encode()

    forms = {"secret": {"utf-8": SECRET.encode()}}
    # Up, the request went plain; down, only the decoded response body shows it.
    assert {leak.where for leak in leaks([connection], forms)} == {
        "connection 0 upstream (raw)",
        "connection 0 exchange 1 (POST /v1/fleet/push-object) request body",
        "connection 0 exchange 1 (POST /v1/fleet/push-object) response body",
    }
    assert SECRET.encode() not in bytes(connection.downstream)


def _posted(body: bytes) -> Connection:
    head = f"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return Connection(upstream=bytearray(head + body))


@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("order", ["<", ">"])
def test_token_ids_are_found_in_every_integer_width_and_byte_order(width, order):
    ids = [311, 1022, 7, 65535]
    connection = _posted(b"\x00" * 3 + np.asarray(ids, dtype=f"{order}u{width}").tobytes() + b"\xff" * 5)
    found = {leak.form for leak in leaks([connection], {"ids": secret_forms("irrelevant", [ids])})}
    name = {"<": "le", ">": "be"}[order]
    assert f"ids-0-int{8 * width}-{name}" in found


def test_utf16_text_is_found_in_either_byte_order():
    for encoding in ("utf-16-le", "utf-16-be"):
        found = leaks([_posted(SECRET.encode(encoding))], {"s": secret_forms(SECRET)})
        assert {leak.form for leak in found} == {encoding}


def test_ids_too_large_for_16_bits_are_searched_in_32_and_64_only():
    forms = secret_forms("x", [[70000, 1]])
    assert not any("int16" in form for form in forms)
    assert "ids-0-int32-le" in forms and "ids-0-int64-be" in forms


def test_bytes_that_are_not_http_are_refused():
    tls_hello = Connection(upstream=bytearray(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64)))
    with pytest.raises(WireAuditError, match="not HTTP/1.1"):
        http_exchanges(tls_hello)


def test_a_content_encoding_the_audit_cannot_undo_is_refused():
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 3\r\n\r\nabc"
    with pytest.raises(WireAuditError, match="'br' cannot be undone"):
        http_exchanges(Connection(upstream=bytearray(head)))


def test_a_message_cut_off_by_the_end_of_the_capture_is_kept_with_its_body_so_far():
    head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + SECRET.encode()
    (exchange,) = http_exchanges(Connection(upstream=bytearray(head)))
    assert exchange.request_body == SECRET.encode() and exchange.status is None
