"""What a request is about, parsed once per flow and read by authorization, policy, approval, masking and audit.

    facts = facts_of(flow)          # the same object for every addon that asks about this flow
    facts.endpoint, facts.model, facts.prompt_texts, facts.tool_names, facts.content_type

The costly facts (the JSON body, the prompt texts, the tools) are worked out on first use only,
then kept. If an addon replaces the body (request masking, an edit in mitmweb while a request is
held for approval), the next ``facts_of`` parses the new body: facts never describe bytes that are
no longer the ones going upstream. No mitmproxy import: a flow is anything with ``.request``.
"""

from __future__ import annotations

import json
import re
import weakref
from functools import cached_property
from typing import Any

from auditgate.masking.payload import endpoint_kind, mask_request_payload

JSON_PARSE_LIMIT = 256 * 1024  # the model of a larger body that nobody parsed is found by a scan
_MODEL_PATTERN = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def media_type(content_type: str) -> str:
    """'application/json; charset=utf-8' → 'application/json': the one content-type parser of the bundle."""
    return content_type.split(";", 1)[0].strip().lower()


def is_event_stream(message) -> bool:
    """A mitmproxy request or response whose body is a server-sent event stream."""
    return media_type(message.headers.get("content-type", "")) == "text/event-stream"


class RequestFacts:
    """Facts about one request as it stands; the costly ones are computed when first read."""

    def __init__(self, request) -> None:
        self._request = request
        self.source = request.raw_content  # the bytes these facts describe
        self.method: str = request.method
        self.path: str = request.path.split("?", 1)[0]
        self.endpoint: str = endpoint_kind(self.path)
        self.content_type: str = media_type(request.headers.get("content-type", ""))
        self.body_size: int = len(self.source or b"")

    @property
    def is_json(self) -> bool:
        """A body that is (or, with no content type, may be) JSON."""
        return not self.content_type or "json" in self.content_type

    @property
    def is_form(self) -> bool:
        return self.content_type in FORM_TYPES

    @cached_property
    def payload(self) -> Any:
        """The body as JSON, or None (empty, not JSON, or not decodable)."""
        if not self.source or not self.is_json:
            return None
        try:
            return json.loads(self._request.get_content(strict=False))
        except (ValueError, UnicodeDecodeError):
            return None

    @cached_property
    def model(self) -> str | None:
        """The "model" the request names: a JSON field, or a form field (audio and image uploads)."""
        if self.is_form:
            return self._form_model()
        if not self.source or not self.is_json:
            return None
        if "payload" not in self.__dict__ and self.body_size > JSON_PARSE_LIMIT and (
                "content-encoding" not in self._request.headers):
            # A long conversation that no rule needed parsed: its first "model" is taken, not parsed for.
            match = _MODEL_PATTERN.search(self.source)
            return match.group(1).decode("utf-8", "replace")[:256] if match else None
        value = self.payload.get("model") if isinstance(self.payload, dict) else None
        return value[:256] if isinstance(value, str) and value else None

    def _form_model(self) -> str | None:
        try:
            if self.content_type == "multipart/form-data":
                value = self._request.multipart_form.get(b"model")
            else:
                value = self._request.urlencoded_form.get("model")
        except (ValueError, AttributeError):
            return None
        value = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return value if isinstance(value, str) and value else None

    @cached_property
    def prompt_texts(self) -> list[str]:
        return prompt_texts(self.payload, self.endpoint)

    @cached_property
    def tool_names(self) -> list[str]:
        return tool_names(self.payload)


_facts: weakref.WeakKeyDictionary[Any, RequestFacts] = weakref.WeakKeyDictionary()


def facts_of(flow) -> RequestFacts:
    """The facts of a flow's request, parsed at most once per version of its body."""
    facts = _facts.get(flow)
    if facts is None or facts.source is not flow.request.raw_content:
        facts = _facts[flow] = RequestFacts(flow.request)
    return facts


def prompt_texts(payload: Any, endpoint: str) -> list[str]:
    """Exactly the prompt text masking would look at: instructions, input, messages, tool outputs."""
    texts: list[str] = []

    def collect(value: str, path: str) -> str:
        if value:
            texts.append(value)
        return value

    if payload is not None:
        mask_request_payload(payload, endpoint, collect)
    return texts


def tool_names(payload: Any) -> list[str]:
    """The tools a request offers (tools, functions) or has called (earlier tool calls in its input)."""
    names: list[str] = []
    if not isinstance(payload, dict):
        return names

    def add(value: Any) -> None:
        if isinstance(value, str) and value:
            names.append(value.lower())

    for tool in _list(payload.get("tools")):
        if isinstance(tool, dict):
            function = tool.get("function") if isinstance(tool.get("function"), dict) else {}
            name = tool.get("name") or function.get("name")
            # Built-in tools have no name: their type is what they are (local_shell, computer_use, ...).
            add(name if name else tool.get("type"))
            if tool.get("type") == "mcp":
                add(tool.get("server_label"))
    for function in _list(payload.get("functions")):
        if isinstance(function, dict):
            add(function.get("name"))
    for item in _list(payload.get("input")):
        if isinstance(item, dict) and str(item.get("type", "")).endswith("_call"):
            add(item.get("name") or item.get("type"))
    for message in _list(payload.get("messages")):
        if isinstance(message, dict):
            for call in _list(message.get("tool_calls")):
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    add(call["function"].get("name"))
            if isinstance(message.get("function_call"), dict):
                add(message["function_call"].get("name"))
    return list(dict.fromkeys(names))


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []
