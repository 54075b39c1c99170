"""An upstream MCP server for Nanoclaw's gateway tests, built on the official Python `mcp` SDK.

Tools: read_file (returns text holding a card number and an email), write_file (records what
it received), delete_file (destructive), transfer (with an optional memo, recorded only when
sent), exec_shell (no profile lists it), lookup (waits `wait_ms` before answering, as a call to
a remote API does, without holding the server: the gateway benchmark's concurrent calls).
Every call's arguments are appended, one JSON line each, to the file named by NANOCLAW_PEER_LOG
(if set), so a test can see exactly what the upstream received.

  python3 mcp_upstream.py                  stdio
  python3 mcp_upstream.py --http PORT      streamable HTTP on 127.0.0.1:PORT at /mcp
"""

import asyncio
import json
import os
import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("nanoclaw-test-upstream")

CARD = "4111 1111 1111 1111"
EMAIL = "alice.smith@example.com"


def record(tool, **args):
    path = os.environ.get("NANOCLAW_PEER_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": tool, "args": args}) + "\n")


@server.tool()
def read_file(path: str) -> str:
    """Read a file."""
    record("read_file", path=path)
    return f"file {path}: customer {EMAIL} paid with card {CARD}."


@server.tool()
def write_file(path: str, content: str) -> str:
    """Write a file."""
    record("write_file", path=path, content=content)
    return f"wrote {len(content)} characters to {path}"


@server.tool()
def delete_file(path: str) -> str:
    """Delete a file (destructive)."""
    record("delete_file", path=path)
    return f"deleted {path}"


@server.tool()
def transfer(amount: int, account: str, memo: str | None = None) -> str:
    """Move money."""
    if memo is None:
        record("transfer", amount=amount, account=account)
    else:
        record("transfer", amount=amount, account=account, memo=memo)
    return f"moved {amount} to {account}"


@server.tool()
def exec_shell(command: str) -> str:
    """Run a shell command (no profile lists it)."""
    record("exec_shell", command=command)
    return "ran"


@server.tool()
async def lookup(key: str, wait_ms: int = 0) -> str:
    """Look a key up in a remote service: waits wait_ms (at most 10 s), then answers."""
    record("lookup", key=key, wait_ms=wait_ms)
    await asyncio.sleep(min(max(wait_ms, 0), 10_000) / 1000)
    return f"{key}: owned by {EMAIL}"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
