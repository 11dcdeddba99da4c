"""Masks a whole request or reply body: JSON-aware for OpenAI shapes, whole text otherwise (no mitmproxy)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode

from auditgate.masking.engine import PiiMasker
from auditgate.masking.payload import mask_request_payload, mask_response_payload

# (entity type, field path) of each value masked; never the value.
Findings = list[tuple[str, str]]
# What json.dumps(value, ensure_ascii=False) builds for every call (its arguments are not the defaults),
# built once: encode() of the same encoder class with the same arguments gives the same text.
_ENCODER = json.JSONEncoder(ensure_ascii=False)


class BodyNotMaskable(ValueError):
    """A text body that cannot be read as text: it must not pass unmasked."""


def mask_body(masker: PiiMasker, body: bytes, content_type: str, kind: str, direction: str) -> tuple[bytes | None, Findings]:
    """The masked body (None when nothing changed) and what was masked where.

    content_type is the media type alone, lower case; kind is payload_masking.endpoint_kind's answer.
    """
    if not body:
        return None, []
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        if content_type.startswith("text/") or "json" in content_type:
            raise BodyNotMaskable("a text body that is not UTF-8") from None
        return None, []  # binary (audio, images): nothing to mask as text
    if "json" in content_type or (not content_type and text.lstrip()[:1] in "{["):
        try:
            payload = json.loads(text)
        except ValueError:
            payload = None  # not JSON after all: masked as text below
        if payload is not None:
            walk = mask_response_payload if direction == "response" else mask_request_payload
            findings: Findings = []

            def mask(value: str, path: str) -> str:
                masked, found = masker.mask(value, direction)
                findings.extend((entity, path) for entity in found)
                return masked

            new_payload = walk(payload, kind, mask)
            if not findings:
                return None, []
            return _ENCODER.encode(new_payload).encode(), findings
    if direction == "request" and content_type == "application/x-www-form-urlencoded":
        return _mask_form(masker, text)
    if direction == "request" and content_type.startswith("multipart/"):
        # Its text fields could hold a prompt, beside files that cannot be masked as text: not sent.
        raise BodyNotMaskable("a multipart request cannot be masked (request masking is on)")
    if not (content_type.startswith("text/") or "json" in content_type or not content_type):
        return None, []
    masked, found = masker.mask(text, direction)
    return (masked.encode() if found else None), [(entity, "body") for entity in found]


def _mask_form(masker: PiiMasker, text: str) -> tuple[bytes | None, Findings]:
    """A form-encoded request: each field's value masked as text, the form encoded again."""
    try:
        fields = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise BodyNotMaskable("a form body that cannot be decoded") from None
    findings: Findings = []
    masked_fields = []
    for name, value in fields:
        masked, found = masker.mask(value, "request")
        findings.extend((entity, f"form.{name}") for entity in found)
        masked_fields.append((name, masked))
    return (urlencode(masked_fields).encode() if findings else None), findings
