"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the S3 test server.

It forwards every request and counts it by kind (LIST, LIST_PROBE, GET, HEAD, PUT, COPY,
DELETE, ...).
With faults on, a share of requests is answered the way object storage misbehaves:
503 SlowDown, 500 InternalError, a connection reset before the answer, a reset after the
store has acted (the answer is lost, so a retry repeats a request that succeeded), and an
object's body cut off in the middle.

Whether a request is faulted is a function of the seed, its request line and how many
times that line has been seen, so interleaving across threads does not change which
requests fail (names with random parts, such as temporary keys, do). No request line is
faulted more than `max_in_a_row` times in a row, so a client that retries at least that
often always gets through and a test run cannot fail by bad luck.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("slowdown", "internal", "reset", "lost", "cut")
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade", "host"}


@dataclass(frozen=True)
class Faults:
    """Which share of requests misbehave, and how."""

    rate: float
    seed: int = 0
    modes: tuple[str, ...] = MODES
    max_in_a_row: int = 2

    def __post_init__(self):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"fault rate must be in [0, 1), got {self.rate}")
        if not self.modes or set(self.modes) - set(MODES):
            raise ValueError(f"fault modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.max_in_a_row < 1:
            raise ValueError(f"max_in_a_row must be >= 1, got {self.max_in_a_row}")

    def draw(self, line: str, seen: int) -> tuple[float, float]:
        digest = hashlib.sha256(f"{self.seed}|{line}|{seen}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big") / 2**64


def kind(method: str, path: str, headers) -> str:
    """The S3 operation a request is, from its method, path and query."""
    split = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
    has_key = "/" in split.path.strip("/")
    if method == "GET":
        if has_key:
            return "GET"
        # s3fs asks "is this a folder?" with a one-name listing after a HEAD finds no object
        return "LIST_PROBE" if query.get("max-keys") == ["1"] else "LIST"
    if method == "PUT":
        if headers.get("x-amz-copy-source"):
            return "COPY"
        if "partNumber" in query:
            return "UPLOAD_PART"
        return "PUT" if has_key else "CREATE_BUCKET"
    if method == "POST":
        if "uploads" in query:
            return "CREATE_MULTIPART"
        if "uploadId" in query:
            return "COMPLETE_MULTIPART"
        if "delete" in query:
            return "DELETE_MANY"
    return method


class S3Proxy(ThreadingHTTPServer):
    """`S3Proxy(upstream_url)`; `.url` is its endpoint. Set `.faults` to a `Faults` (None: off)."""

    daemon_threads = True

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream).netloc
        self.faults: Faults | None = None
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.lines: list[str] = []  # "KIND METHOD PATH" of every request since the last reset
        self._seen: Counter[str] = Counter()
        self._in_a_row: Counter[str] = Counter()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, name="s3proxy", daemon=True).start()

    def reset_counts(self) -> None:
        with self.lock:
            self.requests.clear()
            self.injected.clear()
            self.lines.clear()
            self._seen.clear()
            self._in_a_row.clear()

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def _decide(self, line: str, op: str) -> str | None:
        """The fault for this request, or None; counts the request."""
        with self.lock:
            self.requests[op] += 1
            self.lines.append(f"{op} {line}")
            faults = self.faults
            if faults is None:
                return None
            seen = self._seen[line]
            self._seen[line] += 1
            hit, pick = faults.draw(line, seen)
            if hit >= faults.rate or self._in_a_row[line] >= faults.max_in_a_row:
                self._in_a_row[line] = 0
                return None
            modes = [m for m in faults.modes if m != "cut" or op == "GET"] or ["reset"]
            mode = modes[int(pick * len(modes))]
            self._in_a_row[line] += 1
            self.injected[mode] += 1
            self.injected[f"{op}:{mode}"] += 1
            return mode


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>s3proxy</RequestId></Error>").encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and answers the client's Expect: 100-continue
    server: S3Proxy

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Drop the connection with a TCP reset, as a load balancer that gives up does."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in _HOP | {"content-length", "server", "date"}:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _upstream(self) -> http.client.HTTPConnection:
        if getattr(self, "_conn", None) is None:
            self._conn = http.client.HTTPConnection(self.server.upstream, timeout=60)
        return self._conn

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        headers["Host"] = self.headers.get("Host", self.server.upstream)
        for attempt in range(2):  # a kept-alive upstream connection the server closed meanwhile
            conn = self._upstream()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read()
                return answer.status, answer.getheaders(), data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _handle(self) -> None:
        body = self._body()
        op = kind(self.command, self.path, self.headers)
        mode = self.server._decide(f"{self.command} {self.path}", op)
        if mode == "slowdown":
            return self._answer(503, [("Content-Type", "application/xml")],
                                _error_xml("SlowDown", "Please reduce your request rate."))
        if mode == "internal":
            return self._answer(500, [("Content-Type", "application/xml")],
                                _error_xml("InternalError", "We encountered an internal error. Please try again."))
        if mode == "reset":
            return self._reset()
        status, headers, data = self._forward(body)
        if mode == "lost":
            return self._reset()
        if mode == "cut" and self.command == "GET" and len(data) > 1:
            self.send_response(status)
            for key, value in headers:
                if key.lower() not in _HOP | {"content-length", "server", "date"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._reset()
        if self.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
            return self._answer(status, headers, b"", int(length))
        self._answer(status, headers, data)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            pass  # the client went away (or gave up on a cut body)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the connection was reset on purpose
        if getattr(self, "_conn", None) is not None:
            self._conn.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle
