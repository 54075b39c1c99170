#!/usr/bin/env python3
"""A tool-using agent on the official `openai` and `mcp` Python SDKs, made to run in a
Nanoclaw microVM.

It connects to an MCP endpoint, offers the model every tool listed there as a function tool,
runs the calls the model asks for through the MCP session, gives the model the results, and
repeats until the model answers without tool calls (at most --max-turns model calls).

It holds no API key. In a Nanoclaw VM its model API base URL is the sidecar's credential
proxy, `http://127.0.0.1:8377/<service>/...`; the user's device drops the request's
`Authorization` header, puts in the real one and makes the HTTPS call. The SDK insists on a
key, so the agent gives it API_KEY_PLACEHOLDER, which is not a secret.

Environment (flags win over it):
  OPENAI_BASE_URL     the chat-completions API base (default: the sidecar's proxy,
                      http://127.0.0.1:8377/openai/v1)
  NANOCLAW_MCP_URL    the MCP endpoint, streamable HTTP (default: the sidecar's,
                      http://127.0.0.1:8931/mcp)
  AGENT_MODEL         the model name (required, or --model)
  AGENT_TASK          the task, when none is given as arguments
  AGENT_MAX_TURNS     the most model calls (default 10)
  AGENT_STREAM        0 / false / no: ask for whole answers instead of streams
  AGENT_TOOL_TIMEOUT  seconds to wait for one tool call (default 600: a call may wait for
                      the user's approval)
  AGENT_MAX_RETRIES   retries of a failed model call (default 4; e.g. 503 while the device links)

  agent.py [--model NAME] [--no-stream] [--max-turns N] [TASK ...]

Exit status: 0 with a final answer, 1 when the run failed (the message says why), 2 for a
configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx2
import openai
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

# Not a key. The credential proxy replaces the Authorization header this ends up in.
API_KEY_PLACEHOLDER = "no-key-here-the-nanoclaw-proxy-injects-it"

DEFAULT_BASE_URL = "http://127.0.0.1:8377/openai/v1"
DEFAULT_MCP_URL = "http://127.0.0.1:8931/mcp"
SYSTEM_PROMPT = (
    "You are an agent that does the user's task with the tools you are given. Call tools when "
    "you need them. If a tool call fails or is denied, do not repeat it unchanged: say so in "
    "your answer. When the task is done, answer briefly without calling tools."
)
# What one tool result may put in the conversation, and what is shown of it on stdout.
MAX_RESULT_CHARS = 50_000
SHOWN_CHARS = 400
# OpenAI function names; MCP tool names that do not fit are renamed for the model.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

Message = dict[str, Any]


class AgentError(Exception):
    """A failure that ends the run, with a message for the user."""


class ConfigError(Exception):
    """The configuration is incomplete or invalid."""


@dataclass(frozen=True)
class Config:
    base_url: str
    mcp_url: str
    model: str
    task: str
    stream: bool
    max_turns: int
    tool_timeout: float
    max_retries: int


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str


@dataclass
class Answer:
    """One model answer: its text, the tool calls it asks for, and what it cost."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Any = None


# --- configuration -------------------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a whole number") from None


def config_from(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(description="A tool-using agent (OpenAI chat completions + MCP).")
    parser.add_argument("task", nargs="*", help="the task (default: $AGENT_TASK)")
    parser.add_argument("--model", help="the model (default: $AGENT_MODEL)")
    parser.add_argument("--max-turns", type=int, help="the most model calls (default: $AGENT_MAX_TURNS or 10)")
    streaming = parser.add_mutually_exclusive_group()
    streaming.add_argument(
        "--stream", dest="stream", action="store_true", default=None, help="stream answers (default)"
    )
    streaming.add_argument("--no-stream", dest="stream", action="store_false", help="ask for whole answers")
    args = parser.parse_args(argv)

    task = " ".join(args.task).strip() or os.environ.get("AGENT_TASK", "").strip()
    if not task:
        raise ConfigError("no task: give it as arguments or in AGENT_TASK")
    model = (args.model or os.environ.get("AGENT_MODEL", "")).strip()
    if not model:
        raise ConfigError("no model: set AGENT_MODEL or pass --model")
    stream = args.stream
    if stream is None:
        stream = os.environ.get("AGENT_STREAM", "1").strip().lower() not in ("0", "false", "no", "off")
    max_turns = args.max_turns if args.max_turns is not None else env_int("AGENT_MAX_TURNS", 10)
    if max_turns < 1:
        raise ConfigError("the most model calls must be at least 1")
    urls = {
        "OPENAI_BASE_URL": os.environ.get("OPENAI_BASE_URL", "").strip() or DEFAULT_BASE_URL,
        "NANOCLAW_MCP_URL": os.environ.get("NANOCLAW_MCP_URL", "").strip() or DEFAULT_MCP_URL,
    }
    for name, url in urls.items():
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ConfigError(f"{name}={url!r} is not an http:// or https:// URL")
    return Config(
        base_url=urls["OPENAI_BASE_URL"],
        mcp_url=urls["NANOCLAW_MCP_URL"],
        model=model,
        task=task,
        stream=stream,
        max_turns=max_turns,
        tool_timeout=float(env_int("AGENT_TOOL_TIMEOUT", 600)),
        max_retries=env_int("AGENT_MAX_RETRIES", 4),
    )


def is_loopback(url: str) -> bool:
    """Whether `url` names this machine. Such URLs are called directly: an HTTP_PROXY in the
    environment (the credential proxy's other mode) must not carry them."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- output --------------------------------------------------------------------------------


def say(line: str) -> None:
    print(line, flush=True)


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# --- MCP -----------------------------------------------------------------------------------


@asynccontextmanager
async def mcp_session(url: str) -> AsyncIterator[ClientSession]:
    """An initialized MCP session over streamable HTTP."""
    http = httpx2.AsyncClient(
        timeout=httpx2.Timeout(30.0, read=None),
        trust_env=not is_loopback(url),
    )
    async with http, streamable_http_client(url, http_client=http) as (read_stream, write_stream):
        async with ClientSession(read_stream, write_stream) as session:
            try:
                async with asyncio.timeout(60):
                    await session.initialize()
            except TimeoutError:
                raise AgentError(f"the MCP endpoint {url} did not answer `initialize` within 60 s") from None
            except MCPError as e:
                raise AgentError(f"the MCP endpoint {url} refused `initialize`: {e.message}") from None
            yield session


async def list_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def function_tools(tools: list[types.Tool]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The tools as OpenAI function tools, and the MCP tool name for each function name."""
    functions: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for tool in tools:
        name = tool.name if FUNCTION_NAME.match(tool.name) else re.sub(r"[^A-Za-z0-9_-]", "_", tool.name)[:64]
        if name in names:
            say(f"warning: skipping the MCP tool {tool.name!r}: its function name {name!r} is taken")
            continue
        names[name] = tool.name
        schema = dict(tool.input_schema) if tool.input_schema else {"type": "object", "properties": {}}
        functions.append(
            {
                "type": "function",
                "function": {"name": name, "description": tool.description or tool.title or "", "parameters": schema},
            }
        )
    return functions, names


def result_text(result: types.CallToolResult) -> str:
    """The text of a tool result for the model."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        else:
            parts.append(f"[{getattr(block, 'type', 'non-text')} content omitted]")
    if not any(p.strip() for p in parts) and result.structured_content is not None:
        parts = [json.dumps(result.structured_content)]
    text = "\n".join(parts)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"\n[truncated: {len(text)} characters in all]"
    return text


async def run_tool(session: ClientSession, call: ToolCall, names: dict[str, str], timeout: float) -> tuple[bool, str]:
    """Runs one tool call: (True, result text) or (False, an error for the model). Errors the
    model can act on (a denial, a bad argument, a failing tool) come back; a broken MCP
    connection raises."""
    tool = names.get(call.name)
    if tool is None:
        return False, f"there is no tool named {call.name!r}; the tools are: {', '.join(sorted(names))}"
    try:
        arguments = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError as e:
        return False, f"the arguments are not valid JSON ({e}); send a JSON object"
    if not isinstance(arguments, dict):
        return False, "the arguments must be a JSON object"
    try:
        result = await session.call_tool(tool, arguments, read_timeout_seconds=timeout)
    except MCPError as e:
        # Denials by the access profile and unanswered approvals arrive as JSON-RPC errors.
        return False, f"{e.message} (MCP error {e.code})"
    text = result_text(result)
    if result.is_error:
        return False, text or "the tool failed without saying why"
    return True, text


# --- the model -----------------------------------------------------------------------------


def api_error(config: Config, e: openai.OpenAIError) -> AgentError:
    if isinstance(e, openai.APIStatusError):
        body = e.body
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            detail = body["message"]
        elif isinstance(body, str) and body.strip():
            detail = body.strip()
        else:
            detail = e.response.reason_phrase or "no details"
        hint = ""
        if e.status_code in (401, 403):
            hint = " (the key is added outside the agent: check the credential and its grant for this service)"
        return AgentError(f"the model API at {config.base_url} answered {e.status_code}: {detail}{hint}")
    if isinstance(e, openai.APITimeoutError):
        return AgentError(f"the model API at {config.base_url} did not answer in time")
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e
        return AgentError(f"cannot reach the model API at {config.base_url}: {cause}")
    return AgentError(f"the model call failed: {e}")


async def ask_model(
    llm: openai.AsyncOpenAI, config: Config, messages: list[Message], tools: list[dict[str, Any]], turn: int
) -> Answer:
    """One chat completion, streamed or whole; streamed text is shown as it arrives."""
    request: dict[str, Any] = {"model": config.model, "messages": messages}
    if tools:
        request["tools"] = tools
    answer = Answer()
    if not config.stream:
        response = await llm.chat.completions.create(**request)
        if not response.choices:
            raise AgentError("the model API answered without a choice")
        choice = response.choices[0]
        answer.content = choice.message.content or ""
        answer.finish_reason = choice.finish_reason
        answer.usage = response.usage
        for i, tc in enumerate(choice.message.tool_calls or []):
            function = getattr(tc, "function", None)
            if function is None:
                continue
            answer.tool_calls.append(ToolCall(tc.id or f"call_{turn}_{i}", function.name, function.arguments or ""))
        if answer.content:
            say(f"[turn {turn}] assistant: {answer.content}")
        return answer

    stream = await llm.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    calls: dict[int, ToolCall] = {}
    showing = False
    async for chunk in stream:
        if chunk.usage is not None:
            answer.usage = chunk.usage
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta.content:
                if not showing:
                    print(f"[turn {turn}] assistant: ", end="", flush=True)
                    showing = True
                print(delta.content, end="", flush=True)
                answer.content += delta.content
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, ToolCall("", "", ""))
                if piece.id:
                    call.id = piece.id
                if piece.function is not None:
                    call.name += piece.function.name or ""
                    call.arguments += piece.function.arguments or ""
            if choice.finish_reason:
                answer.finish_reason = choice.finish_reason
    if showing:
        print(flush=True)
    for index in sorted(calls):
        call = calls[index]
        answer.tool_calls.append(ToolCall(call.id or f"call_{turn}_{index}", call.name, call.arguments))
    return answer


# --- the loop ------------------------------------------------------------------------------


async def converse(config: Config, session: ClientSession) -> str:
    tools = await list_tools(session)
    functions, names = function_tools(tools)
    say(f"tools: {', '.join(t.name for t in tools) or '(none)'}")
    messages: list[Message] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": config.task},
    ]
    http = openai.DefaultAsyncHttpxClient(trust_env=not is_loopback(config.base_url))
    async with openai.AsyncOpenAI(
        api_key=API_KEY_PLACEHOLDER,
        base_url=config.base_url,
        max_retries=config.max_retries,
        http_client=http,
    ) as llm:
        for turn in range(1, config.max_turns + 1):
            try:
                answer = await ask_model(llm, config, messages, functions, turn)
            except openai.OpenAIError as e:
                raise api_error(config, e) from None
            if answer.usage is not None:
                say(
                    f"[turn {turn}] usage: {answer.usage.prompt_tokens} prompt + "
                    f"{answer.usage.completion_tokens} completion tokens"
                )
            if answer.finish_reason == "length":
                say(f"[turn {turn}] warning: the answer was cut at the model's length limit")
            assistant: Message = {"role": "assistant", "content": answer.content or None}
            if answer.tool_calls:
                assistant["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in answer.tool_calls
                ]
            messages.append(assistant)
            if not answer.tool_calls:
                if not answer.content.strip():
                    raise AgentError("the model answered with neither text nor tool calls")
                return answer.content
            for call in answer.tool_calls:
                say(f"[turn {turn}] call {call.name} {call.arguments or '{}'}")
                ok, text = await run_tool(session, call, names, config.tool_timeout)
                say(f"[turn {turn}] {'result' if ok else 'error'} {call.name}: {shorten(text)}")
                content = text if ok else f"error: {text}"
                messages.append({"role": "tool", "tool_call_id": call.id, "content": content})
    raise AgentError(f"no final answer after {config.max_turns} model calls")


def leaves(error: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]


async def run(config: Config) -> str:
    try:
        async with mcp_session(config.mcp_url) as session:
            return await converse(config, session)
    except Exception as error:  # the MCP transport wraps what ends it in exception groups
        found = leaves(error)
        for leaf in found:
            if isinstance(leaf, AgentError):
                raise leaf from None
        leaf = found[0]
        if isinstance(leaf, httpx2.ConnectError):
            raise AgentError(f"cannot reach the MCP endpoint {config.mcp_url}: {leaf}") from None
        if isinstance(leaf, httpx2.HTTPError):
            raise AgentError(f"the MCP endpoint {config.mcp_url} failed: {type(leaf).__name__}: {leaf}") from None
        if isinstance(leaf, MCPError):
            raise AgentError(f"the MCP endpoint {config.mcp_url} answered an error: {leaf.message}") from None
        raise AgentError(f"unexpected failure: {type(leaf).__name__}: {leaf}") from leaf


def main(argv: list[str]) -> int:
    try:
        config = config_from(argv)
    except ConfigError as e:
        print(f"agent: {e}", file=sys.stderr)
        return 2
    say(
        f"agent: model {config.model} at {config.base_url} "
        f"({'streaming' if config.stream else 'not streaming'}), tools from {config.mcp_url}"
    )
    say(f"task: {config.task}")
    try:
        final = asyncio.run(run(config))
    except AgentError as e:
        print(f"agent: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("agent: interrupted", file=sys.stderr)
        return 130
    say(f"final answer: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
