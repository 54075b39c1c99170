"""What the sync and async sandboxes share: the create request and the routes."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from ._config import quote, target
from .errors import NanoclawError, SandboxFailed
from .types import Event, VmInfo

#: A command: its argv (program first), or a string run by ``/bin/sh -c``.
Command = Union[str, Sequence[str]]
#: An environment: a mapping, or ``(name, value)`` pairs in order.
Env = Union[Mapping[str, str], Sequence[tuple[str, str]]]
#: A profile: its TOML text, or the path of its file.
Profile = Union[str, os.PathLike[str]]


def argv(command: Command) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    args = list(command)
    if not args or not all(isinstance(a, str) for a in args):
        raise NanoclawError("the command must be a non-empty list of strings (or one string)")
    return args


def create_body(
    command: Command | None,
    image: str | None,
    profile: Profile | None,
    env: Env | None,
    cwd: str | None,
    user: str | None,
    memory_mib: int | None,
    vcpus: int | None,
    disk_size_mib: int | None,
) -> bytes:
    """The JSON of ``POST /v1/vms`` (``CreateVm``); the daemon fills what is not given."""
    body: dict[str, Any] = {}
    if command is None:
        if image is None:
            raise NanoclawError("give a command (or an image, to run its entrypoint)")
        body["command"] = ""
    else:
        program, *args = argv(command)
        body["command"] = program
        body["args"] = args
    if image is not None:
        body["image"] = image
    if profile is not None:
        if isinstance(profile, str):
            body["profile"] = profile
        else:
            try:
                with open(profile, encoding="utf-8") as f:
                    body["profile"] = f.read()
            except OSError as e:
                raise NanoclawError(f"cannot read the profile {os.fspath(profile)}: {e}") from None
    if env is not None:
        pairs = env.items() if isinstance(env, Mapping) else env
        body["env"] = [[str(k), str(v)] for k, v in pairs]
    for name, value in (
        ("cwd", cwd),
        ("user", user),
        ("memory_mib", memory_mib),
        ("vcpus", vcpus),
        ("disk_size_mib", disk_size_mib),
    ):
        if value is not None:
            body[name] = value
    return json.dumps(body).encode()


def write_to(stream: str) -> Callable[[bytes], None]:
    """A callback that writes output to this process's ``stdout`` or ``stderr`` (as bytes when
    it has a binary buffer, else as text with undecodable bytes replaced)."""

    def write(data: bytes) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            buffer.write(data)
        else:
            out.write(data.decode("utf-8", "replace"))
        out.flush()

    return write


JSON = "application/json"
TAR = "application/x-tar"


def vm_path(vm_id: str, action: str = "") -> str:
    return f"/v1/vms/{quote(vm_id)}{'/' + action if action else ''}"


def snapshot_path(name: str, action: str = "") -> str:
    return f"/v1/snapshots/{quote(name)}{'/' + action if action else ''}"


def snapshot_body(name: str | None) -> bytes:
    return json.dumps({} if name is None else {"name": name}).encode()


def fork_body(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


def restore_body(paused: bool) -> bytes:
    return json.dumps({"paused": paused}).encode()


def migrate_body(to: str, downtime_ms: int | None, max_rounds: int | None) -> bytes:
    """The JSON of ``POST /v1/vms/{id}/migrate`` (``MigrateVm``); the daemon fills what is not
    given (a 300 ms downtime target, 30 rounds)."""
    body: dict[str, Any] = {"to": to}
    if downtime_ms is not None:
        body["downtime_ms"] = downtime_ms
    if max_rounds is not None:
        body["max_rounds"] = max_rounds
    return json.dumps(body).encode()


def migration_cut(vm_id: str) -> NanoclawError:
    """The error of a migration stream that ended before its ``ended`` line."""
    return NanoclawError(
        f"the daemon's stream of VM {vm_id}'s migration ended without an outcome: "
        "its record (migrated_to, status) says where the VM is"
    )


def events_target(vm_id: str, follow: bool) -> str:
    return target(vm_path(vm_id, "events"), {"follow": "true" if follow else "false"})


def files_target(vm_id: str, path: str) -> str:
    return target(vm_path(vm_id, "files"), {"path": path})


class Follow:
    """Bookkeeping of a followed event stream that may have to be opened again (the daemon
    restarted): events already seen are skipped by sequence number."""

    #: Streams opened in a row that brought nothing new before giving up.
    MAX_IDLE_REOPENS = 3

    def __init__(self) -> None:
        self.last_seq = -1
        self.exit: Event | None = None
        self.ended: Event | None = None
        self.idle_reopens = 0

    def fresh(self, event: Event) -> bool:
        """Whether ``event`` is new; notes the agent's exit and the VM's end."""
        if 0 <= event.seq <= self.last_seq:
            return False
        self.last_seq = max(self.last_seq, event.seq)
        self.idle_reopens = 0
        if event.kind == "exited":
            self.exit = event
        elif event.kind == "ended":
            self.ended = event
        return True

    def stream_ended(self, vm_id: str) -> None:
        """Called when a stream ended before the VM's last event: raises after too many."""
        self.idle_reopens += 1
        if self.idle_reopens > self.MAX_IDLE_REOPENS:
            raise NanoclawError(f"the event stream of VM {vm_id} keeps ending before the VM")


def exit_code(vm_id: str, follow: Follow, info: VmInfo | None) -> int:
    """The agent's exit code (the shell's convention) once the VM has ended."""
    if follow.exit is not None and follow.exit.exit is not None:
        return follow.exit.exit.code
    if info is not None and info.agent_exit is not None:
        return info.agent_exit.code
    status = follow.ended.status if follow.ended is not None else (info.status if info else "?")
    raise SandboxFailed(
        f"VM {vm_id} ended ({status}) without its agent exiting", str(status)
    )
