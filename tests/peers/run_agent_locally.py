#!/usr/bin/env python3
"""Runs the Python example agent (examples/agents/python/agent.py) on this machine, with no VM
and no proxy: against the scripted model server (openai_server.py) playing
agent_conversation.json, and the workspace MCP server (mcp_workspace.py, streamable HTTP, with
delete_file denied the way the gateway denies a call that needs an approval nobody gives).

Checks, each printed as it passes:
  1. the conversation completes with streamed answers, and 2. with whole answers: exit 0, the
     final answer, every request authenticated and as the script expects, the tool calls the
     upstream got, the denial reported to the model as a tool error;
  3. without the gateway the model gets the real card number, and the script's tokenization
     expectation catches it: 400, a clear message from the agent, exit 1, recorded;
  4. a wrong key fails cleanly: 401, a clear message, exit 1, and the key in no record;
  5. the server serves HTTPS with a certificate from a test CA (as the user's device calls it).

Run it with a Python that has the agent's requirements (examples/agents/python/requirements.txt):
  PYTHON tests/peers/run_agent_locally.py [--python PYTHON] [--keep]
There is no gateway here, so no tokenization: turn 2's `expect_tool_result_not_contains` is
dropped for checks 1 and 2 (check 3 shows why it is there).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PEERS = ROOT / "tests" / "peers"
AGENT = ROOT / "examples" / "agents" / "python" / "agent.py"
CONVERSATION = PEERS / "agent_conversation.json"
TASK = "Summarise the order in /data/orders/latest.txt into /data/out/summary.txt, then delete /data/orders/latest.txt."
CARD = "4111 1111 1111 1111"
EMAIL = "alice.smith@example.com"
RUN_TIMEOUT = 120


class Failure(Exception):
    pass


def expect(condition: bool, what: str, context: str = "") -> None:
    if not condition:
        raise Failure(what + (f"\n{context}" if context else ""))


def placeholder_key() -> str:
    """The agent's placeholder key: with no proxy to put the real key in, it is the key."""
    found = re.search(r'^API_KEY_PLACEHOLDER = "([^"]+)"', AGENT.read_text(encoding="utf-8"), re.M)
    if not found:
        raise Failure(f"no API_KEY_PLACEHOLDER in {AGENT}")
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise Failure(f"the server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise Failure(f"nothing listens on port {port} after {timeout} s")


class Peers:
    """The processes a check starts; all stopped when it ends."""

    def __init__(self, python: str, tmp: Path) -> None:
        self.python = python
        self.tmp = tmp
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *_: object) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def model(self, name: str, key: str, script: Path, tls: tuple[Path, Path] | None = None) -> int:
        """Starts openai_server.py; returns its port once it says it listens."""
        key_file = self.tmp / f"{name}.key"
        key_file.write_text(key, encoding="utf-8")
        command = [
            self.python, str(PEERS / "openai_server.py"),
            "--port", "0",
            "--key-file", str(key_file),
            "--script", str(script),
            "--record", str(self.tmp / f"{name}.record.jsonl"),
        ]  # fmt: skip
        if tls is not None:
            command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        stderr = (self.tmp / f"{name}.stderr").open("wb")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr)
        self.processes.append(process)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        line = process.stdout.readline().decode() if ready else ""
        found = re.fullmatch(r"listening on [\d.]+:(\d+)\s*", line)
        if not found:
            raise Failure(f"openai_server.py did not say it listens: {line!r}")
        return int(found.group(1))

    def workspace(self, name: str, deny: list[str]) -> int:
        """Starts mcp_workspace.py over streamable HTTP; returns its port once it accepts."""
        port = free_port()
        command = [self.python, str(PEERS / "mcp_workspace.py"), "--http", str(port)]
        for tool in deny:
            command += ["--deny", tool]
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=(self.tmp / f"{name}.stderr").open("wb"),
            env={"PATH": "/usr/bin:/bin", "NANOCLAW_PEER_LOG": str(self.tmp / f"{name}.calls.jsonl")},
        )
        self.processes.append(process)
        wait_for_port(port, process)
        return port

    def record(self, name: str) -> list[dict[str, Any]]:
        path = self.tmp / f"{name}.record.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def calls(self, name: str) -> list[dict[str, Any]]:
        path = self.tmp / f"{name}.calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_agent(python: str, model_port: int, mcp_port: int, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
        "NANOCLAW_MCP_URL": f"http://127.0.0.1:{mcp_port}/mcp",
        "AGENT_MODEL": "scripted",
    }
    return subprocess.run(
        [python, str(AGENT), *flags, TASK], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
    )


def show(result: subprocess.CompletedProcess[str]) -> str:
    out = "\n".join("    | " + line for line in result.stdout.splitlines())
    err = "\n".join("    ! " + line for line in result.stderr.splitlines())
    return f"    exit {result.returncode}\n{out}" + (f"\n{err}" if err else "")


def without_tokenization_checks(tmp: Path) -> Path:
    """The conversation minus what only the gateway makes true (surrogates in tool results)."""
    script = json.loads(CONVERSATION.read_text(encoding="utf-8"))
    turn = script["turns"][1]
    expect(turn.get("expect_tool_result_not_contains") == [CARD, EMAIL], "turn 2 no longer checks for the real values")
    del turn["expect_tool_result_not_contains"]
    path = tmp / "conversation-direct.json"
    path.write_text(json.dumps(script), encoding="utf-8")
    return path


def conversation(python: str, tmp: Path, stream: bool) -> None:
    name = "stream" if stream else "whole"
    with Peers(python, tmp) as peers:
        model = peers.model(name, placeholder_key(), without_tokenization_checks(tmp))
        mcp = peers.workspace(name, deny=["delete_file"])
        result = run_agent(python, model, mcp, *([] if stream else ["--no-stream"]))
        print(show(result))
        context = show(result) + "\n" + (tmp / f"{name}.stderr").read_text()
        expect(result.returncode == 0, "the agent failed", context)
        final = "final answer: I wrote the summary to /data/out/summary.txt."
        expect(final in result.stdout, "no final answer", context)
        expect("error delete_file: denied by rule" in result.stdout, "the denial is not shown", context)
        expect("Traceback" not in result.stderr, "a traceback", context)
        record = peers.record(name)
        expect(len(record) == 4, f"{len(record)} model requests, not 4", context)
        for entry in record:
            expect(entry["key_matched"] and entry["status"] == 200, f"request {entry['seq']} failed", json.dumps(entry))
            expect(entry["stream"] is stream, f"request {entry['seq']} has stream={entry['stream']}")
            expect(not entry.get("expectation_failures"), "an expectation failed", json.dumps(entry))
        expect([e["turn"] for e in record] == [1, 2, 3, 4], "the turns are out of order")
        last = record[-1]["messages"]
        expect(
            last[-1]["role"] == "tool" and last[-1]["content"].startswith("error: denied by rule"),
            "the denial did not reach the model as a tool error",
            json.dumps(last[-1]),
        )
        expect(CARD in json.dumps(record[1]["messages"]), "the real card number did not reach the model")
        calls = peers.calls(name)
        expect(
            [c["tool"] for c in calls] == ["read_file", "write_file"],
            f"the upstream got {[c['tool'] for c in calls]}",
        )
        expect(EMAIL in calls[1]["args"]["content"], "write_file did not get the customer's email")
    print(f"ok {'1' if stream else '2'}: the conversation completes, {'streamed' if stream else 'whole answers'}")


def leak_is_caught(python: str, tmp: Path) -> None:
    with Peers(python, tmp) as peers:
        model = peers.model("leak", placeholder_key(), CONVERSATION)
        mcp = peers.workspace("leak", deny=["delete_file"])
        result = run_agent(python, model, mcp)
        print(show(result))
        context = show(result)
        expect(result.returncode == 1, "the agent did not fail", context)
        expect("answered 400" in result.stderr and f"not to contain {CARD!r}" in result.stderr, "unclear", context)
        expect("Traceback" not in result.stderr, "a traceback", context)
        failures = [f for e in peers.record("leak") for f in e.get("expectation_failures", [])]
        expect(any(CARD in f for f in failures), "the failed expectation is not recorded")
    print("ok 3: a real card number reaching the model fails the conversation's expectation")


def wrong_key(python: str, tmp: Path) -> None:
    key = "sk-local-" + secrets.token_hex(16)
    with Peers(python, tmp) as peers:
        model = peers.model("wrongkey", key, CONVERSATION)
        mcp = peers.workspace("wrongkey", deny=[])
        result = run_agent(python, model, mcp)
        print(show(result))
        context = show(result)
        expect(result.returncode == 1, "the agent did not fail", context)
        expect("answered 401: Incorrect API key provided." in result.stderr, "no clear 401 message", context)
        expect("Traceback" not in result.stderr, "a traceback", context)
        record = peers.record("wrongkey")
        refused = all(e["key_matched"] is False and e["status"] == 401 for e in record)
        expect(bool(record) and refused, "the requests were not all refused")
        expect(peers.calls("wrongkey") == [], "a tool ran without the model")
        for path in tmp.iterdir():
            if path.name.startswith("wrongkey.") and path.suffix != ".key":
                expect(key not in path.read_text(errors="replace"), f"the key is written in {path.name}")
    print("ok 4: a wrong key fails cleanly (401, exit 1, the key in no record)")


def make_certs(dir: Path) -> tuple[Path, Path, Path]:
    """A test CA and a leaf for api.test and 127.0.0.1, as the e2e credentials test makes them."""

    def ssl_cmd(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=dir, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ssl_cmd("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=nanoclaw local CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    ssl_cmd("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=api.test")
    (dir / "leaf.ext").write_text(
        "subjectAltName=DNS:api.test,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ssl_cmd("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")  # fmt: skip
    return dir / "ca.pem", dir / "leaf.pem", dir / "leaf.key"


def https(python: str, tmp: Path) -> None:
    if shutil.which("openssl") is None:
        print("skip 5: no openssl to make a test CA")
        return
    certs = tmp / "certs"
    certs.mkdir()
    ca, cert, key_pem = make_certs(certs)
    key = "sk-local-" + secrets.token_hex(16)
    with Peers(python, tmp) as peers:
        port = peers.model("tls", key, CONVERSATION, tls=(cert, key_pem))
        context = ssl.create_default_context(cafile=str(ca))
        connection = HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        body = json.dumps(
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": TASK}],
             "tools": [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
                       for n in ("read_file", "write_file", "delete_file")]}
        )  # fmt: skip
        connection.request(
            "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        )
        response = connection.getresponse()
        text = response.read().decode()
        expect(response.status == 200, f"HTTPS answered {response.status}", text)
        expect(response.getheader("Content-Type", "").startswith("text/event-stream"), "not an event stream")
        expect('"name": "read_file"' in text and text.rstrip().endswith("data: [DONE]"), "an unexpected stream", text)
        connection.close()
        untrusted = HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(), timeout=30)
        try:
            untrusted.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            raise Failure("a client without the test CA got through")
        except ssl.SSLCertVerificationError:
            pass
        finally:
            untrusted.close()
    print("ok 5: HTTPS with a test CA's certificate (streamed turn 1 over TLS; untrusted clients refused)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="the Python with openai and mcp (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (records, logs)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="nanoclaw-agent-"))
    try:
        conversation(args.python, tmp, stream=True)
        conversation(args.python, tmp, stream=False)
        leak_is_caught(args.python, tmp)
        wrong_key(args.python, tmp)
        https(args.python, tmp)
    except (Failure, subprocess.SubprocessError, OSError) as e:
        print(f"FAILED: {e}\n(records and logs in {tmp})", file=sys.stderr)
        return 1
    if args.keep:
        print(f"records and logs in {tmp}")
    else:
        shutil.rmtree(tmp)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
