"""The blocking SDK: :class:`Sandbox`, one VM running one agent command."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Generator
from types import TracebackType

from . import _common as c
from ._config import Settings, resolve
from ._http import Transport
from ._tar import one_file, read_one_file, split_guest_path
from .errors import NanoclawError, NotFound
from .types import (
    Event,
    FilesCopied,
    MigrationEvent,
    SnapshotInfo,
    StreamName,
    VmInfo,
    migration_event,
    parse_json,
)

#: Receives each chunk of the agent's output, as it comes.
OutputCallback = Callable[[bytes], object]




class Files:
    """Files in and out of a VM with an image (``sandbox.files``), through the tar routes."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def write(self, path: str, data: bytes | str, mode: int = 0o644) -> FilesCopied:
        """Writes ``data`` to the new file ``path`` (absolute, in the VM; folders are made as
        needed). The VM must be running; the guest does not overwrite an existing file."""
        folder, name = split_guest_path(path)
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return self.put_tar(folder, one_file(name, raw, mode))

    def read(self, path: str) -> bytes:
        """The bytes of the regular file ``path`` (absolute, in the VM): from a running VM, or
        off an ended VM's writable disk."""
        _, name = split_guest_path(path)
        return read_one_file(self.get_tar(path), name)

    def put_tar(self, folder: str, archive: bytes) -> FilesCopied:
        """Unpacks the uncompressed tar ``archive`` under ``folder`` in the VM."""
        t = self._sandbox._transport
        body = t.call("PUT", c.files_target(self._sandbox.id, folder), archive, c.TAR)
        return FilesCopied.from_json(parse_json(body, "copy answer"))

    def get_tar(self, path: str) -> bytes:
        """A tar of the file or folder ``path`` in the VM, its entries named from the path's
        last component. Check the names before unpacking it anywhere."""
        return self._sandbox._transport.call("GET", c.files_target(self._sandbox.id, path))


class Sandbox:
    """A VM on the daemon, running one agent command (see the README for the model).

    Make one with :meth:`create` (or attach to an existing VM with :meth:`attach`); run a
    command to its end with :meth:`run`. Used as a context manager, the VM is stopped and
    removed on leaving the block.
    """

    def __init__(self, settings: Settings, info: VmInfo) -> None:
        self._transport = Transport(settings)
        self.id = info.id
        #: The VM's record as last fetched (:meth:`refresh` fetches it again).
        self.info = info
        self.files = Files(self)

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, status={self.info.status!r})"

    @classmethod
    def create(
        cls,
        *,
        command: c.Command | None = None,
        image: str | None = None,
        profile: c.Profile | None = None,
        env: c.Env | None = None,
        cwd: str | None = None,
        user: str | None = None,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        disk_size_mib: int | None = None,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> Sandbox:
        """Creates a VM that runs ``command`` (an argv list, or a string for ``/bin/sh -c``).
        With an ``image`` and no command, the image's entrypoint runs. ``profile`` is the
        agent's access profile, as TOML text or a file's path. A long-lived sandbox, to copy
        files into and out of, runs a command that waits: ``["sleep", "infinity"]``.

        Connection settings fall back on ``NANOCLAW_URL``, ``NANOCLAW_TOKEN`` and
        ``NANOCLAW_CA_FILE``. Needs a ``run`` token.
        """
        settings = resolve(url, token, ca_file, verify, timeout)
        body = c.create_body(
            command, image, profile, env, cwd, user, memory_mib, vcpus, disk_size_mib
        )
        answer = Transport(settings).call("POST", "/v1/vms", body, c.JSON)
        return cls(settings, VmInfo.from_json(parse_json(answer, "VM record")))

    @classmethod
    def attach(
        cls,
        vm_id: str,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> Sandbox:
        """The existing VM ``vm_id`` (a ``read`` token suffices to follow and read it)."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = Transport(settings).call("GET", c.vm_path(vm_id))
        return cls(settings, VmInfo.from_json(parse_json(answer, "VM record")))

    @classmethod
    def run(
        cls,
        command: c.Command,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        keep: bool = False,
        image: str | None = None,
        profile: c.Profile | None = None,
        env: c.Env | None = None,
        cwd: str | None = None,
        user: str | None = None,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        disk_size_mib: int | None = None,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> int:
        """Runs ``command`` in a new VM to its end: streams its output to ``on_stdout`` and
        ``on_stderr`` (default: this process's stdout and stderr) and answers its exit code
        (the shell's convention: 128 + N for signal N). The VM is then removed, unless
        ``keep``. If this is interrupted (Ctrl-C, a callback raising), the VM is stopped."""
        sandbox = cls.create(
            command=command,
            image=image,
            profile=profile,
            env=env,
            cwd=cwd,
            user=user,
            memory_mib=memory_mib,
            vcpus=vcpus,
            disk_size_mib=disk_size_mib,
            url=url,
            token=token,
            ca_file=ca_file,
            verify=verify,
            timeout=timeout,
        )
        try:
            code = sandbox.wait(
                on_stdout=on_stdout or c.write_to("stdout"),
                on_stderr=on_stderr or c.write_to("stderr"),
            )
        except BaseException:
            sandbox._stop_quietly()
            raise
        if not keep:
            sandbox.remove()
        return code

    def refresh(self) -> VmInfo:
        """Fetches the VM's record again (and keeps it in :attr:`info`)."""
        answer = self._transport.call("GET", c.vm_path(self.id))
        self.info = VmInfo.from_json(parse_json(answer, "VM record"))
        return self.info

    def events(self, follow: bool = True) -> Generator[Event, None, None]:
        """The VM's events from its first: with ``follow``, as they come until the VM's last
        (``ended``); without, those recorded so far. Close the generator to hang up early."""
        tracker = c.Follow()
        while True:
            with self._transport.open(
                "GET", c.events_target(self.id, follow), stream=True
            ) as resp:
                for line in resp.lines():
                    event = Event.from_line(line)
                    if tracker.fresh(event):
                        yield event
            if not follow or tracker.ended is not None:
                return
            # The stream ended before the VM did (the daemon restarted): open it again.
            tracker.stream_ended(self.id)

    def output(
        self, follow: bool = True
    ) -> Generator[tuple[StreamName, bytes], None, None]:
        """The agent's output as ``(stream, bytes)`` pairs, ``stream`` ``stdout`` or
        ``stderr``."""
        events = self.events(follow)
        try:
            for event in events:
                if event.kind == "output" and event.stream is not None:
                    yield event.stream, event.data
        finally:
            events.close()

    def wait(
        self,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> int:
        """Follows the VM to its end, passing its output to the callbacks given, and answers
        the agent's exit code (128 + N for signal N). Raises :class:`SandboxFailed` if the VM
        ended without its agent exiting."""
        tracker = c.Follow()
        for event in self.events(follow=True):
            tracker.fresh(event)
            if event.kind == "output":
                callback = on_stdout if event.stream == "stdout" else on_stderr
                if callback is not None:
                    callback(event.data)
        info = self.refresh()
        return c.exit_code(self.id, tracker, info)

    def pause(self) -> VmInfo:
        """Parks the VM's vCPUs (``409`` unless its VMM runs; ``502`` if the VMM refused)."""
        return self._post("pause")

    def resume(self) -> VmInfo:
        """Lets the paused vCPUs run again."""
        return self._post("resume")

    def snapshot(self, name: str | None = None) -> SnapshotInfo:
        """Saves the VM's memory and state as snapshot ``name`` (the daemon makes a name up
        without one) in the daemon's state folder. A running VM is paused around it and runs
        again after. ``409`` unless the VMM runs or when the name is taken; ``502`` if the VMM
        refused. The snapshot holds guest memory: remove it (:meth:`remove_snapshot`) once it
        is not needed."""
        answer = self._transport.call(
            "POST", c.vm_path(self.id, "snapshot"), c.snapshot_body(name), c.JSON
        )
        return SnapshotInfo.from_json(parse_json(answer, "snapshot record"))

    def fork(self, n: int) -> list[Sandbox]:
        """``n`` new VMs (1 to 8) from this running VM: one snapshot of it, restored ``n`` times,
        then removed. Each copy reseeds its kernel from the host and takes a new sidecar boot id
        and key before its processes go on, so copies never share randomness, keys or grants.
        ``409`` if the VM is paused or not running; ``429`` if ``n`` more VMs would pass the
        daemon's cap; ``400`` for an ``n`` out of range. Needs a ``run`` token."""
        answer = self._transport.call(
            "POST", c.vm_path(self.id, "fork"), c.fork_body(n), c.JSON
        )
        infos = VmInfo.list_from_json(parse_json(answer, "VM list"))
        return [type(self)(self._transport.settings, info) for info in infos]

    @classmethod
    def restore(
        cls,
        name: str,
        *,
        paused: bool = False,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> Sandbox:
        """A new VM started from snapshot ``name`` (with its vCPUs paused if ``paused``),
        once its VMM has restored it. ``404`` if there is no such snapshot; ``422`` (a
        :class:`NanoclawError`) if it is damaged, incomplete, of another format or the VMM
        refused it. Needs a ``run`` token."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = Transport(settings).call(
            "POST", c.snapshot_path(name, "restore"), c.restore_body(paused), c.JSON
        )
        return cls(settings, VmInfo.from_json(parse_json(answer, "VM record")))

    @staticmethod
    def snapshots(
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> list[SnapshotInfo]:
        """Every snapshot the daemon keeps, oldest first (a ``read`` token suffices)."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = Transport(settings).call("GET", "/v1/snapshots")
        return SnapshotInfo.list_from_json(parse_json(answer, "snapshot list"))

    @staticmethod
    def remove_snapshot(
        name: str,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> None:
        """Deletes snapshot ``name``'s files (``404`` if there is none)."""
        settings = resolve(url, token, ca_file, verify, timeout)
        Transport(settings).call("DELETE", c.snapshot_path(name))

    @staticmethod
    def migrate(
        vm_id: str,
        to: str,
        downtime_ms: int | None = None,
        max_rounds: int | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> Generator[MigrationEvent, None, None]:
        """Moves the running VM ``vm_id`` to another host's daemon by live migration, and
        yields its events as they come (see :data:`nanoclaw.types.MigrationEvent`): ``accepted``,
        one ``round`` per pre-copy round, and ``ended``, the last, whose ``outcome`` says which
        copy runs (``moved``: the target's; ``kept``: this one; ``unknown``: the state went out
        and no answer came, and the VM stays paused here until the target's host says).

        ``to`` is the target's migration address, ``HOST:PORT``, pinned on the daemon as a
        migration peer; ``downtime_ms`` and ``max_rounds`` default to the daemon's (300 ms, 30).
        The request goes when the first event is asked for. ``404`` without such a VM, ``409``
        unless it runs or when it migrates already, ``400`` when the host is not a pinned peer.
        A stream that ends before ``ended`` raises :class:`NanoclawError`. Closing the generator
        only stops reading: the migration goes on (:meth:`cancel_migration` stops it). Needs an
        ``admin`` token."""
        settings = resolve(url, token, ca_file, verify, timeout)
        body = c.migrate_body(to, downtime_ms, max_rounds)
        with Transport(settings).open(
            "POST", c.vm_path(vm_id, "migrate"), body, c.JSON, stream=True
        ) as resp:
            for line in resp.lines():
                event = migration_event(line)
                yield event
                if event["event"] == "ended":
                    return
        raise c.migration_cut(vm_id)

    @staticmethod
    def cancel_migration(
        vm_id: str,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> None:
        """Cancels VM ``vm_id``'s live migration: the VM runs on here, unless its state has
        gone out already; the migration's ``ended`` event says which. ``409``
        (:class:`Conflict`) when none runs, ``404`` without such a VM. Needs an ``admin``
        token."""
        settings = resolve(url, token, ca_file, verify, timeout)
        Transport(settings).call("DELETE", c.vm_path(vm_id, "migrate"))

    @staticmethod
    def resolve_migration(
        vm_id: str,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> VmInfo:
        """Settles a migration of VM ``vm_id`` whose outcome was ``unknown``: the daemon asks
        the target host. A copy there that runs or ran ends this one (status ``migrated``);
        none there lets this one run again. Answers the VM's record as it now is. ``409``
        (:class:`Conflict`) when it has no such migration, ``502`` when the target cannot be
        asked. Needs an ``admin`` token."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = Transport(settings).call("POST", c.vm_path(vm_id, "migrate/resolve"))
        return VmInfo.from_json(parse_json(answer, "VM record"))

    def kill(self) -> VmInfo:
        """Stops the VM (its agent gets SIGTERM, then the VMM is ended) and answers its
        record once the VMM has ended."""
        return self._post("stop")

    def remove(self) -> None:
        """Removes the ended VM and its record (``409`` while it runs: :meth:`kill` first)."""
        self._transport.call("DELETE", c.vm_path(self.id))

    def _post(self, action: str) -> VmInfo:
        answer = self._transport.call("POST", c.vm_path(self.id, action))
        self.info = VmInfo.from_json(parse_json(answer, "VM record"))
        return self.info

    def _stop_quietly(self) -> None:
        try:
            self.kill()
        except NanoclawError:
            pass

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops the VM if it still runs, and removes it."""
        try:
            if not self.refresh().ended:
                self.kill()
            self.remove()
        except NotFound:
            pass
        except NanoclawError:
            if exc is None:
                raise
