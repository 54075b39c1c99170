"""A small workspace MCP server for running agents without a Nanoclaw host, on the official
Python `mcp` SDK.

Tools: read_file, write_file, delete_file over an in-memory workspace that starts with one
file, /data/orders/latest.txt, holding an email address and a card number (the shape of
`mcp_upstream.py`'s read_file answer, so one scripted conversation fits both). Reading a file
that is not there is a tool error (`isError`).

--deny TOOL (repeatable) answers every call to TOOL with a JSON-RPC error, code -32003 and a
message starting "denied by rule", which is how the Nanoclaw gateway answers a call its access
profile denies (or whose approval is refused); it lets an agent's handling of denials be tried
without the gateway.

Every call's arguments are appended, one JSON line each, to the file named by
NANOCLAW_PEER_LOG (if set), as `mcp_upstream.py` does.

  python3 mcp_workspace.py [--deny TOOL]...                  stdio
  python3 mcp_workspace.py --http PORT [--deny TOOL]...      streamable HTTP, 127.0.0.1:PORT/mcp
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

CARD = "4111 1111 1111 1111"
EMAIL = "alice.smith@example.com"
# The code the Nanoclaw gateway gives a denied call.
DENIED = -32003

server = MCPServer("nanoclaw-test-workspace")
files: dict[str, str] = {
    "/data/orders/latest.txt": f"order 1042: customer {EMAIL} paid with card {CARD}, total 129.00 EUR.",
}
denied: set[str] = set()


def record(tool: str, **args: object) -> None:
    path = os.environ.get("NANOCLAW_PEER_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": tool, "args": args}) + "\n")


def refuse_if_denied(tool: str) -> None:
    if tool in denied:
        raise MCPError(DENIED, f"denied by rule `local:deny`: mcp_workspace was started with --deny {tool}")


@server.tool()
def read_file(path: str) -> str:
    """Read a file of the workspace."""
    refuse_if_denied("read_file")
    record("read_file", path=path)
    if path not in files:
        raise ToolError(f"no such file: {path}")
    return f"file {path}: {files[path]}"


@server.tool()
def write_file(path: str, content: str) -> str:
    """Write a file of the workspace (replacing it if it exists)."""
    refuse_if_denied("write_file")
    record("write_file", path=path, content=content)
    files[path] = content
    return f"wrote {len(content)} characters to {path}"


@server.tool()
def delete_file(path: str) -> str:
    """Delete a file of the workspace (destructive)."""
    refuse_if_denied("delete_file")
    record("delete_file", path=path)
    if files.pop(path, None) is None:
        raise ToolError(f"no such file: {path}")
    return f"deleted {path}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="A small workspace MCP server.")
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on 127.0.0.1:PORT")
    parser.add_argument("--deny", action="append", default=[], metavar="TOOL", help="deny every call to TOOL")
    args = parser.parse_args(argv)
    denied.update(args.deny)
    if args.http is not None:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main(sys.argv[1:])
