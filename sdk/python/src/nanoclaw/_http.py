"""HTTP/1.1 over TLS with the standard library: blocking (:mod:`http.client`)."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from ._config import Settings
from .errors import NanoclawError, error_for

#: The most bytes of one line of an event stream (an event holds at most about 1.4 MiB).
MAX_LINE = 4 << 20


def connection_error(settings: Settings, e: BaseException) -> NanoclawError:
    """A failure to reach the daemon, said plainly."""
    if isinstance(e, ssl.SSLCertVerificationError):
        return NanoclawError(
            f"the daemon at {settings.netloc} has a certificate we do not trust "
            f"({e.verify_message}): pass ca_file=... (its <state-dir>/tls/cert.pem) "
            "or set NANOCLAW_CA_FILE"
        )
    return NanoclawError(f"cannot talk to the daemon at {settings.netloc}: {e}")


class Transport:
    """One request per connection, so that a stream never blocks another call."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _headers(self, content_type: str | None, length: int | None) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self.settings.token}",
            "Accept": "application/json",
            "Connection": "close",
        }
        if content_type is not None:
            headers["Content-Type"] = content_type
        if length is not None:
            headers["Content-Length"] = str(length)
        return headers

    @contextmanager
    def open(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        content_type: str | None = None,
        stream: bool = False,
    ) -> Iterator[http.client.HTTPResponse]:
        """Sends the request and yields the answer once its status is a success; a failure
        raises its :class:`NanoclawError`. With ``stream``, the answer's body may then stay
        silent for as long as it likes."""
        s = self.settings
        conn = http.client.HTTPSConnection(
            s.host, s.port, context=s.ssl_context, timeout=s.timeout
        )
        try:
            try:
                length = None if body is None and method == "GET" else len(body or b"")
                conn.request(
                    method, target, body=body, headers=self._headers(content_type, length)
                )
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise connection_error(s, e) from None
            if not 200 <= resp.status < 300:
                try:
                    data = resp.read(64 * 1024)
                except (OSError, http.client.HTTPException):
                    data = b""
                raise error_for(resp.status, data)
            if stream and conn.sock is not None:
                conn.sock.settimeout(None)
            yield resp
        finally:
            conn.close()

    def call(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> bytes:
        """The whole body of a successful answer."""
        with self.open(method, target, body, content_type) as resp:
            try:
                return resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise connection_error(self.settings, e) from None


def lines(settings: Settings, resp: http.client.HTTPResponse) -> Iterator[bytes]:
    """The non-empty lines of a streamed body, until it ends."""
    while True:
        try:
            line = resp.readline(MAX_LINE + 1)
        except (OSError, http.client.HTTPException) as e:
            raise connection_error(settings, e) from None
        if not line:
            return
        if len(line) > MAX_LINE:
            raise NanoclawError("the daemon sent an event line over 4 MiB")
        line = line.strip()
        if line:
            yield line
