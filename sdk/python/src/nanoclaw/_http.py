"""HTTP/1.1 over TLS with the standard library: blocking sockets (see :mod:`._wire`)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from ._config import Settings
from ._wire import (
    CONTINUE_WAIT,
    MAX_HEAD,
    PIECE,
    Framing,
    chunk_size,
    parse_head,
    request_head,
    split_lines,
)
from .errors import NanoclawError, error_for


def connection_error(settings: Settings, e: BaseException) -> NanoclawError:
    """A failure to reach the daemon, said plainly."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return NanoclawError(
            f"the daemon at {settings.netloc} has a certificate we do not trust "
            f"({e.verify_message}): pass ca_file=... (its <state-dir>/tls/cert.pem) "
            "or set NANOCLAW_CA_FILE"
        )
    if isinstance(e, EOFError):
        return NanoclawError(f"the daemon at {settings.netloc} closed the connection early")
    return NanoclawError(f"cannot talk to the daemon at {settings.netloc}: {e or type(e).__name__}")


class _Reader:
    """A socket read through a buffer of our own, so that a timeout loses nothing."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(PIECE)
        self.buf += data
        return bool(data)

    def until(self, sep: bytes, limit: int) -> bytes:
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                out = bytes(self.buf[: i + len(sep)])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise NanoclawError("the daemon sent a header or chunk line over 64 KiB")
            start = max(0, len(self.buf) - len(sep) + 1)
            if not self._fill():
                raise EOFError

    def some(self, n: int) -> bytes:
        if not self.buf and not self._fill():
            return b""
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


class Response:
    """A successful answer whose body is read as it comes."""

    def __init__(self, settings: Settings, reader: _Reader, status: int, framing: Framing) -> None:
        self._settings = settings
        self._reader = reader
        self.status = status
        self._framing = framing
        self._chunk_left = 0
        self._done = False

    def _chunk(self) -> bytes:
        r = self._reader
        if self._chunk_left == 0:
            size = chunk_size(r.until(b"\r\n", MAX_HEAD))
            if size == 0:
                while r.until(b"\r\n", MAX_HEAD) != b"\r\n":
                    pass  # trailers
                self._done = True
                return b""
            self._chunk_left = size
        data = r.some(min(self._chunk_left, PIECE))
        if not data:
            raise EOFError
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            r.exactly(2)
        return data

    def read_some(self) -> bytes:
        """The next piece of the body; ``b""`` once it has ended."""
        if self._done:
            return b""
        f = self._framing
        try:
            if f.chunked:
                return self._chunk()
            if f.left is not None:
                if f.left == 0:
                    self._done = True
                    return b""
                data = self._reader.some(min(f.left, PIECE))
                if not data:
                    raise EOFError
                f.left -= len(data)
                return data
            data = self._reader.some(PIECE)
            if not data:
                self._done = True
            return data
        except (OSError, EOFError) as e:
            raise connection_error(self._settings, e) from None

    def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while piece := self.read_some():
            parts.append(piece)
        return b"".join(parts)

    def lines(self) -> Iterator[bytes]:
        """The non-empty lines of the body, until it ends."""
        buf = b""
        while True:
            piece = self.read_some()
            if not piece:
                if buf.strip():
                    yield buf.strip()
                return
            complete, buf = split_lines(buf, piece)
            yield from complete


class Transport:
    """One request per connection, so that a stream never blocks another call."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _connect(self) -> ssl.SSLSocket:
        s = self.settings
        raw = socket.create_connection((s.host, s.port), timeout=s.timeout)
        try:
            return s.ssl_context.wrap_socket(raw, server_hostname=s.host)
        except BaseException:
            raw.close()
            raise

    @contextmanager
    def open(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        content_type: str | None = None,
        stream: bool = False,
    ) -> Iterator[Response]:
        """Sends the request and yields the answer once its status is a success; a failure
        raises its :class:`NanoclawError`. With ``stream``, the answer's body may then stay
        silent for as long as it likes."""
        s = self.settings
        try:
            sock = self._connect()
        except (OSError, ValueError) as e:
            raise connection_error(s, e) from None
        try:
            reader = _Reader(sock)
            try:
                sock.sendall(request_head(s, method, target, content_type, body))
                status, headers = self._head(sock, reader, body)
            except (OSError, EOFError) as e:
                raise connection_error(s, e) from None
            resp = Response(s, reader, status, Framing(headers))
            if not 200 <= status < 300:
                try:
                    data = resp.read()
                except NanoclawError:
                    data = b""
                raise error_for(status, data)
            if stream:
                sock.settimeout(None)
            yield resp
        finally:
            sock.close()

    def _head(
        self, sock: ssl.SSLSocket, reader: _Reader, body: bytes | None
    ) -> tuple[int, dict[str, str]]:
        """The final answer's status and headers; sends ``body`` once asked for it."""
        if body:
            sock.settimeout(min(CONTINUE_WAIT, self.settings.timeout))
            try:
                status, headers = parse_head(reader.until(b"\r\n\r\n", MAX_HEAD))
            except (socket.timeout, TimeoutError):
                status = 100  # no word: send it anyway
            sock.settimeout(self.settings.timeout)
            if status != 100:
                return status, headers  # answered before the body was needed
            sock.sendall(body)
        while True:
            status, headers = parse_head(reader.until(b"\r\n\r\n", MAX_HEAD))
            if status != 100:
                return status, headers

    def call(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> bytes:
        """The whole body of a successful answer."""
        with self.open(method, target, body, content_type) as resp:
            return resp.read()
