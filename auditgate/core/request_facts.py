"""What a request is about, parsed once per flow and read by authorization, policy, approval, masking and audit.

    facts = facts_of(flow)          # the same object for every addon that asks about this flow
    facts.endpoint, facts.model, facts.prompt_texts, facts.tool_names, facts.content_type

The costly facts (the JSON body, the prompt texts, the tools) are worked out on first use only,
then kept. If an addon replaces the body (request masking, an edit in mitmweb while a request is
held for approval), the next ``facts_of`` parses the new body: facts never describe bytes that are
no longer the ones going upstream. No mitmproxy import: a flow is anything with ``.request``.
"""

from __future__ import annotations

import codecs
import re
import weakref
from email.parser import BytesParser
from email.policy import HTTP
from functools import cached_property
from typing import Any
from urllib.parse import parse_qsl

from auditgate.core.prompt_text import PromptTexts
from auditgate.core.strict_json import DuplicateKeyError, loads_strict
from auditgate.masking.payload import endpoint_kind, read_request_texts

JSON_PARSE_LIMIT = 256 * 1024  # the model of a larger body that nobody parsed is found by a scan
_MODEL_PATTERN = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([^\s\";]+)", re.IGNORECASE)


class BodyNotDecodable(ValueError):
    """A request body whose text the gateway cannot read: refused (never passed) by policy."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _unsupported(message: str) -> BodyNotDecodable:
    return BodyNotDecodable(415, "gateway_unsupported_media_type", message)


def _bad(message: str) -> BodyNotDecodable:
    return BodyNotDecodable(400, "gateway_bad_request", message)


def _charset(content_type: str, default: str = "utf-8") -> str:
    """The codec a content type names (default UTF-8); an unknown one is refused, not guessed."""
    match = _CHARSET.search(content_type)
    name = match.group(1) if match else default
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise _unsupported(f"the request body's charset {name!r} is not one the gateway can read") from None


def _decode(data: bytes, charset: str, what: str) -> str:
    try:
        return data.decode(charset)  # strict: one undecodable byte anywhere refuses the whole body
    except UnicodeDecodeError:
        raise _bad(f"the {what} is not valid {charset}, so the gateway cannot inspect it") from None


def _is_text_type(media: str) -> bool:
    return media.startswith("text/") or "json" in media or media in ("", "application/xml")


def media_type(content_type: str) -> str:
    """'application/json; charset=utf-8' → 'application/json': the one content-type parser of the bundle."""
    return content_type.split(";", 1)[0].strip().lower()


def header_value(headers, name: bytes, default: str = "") -> str:
    """``headers.get(name, default)`` of a mitmproxy Headers object, for a lower-case ``name``, in one
    pass over its fields (the same value: several fields folded with ", ", decoded as mitmproxy does)."""
    fields = getattr(headers, "fields", None)
    if fields is None:  # not mitmproxy's Headers (a test's plain mapping): asked as before
        return headers.get(name.decode("latin-1"), default)
    values = [value for key, value in fields if key.lower() == name]
    if not values:
        return default
    return ", ".join(value.decode("utf-8", "surrogateescape") for value in values)


def is_event_stream(message) -> bool:
    """A mitmproxy request or response whose body is a server-sent event stream."""
    return media_type(header_value(message.headers, b"content-type")) == "text/event-stream"


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
    def _read(self) -> tuple[Any, list[str] | None, BodyNotDecodable | None]:
        """(JSON payload or None, the texts of a body that is not JSON or None, why it cannot be read)."""
        try:
            return self._read_body()
        except BodyNotDecodable as e:
            return None, None, e

    def _read_body(self) -> tuple[Any, list[str] | None, None]:
        if not self.source:
            return None, None, None
        text_type = self.is_json or self.is_form or _is_text_type(self.content_type)
        if not text_type:
            return None, [], None  # binary (audio, images, files): no prompt text to read
        try:
            data = self._request.get_content(strict=True)
        except ValueError:
            raise _unsupported("the request body's content-encoding cannot be decoded") from None
        raw_type = self._request.headers.get("content-type", "")
        if self.content_type == "multipart/form-data":
            return None, _multipart_texts(raw_type, data), None
        text = _decode(data, _charset(raw_type), "request body")
        if self.content_type == "application/x-www-form-urlencoded":
            try:
                fields = parse_qsl(text, keep_blank_values=True, encoding=_charset(raw_type), errors="strict")
            except (UnicodeDecodeError, ValueError):
                raise _bad("a form field of the request body is not valid text") from None
            return None, [v for pair in fields for v in pair if v], None
        if self.is_json:
            try:
                return loads_strict(text), None, None
            except DuplicateKeyError:
                # Policy would decide on one value while the upstream may read the other: never read.
                raise _bad("the request body's JSON names the same key twice in one object") from None
            except ValueError:
                if self.content_type:  # declared JSON: what the upstream would read cannot be known
                    raise _bad("the request body is not valid JSON") from None
        return None, [text] if text else [], None

    @property
    def decode_error(self) -> BodyNotDecodable | None:
        """Why the body's text cannot be read (refused by policy), or None."""
        return self._read[2]

    @property
    def payload(self) -> Any:
        """The body as JSON, or None (empty, not JSON, or not decodable)."""
        return self._read[0]

    @cached_property
    def model(self) -> str | None:
        """The "model" the request names: a JSON field, or a form field (audio and image uploads)."""
        if self.is_form:
            return self._form_model()
        if not self.source or not self.is_json:
            return None
        if "_read" not in self.__dict__ and self.body_size > JSON_PARSE_LIMIT and (
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
    def prompt_texts(self) -> PromptTexts:
        """Every text of the request: a JSON body's text leaves and keys and inline text files, a text
        body, form fields' values; with its joined and normalized forms (see core.prompt_text)."""
        payload, texts, _ = self._read
        return PromptTexts(texts) if texts is not None else prompt_texts(payload, self.endpoint)

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


def prompt_texts(payload: Any, endpoint: str = "") -> PromptTexts:
    """The prompt text policy reads: every text masking looks at (instructions, input, messages, tool
    outputs, long base64 runs too), the caller's object keys, inline text files decoded; content it
    cannot read noted (``.unreadable``). The same walker for every endpoint (and WebSocket events)."""
    return read_request_texts(payload)


def _multipart_texts(content_type: str, data: bytes) -> list[str]:
    """The text of every form field, and of every uploaded file in a text type (a JSONL batch file)."""
    message = BytesParser(policy=HTTP).parsebytes(b"content-type: " + content_type.encode("latin-1") + b"\r\n\r\n" + data)
    if not message.is_multipart() or message.defects:
        raise _bad("the multipart request body cannot be parsed")
    texts = []
    for part in message.iter_parts():
        media = part.get_content_type()
        if part.get_filename() is not None and not (media.startswith("text/") or "json" in media):
            continue  # an uploaded binary file (audio, image): no prompt text
        charset = _charset(f"; charset={part.get_content_charset()}" if part.get_content_charset() else "")
        text = _decode(part.get_payload(decode=True) or b"", charset, "multipart field")
        if text:
            texts.append(text)
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
