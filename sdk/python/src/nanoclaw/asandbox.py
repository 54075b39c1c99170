"""The asyncio SDK: :class:`AsyncSandbox`, the twin of :class:`nanoclaw.Sandbox`."""

from __future__ import annotations

import inspect
import os
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType
from typing import Union

from . import _common as c
from ._ahttp import AsyncTransport
from ._config import Settings, resolve
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

#: Receives each chunk of the agent's output, as it comes: a function or a coroutine function.
AsyncOutputCallback = Callable[[bytes], Union[Awaitable[object], object]]




class AsyncFiles:
    """Files in and out of a VM with an image (``sandbox.files``), through the tar routes."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: bytes | str, mode: int = 0o644) -> FilesCopied:
        """Writes ``data`` to the new file ``path`` (see :meth:`nanoclaw.Files.write`)."""
        folder, name = split_guest_path(path)
        raw = data.encode() if isinstance(data, str) else bytes(data)
        return await self.put_tar(folder, one_file(name, raw, mode))

    async def read(self, path: str) -> bytes:
        """The bytes of the regular file ``path`` (see :meth:`nanoclaw.Files.read`)."""
        _, name = split_guest_path(path)
        return read_one_file(await self.get_tar(path), name)

    async def put_tar(self, folder: str, archive: bytes) -> FilesCopied:
        """Unpacks the uncompressed tar ``archive`` under ``folder`` in the VM."""
        t = self._sandbox._transport
        body = await t.call("PUT", c.files_target(self._sandbox.id, folder), archive, c.TAR)
        return FilesCopied.from_json(parse_json(body, "copy answer"))

    async def get_tar(self, path: str) -> bytes:
        """A tar of the file or folder ``path`` in the VM (check its names before use)."""
        return await self._sandbox._transport.call(
            "GET", c.files_target(self._sandbox.id, path)
        )


class AsyncSandbox:
    """A VM on the daemon, running one agent command: the asyncio twin of
    :class:`nanoclaw.Sandbox`, with the same methods as coroutines (and :meth:`events` and
    :meth:`output` as async iterators). Used as an async context manager, the VM is stopped
    and removed on leaving the block."""

    def __init__(self, settings: Settings, info: VmInfo) -> None:
        self._transport = AsyncTransport(settings)
        self.id = info.id
        #: The VM's record as last fetched (:meth:`refresh` fetches it again).
        self.info = info
        self.files = AsyncFiles(self)

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.id!r}, status={self.info.status!r})"

    @classmethod
    async def create(
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
    ) -> AsyncSandbox:
        """Creates a VM that runs ``command`` (see :meth:`nanoclaw.Sandbox.create`)."""
        settings = resolve(url, token, ca_file, verify, timeout)
        body = c.create_body(
            command, image, profile, env, cwd, user, memory_mib, vcpus, disk_size_mib
        )
        answer = await AsyncTransport(settings).call("POST", "/v1/vms", body, c.JSON)
        return cls(settings, VmInfo.from_json(parse_json(answer, "VM record")))

    @classmethod
    async def attach(
        cls,
        vm_id: str,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> AsyncSandbox:
        """The existing VM ``vm_id``."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = await AsyncTransport(settings).call("GET", c.vm_path(vm_id))
        return cls(settings, VmInfo.from_json(parse_json(answer, "VM record")))

    @classmethod
    async def run(
        cls,
        command: c.Command,
        *,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
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
        """Runs ``command`` in a new VM to its end (see :meth:`nanoclaw.Sandbox.run`); if the
        task is cancelled, the VM is stopped."""
        sandbox = await cls.create(
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
            code = await sandbox.wait(
                on_stdout=on_stdout or c.write_to("stdout"),
                on_stderr=on_stderr or c.write_to("stderr"),
            )
        except BaseException:
            await sandbox._stop_quietly()
            raise
        if not keep:
            await sandbox.remove()
        return code

    async def refresh(self) -> VmInfo:
        """Fetches the VM's record again (and keeps it in :attr:`info`)."""
        answer = await self._transport.call("GET", c.vm_path(self.id))
        self.info = VmInfo.from_json(parse_json(answer, "VM record"))
        return self.info

    async def events(self, follow: bool = True) -> AsyncGenerator[Event, None]:
        """The VM's events from its first (see :meth:`nanoclaw.Sandbox.events`)."""
        tracker = c.Follow()
        while True:
            resp = await self._transport.open("GET", c.events_target(self.id, follow))
            try:
                async for line in resp.lines():
                    event = Event.from_line(line)
                    if tracker.fresh(event):
                        yield event
            finally:
                await resp.close()
            if not follow or tracker.ended is not None:
                return
            tracker.stream_ended(self.id)

    async def output(
        self, follow: bool = True
    ) -> AsyncGenerator[tuple[StreamName, bytes], None]:
        """The agent's output as ``(stream, bytes)`` pairs."""
        events = self.events(follow)
        try:
            async for event in events:
                if event.kind == "output" and event.stream is not None:
                    yield event.stream, event.data
        finally:
            await events.aclose()

    async def wait(
        self,
        on_stdout: AsyncOutputCallback | None = None,
        on_stderr: AsyncOutputCallback | None = None,
    ) -> int:
        """Follows the VM to its end and answers the agent's exit code (see
        :meth:`nanoclaw.Sandbox.wait`)."""
        tracker = c.Follow()
        async for event in self.events(follow=True):
            tracker.fresh(event)
            if event.kind == "output":
                callback = on_stdout if event.stream == "stdout" else on_stderr
                if callback is not None:
                    result = callback(event.data)
                    if inspect.isawaitable(result):
                        await result
        info = await self.refresh()
        return c.exit_code(self.id, tracker, info)

    async def pause(self) -> VmInfo:
        """Parks the VM's vCPUs (``409`` unless its VMM runs; ``502`` if the VMM refused)."""
        return await self._post("pause")

    async def resume(self) -> VmInfo:
        """Lets the paused vCPUs run again."""
        return await self._post("resume")

    async def snapshot(self, name: str | None = None) -> SnapshotInfo:
        """Saves the VM's memory and state as snapshot ``name`` (the daemon makes a name up
        without one) in the daemon's state folder. A running VM is paused around it and runs
        again after. ``409`` unless the VMM runs or when the name is taken; ``502`` if the VMM
        refused. The snapshot holds guest memory: remove it (:meth:`remove_snapshot`) once it
        is not needed."""
        answer = await self._transport.call(
            "POST", c.vm_path(self.id, "snapshot"), c.snapshot_body(name), c.JSON
        )
        return SnapshotInfo.from_json(parse_json(answer, "snapshot record"))

    async def fork(self, n: int) -> list[AsyncSandbox]:
        """``n`` new VMs (1 to 8) from this running VM: one snapshot of it, restored ``n`` times,
        then removed. Each copy reseeds its kernel from the host and takes a new sidecar boot id
        and key before its processes go on, so copies never share randomness, keys or grants.
        ``409`` if the VM is paused or not running; ``429`` if ``n`` more VMs would pass the
        daemon's cap; ``400`` for an ``n`` out of range. Needs a ``run`` token."""
        answer = await self._transport.call(
            "POST", c.vm_path(self.id, "fork"), c.fork_body(n), c.JSON
        )
        infos = VmInfo.list_from_json(parse_json(answer, "VM list"))
        return [type(self)(self._transport.settings, info) for info in infos]

    @classmethod
    async def restore(
        cls,
        name: str,
        *,
        paused: bool = False,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> AsyncSandbox:
        """A new VM started from snapshot ``name`` (with its vCPUs paused if ``paused``),
        once its VMM has restored it. ``404`` if there is no such snapshot; ``422`` (a
        :class:`NanoclawError`) if it is damaged, incomplete, of another format or the VMM
        refused it. Needs a ``run`` token."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = await AsyncTransport(settings).call(
            "POST", c.snapshot_path(name, "restore"), c.restore_body(paused), c.JSON
        )
        return cls(settings, VmInfo.from_json(parse_json(answer, "VM record")))

    @staticmethod
    async def snapshots(
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> list[SnapshotInfo]:
        """Every snapshot the daemon keeps, oldest first (a ``read`` token suffices)."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = await AsyncTransport(settings).call("GET", "/v1/snapshots")
        return SnapshotInfo.list_from_json(parse_json(answer, "snapshot list"))

    @staticmethod
    async def remove_snapshot(
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
        await AsyncTransport(settings).call("DELETE", c.snapshot_path(name))

    @staticmethod
    async def migrate(
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
    ) -> AsyncGenerator[MigrationEvent, None]:
        """Moves the running VM ``vm_id`` to another host's daemon by live migration, and
        yields its events as they come, ``ended`` last (see
        :meth:`nanoclaw.Sandbox.migrate`). Needs an ``admin`` token."""
        settings = resolve(url, token, ca_file, verify, timeout)
        body = c.migrate_body(to, downtime_ms, max_rounds)
        resp = await AsyncTransport(settings).open(
            "POST", c.vm_path(vm_id, "migrate"), body, c.JSON
        )
        try:
            async for line in resp.lines():
                event = migration_event(line)
                yield event
                if event["event"] == "ended":
                    return
        finally:
            await resp.close()
        raise c.migration_cut(vm_id)

    @staticmethod
    async def cancel_migration(
        vm_id: str,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> None:
        """Cancels VM ``vm_id``'s live migration (see
        :meth:`nanoclaw.Sandbox.cancel_migration`)."""
        settings = resolve(url, token, ca_file, verify, timeout)
        await AsyncTransport(settings).call("DELETE", c.vm_path(vm_id, "migrate"))

    @staticmethod
    async def resolve_migration(
        vm_id: str,
        *,
        url: str | None = None,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        verify: bool | ssl.SSLContext = True,
        timeout: float | None = None,
    ) -> VmInfo:
        """Settles a migration of unknown outcome (see
        :meth:`nanoclaw.Sandbox.resolve_migration`)."""
        settings = resolve(url, token, ca_file, verify, timeout)
        answer = await AsyncTransport(settings).call(
            "POST", c.vm_path(vm_id, "migrate/resolve")
        )
        return VmInfo.from_json(parse_json(answer, "VM record"))

    async def kill(self) -> VmInfo:
        """Stops the VM and answers its record once the VMM has ended."""
        return await self._post("stop")

    async def remove(self) -> None:
        """Removes the ended VM and its record."""
        await self._transport.call("DELETE", c.vm_path(self.id))

    async def _post(self, action: str) -> VmInfo:
        answer = await self._transport.call("POST", c.vm_path(self.id, action))
        self.info = VmInfo.from_json(parse_json(answer, "VM record"))
        return self.info

    async def _stop_quietly(self) -> None:
        try:
            await self.kill()
        except NanoclawError:
            pass

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stops the VM if it still runs, and removes it."""
        try:
            if not (await self.refresh()).ended:
                await self.kill()
            await self.remove()
        except NotFound:
            pass
        except NanoclawError:
            if exc is None:
                raise
