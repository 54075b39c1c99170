"""What the daemon answers, as typed values (the API's ``VmInfo`` and ``EventRecord``).

Each keeps the daemon's JSON in ``raw`` for the fields this SDK does not name.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import NanoclawError

#: A VM's life, as the daemon names it. ``exited``, ``stopped``, ``failed``, ``lost`` and
#: ``migrated`` (moved to another host by a live migration: ``raw["migrated_to"]`` says where)
#: are final.
VmStatus = Literal[
    "starting", "running", "stopping", "exited", "stopped", "failed", "lost", "migrated"
]
FINAL_STATUSES = frozenset({"exited", "stopped", "failed", "lost", "migrated"})

#: One line of a live migration's stream (``POST /v1/vms/{id}/migrate``), the daemon's JSON
#: object as it is. Its ``event`` is ``accepted`` (``target_vm``: the VM's id on the target
#: host), ``round`` (``round``, 0 for the full copy; ``pages``; ``mb_per_s``; ``dirty``;
#: ``expected_downtime_ms``) or ``ended``, the last (``outcome``: ``moved``, ``kept`` or
#: ``unknown``; ``total_ms``; and when known ``target_vm``, ``downtime_ms`` and ``error``).
MigrationEvent = dict[str, Any]

StreamName = Literal["stdout", "stderr"]


def _bad(what: str, value: object) -> NanoclawError:
    return NanoclawError(f"the daemon sent a malformed {what}: {str(value)[:200]}")


def parse_json(body: bytes, what: str) -> Any:
    """``body`` as JSON, or a :class:`NanoclawError` naming ``what``."""
    try:
        return json.loads(body)
    except ValueError:
        raise _bad(what, body[:200].decode("utf-8", "replace")) from None


@dataclass(frozen=True)
class AgentExit:
    """How the agent process ended: ``kind`` ``exit`` with its code, or ``signal`` with the
    number of the signal that killed it."""

    kind: Literal["exit", "signal"]
    value: int

    @property
    def code(self) -> int:
        """The shell convention: the exit code, or 128 plus the signal (clamped to 0..255)."""
        code = self.value if self.kind == "exit" else 128 + self.value
        return max(0, min(255, code))

    @classmethod
    def from_json(cls, value: Any) -> AgentExit:
        if isinstance(value, dict) and len(value) == 1:
            ((kind, number),) = value.items()
            if kind in ("exit", "signal") and isinstance(number, int):
                return cls(kind, number)
        raise _bad("agent exit", value)


@dataclass(frozen=True)
class VmInfo:
    """What the daemon knows about one VM (``GET /v1/vms/{id}``)."""

    id: str
    status: VmStatus
    paused: bool
    agent_exit: AgentExit | None
    created_unix_ms: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @property
    def ended(self) -> bool:
        """Whether the VM has ended for good."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, value: Any) -> VmInfo:
        if not isinstance(value, dict):
            raise _bad("VM record", value)
        vm_id, status = value.get("id"), value.get("status")
        if not isinstance(vm_id, str) or not isinstance(status, str):
            raise _bad("VM record", value)
        exit_json = value.get("agent_exit")
        created = value.get("created_unix_ms")
        return cls(
            id=vm_id,
            status=status,  # type: ignore[arg-type]  # a newer daemon may name more
            paused=bool(value.get("paused", False)),
            agent_exit=None if exit_json is None else AgentExit.from_json(exit_json),
            created_unix_ms=created if isinstance(created, int) else 0,
            raw=value,
        )

    @classmethod
    def list_from_json(cls, value: Any) -> list[VmInfo]:
        if not isinstance(value, list):
            raise _bad("VM list", value)
        return [cls.from_json(v) for v in value]


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot the daemon keeps (``GET /v1/snapshots``): a VM's memory and state, saved
    under the daemon's state folder (root's, mode 0600: it holds guest memory)."""

    name: str
    source_vm: str
    image: str | None
    created_unix_ms: int
    format_version: int
    memory_bytes: int
    memory_data_bytes: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, value: Any) -> SnapshotInfo:
        if not isinstance(value, dict):
            raise _bad("snapshot record", value)
        name, source = value.get("name"), value.get("source_vm")
        if not isinstance(name, str) or not isinstance(source, str):
            raise _bad("snapshot record", value)
        image = value.get("image")

        def number(key: str) -> int:
            n = value.get(key)
            return n if isinstance(n, int) else 0

        return cls(
            name=name,
            source_vm=source,
            image=image if isinstance(image, str) else None,
            created_unix_ms=number("created_unix_ms"),
            format_version=number("format_version"),
            memory_bytes=number("memory_bytes"),
            memory_data_bytes=number("memory_data_bytes"),
            raw=value,
        )

    @classmethod
    def list_from_json(cls, value: Any) -> list[SnapshotInfo]:
        if not isinstance(value, list):
            raise _bad("snapshot list", value)
        return [cls.from_json(v) for v in value]


EventKind = Literal["started", "output", "guest_error", "exited", "ended"]


@dataclass(frozen=True)
class Event:
    """One agent event of ``GET /v1/vms/{id}/events``.

    ``kind`` says which fields are set: ``started`` (``pid``), ``output`` (``stream``,
    ``data``, the bytes decoded), ``guest_error`` (``message``), ``exited`` (``exit``),
    ``ended`` (``status``, the VM's final status; the last event of a VM).
    """

    seq: int
    kind: str
    pid: int | None = None
    stream: StreamName | None = None
    data: bytes = b""
    message: str | None = None
    exit: AgentExit | None = None
    status: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_line(cls, line: bytes) -> Event:
        value = parse_json(line, "event")
        if not isinstance(value, dict) or not isinstance(value.get("event"), str):
            raise _bad("event", value)
        kind: str = value["event"]
        seq = value.get("seq")
        seq = seq if isinstance(seq, int) else -1
        if kind == "started":
            pid = value.get("pid")
            return cls(seq, kind, pid=pid if isinstance(pid, int) else None, raw=value)
        if kind == "output":
            stream, data = value.get("stream"), value.get("data")
            if stream not in ("stdout", "stderr") or not isinstance(data, str):
                raise _bad("output event", value)
            try:
                decoded = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise _bad("output event", value) from None
            return cls(seq, kind, stream=stream, data=decoded, raw=value)
        if kind == "guest_error":
            message = value.get("message")
            return cls(seq, kind, message=str(message), raw=value)
        if kind == "exited":
            return cls(seq, kind, exit=AgentExit.from_json(value.get("status")), raw=value)
        if kind == "ended":
            status = value.get("status")
            return cls(seq, kind, status=str(status), raw=value)
        # A kind this SDK does not know: passed on as it is.
        return cls(seq, kind, raw=value)


@dataclass(frozen=True)
class FilesCopied:
    """What ``PUT /v1/vms/{id}/files`` copied: the tar's length and the entries unpacked."""

    bytes: int
    entries: int

    @classmethod
    def from_json(cls, value: Any) -> FilesCopied:
        if isinstance(value, dict):
            n, entries = value.get("bytes"), value.get("entries")
            if isinstance(n, int) and isinstance(entries, int):
                return cls(n, entries)
        raise _bad("copy answer", value)


def migration_event(line: bytes) -> MigrationEvent:
    """One line of a migration stream, checked: an object with a string ``event``, and an
    ``ended`` one with a string ``outcome``."""
    value = parse_json(line, "migration event")
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        raise _bad("migration event", value)
    if value["event"] == "ended" and not isinstance(value.get("outcome"), str):
        raise _bad("migration event", value)
    return value
