"""HTTP/1.1 over TLS with the standard library: asyncio streams.

A small client for the daemon's API only: one request per connection (``Connection:
close``), a body given whole, and an answer whose body is sized, chunked or ends with the
connection.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

from ._config import Settings
from ._http import MAX_LINE, connection_error
from .errors import NanoclawError, error_for

#: The most bytes of the status line and headers.
MAX_HEAD = 64 * 1024
#: Seconds a closing connection waits for the peer's TLS close.
CLOSE_TIMEOUT = 5.0


class AsyncResponse:
    """A successful answer whose body is read as it comes."""

    def __init__(
        self,
        settings: Settings,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
    ) -> None:
        self._settings = settings
        self._reader = reader
        self._writer = writer
        self.status = status
        self.headers = headers
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._left: int | None = None
        if not self._chunked and length is not None:
            try:
                self._left = int(length)
            except ValueError:
                raise NanoclawError(f"the daemon sent a bad Content-Length: {length!r}") from None
        self._chunk_left = 0
        self._done = False

    async def _chunk(self) -> bytes:
        r = self._reader
        if self._chunk_left == 0:
            size_line = await r.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise NanoclawError("the daemon sent a malformed chunk") from None
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                self._done = True
                return b""
            self._chunk_left = size
        data = await r.read(min(self._chunk_left, 64 * 1024))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._chunk_left)
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            await r.readexactly(2)
        return data

    async def read_some(self) -> bytes:
        """The next piece of the body; ``b""`` once it has ended."""
        if self._done:
            return b""
        try:
            if self._chunked:
                return await self._chunk()
            if self._left is not None:
                if self._left == 0:
                    self._done = True
                    return b""
                data = await self._reader.read(min(self._left, 64 * 1024))
                if not data:
                    raise asyncio.IncompleteReadError(b"", self._left)
                self._left -= len(data)
                return data
            data = await self._reader.read(64 * 1024)
            if not data:
                self._done = True
            return data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise connection_error(self._settings, e) from None

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while piece := await self.read_some():
            parts.append(piece)
        return b"".join(parts)

    async def lines(self) -> AsyncIterator[bytes]:
        """The non-empty lines of the body, until it ends."""
        buf = b""
        while True:
            piece = await self.read_some()
            if not piece:
                if buf.strip():
                    yield buf.strip()
                return
            buf += piece
            *complete, buf = buf.split(b"\n")
            for line in complete:
                if line.strip():
                    yield line.strip()
            if len(buf) > MAX_LINE:
                raise NanoclawError("the daemon sent an event line over 4 MiB")

    async def close(self) -> None:
        self._writer.close()
        try:
            # A peer that never answers the TLS close does not hold us up for long.
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            pass


class AsyncTransport:
    """The asyncio twin of :class:`nanoclaw._http.Transport`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def open(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> AsyncResponse:
        """Sends the request and answers once its status is a success (close the answer);
        a failure raises its :class:`NanoclawError`."""
        s = self.settings
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    s.host, s.port, ssl=s.ssl_context, server_hostname=s.host, limit=MAX_HEAD
                ),
                s.timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise connection_error(s, e) from None
        try:
            head = [
                f"{method} {target} HTTP/1.1",
                f"Host: {s.netloc}",
                f"Authorization: Bearer {s.token}",
                "Accept: application/json",
                "Connection: close",
            ]
            if content_type is not None:
                head.append(f"Content-Type: {content_type}")
            if body is not None or method != "GET":
                head.append(f"Content-Length: {len(body or b'')}")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if body:
                writer.write(body)
            status, headers = await asyncio.wait_for(self._head(writer, reader), s.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            writer.close()
            raise connection_error(s, e) from None
        except BaseException:
            writer.close()
            raise
        resp = AsyncResponse(s, reader, writer, status, headers)
        if not 200 <= status < 300:
            try:
                data = await asyncio.wait_for(resp.read(), s.timeout)
            except (NanoclawError, asyncio.TimeoutError):
                data = b""
            finally:
                await resp.close()
            raise error_for(status, data)
        return resp

    async def _head(
        self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader
    ) -> tuple[int, dict[str, str]]:
        await writer.drain()
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise NanoclawError("the daemon's answer has headers over 64 KiB") from None
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise NanoclawError(f"the daemon sent a malformed status line: {status_line[:100]!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def call(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> bytes:
        """The whole body of a successful answer."""
        resp = await self.open(method, target, body, content_type)
        try:
            return await asyncio.wait_for(resp.read(), self.settings.timeout)
        except asyncio.TimeoutError as e:
            raise connection_error(self.settings, e) from None
        finally:
            await resp.close()
