"""HTTP/1.1 framing shared by the blocking and the asyncio transports.

Why by hand: the SDK depends on nothing but the standard library, whose ``http.client`` has no
asyncio counterpart and cannot wait for ``100 Continue`` before it sends a body (below). The
part written here is small: a request head, the status line and headers, and the two body
framings the daemon uses (a length, or chunks).

Each request goes on its own connection (``Connection: close``). A request with a body says
``Expect: 100-continue`` and sends the body only once the daemon asks for it (or has been
silent for :data:`CONTINUE_WAIT`): a daemon that refuses the request early (a token's scope,
a VM not running) answers without reading the body, and a body already sent would then sit
unread in its socket when it closes the connection, which resets it and can throw away the
answer before the client reads it.
"""

from __future__ import annotations

from ._config import Settings
from .errors import NanoclawError

#: The most bytes of the status line and headers.
MAX_HEAD = 64 * 1024
#: The most bytes of one line of an event stream (an event holds at most about 1.4 MiB).
MAX_LINE = 4 << 20
#: Seconds to wait for ``100 Continue`` before sending the body anyway.
CONTINUE_WAIT = 5.0
#: How much is read at once.
PIECE = 64 * 1024


def request_head(
    settings: Settings,
    method: str,
    target: str,
    content_type: str | None,
    body: bytes | None,
) -> bytes:
    """The request line and headers; ``Expect: 100-continue`` when there is a body."""
    head = [
        f"{method} {target} HTTP/1.1",
        f"Host: {settings.netloc}",
        f"Authorization: Bearer {settings.token}",
        "Accept: application/json",
        "Connection: close",
    ]
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    if body is not None or method != "GET":
        head.append(f"Content-Length: {len(body or b'')}")
    if body:
        head.append("Expect: 100-continue")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    """The status and the headers (names lowercased) of a response head ending in a blank
    line."""
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


class Framing:
    """How a response's body ends: chunked, after ``Content-Length`` bytes, or with the
    connection."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.left: int | None = None
        length = headers.get("content-length")
        if not self.chunked and length is not None:
            try:
                self.left = int(length)
            except ValueError:
                raise NanoclawError(f"the daemon sent a bad Content-Length: {length!r}") from None
            if self.left < 0:
                raise NanoclawError(f"the daemon sent a bad Content-Length: {length!r}")


def chunk_size(line: bytes) -> int:
    """The size on a chunk's first line."""
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise NanoclawError("the daemon sent a malformed chunk") from None


def split_lines(buf: bytes, piece: bytes) -> tuple[list[bytes], bytes]:
    """``buf`` and ``piece`` as the non-empty complete lines and the rest."""
    *complete, rest = (buf + piece).split(b"\n")
    if len(rest) > MAX_LINE:
        raise NanoclawError("the daemon sent an event line over 4 MiB")
    return [line.strip() for line in complete if line.strip()], rest
