"""The SDK's exceptions: every failure is a :class:`NanoclawError`."""

from __future__ import annotations

import json


class NanoclawError(Exception):
    """A failure talking to the daemon, or an answer it refused.

    ``status`` is the HTTP status of the daemon's answer (``None`` when there was none: the
    connection failed, or the answer was not what the API promises); ``message`` is the
    daemon's one-line error, or ours.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"{message} (HTTP {status})")
        self.message = message
        self.status = status


class AuthError(NanoclawError):
    """``401``: no token, or one the daemon does not know; ``403``: the token's scope is too
    small for the route (the message says which scope it needs)."""


class PermissionDenied(NanoclawError):
    """``403`` from the guest, not the daemon's token check: the agent's user may not read or
    write that path in the VM."""


class NotFound(NanoclawError):
    """``404``: no such VM, image or path."""


class Conflict(NanoclawError):
    """``409``: the VM is not in a state that allows it (running, ended, not paused, ...)."""


class ServerError(NanoclawError):
    """``5xx``: the daemon or the VMM behind it failed (``502``: the VMM refused or did not
    answer, as a pause can)."""


class SandboxFailed(NanoclawError):
    """The VM ended without its agent exiting (its VMM failed, or it was lost)."""

    def __init__(self, message: str, vm_status: str) -> None:
        super().__init__(message)
        self.vm_status = vm_status


#: How the daemon's remote API begins a 403 for a token whose scope is too small.
SCOPE_REFUSAL = "this token's scope is "


def error_for(status: int, body: bytes) -> NanoclawError:
    """The exception for a non-2xx answer with ``body``, the daemon's ``{"error": ...}``."""
    message = ""
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            message = parsed["error"]
    except ValueError:
        pass
    if not message:
        message = body.decode("utf-8", "replace").strip()[:512] or "no error message"
    cls: type[NanoclawError]
    if status == 401:
        cls = AuthError
    elif status == 403:
        # The daemon's token check says which scope the route needs; a guest that refuses a
        # file copy answers 403 too.
        cls = AuthError if message.startswith(SCOPE_REFUSAL) else PermissionDenied
    elif status == 404:
        cls = NotFound
    elif status == 409:
        cls = Conflict
    elif status >= 500:
        cls = ServerError
    else:
        cls = NanoclawError
    return cls(message, status)
