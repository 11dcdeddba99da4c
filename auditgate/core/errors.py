"""Error bodies shaped like OpenAI API errors, so the openai SDK raises its usual exception classes."""

from __future__ import annotations

import json

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, code: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": error_type(status), "param": None, "code": code}}).encode()
