"""An MCP client standing in for the agent, built on the official Python `mcp` SDK.

It connects to the gateway's Unix socket (the host side of the MCP vsock port), or with an
http:// URL to a streamable-HTTP endpoint (the sidecar's local one), runs the MCP handshake, then a scenario given as JSON on argv[2]: a list of steps, each
{"list": true} or {"call": NAME, "args": {...}} or {"call_with": [INDEX, KEY], ...}. It prints one
JSON line per step: {"tools": [...]} or {"ok": <result>} or {"error": {"code":..,"message":..}}.
A "call_with" step passes, as argument KEY, the first email found in step INDEX's text output
(how a test makes the agent hand a surrogate back).

  python3 mcp_agent.py SOCKET|URL 'SCENARIO-JSON'
"""

import json
import re
import sys

import anyio
import mcp_types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage


async def run(target, steps):
    if target.startswith("http://"):
        async with streamable_http_client(target) as (read_stream, write_stream):
            await scenario(read_stream, write_stream, steps)
        return
    stream = await anyio.connect_unix(target)
    read_writer, read_stream = anyio.create_memory_object_stream(16)
    write_stream, write_reader = anyio.create_memory_object_stream(16)

    async def reader():
        buffer = b""
        async with read_writer:
            try:
                while True:
                    chunk = await stream.receive()
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            msg = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                            await read_writer.send(SessionMessage(msg))
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

    async def writer():
        async with write_reader:
            async for m in write_reader:
                data = m.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                await stream.send(data.encode())

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        await scenario(read_stream, write_stream, steps)
        tg.cancel_scope.cancel()
    await stream.aclose()


async def scenario(read_stream, write_stream, steps):
    outputs = []
    async with ClientSession(read_stream, write_stream) as session:
        with anyio.fail_after(30):
            await session.initialize()
            for step in steps:
                if step.get("list"):
                    res = await session.list_tools()
                    out = {"tools": [t.name for t in res.tools]}
                else:
                    args = dict(step.get("args", {}))
                    if "call_with" in step:
                        index, key = step["call_with"]
                        text = json.dumps(outputs[index])
                        found = re.search(r"[\w.+-]+@[\w-]+(\.[\w-]+)+", text)
                        args[key] = found.group(0) if found else ""
                    try:
                        res = await session.call_tool(step["call"], args)
                        out = {"ok": res.model_dump(by_alias=True, mode="json", exclude_none=True)}
                    except MCPError as e:
                        out = {"error": {"code": e.error.code, "message": e.error.message}}
                outputs.append(out)
                print(json.dumps(out), flush=True)


if __name__ == "__main__":
    anyio.run(run, sys.argv[1], json.loads(sys.argv[2]))
