"""Files and media a request carries inline (data URLs, base64 ``file_data``): what policy can read of them.

The model reads an inline file, so policy must read it too. Each inline value is one of:
- ``text``: bytes the gateway can read as text (a text, JSON, CSV, Markdown... file that decodes as
  UTF-8, or UTF-16 with a BOM): policy reads the decoded text like any prompt text;
- ``media``: an image or audio clip (``data:image/...``, ``data:audio/...``, a chat ``input_audio``):
  passed, not read (no rule can read a picture or speech; refusing them would refuse every vision
  and audio call);
- ``unreadable``: anything else (PDF, office documents, archives, other binary, base64 that does not
  decode strictly, a file the upstream fetches by URL): refused unless policy.yaml says
  ``unreadable_content: allow``.
No mitmproxy, no I/O: pure functions over the request's strings.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_DATA_URL = re.compile(r"data:([^;,]{0,128})((?:;[^;,]{0,128}){0,8}),", re.IGNORECASE)
_MEDIA = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
_WHITESPACE = re.compile(r"\s+")
# Text formats under application/ (and the like) the model reads as text.
_TEXT_SUBTYPES = frozenset({"json", "xml", "yaml", "x-yaml", "csv", "markdown", "javascript", "ecmascript",
                            "x-sh", "x-python", "sql", "toml", "x-tex", "x-latex", "x-httpd-php", "x-perl", "x-ruby",
                            "x-ndjson", "ndjson", "jsonl", "x-jsonlines"})
_TEXT_SUFFIXES = ("+json", "+xml", "+yaml")  # structured syntax suffixes (RFC 6839): svg+xml, ld+json
# Containers whose text the gateway would have to parse (PDF, zip-based office files, OLE, gzip).
_BINARY_MAGIC = (b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"\x1f\x8b", b"7z\xbc\xaf")


@dataclass(frozen=True)
class InlineContent:
    kind: str  # "text" | "media" | "unreadable"
    media_type: str  # safe to record: a media type token, or "unknown"
    text: str = ""


def is_text_media(media: str) -> bool:
    media = media.lower()
    subtype = media.partition("/")[2]
    return media.startswith("text/") or subtype in _TEXT_SUBTYPES or subtype.endswith(_TEXT_SUFFIXES)


def _record_safe(media: str) -> str:
    media = media.strip().lower()
    return media if _MEDIA.fullmatch(media) else "unknown"


def is_data_url(value: str) -> bool:
    return value[:5].lower() == "data:" and _DATA_URL.match(value) is not None


def _b64decode(payload: str) -> bytes | None:
    """Strict base64 (standard or URL-safe alphabet, whitespace ignored): None when it is not base64,
    as a lenient decoder upstream could read a value hidden among characters a strict one refuses."""
    payload = _WHITESPACE.sub("", payload) if not payload.isalnum() else payload
    payload += "=" * (-len(payload) % 4)
    for altchars in (None, b"-_"):
        try:
            return base64.b64decode(payload, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
    return None


def read_bytes(data: bytes, media: str) -> InlineContent:
    """Decoded inline bytes: text when their type is a text one (or unknown) and they decode as text."""
    media = media.lower()
    shown = _record_safe(media) if media else "unknown"
    if media and not is_text_media(media) and media != "application/octet-stream":
        return InlineContent("unreadable", shown)
    if b"%PDF-" in data[:1024] or data.startswith(_BINARY_MAGIC):
        return InlineContent("unreadable", shown)
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            text = data.decode("utf-16")
        else:
            text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return InlineContent("unreadable", shown)
    if "\x00" in text:  # no text file holds NUL characters; a binary format that happens to decode does
        return InlineContent("unreadable", shown)
    return InlineContent("text", shown, text)


def read_data_url(value: str, filename: str | None = None) -> InlineContent | None:
    """A data: URL's content (None when the value is not a data URL)."""
    match = _DATA_URL.match(value) if value[:5].lower() == "data:" else None
    if match is None:
        return None
    media = match.group(1).strip().lower()
    if media.startswith(("image/", "audio/")) and not is_text_media(media):
        return InlineContent("media", _record_safe(media))
    payload = value[match.end():]
    if ";base64" in match.group(2).lower():
        data = _b64decode(payload)
        if data is None:
            return InlineContent("unreadable", _record_safe(media) if media else "unknown")
    else:
        data = unquote_to_bytes(payload)
    return read_bytes(data, _declared(media or "text/plain", filename))


def read_file_data(value: str, filename: str | None = None) -> InlineContent:
    """An ``input_file``'s ``file_data``: a data URL, or raw base64 whose type its filename tells."""
    content = read_data_url(value, filename)
    if content is not None:
        return content
    guessed = (mimetypes.guess_type(filename, strict=False)[0] or "").lower() if filename else ""
    if guessed.startswith(("image/", "audio/")):
        return InlineContent("media", _record_safe(guessed))
    data = _b64decode(value)
    if data is None:
        return InlineContent("unreadable", "unknown")
    return read_bytes(data, _declared("", filename))


def _declared(media: str, filename: str | None) -> str:
    """The type a file is sent as: its data URL's, unless its filename says it is not text (the
    upstream may go by either, so a text type and a .pdf name is read as a PDF: unreadable)."""
    guessed = mimetypes.guess_type(filename, strict=False)[0] if filename else None
    if guessed and not is_text_media(guessed) and not guessed.startswith(("image/", "audio/", "video/")):
        return guessed.lower()
    return media
