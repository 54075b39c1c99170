#!/usr/bin/env python3
"""A scripted OpenAI-compatible chat-completions server for Nanoclaw's tests and demo.

Standard library only. It plays the model: each answer comes from a JSON script, and each
request is checked against what the script expects the agent to send at that point.

Endpoints (any path prefix is accepted, so `/v1/...`, `/...` and whatever a proxy leaves):
  POST .../chat/completions   the next scripted turn, streamed (SSE) or not, with `usage`
  GET  .../models             one model, named by --model

Every request must carry `Authorization: Bearer <key>`, the key being the content of
--key-file (never given on the command line); otherwise the answer is 401 with an
OpenAI-style error body.

The script (--script) is a JSON list of turns (or {"turns": [...]}), counted from 1. The turn
served is one more than the number of assistant messages in the request, so the server keeps
no conversation state and one server can serve several runs of the same conversation. A turn
is either
  {"tool_calls": [{"name": "read_file", "arguments": {"path": "/data/x"}}, ...]}
or
  {"content": "the answer"}
and may carry expectations, checked against the request before answering:
  "expect_user_contains": S             the user messages contain S
  "expect_tools_offered": [NAME, ...]   the request offers these function tools
  "expect_tool_result_contains": S      the tool results since the last assistant message
  "expect_tool_result_not_contains": S    contain / do not contain S,
  "expect_tool_result_matches": RE        or match the regular expression RE
(S and RE may also be lists: each item must hold). A failed expectation is answered 400 with
a message naming the turn and what was expected, and is recorded. A "comment" key (in a turn,
or beside "turns") is ignored; any other unknown key is an error when the script loads.
A tool-call turn may also take values from those tool results:
  "capture": {"email": RE}   the first match of RE (its group 1 if it has groups) is put in
                             place of "{{email}}" in the strings of the calls' arguments.

--record FILE appends one JSON line per request: the path, whether the key matched (never the
key), the header names, the model, whether it streamed, the turn, the messages and tool names
it received, and what was answered or why not.

  openai_server.py --key-file KEY --script TURNS.json [--host 127.0.0.1] [--port 0]
                   [--port-file FILE] [--record FILE] [--model NAME]
                   [--tls-cert CERT.pem --tls-key KEY.pem]

It prints `listening on HOST:PORT` once it accepts connections.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Json = dict[str, Any]

EXPECTATIONS = (
    "expect_user_contains",
    "expect_tools_offered",
    "expect_tool_result_contains",
    "expect_tool_result_not_contains",
    "expect_tool_result_matches",
)
TURN_KEYS = {"tool_calls", "content", "capture", "comment", *EXPECTATIONS}
MAX_BODY = 16 << 20


class ScriptError(ValueError):
    """The script file is malformed."""


class ExpectationFailed(Exception):
    """The request is not what the script expects at this turn."""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Reply:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"


def as_list(value: Any, what: str) -> list[str]:
    """A string or a list of strings, as a list."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ScriptError(f"{what} must be a string or a list of strings")
    return items


def load_script(path: Path) -> list[Json]:
    """Reads and checks the script; every mistake is reported here, not mid-conversation."""
    turns = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(turns, dict):
        turns = turns.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ScriptError('the script must be a non-empty list of turns (or {"turns": [...]})')
    for n, turn in enumerate(turns):
        where = f"turn {n + 1}"
        if not isinstance(turn, dict):
            raise ScriptError(f"{where} must be an object")
        unknown = set(turn) - TURN_KEYS
        if unknown:
            raise ScriptError(f"{where}: unknown keys {sorted(unknown)}")
        if ("tool_calls" in turn) == ("content" in turn):
            raise ScriptError(f"{where} needs exactly one of `tool_calls` and `content`")
        if "content" in turn and not isinstance(turn["content"], str):
            raise ScriptError(f"{where}: `content` must be a string")
        if "tool_calls" in turn:
            calls = turn["tool_calls"]
            if not isinstance(calls, list) or not calls:
                raise ScriptError(f"{where}: `tool_calls` must be a non-empty list")
            for call in calls:
                if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                    raise ScriptError(f"{where}: each tool call needs a `name`")
                if not isinstance(call.get("arguments", {}), (dict, str)):
                    raise ScriptError(f"{where}: `arguments` must be an object or a string")
        elif "capture" in turn:
            raise ScriptError(f"{where}: `capture` only applies to a tool-call turn")
        for key in EXPECTATIONS:
            if key in turn:
                as_list(turn[key], f"{where}: `{key}`")
        for pattern in as_list(turn.get("expect_tool_result_matches", []), where):
            re.compile(pattern)
        capture = turn.get("capture", {})
        if not isinstance(capture, dict):
            raise ScriptError(f"{where}: `capture` must map names to regular expressions")
        for pattern in capture.values():
            re.compile(pattern)
    return turns


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def tool_results(messages: list[Json]) -> list[str]:
    """The contents of the tool messages after the last assistant message."""
    results: list[str] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant":
            results = []
        elif role == "tool":
            results.append(text_of(message.get("content")))
    return results


def check(turn_no: int, total: int, turn: Json, messages: list[Json], tools: list[str]) -> list[str]:
    """The failed expectations of `turn` for this request, each as a sentence."""
    failures: list[str] = []
    user = "\n".join(text_of(m.get("content")) for m in messages if m.get("role") == "user")
    for want in as_list(turn.get("expect_user_contains", []), ""):
        if want not in user:
            failures.append(f"expected the user messages to contain {want!r}")
    for name in as_list(turn.get("expect_tools_offered", []), ""):
        if name not in tools:
            failures.append(f"expected the tool {name!r} to be offered (offered: {tools})")
    wants_result = any(k.startswith("expect_tool_result") for k in turn) or "capture" in turn
    results = tool_results(messages)
    if wants_result and not results:
        failures.append("expected tool results after the last assistant message, found none")
    joined = "\n".join(results)
    for want in as_list(turn.get("expect_tool_result_contains", []), ""):
        if results and want not in joined:
            failures.append(f"expected the tool results to contain {want!r}")
    for unwanted in as_list(turn.get("expect_tool_result_not_contains", []), ""):
        if unwanted in joined:
            failures.append(f"expected the tool results not to contain {unwanted!r}")
    for pattern in as_list(turn.get("expect_tool_result_matches", []), ""):
        if results and not re.search(pattern, joined):
            failures.append(f"expected the tool results to match /{pattern}/")
    for name, pattern in turn.get("capture", {}).items():
        if results and not re.search(pattern, joined):
            failures.append(f"nothing in the tool results matches /{pattern}/ to capture {name!r}")
    return [f"script turn {turn_no} of {total}: {f}" for f in failures]


def substitute(value: Any, captured: dict[str, str]) -> Any:
    """`value` with each "{{name}}" in its strings replaced by the captured value."""
    if isinstance(value, str):
        for name, found in captured.items():
            value = value.replace("{{" + name + "}}", found)
        return value
    if isinstance(value, list):
        return [substitute(v, captured) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, captured) for k, v in value.items()}
    return value


def reply_for(turn_no: int, turn: Json, messages: list[Json]) -> Reply:
    """The scripted answer (call after `check` passed)."""
    if "content" in turn:
        return Reply(content=turn["content"])
    joined = "\n".join(tool_results(messages))
    captured: dict[str, str] = {}
    for name, pattern in turn.get("capture", {}).items():
        found = re.search(pattern, joined)
        if found:
            captured[name] = found.group(1) if found.groups() else found.group(0)
    calls: list[ToolCall] = []
    for i, call in enumerate(turn["tool_calls"]):
        arguments = substitute(call.get("arguments", {}), captured)
        encoded = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(ToolCall(id=f"call_{turn_no}_{i}", name=call["name"], arguments=encoded))
    return Reply(content=None, tool_calls=calls)


def usage(messages: list[Json], reply: Reply) -> Json:
    """Token counts, estimated at four characters a token (there is no tokenizer here)."""
    prompt = max(1, len(json.dumps(messages)) // 4)
    out = (reply.content or "") + "".join(c.name + c.arguments for c in reply.tool_calls)
    completion = max(1, len(out) // 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(reply: Reply, model: str, messages: list[Json], completion_id: str) -> Json:
    message: Json = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in reply.tool_calls
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}],
        "usage": usage(messages, reply),
    }


def pieces(text: str, size: int) -> Iterator[str]:
    for start in range(0, len(text), size):
        yield text[start : start + size]


def stream_chunks(
    reply: Reply, model: str, messages: list[Json], completion_id: str, include_usage: bool
) -> Iterator[Json]:
    """The SSE chunks of `reply` in OpenAI's format: the role, the content in pieces or each
    tool call (its id and name, then its arguments in pieces), the finish reason, the usage."""
    created = int(time.time())

    def chunk(delta: Json, finish: str | None = None) -> Json:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    yield chunk({"role": "assistant", "content": "" if reply.content is not None else None})
    if reply.content:
        for piece in re.findall(r"\S+\s*|\s+", reply.content):
            yield chunk({"content": piece})
    for index, call in enumerate(reply.tool_calls):
        yield chunk(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        )
        for piece in pieces(call.arguments, 7):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, reply.finish_reason)
    if include_usage:
        yield {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(messages, reply),
        }


class Recorder:
    """Appends one JSON line per request to a file, or does nothing without one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.count = 0

    def write(self, entry: Json) -> None:
        with self.lock:
            self.count += 1
            entry = {"seq": self.count, "time": round(time.time(), 3), **entry}
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], key: bytes, script: list[Json], recorder: Recorder, model: str
    ) -> None:
        super().__init__(address, Handler)
        self.key = key
        self.script = script
        self.recorder = recorder
        self.model = model
        self.tls = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        log(f"connection from {client_address[0]}:{client_address[1]}: {error!r}")


def log(message: str) -> None:
    print(f"openai_server: {message}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(30)
            self.connection.do_handshake()
            self.connection.settimeout(None)

    def log_message(self, format: str, *args: Any) -> None:
        log(format % args)

    # --- answers -------------------------------------------------------------------------

    def send_json(self, status: int, body: Json) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_body(self, status: int, message: str, kind: str, code: str | None) -> None:
        self.send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})

    def send_stream(self, chunks: Iterator[Json]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for c in chunks:
            self.write_chunk(f"data: {json.dumps(c)}\n\n".encode())
        self.write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # --- requests ------------------------------------------------------------------------

    def key_matches(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.server.key)

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
                if len(body) > MAX_BODY:
                    raise ValueError("request body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("request body too large")
        return self.rfile.read(length)

    def base_record(self, key_matched: bool) -> Json:
        authorization = self.headers.get("Authorization")
        return {
            "method": self.command,
            "path": self.path,
            "key_matched": key_matched,
            "authorization": None if authorization is None else authorization.partition(" ")[0].lower(),
            "header_names": sorted({name.lower() for name in self.headers.keys()}),
        }

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        matched = self.key_matches()
        record = self.base_record(matched)
        if not matched:
            record["status"] = 401
            self.server.recorder.write(record)
            self.send_error_body(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            return
        if path.endswith("/models") or path == "/models":
            record["status"] = 200
            self.server.recorder.write(record)
            model = {"id": self.server.model, "object": "model", "created": 0, "owned_by": "nanoclaw-tests"}
            self.send_json(200, {"object": "list", "data": [model]})
            return
        record["status"] = 404
        self.server.recorder.write(record)
        self.send_error_body(404, f"no route for GET {path}", "invalid_request_error", "unknown_url")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            raw = self.read_body()
        except ValueError as e:
            self.close_connection = True
            self.send_error_body(400, str(e), "invalid_request_error", None)
            return
        matched = self.key_matches()
        record = self.base_record(matched)
        if not matched:
            record["status"] = 401
            self.server.recorder.write(record)
            self.send_error_body(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            return
        if not path.endswith("/chat/completions"):
            record["status"] = 404
            self.server.recorder.write(record)
            self.send_error_body(404, f"no route for POST {path}", "invalid_request_error", "unknown_url")
            return
        try:
            request = json.loads(raw)
            if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
                raise ValueError("the body must be an object with a `messages` list")
        except ValueError as e:
            record.update(status=400, error=f"bad request body: {e}")
            self.server.recorder.write(record)
            self.send_error_body(400, f"bad request body: {e}", "invalid_request_error", None)
            return
        self.chat(request, record)

    def chat(self, request: Json, record: Json) -> None:
        messages: list[Json] = request["messages"]
        model = str(request.get("model") or self.server.model)
        stream = bool(request.get("stream"))
        tools = [
            t["function"]["name"]
            for t in request.get("tools") or []
            if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
        ]
        turn_no = 1 + sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        record.update(model=model, stream=stream, turn=turn_no, tools=tools, messages=messages)
        script = self.server.script
        if turn_no > len(script):
            message = f"the script has {len(script)} turns; the request asks for turn {turn_no}"
            record.update(status=400, expectation_failures=[message])
            self.server.recorder.write(record)
            log(message)
            self.send_error_body(400, message, "invalid_request_error", "script_exhausted")
            return
        turn = script[turn_no - 1]
        failures = check(turn_no, len(script), turn, messages, tools)
        if failures:
            record.update(status=400, expectation_failures=failures)
            self.server.recorder.write(record)
            for failure in failures:
                log(failure)
            self.send_error_body(400, "; ".join(failures), "invalid_request_error", "expectation_failed")
            return
        reply = reply_for(turn_no, turn, messages)
        record.update(
            status=200,
            reply={"content": reply.content, "tool_calls": [c.__dict__ for c in reply.tool_calls]},
        )
        self.server.recorder.write(record)
        completion_id = f"chatcmpl-nanoclaw-{turn_no}-{int(time.time() * 1000)}"
        if stream:
            options = request.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            self.send_stream(stream_chunks(reply, model, messages, completion_id, include_usage))
        else:
            self.send_json(200, completion_body(reply, model, messages, completion_id))


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible chat-completions server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the port here once listening")
    parser.add_argument("--key-file", type=Path, required=True, help="the API key clients must send")
    parser.add_argument("--script", type=Path, required=True, help="the model's turns (JSON)")
    parser.add_argument("--record", type=Path, help="append one JSON line per request here")
    parser.add_argument("--model", default="nanoclaw-scripted", help="the model GET /models lists")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="and this private key (PEM)")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    try:
        key = args.key_file.read_text(encoding="utf-8").strip().encode()
        script = load_script(args.script)
    except (OSError, ValueError) as e:
        print(f"openai_server: {e}", file=sys.stderr)
        return 2
    if not key:
        print(f"openai_server: the key file {args.key_file} is empty", file=sys.stderr)
        return 2
    server = ScriptedServer((args.host, args.port), key, script, Recorder(args.record), args.model)
    if args.tls_cert is not None:
        context = tls_context(args.tls_cert, args.tls_key)
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        server.tls = True
    port = int(server.server_address[1])
    host = args.host
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.port_file is not None:
        write_atomically(args.port_file, f"{port}\n")
    scheme = "https" if server.tls else "http"
    print(f"listening on {host}:{port}", flush=True)
    log(f"{scheme}://{host}:{port}, {len(script)} scripted turns")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
