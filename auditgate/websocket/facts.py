"""What policy matches a client event on: the facts an HTTP request gives (``RequestFacts``), for one event.

The rules, the engine and ``auditgate.policy.loading.match_input`` are the HTTP ones: the event's
prompt texts are exactly what the request walker reads in a request body (every text leaf, audio
left out), its tools those of ``tools``/``input`` wherever the event carries them (top level, under
``response`` or ``session``), its endpoint ``responses`` or ``realtime``, its path and method the
upgrade's.
"""

from __future__ import annotations

from functools import cached_property

from auditgate.core.request_facts import prompt_texts, tool_names
from auditgate.websocket.events import model_of, prompt_payload


class EventFacts:
    """Facts about one client event, shaped like ``RequestFacts`` for ``match_input``."""

    def __init__(self, event: dict, *, endpoint: str, path: str, method: str, size: int) -> None:
        self.event = event
        self.method = method
        self.path = path.split("?", 1)[0]
        self.endpoint = endpoint
        self.content_type = "application/json"
        self.body_size = size
        self.decode_error = None
        self.payload = prompt_payload(event)

    @cached_property
    def model(self) -> str | None:
        return model_of(self.event)

    @cached_property
    def prompt_texts(self) -> list[str]:
        # The Responses walker for both APIs: every string leaf but the structural ones is text.
        return prompt_texts(self.payload, "responses")

    @cached_property
    def tool_names(self) -> list[str]:
        names: list[str] = []
        for where in (self.payload, self.payload.get("response"), self.payload.get("session"),
                      {"input": [self.payload["item"]]} if isinstance(self.payload.get("item"), dict) else None):
            if isinstance(where, dict):
                names += tool_names(where)
        return list(dict.fromkeys(names))
