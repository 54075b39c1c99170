"""HTTP/1.1 over TLS with the standard library: asyncio streams (see :mod:`._wire`)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

from ._config import Settings
from ._http import connection_error
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
        framing: Framing,
    ) -> None:
        self._settings = settings
        self._reader = reader
        self._writer = writer
        self.status = status
        self._framing = framing
        self._chunk_left = 0
        self._done = False

    async def _chunk(self) -> bytes:
        r = self._reader
        if self._chunk_left == 0:
            size = chunk_size(await r.readuntil(b"\r\n"))
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                self._done = True
                return b""
            self._chunk_left = size
        data = await r.read(min(self._chunk_left, PIECE))
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
        f = self._framing
        try:
            if f.chunked:
                return await self._chunk()
            if f.left is not None:
                if f.left == 0:
                    self._done = True
                    return b""
                data = await self._reader.read(min(f.left, PIECE))
                if not data:
                    raise asyncio.IncompleteReadError(b"", f.left)
                f.left -= len(data)
                return data
            data = await self._reader.read(PIECE)
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
            complete, buf = split_lines(buf, piece)
            for line in complete:
                yield line

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
            writer.write(request_head(s, method, target, content_type, body))
            status, headers = await asyncio.wait_for(self._head(writer, reader, body), s.timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            writer.close()
            raise connection_error(s, e) from None
        except asyncio.LimitOverrunError:
            writer.close()
            raise NanoclawError("the daemon's answer has headers over 64 KiB") from None
        except BaseException:
            writer.close()
            raise
        resp = AsyncResponse(s, reader, writer, status, Framing(headers))
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
        self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, body: bytes | None
    ) -> tuple[int, dict[str, str]]:
        """The final answer's status and headers; sends ``body`` once asked for it."""
        await writer.drain()
        if body:
            try:
                raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONTINUE_WAIT)
                status, headers = parse_head(raw)
            except asyncio.TimeoutError:
                status = 100  # no word: send it anyway
            if status != 100:
                return status, headers  # answered before the body was needed
            writer.write(body)
            await writer.drain()
        while True:
            status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if status != 100:
                return status, headers

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
