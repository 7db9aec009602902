"""Tool calling for a model without tool tokens (Gemma): OpenAI's `tools` as text, calls as JSON.

Gemma's chat format has user and model turns only, so (as Google's function-calling guide for
Gemma does) the tools are described in the first user turn, a call is the model's answer as one
JSON object `{"name": ..., "arguments": {...}}`, the model's earlier calls are that JSON in its
turns, and tool results are user turns. `tool_choice` "required" or a named function constrains
the answer to such an object, with that tool's `parameters` as the arguments' schema (grammar.py:
the call always parses and validates); "auto" lets the model choose, and an answer that is such
an object naming a tool is a call; "none" leaves the tools out. One call per answer.
"""

from __future__ import annotations

import json
import re
import uuid

from .protocol import APIError, ChatMessage, Tool

_INSTRUCTIONS = ("You can call these functions (a JSON schema gives each one's arguments):\n{tools}\n\n"
                 "To call one, answer with only a JSON object of the form "
                 '{{"name": <function name>, "arguments": <its arguments>}} and nothing else. '
                 "When no call is needed, answer normally.")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def chosen(tools: list[Tool] | None, tool_choice) -> tuple[list[Tool], str]:
    """The tools the model may call (none for "none") and how: "none", "auto" or "required" (a
    named choice is "required" with that tool alone)."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return [], "none"
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique", param="tools")
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(400, 'tool_choice must be "none", "auto", "required" or '
                                '{"type": "function", "function": {"name": ...}}', param="tool_choice")
        if name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return [t for t in tools if t.function.name == name], "required"
    if tool_choice == "none":
        return [], "none"
    return list(tools), tool_choice or "auto"


def messages(messages: list[ChatMessage], tools: list[Tool]) -> list[dict]:
    """The conversation as Gemma's turns ({"role", "content"} each): tool calls and results as
    text, consecutive turns of one side joined, the tools described before the first user turn."""
    turns: list[dict] = []
    for i, m in enumerate(messages):
        role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
        text = m.text()
        if m.role == "tool":
            text = f"Result of the function call{f' {m.tool_call_id}' if m.tool_call_id else ''}:\n{text}"
        if m.role == "assistant" and m.tool_calls:
            calls = [_call_text(c.function, i) for c in m.tool_calls]
            text = "\n".join(filter(None, [text, *calls]))
        if turns and turns[-1]["role"] == role and role != "system":
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    if tools:
        described = _INSTRUCTIONS.format(tools="\n".join(json.dumps(_spec(t)) for t in tools))
        first = next((t for t in turns if t["role"] == "user"), None)
        if first is None:
            raise APIError(400, "messages need a user message", param="messages")
        first["content"] = f"{described}\n\n{first['content']}"
    return turns


def call_schema(tools: list[Tool]) -> dict:
    """The JSON schema of one call of one of `tools`."""
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "arguments": t.function.parameters or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parse(text: str, tools: list[Tool]) -> list[dict] | None:
    """The call an answer makes, as OpenAI's `tool_calls`; None if it makes none."""
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced[1]
    try:
        call = json.loads(text)
    except ValueError:
        return None
    names = {t.function.name for t in tools}
    if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict)):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}]


def may_be_call(text: str) -> bool:
    """Whether an answer that starts with `text` may still turn out to be a call (a stream holds
    it back until it knows)."""
    start = text.lstrip()
    return not start or start[0] in "{`"


def _spec(tool: Tool) -> dict:
    f = tool.function
    return {"name": f.name, **({"description": f.description} if f.description else {}),
            "parameters": f.parameters or {"type": "object", "properties": {}}}


def _call_text(function: dict, i: int) -> str:
    name, arguments = function.get("name"), function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        raise APIError(400, f"messages[{i}].tool_calls: arguments must be a JSON string", param="messages") from None
    return json.dumps({"name": name, "arguments": arguments})
