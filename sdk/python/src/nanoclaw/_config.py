"""Where the daemon is and how to trust it: from arguments, else the environment."""

from __future__ import annotations

import os
import ssl
import urllib.parse
from dataclasses import dataclass

from .errors import NanoclawError

#: The daemon's address, ``https://HOST:PORT`` (what ``host-agent serve --listen`` serves).
ENV_URL = "NANOCLAW_URL"
#: A bearer token (``nanoclaw token create --scope run``).
ENV_TOKEN = "NANOCLAW_TOKEN"
#: A PEM file of the certificate(s) to trust, such as the daemon's own ``<state-dir>/tls/cert.pem``.
ENV_CA_FILE = "NANOCLAW_CA_FILE"

#: Seconds a request may take to connect and answer (streams may then stay idle for as long
#: as the agent is silent).
DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Settings:
    """A resolved connection: host, port, token and TLS context."""

    host: str
    port: int
    token: str
    ssl_context: ssl.SSLContext
    timeout: float

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def resolve(
    url: str | None = None,
    token: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    verify: bool | ssl.SSLContext = True,
    timeout: float | None = None,
) -> Settings:
    """Settings from the arguments, each falling back on its environment variable.

    ``verify`` is ``True`` (check the daemon's certificate against ``ca_file``, else the
    system's roots), an :class:`ssl.SSLContext` of the caller's, or ``False`` (no check at
    all: only for a daemon on a network you trust, as anyone in between could read the token).
    """
    url = url or os.environ.get(ENV_URL)
    token = token or os.environ.get(ENV_TOKEN)
    if not url:
        raise NanoclawError(f"no daemon address: pass url=... or set {ENV_URL}")
    if not token:
        raise NanoclawError(f"no token: pass token=... or set {ENV_TOKEN}")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        raise NanoclawError(f"the daemon's address must be https://HOST:PORT, not {url!r}")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise NanoclawError(f"the daemon's address has no path: {url!r}")
    try:
        port = parsed.port or 443
    except ValueError:
        raise NanoclawError(f"bad port in {url!r}") from None
    if any(c in token for c in "\r\n"):
        raise NanoclawError("the token contains a line break")

    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif verify:
        ca = ca_file or os.environ.get(ENV_CA_FILE) or None
        try:
            context = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise NanoclawError(f"cannot load the CA file {ca}: {e}") from None
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return Settings(
        host=parsed.hostname,
        port=port,
        token=token,
        ssl_context=context,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
    )


def quote(segment: str) -> str:
    """``segment`` as one path segment of a URL."""
    return urllib.parse.quote(segment, safe="")


def target(path: str, query: dict[str, str] | None = None) -> str:
    """The request target: ``path`` and its query string."""
    if not query:
        return path
    return f"{path}?{urllib.parse.urlencode(query)}"
