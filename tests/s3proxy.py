"""A fault-injecting HTTP proxy for tests: sits between an S3 client and a moto server.

Each request is forwarded whole (keep-alive on the client side, a fresh connection to
the server); queued faults apply to the next requests that match them. Besides transient
faults it plays hostile servers: one that ignores Range and answers 200 with a huge body
("huge"), one that streams a chunked body without end ("endless"), and one that takes a
request and never answers ("hang"). "gate" holds a request until `open_gate`, then
forwards it: a test runs something else at that point of a client's work.
"""

from __future__ import annotations

import http.client
import io
import os
import select
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FAULTS = ("500", "503", "403", "reset", "slow", "flip", "huge", "endless", "hang", "gate")
_BLOCK = 1 << 20
_ERROR_BODIES = {
    "500": (500, "InternalError", "We encountered an internal error."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class Fault:
    kind: str
    method: str
    path_part: str
    times: int


class FaultProxy:
    """Listens on 127.0.0.1 at a free port; `inject` queues faults, `endpoint` is the URL."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: list[Fault] = []
        self.injected: dict[str, int] = {}
        self.requests = 0
        # What "huge" and "endless" send at most, and what they did send, in all.
        self.stream_limit = 1 << 30
        self.streamed = 0
        # Requests held by "hang" whose client gave up and closed the connection.
        self.abandoned = 0
        # Requests "gate" is holding now.
        self.gated = 0
        self._gate = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.connection, self.rfile)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def inject(self, kind: str, method: str = "", path_part: str = "", times: int = 1) -> None:
        """Apply `kind` to the next `times` requests whose method and path match
        (times < 0: to every one)."""
        assert kind in FAULTS, kind
        with self._lock:
            self.faults.append(Fault(kind, method, path_part, times))

    def open_gate(self) -> None:
        self._gate.set()

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def close(self) -> None:
        self._closed.set()
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()

    def _take(self, method: str, path: str) -> str | None:
        with self._lock:
            self.requests += 1
            for f in self.faults:
                if f.times != 0 and (not f.method or f.method == method) and f.path_part in path:
                    if f.times > 0:
                        f.times -= 1
                    self.injected[f.kind] = self.injected.get(f.kind, 0) + 1
                    return f.kind
        return None

    def _serve(self, conn: socket.socket, rfile: io.BufferedIOBase) -> None:
        while True:
            line = rfile.readline()
            if not line:
                return
            method, path, _ = line.decode("latin-1").split(" ", 2)
            headers: list[tuple[str, str]] = []
            while (h := rfile.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = h.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            length = int(next((v for k, v in headers if k.lower() == "content-length"), "0"))
            body = rfile.read(length) if length else b""
            fault = self._take(method, path)
            if fault in _ERROR_BODIES:
                status, code, message = _ERROR_BODIES[fault]
                xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                       f"<Message>{message}</Message></Error>").encode()
                self._send(conn, status, [("Content-Type", "application/xml")], xml)
                continue
            if fault == "hang":
                self._hold(conn)
                return
            if fault in ("huge", "endless"):
                self._stream_zeros(conn, chunked=fault == "endless")
                return
            if fault == "gate":
                with self._lock:
                    self.gated += 1
                self._gate.wait(60)
                with self._lock:
                    self.gated -= 1
            if fault == "slow":
                time.sleep(0.3)
            status, out_headers, out_body = self._forward(method, path, headers, body)
            if fault == "flip" and len(out_body) > 16:
                flipped = bytearray(out_body)
                flipped[len(flipped) // 2] ^= 0x40
                out_body = bytes(flipped)
            if fault == "reset":
                self._send(conn, status, out_headers, out_body, cut=True)
                return
            self._send(conn, status, out_headers, out_body, head=method == "HEAD")

    def _hold(self, conn: socket.socket) -> None:
        """Never answer; return when the client closes the connection or the proxy ends."""
        while not self._closed.is_set():
            readable, _, _ = select.select([conn], [], [], 0.1)
            if readable:
                try:
                    gone = conn.recv(1 << 16) == b""
                except OSError:
                    gone = True
                if gone:
                    with self._lock:
                        self.abandoned += 1
                    return

    def _stream_zeros(self, conn: socket.socket, chunked: bool) -> None:
        """A 200 whose body is zeros up to `stream_limit`: declared at 10 GiB, or chunked
        with no length at all, whatever the request asked for."""
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {10 << 30}"
        head = ("HTTP/1.1 200 OK\r\nContent-Type: binary/octet-stream\r\n"
                f"{framing}\r\n\r\n")
        block = bytes(_BLOCK)
        if chunked:
            block = f"{_BLOCK:x}\r\n".encode() + block + b"\r\n"
        try:
            conn.sendall(head.encode())
            sent = 0
            while sent < self.stream_limit and not self._closed.is_set():
                conn.sendall(block)
                sent += _BLOCK
                with self._lock:
                    self.streamed += _BLOCK
        except OSError:
            return

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]],
                 body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        try:
            upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() not in ("connection", "transfer-encoding"):
                    upstream.putheader(k, v)
            upstream.endheaders(body)
            resp = upstream.getresponse()
            data = resp.read()
            # A HEAD's Content-Length is the object's size, not that of its (empty) body.
            dropped = ("connection", "transfer-encoding") + (
                () if method == "HEAD" else ("content-length",))
            out = [(k, v) for k, v in resp.getheaders() if k.lower() not in dropped]
            return resp.status, out, data
        finally:
            upstream.close()

    @staticmethod
    def _send(conn: socket.socket, status: int, headers: list[tuple[str, str]], body: bytes,
              cut: bool = False, head: bool = False) -> None:
        lines = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        if not head:
            lines += f"Content-Length: {len(body)}\r\n"
        lines += "\r\n"
        if cut:
            # Half the body, then a TCP reset (linger 0): a connection dropped mid-body.
            conn.sendall(lines.encode() + body[: len(body) // 2])
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        conn.sendall(lines.encode() + body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[int]:
    """Run moto's S3 server on a free local port until the block ends; yield the port."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    cmd = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
                conn.close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        proc.kill()
        proc.wait()


def make_bucket(port: int, name: str) -> None:
    """Create a bucket (moto takes unsigned requests for that)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("PUT", f"/{name}")
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200, resp.status


def put_object(port: int, bucket: str, key: str, data: bytes) -> None:
    """Write an object at a raw key, as another program would (moto takes unsigned
    requests for that too): how a test plants keys that name no object of snapstore's."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("PUT", f"/{bucket}/{urllib.parse.quote(key)}", body=data)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200, resp.status


def s3_env() -> dict[str, str]:
    """Test credentials: dummy values moto accepts. Profiles and config files are ignored."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
