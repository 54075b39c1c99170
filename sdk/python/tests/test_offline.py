"""The SDK's parts that need no daemon: tar safety, errors, settings, the create request, and
the migration stream (over a stand-in transport)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import unittest
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any
from unittest import mock

from nanoclaw import (
    AsyncSandbox,
    AuthError,
    Conflict,
    Event,
    MigrationEvent,
    NanoclawError,
    NotFound,
    PermissionDenied,
    Sandbox,
    ServerError,
    VmInfo,
)
from nanoclaw._common import create_body, migrate_body, write_to
from nanoclaw.types import migration_event
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


ACCEPTED = b'{"event":"accepted","target_vm":"f00d"}'
ROUND = (b'{"event":"round","round":0,"pages":100,"mb_per_s":800.0,"dirty":3,'
         b'"expected_downtime_ms":0.1}')
MOVED = b'{"event":"ended","outcome":"moved","target_vm":"f00d","downtime_ms":41.2,"total_ms":2310.0}'
SETTINGS: dict[str, Any] = {"url": "https://example.test:8443", "token": "nct_x"}


class StandIn:
    """What the daemon is asked (method, target, body) and the body lines it answers, shared by
    the stand-in transports that :meth:`patched` puts in the SDK's place."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.requests: list[tuple[str, str, bytes | None]] = []

    @contextmanager
    def patched(self) -> Iterator[None]:
        """Puts the stand-ins in place of the blocking and the asyncio transports."""
        stand_in = self

        class Response:
            def lines(self) -> Iterator[bytes]:
                yield from stand_in.lines

        class AsyncResponse:
            async def lines(self) -> AsyncIterator[bytes]:
                for line in stand_in.lines:
                    yield line

            async def close(self) -> None:
                pass

        class Transport:
            def __init__(self, settings: object) -> None:
                pass

            @contextmanager
            def open(self, method: str, target: str, body: bytes | None = None,
                     content_type: str | None = None, stream: bool = False) -> Iterator[Response]:
                stand_in.requests.append((method, target, body))
                yield Response()

            def call(self, method: str, target: str, body: bytes | None = None,
                     content_type: str | None = None) -> bytes:
                stand_in.requests.append((method, target, body))
                return b"".join(stand_in.lines)

        class AsyncTransport:
            def __init__(self, settings: object) -> None:
                pass

            async def open(self, method: str, target: str, body: bytes | None = None,
                           content_type: str | None = None) -> AsyncResponse:
                stand_in.requests.append((method, target, body))
                return AsyncResponse()

            async def call(self, method: str, target: str, body: bytes | None = None,
                           content_type: str | None = None) -> bytes:
                stand_in.requests.append((method, target, body))
                return b"".join(stand_in.lines)

        with mock.patch("nanoclaw.sandbox.Transport", Transport), \
                mock.patch("nanoclaw.asandbox.AsyncTransport", AsyncTransport):
            yield


class MigrationTest(unittest.TestCase):
    def test_the_request_is_the_apis_migrate_vm(self) -> None:
        self.assertEqual(json.loads(migrate_body("10.0.0.2:7070", None, None)),
                         {"to": "10.0.0.2:7070"})
        self.assertEqual(json.loads(migrate_body("h:1", 50, 5)),
                         {"to": "h:1", "downtime_ms": 50, "max_rounds": 5})

    def test_migration_lines_are_checked(self) -> None:
        self.assertEqual(migration_event(ACCEPTED), {"event": "accepted", "target_vm": "f00d"})
        for bad in (b"{", b"[]", b'{"target_vm":"f00d"}', b'{"event":"ended","total_ms":1}'):
            with self.assertRaises(NanoclawError):
                migration_event(bad)

    def test_a_migrated_vm_has_ended(self) -> None:
        info = VmInfo.from_json({"id": "abc", "status": "migrated", "created_unix_ms": 1,
                                 "migrated_to": {"host": "h:1", "vm": "f00d",
                                                 "outcome": "moved"}})
        self.assertTrue(info.ended)
        self.assertEqual(info.raw["migrated_to"]["vm"], "f00d")

    def _sync(self, lines: list[bytes], **kwargs: Any) -> tuple[list[MigrationEvent], StandIn]:
        stand_in = StandIn(lines)
        with stand_in.patched():
            events = list(Sandbox.migrate("abc", "10.0.0.2:7070", **kwargs, **SETTINGS))
        return events, stand_in

    def test_migrate_yields_the_events_up_to_ended(self) -> None:
        events, stand_in = self._sync([ACCEPTED, ROUND, MOVED, b'{"event":"after the end"}'],
                                      downtime_ms=50)
        self.assertEqual([e["event"] for e in events], ["accepted", "round", "ended"])
        self.assertEqual((events[-1]["outcome"], events[-1]["downtime_ms"]), ("moved", 41.2))
        ((method, target, body),) = stand_in.requests
        self.assertEqual((method, target), ("POST", "/v1/vms/abc/migrate"))
        assert body is not None
        self.assertEqual(json.loads(body), {"to": "10.0.0.2:7070", "downtime_ms": 50})

    def test_a_stream_cut_before_ended_is_an_error(self) -> None:
        with self.assertRaisesRegex(NanoclawError, "without an outcome"):
            self._sync([ACCEPTED, ROUND])

    def test_cancel_is_a_delete_of_the_migration(self) -> None:
        stand_in = StandIn([])
        with stand_in.patched():
            Sandbox.cancel_migration("abc", **SETTINGS)
            asyncio.run(AsyncSandbox.cancel_migration("abc", **SETTINGS))
        self.assertEqual(stand_in.requests, [("DELETE", "/v1/vms/abc/migrate", None)] * 2)

    def test_resolve_posts_and_answers_the_vm_as_it_now_is(self) -> None:
        record = json.dumps({
            "id": "abc", "status": "migrated", "spec": {"command": "/bin/agent"},
            "created_unix_ms": 0, "control_connected": False, "control_reconnects": 0,
            "guest_protocol_errors": 0, "output_dropped_bytes": 0, "vm_dir": "/d",
            "migrated_to": {"host": "10.0.0.2:7070", "vm": "f00d", "outcome": "moved"},
        }).encode()
        stand_in = StandIn([record])
        with stand_in.patched():
            info = Sandbox.resolve_migration("abc", **SETTINGS)
            again = asyncio.run(AsyncSandbox.resolve_migration("abc", **SETTINGS))
        self.assertEqual((info.status, again.status), ("migrated", "migrated"))
        self.assertEqual(stand_in.requests,
                         [("POST", "/v1/vms/abc/migrate/resolve", None)] * 2)

    def test_the_async_twin_yields_the_same_and_fails_the_same(self) -> None:
        async def collect(lines: list[bytes]) -> list[MigrationEvent]:
            stand_in = StandIn(lines)
            with stand_in.patched():
                return [e async for e in AsyncSandbox.migrate("abc", "h:1", None, 5,
                                                              **SETTINGS)]

        events = asyncio.run(collect([ACCEPTED, MOVED, ROUND]))
        self.assertEqual([e["event"] for e in events], ["accepted", "ended"])
        with self.assertRaisesRegex(NanoclawError, "without an outcome"):
            asyncio.run(collect([ACCEPTED]))


if __name__ == "__main__":
    unittest.main()
