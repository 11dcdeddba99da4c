"""Which strings of an OpenAI request or reply carry text, and rewriting them in place (no mitmproxy)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

# mask(text, path) -> replacement text. Paths name fields like "output[0].content[0].text".
MaskFn = Callable[[str, str], str]

# Keys whose string values are structure, never prose: left alone even in unknown shapes.
STRUCTURAL_KEYS = frozenset({
    "id", "object", "type", "role", "status", "model", "call_id", "item_id", "tool_call_id", "response_id",
    "previous_response_id", "finish_reason", "system_fingerprint", "service_tier", "encoding_format",
    "tool_choice", "created", "created_at", "index", "logprobs", "format", "detail", "truncation",
})


def endpoint_kind(path: str) -> str:
    """The API an upstream path belongs to, which decides the shape of its bodies."""
    path = path.split("?", 1)[0].rstrip("/")
    if path.endswith("/traces/ingest"):
        return "traces"
    if path.endswith("/responses") or "/responses/" in path:
        return "responses"
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/models") or "/models/" in path:
        return "models"
    return "other"


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def mask_leaves(value: Any, path: str, mask: MaskFn, skip_structural: bool = True) -> Any:
    """Every string leaf of a JSON value, masked (structural keys skipped)."""
    if isinstance(value, str):
        return mask(value, path)
    if isinstance(value, list):
        return [mask_leaves(v, _join(path, i), mask, skip_structural) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {
            k: v if (skip_structural and k in STRUCTURAL_KEYS) else mask_leaves(v, _join(path, k), mask, skip_structural)
            for k, v in value.items()
        }
    return value


def mask_json_string(text: str, path: str, mask: MaskFn) -> str:
    """Tool-call arguments: a JSON document in a string. Mask its string leaves so it stays valid JSON."""
    try:
        parsed = json.loads(text)
    except (ValueError, TypeError):
        return mask(text, path)  # not JSON (yet): treat as text
    if isinstance(parsed, str):
        masked = mask(parsed, path)
        return text if masked == parsed else json.dumps(masked, ensure_ascii=False)
    masked = mask_leaves(parsed, path, mask, skip_structural=False)
    return text if masked == parsed else json.dumps(masked, ensure_ascii=False)


def _mask_content_parts(parts: Any, path: str, mask: MaskFn) -> Any:
    if isinstance(parts, str):
        return mask(parts, path)
    if not isinstance(parts, list):
        return mask_leaves(parts, path, mask)
    out = []
    for i, part in enumerate(parts):
        p = _join(path, i)
        if isinstance(part, dict):
            part = dict(part)
            for field in ("text", "refusal", "transcript"):
                if isinstance(part.get(field), str):
                    part[field] = mask(part[field], _join(p, field))
        elif isinstance(part, str):
            part = mask(part, p)
        out.append(part)
    return out


def mask_output_item(item: Any, path: str, mask: MaskFn) -> Any:
    """One item of a Responses API `output` (or `input`) list."""
    if not isinstance(item, dict):
        return mask_leaves(item, path, mask)
    item = dict(item)
    kind = item.get("type")
    if kind == "message" or ("role" in item and "content" in item):
        item["content"] = _mask_content_parts(item.get("content"), _join(path, "content"), mask)
    elif kind in ("function_call", "mcp_call") and isinstance(item.get("arguments"), str):
        item["arguments"] = mask_json_string(item["arguments"], _join(path, "arguments"), mask)
        if isinstance(item.get("output"), str):
            item["output"] = mask(item["output"], _join(path, "output"))
    elif kind == "custom_tool_call" and isinstance(item.get("input"), str):
        item["input"] = mask(item["input"], _join(path, "input"))
    elif kind in ("function_call_output", "custom_tool_call_output"):
        item["output"] = _mask_content_parts(item.get("output"), _join(path, "output"), mask)
    elif kind == "reasoning":
        for field in ("summary", "content"):
            if field in item:
                item[field] = _mask_content_parts(item[field], _join(path, field), mask)
    else:
        # Unknown item types (search results, computer actions, ...): never pass unmasked.
        item = mask_leaves(item, path, mask)
    return item


def _mask_responses_object(payload: dict, mask: MaskFn) -> dict:
    payload = dict(payload)
    if isinstance(payload.get("output"), list):
        payload["output"] = [mask_output_item(item, f"output[{i}]", mask) for i, item in enumerate(payload["output"])]
    if isinstance(payload.get("error"), dict) and isinstance(payload["error"].get("message"), str):
        payload["error"] = dict(payload["error"], message=mask(payload["error"]["message"], "error.message"))
    return payload


def _mask_chat_message(message: Any, path: str, mask: MaskFn) -> Any:
    if not isinstance(message, dict):
        return mask_leaves(message, path, mask)
    message = dict(message)
    if "content" in message and message["content"] is not None:
        message["content"] = _mask_content_parts(message["content"], _join(path, "content"), mask)
    for field in ("refusal", "reasoning_content"):
        if isinstance(message.get(field), str):
            message[field] = mask(message[field], _join(path, field))
    if isinstance(message.get("tool_calls"), list):
        calls = []
        for i, call in enumerate(message["tool_calls"]):
            call = dict(call) if isinstance(call, dict) else call
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                call["function"] = dict(function, arguments=mask_json_string(
                    function["arguments"], _join(_join(_join(path, "tool_calls"), i), "function.arguments"), mask))
            calls.append(call)
        message["tool_calls"] = calls
    function_call = message.get("function_call")
    if isinstance(function_call, dict) and isinstance(function_call.get("arguments"), str):
        message["function_call"] = dict(function_call, arguments=mask_json_string(
            function_call["arguments"], _join(path, "function_call.arguments"), mask))
    if isinstance(message.get("audio"), dict) and isinstance(message["audio"].get("transcript"), str):
        message["audio"] = dict(message["audio"], transcript=mask(message["audio"]["transcript"], _join(path, "audio.transcript")))
    return message


def _mask_chat_completion(payload: dict, mask: MaskFn) -> dict:
    payload = dict(payload)
    choices = []
    for i, choice in enumerate(payload.get("choices") or []):
        choice = dict(choice)
        for field in ("message", "delta"):
            if field in choice:
                choice[field] = _mask_chat_message(choice[field], f"choices[{i}].{field}", mask)
        choices.append(choice)
    payload["choices"] = choices
    return payload


def mask_response_payload(payload: Any, kind: str, mask: MaskFn) -> Any:
    """A reply body: only text-bearing fields of known shapes; every string leaf of unknown ones."""
    if kind in ("embeddings", "models"):
        return payload  # vectors and model lists carry no text from the model
    if isinstance(payload, dict) and payload.get("object") == "response":
        return _mask_responses_object(payload, mask)
    if isinstance(payload, dict) and payload.get("object") in ("chat.completion", "chat.completion.chunk"):
        return _mask_chat_completion(payload, mask)
    return mask_leaves(payload, "", mask)


def mask_request_payload(payload: Any, kind: str, mask: MaskFn) -> Any:
    """A request body: prompts, instructions, messages and tool outputs; unknown shapes: every string leaf."""
    if kind == "embeddings" and isinstance(payload, dict):
        return dict(payload, input=mask_leaves(payload.get("input"), "input", mask))
    if kind == "responses" and isinstance(payload, dict):
        payload = dict(payload)
        if isinstance(payload.get("instructions"), str):
            payload["instructions"] = mask(payload["instructions"], "instructions")
        value = payload.get("input")
        if isinstance(value, str):
            payload["input"] = mask(value, "input")
        elif isinstance(value, list):
            payload["input"] = [mask_output_item(item, f"input[{i}]", mask) for i, item in enumerate(value)]
        return payload
    if kind == "chat" and isinstance(payload, dict):
        payload = dict(payload)
        payload["messages"] = [
            _mask_chat_message(m, f"messages[{i}]", mask) for i, m in enumerate(payload.get("messages") or [])
        ]
        return payload
    return mask_leaves(payload, "", mask)
