"""A flaky S3 endpoint for the tests: a threaded HTTP proxy on loopback in front of the moto server.

Each request the proxy receives is either answered by a fault of its own, without reaching moto:

* ``503`` SlowDown (S3's "reduce your request rate"), with S3's XML error body,
* ``500`` InternalError, with S3's XML error body,
* ``drop``: the request is read, then the connection is closed with no answer at all,

or forwarded to moto, some of them after a short delay. One more fault, ``lost``, is only injected when asked
for (``faults=`` or ``script``): the request is forwarded and done, then its answer is dropped, so the client's
retry repeats a request the store has already carried out. Whether a request fails is drawn from a hash of the
seed, the method, the path and query, and how many times that same request was seen before: a retry of a
request is a new draw, and a run that sends the same requests meets the same faults, whatever the order
in which concurrent clients send them.

Example::

    with FaultyS3Proxy(s3_server.endpoint_url, fault_rate=0.08, seed=1) as proxy:
        os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint_url
        ...
        print(proxy.injected)  # {"503": 4, "500": 3, "drop": 2}
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("503", "500", "drop")
KINDS = (*FAULTS, "lost")
_ERRORS = {
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}
# Hop-by-hop headers: they describe one connection, not the request, and are not forwarded.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}


def _draw(*parts) -> float:
    """A number in [0, 1) fixed by `parts`."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FaultyS3Proxy:
    """Forwards S3 requests to `upstream`, answering `fault_rate` of them with a fault (see the module)."""

    def __init__(self, upstream: str, *, fault_rate: float = 0.08, delay_rate: float = 0.2,
                 max_delay_s: float = 0.05, seed: int = 0, faults: tuple[str, ...] = FAULTS):
        if not 0 <= fault_rate < 1 or not set(faults) <= set(KINDS) or not faults:
            raise ValueError(f"fault_rate must be in [0, 1) and faults among {KINDS}")
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.fault_rate, self.delay_rate, self.max_delay_s = fault_rate, delay_rate, max_delay_s
        self.seed, self.faults = seed, tuple(faults)
        self.requests = 0
        self.delayed = 0
        self.injected: Counter[str] = Counter()  # fault kind -> how many
        # (kind, method, path, client) of each fault; client: "botocore" (boto3, s3fs) or "aws-sdk-cpp" (pyarrow)
        self.failed: list[tuple[str, str, str, str]] = []
        self._seen: Counter[tuple[str, str]] = Counter()
        # (method, path without the query) -> faults to answer its next requests with, before any drawing
        self.script: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultyS3Proxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="faulty-s3")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FaultyS3Proxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def decide(self, method: str, target: str, client: str = "") -> tuple[str | None, float]:
        """(fault kind or None, delay in seconds) for this request: the n-th time `method target` is sent."""
        with self._lock:
            self.requests += 1
            n = self._seen[method, target]
            self._seen[method, target] += 1
            queued = self.script.get((method, target.split("?", 1)[0]))
            if queued:
                kind = queued.pop(0)
                self.injected[kind] += 1
                self.failed.append((kind, method, target, client))
                return kind, 0.0
        draw = _draw(self.seed, method, target, n)
        if draw < self.fault_rate:
            kind = self.faults[int(draw / self.fault_rate * len(self.faults))]
            with self._lock:
                self.injected[kind] += 1
                self.failed.append((kind, method, target, client))
            return kind, 0.0
        second = _draw(self.seed, "delay", method, target, n)
        if second < self.delay_rate:
            with self._lock:
                self.delayed += 1
            return None, second / self.delay_rate * self.max_delay_s
        return None, 0.0

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; answers Expect: 100-continue

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, kind: str) -> None:
                status, reason, code, message = _ERRORS[kind]
                request_id = uuid.uuid4().hex[:16].upper()
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                        f"</Message><RequestId>{request_id}</RequestId><HostId>faulty-s3</HostId></Error>").encode()
                self.send_response_only(status, reason)
                self.send_header("Content-Type", "application/xml")
                self.send_header("x-amz-request-id", request_id)
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _drop(self) -> None:
                # An abortive close (RST), as a crashed or overloaded front end does: no status line at all.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _forward(self, body: bytes, lose: bool = False) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP | {"content-length"}}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    reply = upstream.getresponse()
                    data = reply.read()
                    if lose:
                        return self._drop()
                    self.send_response_only(reply.status, reply.reason)
                    for k, v in reply.getheaders():
                        if k.lower() not in _HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            def _handle(self) -> None:
                body = self._body()
                agent = self.headers.get("User-Agent", "").lower()
                client = "botocore" if "botocore" in agent else "aws-sdk-cpp" if "aws-sdk-cpp" in agent else agent
                kind, delay = proxy.decide(self.command, self.path, client)
                if kind == "drop":
                    return self._drop()
                if kind == "lost":
                    return self._forward(body, lose=True)
                if kind is not None:
                    return self._error(kind)
                if delay:
                    time.sleep(delay)
                self._forward(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
