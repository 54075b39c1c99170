"""The SDK against a real daemon booting real guests: one VM of an image.

Run by ``nanoclaw-tests``' e2e test ``the_python_sdk_runs_an_agent_and_copies_its_files``
(``tests/e2e/sdk.rs``, through ``scripts/e2e``), which imports the busybox test image and sets
``NANOCLAW_SDK_DAEMON=guest``, ``NANOCLAW_TEST_IMAGE`` and the remote API's settings. Skipped
otherwise.
"""

from __future__ import annotations

import asyncio
import os
import unittest

from nanoclaw import AsyncSandbox, AuthError, NotFound, Sandbox

GUEST = os.environ.get("NANOCLAW_SDK_DAEMON") == "guest"
IMAGE = os.environ.get("NANOCLAW_TEST_IMAGE", "")

#: The agent: says it is ready, waits for the file ``go`` (empty), prints the file the test wrote,
#: leaves one of its own on the disk and exits 3.
AGENT = """echo ready; echo to-stderr >&2
until cat /data/sdk/go; do sleep 1; done
cat /data/sdk/hello.txt
echo agent-wrote > /data/sdk/out.txt
sync
exit 3
"""

@unittest.skipUnless(GUEST, "needs a daemon with real guests (NANOCLAW_SDK_DAEMON=guest)")
class GuestTest(unittest.TestCase):
    def test_an_agent_runs_to_its_exit_code_and_files_go_in_and_out(self) -> None:
        with Sandbox.create(
            image=IMAGE, disk_size_mib=64, command=["/bin/sh", "-c", AGENT]
        ) as sandbox:
            # Its files are there to copy into once it has said so.
            said = b""
            stream = sandbox.output()
            for name, data in stream:
                said += data if name == "stdout" else b""
                if b"ready\n" in said:
                    break
            stream.close()
            self.assertEqual(said, b"ready\n")

            # In and back out, byte for byte, while it runs.
            blob = bytes(range(256)) * 1000
            copied = sandbox.files.write("/data/sdk/blob.bin", blob, mode=0o600)
            self.assertEqual(copied.entries, 1)
            sandbox.files.write("/data/sdk/hello.txt", "hello from the sdk\n")
            self.assertEqual(sandbox.files.read("/data/sdk/blob.bin"), blob)
            with self.assertRaises(NotFound):
                sandbox.files.read("/data/sdk/missing.txt")
            # A second write replaces the file (the guest unlinks and creates it anew).
            sandbox.files.write("/data/sdk/hello.txt", "again\n")
            self.assertEqual(sandbox.files.read("/data/sdk/hello.txt"), b"again\n")
            sandbox.files.write("/data/sdk/hello.txt", "hello from the sdk\n")

            # Paused and resumed by the real VMM.
            self.assertTrue(sandbox.pause().paused)
            self.assertFalse(sandbox.resume().paused)

            sandbox.files.write("/data/sdk/go", b"")
            out: list[bytes] = []
            err: list[bytes] = []
            code = sandbox.wait(on_stdout=out.append, on_stderr=err.append)
            self.assertEqual(code, 3)
            self.assertEqual(b"".join(out), b"ready\nhello from the sdk\n")
            self.assertIn(b"to-stderr", b"".join(err))
            self.assertEqual(sandbox.refresh().status, "exited")

            # Ended: what the agent wrote comes off its disk, through the async twin too.
            self.assertEqual(sandbox.files.read("/data/sdk/out.txt"), b"agent-wrote\n")

            async def read_async() -> bytes:
                twin = await AsyncSandbox.attach(sandbox.id)
                return await twin.files.read("/data/sdk/hello.txt")

            self.assertEqual(asyncio.run(read_async()), b"hello from the sdk\n")

    def test_a_read_token_cannot_create_a_sandbox(self) -> None:
        read = os.environ["NANOCLAW_READ_TOKEN"]
        with self.assertRaises(AuthError) as cm:
            Sandbox.create(image=IMAGE, command=["/bin/true"], token=read)
        self.assertEqual(cm.exception.status, 403)


if __name__ == "__main__":
    unittest.main()
