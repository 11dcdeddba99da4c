"""Which strings of an OpenAI request or reply carry text, and rewriting them in place (no mitmproxy).

One walker serves every shape (Chat, Responses, their stream events, trace uploads, unknown bodies):
it is exhaustive by construction. A string under a known structural key (ids, types, enums) passes;
every other string leaf is text and goes through the mask. Two kinds of field are handled apart:
- JSON held in a string (tool-call ``arguments``): its own string leaves are masked, it stays JSON;
- shadows of text (``logprobs``, ``top_logprobs``): token lists that spell the text beside them. They
  cannot be masked consistently, so they are kept untouched when masking left their text alone and
  dropped (null, or [] where the API has a list) when it changed anything in the same object.
"""

from __future__ import annotations

import json as _json
import re
from collections.abc import Callable
from typing import Any

from auditgate.core.inline_content import InlineContent, read_data_url, read_file_data
from auditgate.core.prompt_text import PromptTexts
from auditgate.core.strict_json import loads_strict

# mask(text, path) -> replacement text. Paths name fields like "output[0].content[0].text".
MaskFn = Callable[[str, str], str]

# Keys whose string values are structure, never prose: ids, types, enums, names a client dispatches on.
# Only a string (or number) under them passes; a list or object under them is walked like any other.
STRUCTURAL_KEYS = frozenset({
    "id", "object", "type", "role", "status", "model", "call_id", "item_id", "tool_call_id", "response_id",
    "previous_response_id", "finish_reason", "system_fingerprint", "service_tier", "encoding_format",
    "tool_choice", "created", "created_at", "index", "format", "detail", "truncation", "name",
    "file_id", "trace_id", "span_id", "parent_id", "group_id", "started_at", "ended_at", "param",
    "effort", "verbosity", "voice", "sequence_number", "output_index", "content_index", "summary_index",
    "annotation_index", "logprob", "completed_at", "reason", "phase", "vector_store_id",
})
# Text-shaped shadows of the text beside them (see the module docstring): kept or dropped, never walked.
SHADOW_KEYS = frozenset({"logprobs", "top_logprobs"})
# Strings that hold a JSON document (tool-call arguments): masked leaf by leaf so they stay JSON.
JSON_STRING_KEYS = frozenset({"arguments"})
# Binary payloads (images, audio, files as base64): long single-line runs of the base64 alphabet.
# Masking skips them: too costly to scan, and a run of word characters has no word edge inside for a
# recognizer to bound a value by. Line breaks make it text (a list of card numbers one per line is
# not a payload; JSON APIs never wrap their base64). Policy reads every run all the same (see
# read_request_texts): a secret needs no word edge before it.
_BASE64_BLOB = re.compile(r"(?:data:[\w.+-]+/[\w.+-]+(?:;[\w=.-]+)*;base64,)?[A-Za-z0-9+/]+=*")
_BLOB_MIN = 1024
# json.dumps(value, ensure_ascii=False) without building its encoder on every call (same class, same arguments).
_ENCODER = _json.JSONEncoder(ensure_ascii=False)
# Keys of the API's own request shape (and JSON Schema's): fixed words that carry no caller text.
# Every other object key (a tool schema's property names, metadata keys, keys of unknown bodies) is
# caller-chosen text the model reads, and policy reads it (masking does not rewrite keys).
API_FIELD_KEYS = frozenset({
    "input", "instructions", "messages", "content", "text", "tools", "functions", "function", "parameters",
    "strict", "description", "temperature", "top_p", "max_tokens", "max_output_tokens", "max_completion_tokens",
    "stream", "stream_options", "include_usage", "store", "metadata", "user", "n", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "parallel_tool_calls", "response_format",
    "json_schema", "schema", "reasoning", "summary", "include", "background", "prompt", "variables", "version",
    "modalities", "audio", "input_audio", "data", "image_url", "url", "file", "file_data", "filename", "file_url",
    "output", "refusal", "annotations", "tool_calls", "function_call", "session", "response", "item", "event_id",
    "conversation", "prompt_cache_key", "safety_identifier", "max_tool_calls", "server_label", "server_url",
    "server_description", "headers", "require_approval", "allowed_tools", "container", "code", "queries",
    "results", "action", "environment", "display_width", "display_height", "acknowledged_safety_checks",
    "pending_safety_checks", "message", "error", "usage", "turn_detection", "input_audio_format",
    "output_audio_format", "input_audio_transcription", "output_modalities", "arguments", "encrypted_content",
    "dimensions", "user_location", "search_context_size", "filters", "ranking_options", "max_num_results",
    "vector_store_ids", "web_search_options", "prediction", "audio_url", "transcript", "language",
    "properties", "required", "items", "enum", "additionalProperties", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "default", "title", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "pattern", "const", "nullable", "examples",
}) | STRUCTURAL_KEYS | SHADOW_KEYS | JSON_STRING_KEYS


def is_encoded_blob(value: str) -> bool:
    """A long base64 payload on one line (a data URL's included): no text masking could find in it."""
    return len(value) >= _BLOB_MIN and _BASE64_BLOB.fullmatch(value) is not None


class _Walk:
    """One walk over a JSON value: masks every text leaf and counts the leaves masking changed."""

    __slots__ = ("mask", "changed")
    reads_keys = False  # masking leaves keys as sent; the policy read (read_request_texts) reads them

    def __init__(self, mask: MaskFn) -> None:
        self.mask = mask
        self.changed = 0

    def key(self, key: str) -> None:
        """An object key (called only when reads_keys)."""

    def text(self, value: str, path: str) -> str:
        if not value or is_encoded_blob(value):
            return value
        masked = self.mask(value, path)
        if masked != value:
            self.changed += 1
        return masked

    def json_text(self, value: str, path: str) -> str:
        """A JSON document in a string: its string leaves masked, still valid JSON."""
        try:
            # Strict: with a key twice, the whole string is text (a parse keeping one value would hide the other).
            parsed = loads_strict(value)
        except (ValueError, TypeError):
            return self.text(value, path)  # not JSON (yet): treat as text
        before = self.changed
        masked = _mask_all(parsed, path, self)  # JSON the model wrote: even its "id" or "name" is data
        if self.changed == before:
            return value
        return _ENCODER.encode(masked)

    def value(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self.text(value, path)
        if isinstance(value, list):
            return [self.value(v, f"{path}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return self.object(value, path)
        return value

    def object(self, value: dict, path: str) -> dict:
        before = self.changed
        out: dict = {}
        shadows = []
        reads_keys = self.reads_keys
        prefix = f"{path}." if path else ""
        for key, item in value.items():
            if reads_keys:
                self.key(key)
            if key in SHADOW_KEYS:
                shadows.append(key)
                out[key] = item
            elif not isinstance(item, (str, dict, list)):  # a number, true/false or null: no text in it
                out[key] = item
            elif key in STRUCTURAL_KEYS and isinstance(item, str):
                out[key] = item
            elif key in JSON_STRING_KEYS and isinstance(item, str):
                out[key] = self.json_text(item, prefix + key if type(key) is str else _join(path, key))
            else:
                out[key] = self.value(item, prefix + key if type(key) is str else _join(path, key))
        if shadows and self.changed != before:
            for key in shadows:
                out[key] = drop_shadow(value[key])
        return out


def drop_shadow(value: Any) -> Any:
    """What a logprobs field becomes when its text was masked: empty, in the shape the API uses."""
    return [] if isinstance(value, list) else None


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
    """Every text leaf of a JSON value, masked (structural keys pass; logprobs of masked text dropped).

    skip_structural=False masks every string leaf, structural keys included (JSON written by the model).
    """
    walk = _Walk(mask)
    if skip_structural:
        return walk.value(value, path)
    return _mask_all(value, path, walk)


def _mask_all(value: Any, path: str, walk: _Walk) -> Any:
    if isinstance(value, str):
        return walk.text(value, path)
    if isinstance(value, list):
        return [_mask_all(v, _join(path, i), walk) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if walk.reads_keys:
            for k in value:
                walk.key(k)
        return {k: _mask_all(v, _join(path, k), walk) for k, v in value.items()}
    return value


def mask_json_string(text: str, path: str, mask: MaskFn) -> str:
    """Tool-call arguments: a JSON document in a string. Mask its string leaves so it stays valid JSON."""
    return _Walk(mask).json_text(text, path)


def mask_output_item(item: Any, path: str, mask: MaskFn) -> Any:
    """One item of a Responses API `output` (or `input`) list: every text leaf."""
    return _Walk(mask).value(item, path)


def mask_response_payload(payload: Any, kind: str, mask: MaskFn) -> Any:
    """A reply body: every text leaf, whatever its shape (embeddings and model lists carry no model text)."""
    if kind in ("embeddings", "models"):
        return payload
    return _Walk(mask).value(payload, "")


def mask_request_payload(payload: Any, kind: str, mask: MaskFn) -> Any:
    """A request body: every text leaf (instructions, input items, messages, tools and their descriptions,
    prompt variables, tool outputs, metadata); the same walk gives policy its prompt texts."""
    return _Walk(mask).value(payload, "")


# ---- what policy reads ---------------------------------------------------------------------------------
class _PolicyRead(_Walk):
    """The walk that gives policy its texts: every text leaf (long base64 included), the caller's object
    keys, inline files decoded; images and audio noted, content the gateway cannot read noted apart."""

    __slots__ = ("texts", "keys", "unreadable", "media", "_filename")
    reads_keys = True

    def __init__(self) -> None:
        super().__init__(_unchanged)
        self.texts: list[str] = []
        self.keys: dict[str, None] = {}  # distinct, in order
        self.unreadable: list[str] = []
        self.media: list[str] = []
        self._filename: str | None = None

    def key(self, key: str) -> None:
        if key not in API_FIELD_KEYS and key:
            self.keys[key] = None

    def object(self, value: dict, path: str) -> dict:
        if "file_data" not in value:
            return super().object(value, path)
        saved, name = self._filename, value.get("filename")
        self._filename = name if isinstance(name, str) else None
        try:
            return super().object(value, path)
        finally:
            self._filename = saved

    def text(self, value: str, path: str) -> str:
        if not value:
            return value
        field = path.rpartition(".")[2]
        if field == "file_data":
            self._inline(read_file_data(value, self._filename))
        elif field == "file_url":
            self.unreadable.append("a file the upstream fetches by URL")
        elif field == "data" and path.endswith("input_audio.data"):
            self.media.append("audio")
        elif (content := read_data_url(value, self._filename)) is not None:
            self._inline(content)
        else:
            self.texts.append(value)
        return value

    def _inline(self, content: InlineContent) -> None:
        if content.kind == "text":
            if content.text:
                self.texts.append(content.text)
        elif content.kind == "media":
            self.media.append(content.media_type)
        else:
            self.unreadable.append(content.media_type)


def _unchanged(text: str, path: str) -> str:
    return text


def read_request_texts(payload: Any) -> PromptTexts:
    """What policy reads of a request body or client event: every text leaf but structural ones (long
    base64 runs too), inline text files decoded, the object keys the caller chose; with the content it
    cannot read (PDF, binary, files by URL) and the media it does not read (images, audio) noted."""
    walk = _PolicyRead()
    if payload is not None:
        walk.value(payload, "")
    return PromptTexts(walk.texts, keys=tuple(walk.keys), unreadable=tuple(walk.unreadable),
                       media=tuple(walk.media))
