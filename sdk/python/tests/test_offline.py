"""The SDK's parts that need no daemon: tar safety, errors, settings, the create request."""

from __future__ import annotations

import io
import json
import os
import tarfile
import unittest
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

from nanoclaw import (
    AuthError,
    Conflict,
    Event,
    NanoclawError,
    NotFound,
    PermissionDenied,
    ServerError,
)
from nanoclaw._common import create_body, write_to
from nanoclaw._config import resolve
from nanoclaw._tar import one_file, read_one_file, split_guest_path
from nanoclaw.errors import error_for


def tar_of(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class TarTest(unittest.TestCase):
    def test_a_file_written_reads_back(self) -> None:
        archive = one_file("notes.txt", b"\x00binary\xff", 0o600)
        self.assertEqual(read_one_file(archive, "notes.txt"), b"\x00binary\xff")
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            (member,) = tar.getmembers()
            self.assertEqual((member.name, member.mode), ("notes.txt", 0o600))

    def test_names_that_climb_or_are_absolute_are_refused(self) -> None:
        for bad in ("../escape.txt", "a/../../b", "/etc/passwd"):
            archive = tar_of(("notes.txt", b"ok"), (bad, b"evil"))
            with self.assertRaises(NanoclawError) as cm:
                read_one_file(archive, "notes.txt")
            self.assertIn("unsafe name", str(cm.exception))

    def test_a_folder_a_missing_entry_and_garbage_are_errors(self) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        with self.assertRaisesRegex(NanoclawError, "a folder"):
            read_one_file(buf.getvalue(), "dir")
        with self.assertRaisesRegex(NanoclawError, "no entry"):
            read_one_file(tar_of(("other", b"")), "notes.txt")
        with self.assertRaisesRegex(NanoclawError, "malformed or cut short"):
            read_one_file(b"not a tar at all" * 40, "notes.txt")

    def test_guest_paths_are_absolute_and_name_a_file(self) -> None:
        self.assertEqual(split_guest_path("/work/a/b.txt"), ("/work/a", "b.txt"))
        self.assertEqual(split_guest_path("/b.txt"), ("/", "b.txt"))
        for bad in ("b.txt", "/", "/work/../etc/passwd", "/work/."):
            with self.assertRaises(NanoclawError):
                split_guest_path(bad)


class ErrorsTest(unittest.TestCase):
    def test_statuses_map_to_typed_errors_with_the_daemons_message(self) -> None:
        for status, cls in ((401, AuthError), (403, PermissionDenied), (404, NotFound),
                            (409, Conflict), (502, ServerError)):
            e = error_for(status, json.dumps({"error": "said the daemon"}).encode())
            self.assertIs(type(e), cls)
            self.assertEqual((e.status, e.message), (status, "said the daemon"))
        # A 403 of the token check, not of the guest.
        said = "this token's scope is read; POST /v1/vms needs run"
        e = error_for(403, json.dumps({"error": said}).encode())
        self.assertIs(type(e), AuthError)
        self.assertEqual(e.message, said)

    def test_a_body_that_is_not_json_is_still_a_typed_error(self) -> None:
        e = error_for(400, b"<html>nope</html>")
        self.assertIs(type(e), NanoclawError)
        self.assertEqual(e.message, "<html>nope</html>")
        self.assertEqual(error_for(500, b"").message, "no error message")

    def test_malformed_events_are_errors_not_tracebacks(self) -> None:
        for line in (b"{", b"[]", b'{"event":"output","stream":"stdout","data":"!!"}',
                     b'{"event":"exited","status":{"exit":"x"}}'):
            with self.assertRaises(NanoclawError):
                Event.from_line(line)
        e = Event.from_line(b'{"seq":2,"event":"output","stream":"stderr","data":"aGk="}')
        self.assertEqual((e.seq, e.kind, e.stream, e.data), (2, "output", "stderr", b"hi"))
        e = Event.from_line(b'{"seq":3,"event":"exited","status":{"signal":15}}')
        assert e.exit is not None
        self.assertEqual(e.exit.code, 143)


class SettingsTest(unittest.TestCase):
    def test_settings_come_from_arguments_else_the_environment(self) -> None:
        env = {"NANOCLAW_URL": "https://example.test:8443", "NANOCLAW_TOKEN": "nct_x"}
        with mock.patch.dict(os.environ, env, clear=True):
            s = resolve()
            self.assertEqual((s.host, s.port, s.token), ("example.test", 8443, "nct_x"))
            s = resolve(url="https://[::1]", token="nct_y")
            self.assertEqual((s.netloc, s.token), ("[::1]:443", "nct_y"))
        with mock.patch.dict(os.environ, {}, clear=True):
            with self.assertRaisesRegex(NanoclawError, "NANOCLAW_URL"):
                resolve()
            with self.assertRaisesRegex(NanoclawError, "NANOCLAW_TOKEN"):
                resolve(url="https://example.test")
            with self.assertRaisesRegex(NanoclawError, "https://"):
                resolve(url="http://example.test", token="t")
            with self.assertRaisesRegex(NanoclawError, "CA file"):
                resolve(url="https://example.test", token="t", ca_file="/nonexistent.pem")


class CreateBodyTest(unittest.TestCase):
    def test_the_create_request_is_the_apis_create_vm(self) -> None:
        body = json.loads(create_body("echo hi", None, "name = 'x'\n", {"A": "1"}, None, None,
                                      512, None, None))
        self.assertEqual(body, {"command": "/bin/sh", "args": ["-c", "echo hi"],
                                "profile": "name = 'x'\n", "env": [["A", "1"]],
                                "memory_mib": 512})
        body = json.loads(create_body(None, "img", None, [("B", "2")], "/w", "agent",
                                      None, 2, 64))
        self.assertEqual(body, {"command": "", "image": "img", "env": [["B", "2"]],
                                "cwd": "/w", "user": "agent", "vcpus": 2,
                                "disk_size_mib": 64})
        with self.assertRaises(NanoclawError):
            create_body(None, None, None, None, None, None, None, None, None)
        with self.assertRaises(NanoclawError):
            create_body([], None, None, None, None, None, None, None, None)


class DefaultOutputTest(unittest.TestCase):
    def test_output_goes_to_this_process_as_bytes_or_as_text(self) -> None:
        raw = io.BytesIO()
        wrapper = io.TextIOWrapper(raw, encoding="utf-8")
        with redirect_stdout(wrapper):
            write_to("stdout")(b"\xffbytes\n")
        self.assertEqual(raw.getvalue(), b"\xffbytes\n")
        wrapper.detach()
        text = io.StringIO()
        with redirect_stderr(text):
            write_to("stderr")(b"caf\xc3\xa9 \xff\n")
        self.assertEqual(text.getvalue(), "caf\u00e9 \ufffd\n")


if __name__ == "__main__":
    unittest.main()
