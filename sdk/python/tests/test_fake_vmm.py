"""The SDK against a real daemon whose VMM is the component tests' fake one.

Run by ``nanoclaw-tests``' component test ``the_python_sdk_drives_the_remote_api``
(``tests/component/self_exec/daemon.rs``), which starts the daemon with ``--listen``, makes
the tokens and sets ``NANOCLAW_SDK_DAEMON=fake``, ``NANOCLAW_URL``, ``NANOCLAW_TOKEN`` (run
scope), ``NANOCLAW_READ_TOKEN`` and ``NANOCLAW_CA_FILE``. Skipped otherwise.

The fake agent (``fake_agent`` there): the command ``wait`` prints ``waiting`` and runs until
stopped (then it dies of SIGTERM: 143); ``pausable`` does the same and serves the VMM's
control socket (pause, resume, snapshots; a VM restored from its snapshot prints ``restored``
and runs until stopped); any other prints ``hello ARGS ENV`` on stdout and
``to stderr`` on stderr and exits 3. Its VMs have no image (so no files) and no VMM control
socket (so a pause is the VMM's failure, 502).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import unittest

from nanoclaw import (
    AsyncSandbox,
    AuthError,
    Conflict,
    NanoclawError,
    NotFound,
    Sandbox,
    ServerError,
)
from nanoclaw._config import resolve
from nanoclaw._http import Transport
from nanoclaw.types import parse_json

FAKE = os.environ.get("NANOCLAW_SDK_DAEMON") == "fake"


@unittest.skipUnless(FAKE, "needs the fake-VMM daemon (NANOCLAW_SDK_DAEMON=fake)")
class SyncTest(unittest.TestCase):
    def test_run_streams_the_output_and_returns_the_exit_code(self) -> None:
        out: list[bytes] = []
        err: list[bytes] = []
        code = Sandbox.run(
            ["/bin/agent", "x", "y"],
            env={"A": "1"},
            on_stdout=out.append,
            on_stderr=err.append,
        )
        self.assertEqual(code, 3)
        self.assertEqual(b"".join(out), b"hello x y A=1\n")
        self.assertEqual(b"".join(err), b"to stderr\n")

    def test_a_kept_run_is_there_afterwards_and_a_removed_one_is_not(self) -> None:
        seen = self._list()
        code = Sandbox.run(["/bin/agent"], keep=True, on_stdout=lambda b: None,
                           on_stderr=lambda b: None)
        self.assertEqual(code, 3)
        (vm,) = [s for s in self._list() if s not in seen]
        sandbox = Sandbox.attach(vm)
        self.assertEqual(sandbox.info.status, "exited")
        assert sandbox.info.agent_exit is not None
        self.assertEqual(sandbox.info.agent_exit.code, 3)
        self.assertEqual(
            [(s, d) for s, d in sandbox.output(follow=False)],
            [("stdout", b"hello  \n"), ("stderr", b"to stderr\n")],
        )
        sandbox.remove()
        with self.assertRaises(NotFound) as cm:
            Sandbox.attach(vm)
        self.assertEqual(cm.exception.status, 404)
        self.assertIn(f"no VM with id {vm}", cm.exception.message)

    def test_a_run_interrupted_stops_its_vm(self) -> None:
        class Enough(Exception):
            pass

        def hang_up(data: bytes) -> None:
            raise Enough

        seen = self._list()
        with self.assertRaises(Enough):
            Sandbox.run(["wait"], on_stdout=hang_up)
        (vm,) = [s for s in self._list() if s not in seen]
        sandbox = Sandbox.attach(vm)
        self.assertEqual(sandbox.info.status, "stopped")
        sandbox.remove()

    def test_a_long_lived_sandbox_pauses_refuses_files_and_is_killed(self) -> None:
        with Sandbox.create(command=["wait"]) as sandbox:
            stream = sandbox.output()
            self.assertEqual(next(stream), ("stdout", b"waiting\n"))
            stream.close()
            # Still running: it cannot be removed.
            with self.assertRaises(Conflict):
                sandbox.remove()
            # The fake VMM has no control socket: the VMM's failure, typed.
            with self.assertRaises(ServerError) as cm:
                sandbox.pause()
            self.assertEqual(cm.exception.status, 502)
            with self.assertRaises(ServerError):
                sandbox.resume()
            # Files need an image VM.
            with self.assertRaises(Conflict) as conflict:
                sandbox.files.write("/work/notes.txt", "hi")
            self.assertIn("without an image", conflict.exception.message)
            with self.assertRaises(Conflict):
                sandbox.files.read("/work/notes.txt")
            info = sandbox.kill()
            self.assertEqual(info.status, "stopped")
            self.assertEqual(sandbox.wait(), 143)
            vm = sandbox.id
        # Leaving the block removed it.
        self.assertNotIn(vm, self._list())

    def test_a_read_token_reads_but_cannot_create(self) -> None:
        read = os.environ["NANOCLAW_READ_TOKEN"]
        with self.assertRaises(AuthError) as cm:
            Sandbox.create(command=["wait"], token=read)
        self.assertEqual(cm.exception.status, 403)
        self.assertIn("needs run", cm.exception.message)
        with Sandbox.create(command=["wait"]) as sandbox:
            reader = Sandbox.attach(sandbox.id, token=read)
            stream = reader.output()
            self.assertEqual(next(stream), ("stdout", b"waiting\n"))
            stream.close()
            with self.assertRaises(AuthError) as cm:
                reader.kill()
            self.assertEqual(cm.exception.status, 403)

    def test_an_unknown_token_is_refused(self) -> None:
        with self.assertRaises(AuthError) as cm:
            Sandbox.create(command=["wait"], token="nct_forged")
        self.assertEqual(cm.exception.status, 401)

    def test_a_certificate_we_do_not_trust_is_refused(self) -> None:
        with self.assertRaises(NanoclawError) as cm:
            Sandbox.create(command=["wait"], verify=ssl.create_default_context())
        self.assertIn("certificate we do not trust", str(cm.exception))
        self.assertIsNone(cm.exception.status)

    def test_a_sandbox_is_snapshotted_restored_and_its_snapshot_removed(self) -> None:
        with Sandbox.create(command=["pausable"]) as sandbox:
            stream = sandbox.output()
            self.assertEqual(next(stream), ("stdout", b"waiting\n"))
            stream.close()
            snap = sandbox.snapshot("sdk-sync")
            self.assertEqual(
                (snap.name, snap.source_vm, snap.format_version), ("sdk-sync", sandbox.id, 2)
            )
            self.assertGreater(snap.memory_bytes, snap.memory_data_bytes)
            # Paused around the snapshot, running again after.
            self.assertFalse(sandbox.refresh().paused)
            with self.assertRaises(Conflict) as taken:
                sandbox.snapshot("sdk-sync")
            self.assertIn("exists already", taken.exception.message)
            with self.assertRaises(NanoclawError) as bad:
                sandbox.snapshot("../escape")
            self.assertEqual(bad.exception.status, 400)
        read = os.environ["NANOCLAW_READ_TOKEN"]
        self.assertIn("sdk-sync", [s.name for s in Sandbox.snapshots(token=read)])
        with self.assertRaises(AuthError):
            Sandbox.restore("sdk-sync", token=read)
        with Sandbox.restore("sdk-sync") as restored:
            self.assertNotEqual(restored.id, snap.source_vm)
            self.assertEqual(restored.info.raw.get("restored_from"), "sdk-sync")
            stream = restored.output()
            self.assertEqual(next(stream), ("stdout", b"restored\n"))
            stream.close()
        Sandbox.remove_snapshot("sdk-sync")
        self.assertNotIn("sdk-sync", [s.name for s in Sandbox.snapshots()])
        with self.assertRaises(NotFound):
            Sandbox.restore("sdk-sync")
        with self.assertRaises(NotFound):
            Sandbox.remove_snapshot("sdk-sync")

    def test_a_sandbox_is_forked_into_copies_with_identities_of_their_own(self) -> None:
        with Sandbox.create(command=["pausable"]) as sandbox:
            stream = sandbox.output()
            self.assertEqual(next(stream), ("stdout", b"waiting\n"))
            stream.close()
            with self.assertRaises(NanoclawError) as bad:
                sandbox.fork(0)
            self.assertEqual(bad.exception.status, 400)
            copies = sandbox.fork(2)
            try:
                self.assertEqual(len(copies), 2)
                ids = {copy.id for copy in copies}
                self.assertEqual(len(ids), 2)
                self.assertNotIn(sandbox.id, ids)
                for copy in copies:
                    stream = copy.output()
                    self.assertEqual(next(stream), ("stdout", b"restored\n"))
                    stream.close()
                    boot = copy.refresh().raw.get("boot_id")
                    self.assertIsNotNone(boot)
                    self.assertNotEqual(boot, sandbox.refresh().raw.get("boot_id"))
            finally:
                for copy in copies:
                    copy.__exit__(None, None, None)

    def _list(self) -> list[str]:
        return list_vms()


def list_vms() -> list[str]:
    """The ids of the daemon's VMs."""
    vms = parse_json(Transport(resolve()).call("GET", "/v1/vms"), "list")
    return [vm["id"] for vm in vms]


@unittest.skipUnless(FAKE, "needs the fake-VMM daemon (NANOCLAW_SDK_DAEMON=fake)")
class AsyncTest(unittest.IsolatedAsyncioTestCase):
    async def test_run_streams_the_output_and_returns_the_exit_code(self) -> None:
        out: list[bytes] = []
        err: list[bytes] = []

        async def collect(data: bytes) -> None:
            err.append(data)

        code = await AsyncSandbox.run(
            ["/bin/agent", "z"], env=[("B", "2")], on_stdout=out.append, on_stderr=collect
        )
        self.assertEqual(code, 3)
        self.assertEqual(b"".join(out), b"hello z B=2\n")
        self.assertEqual(b"".join(err), b"to stderr\n")

    async def test_a_long_lived_sandbox_pauses_refuses_files_and_is_killed(self) -> None:
        async with await AsyncSandbox.create(command=["wait"]) as sandbox:
            stream = sandbox.output()
            self.assertEqual(await stream.__anext__(), ("stdout", b"waiting\n"))
            await stream.aclose()
            with self.assertRaises(ServerError) as cm:
                await sandbox.pause()
            self.assertEqual(cm.exception.status, 502)
            with self.assertRaises(Conflict):
                await sandbox.files.write("/work/notes.txt", b"hi")
            # Two calls at once on one sandbox: each has its own connection.
            waited = asyncio.ensure_future(sandbox.wait())
            info = await sandbox.kill()
            self.assertEqual(info.status, "stopped")
            self.assertEqual(await asyncio.wait_for(waited, 20), 143)

    async def test_a_sandbox_is_snapshotted_and_restored(self) -> None:
        async with await AsyncSandbox.create(command=["pausable"]) as sandbox:
            stream = sandbox.output()
            self.assertEqual(await stream.__anext__(), ("stdout", b"waiting\n"))
            await stream.aclose()
            await sandbox.pause()
            snap = await sandbox.snapshot()
            self.assertTrue(snap.name.startswith("snap-"), snap.name)
            # A paused VM stays paused.
            self.assertTrue((await sandbox.refresh()).paused)
            await sandbox.resume()
        self.assertIn(snap.name, [s.name for s in await AsyncSandbox.snapshots()])
        async with await AsyncSandbox.restore(snap.name, paused=True) as restored:
            self.assertTrue(restored.info.paused)
            await restored.resume()
            stream = restored.output()
            self.assertEqual(await stream.__anext__(), ("stdout", b"restored\n"))
            await stream.aclose()
        await AsyncSandbox.remove_snapshot(snap.name)
        with self.assertRaises(NotFound):
            await AsyncSandbox.remove_snapshot(snap.name)

    async def test_a_cancelled_run_stops_its_vm(self) -> None:
        seen = list_vms()
        started = asyncio.Event()
        task = asyncio.ensure_future(
            AsyncSandbox.run(["wait"], on_stdout=lambda data: started.set())
        )
        await asyncio.wait_for(started.wait(), 20)
        task.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await task
        (vm,) = [s for s in list_vms() if s not in seen]
        sandbox = await AsyncSandbox.attach(vm)
        self.assertEqual(sandbox.info.status, "stopped")
        await sandbox.remove()

    async def test_tokens_are_checked(self) -> None:
        with self.assertRaises(AuthError) as cm:
            await AsyncSandbox.create(command=["wait"], token=os.environ["NANOCLAW_READ_TOKEN"])
        self.assertEqual(cm.exception.status, 403)
        with self.assertRaises(AuthError) as cm:
            await AsyncSandbox.create(command=["wait"], token="nct_forged")
        self.assertEqual(cm.exception.status, 401)
        with self.assertRaises(NotFound):
            await AsyncSandbox.attach("nosuchvm")


if __name__ == "__main__":
    unittest.main()
