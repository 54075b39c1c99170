"""Run AI agents in Nanoclaw microVMs through the daemon's remote API.

``Sandbox`` (blocking) and ``AsyncSandbox`` (asyncio) drive one VM each; see the README for the
model: a VM runs one agent command, given when it is created. The standard library only.
"""

from .asandbox import AsyncFiles, AsyncSandbox
from .errors import (
    AuthError,
    Conflict,
    NanoclawError,
    NotFound,
    PermissionDenied,
    SandboxFailed,
    ServerError,
)
from .sandbox import Files, Sandbox
from .types import AgentExit, Event, FilesCopied, MigrationEvent, SnapshotInfo, VmInfo

__all__ = [
    "AgentExit",
    "AsyncFiles",
    "AsyncSandbox",
    "AuthError",
    "Conflict",
    "Event",
    "Files",
    "FilesCopied",
    "MigrationEvent",
    "NanoclawError",
    "NotFound",
    "PermissionDenied",
    "Sandbox",
    "SandboxFailed",
    "ServerError",
    "SnapshotInfo",
    "VmInfo",
]
