"""Upstream timeouts: when an exchange with the upstream has waited too long, and what the caller is told.

Three clocks, each answered with 504 ``gateway_upstream_timeout``:

- connect: from the start of the TCP connect (DNS included) to the connection;
- first byte: from the moment the request leaves (its request hooks are done: a request held for a
  person's approval is not waiting on the upstream) to the reply's headers;
- idle: between the reply's headers and its end, the longest silence of the connection.

No mitmproxy import: the transport_errors addon feeds in the times it sees and acts on ``overdue``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

STATUS = 504
CODE = "gateway_upstream_timeout"

# A connect timeout reaches the client through mitmproxy's own error path, as the message of the
# connection error; this prefix tells the transport error page it is one of ours.
MARKER = "auditgate upstream timeout: "


@dataclass(frozen=True)
class UpstreamTimeouts:
    """The three timeouts, in seconds."""

    connect: float
    first_byte: float
    idle: float

    def __post_init__(self) -> None:
        for name, value in (("gateway_upstream_connect_timeout_ms", self.connect),
                            ("gateway_upstream_first_byte_timeout_ms", self.first_byte),
                            ("gateway_upstream_idle_timeout_ms", self.idle)):
            if not value > 0:
                raise ValueError(f"{name} must be more than 0, not {round(value * 1000)}")

    @property
    def tick(self) -> float:
        """How often the clocks are read: a quarter of the shortest timeout, between 50 ms and 1 s."""
        return max(0.05, min(1.0, min(self.connect, self.first_byte, self.idle) / 4))


@dataclass
class Exchange:
    """What is known of one flow's exchange with its upstream (times from time.time())."""

    sent: float | None = None  # the request left for the upstream
    headers: float | None = None  # the reply's headers arrived
    activity: float | None = None  # the connection's latest event
    done: bool = False  # the reply ended (or the flow did): no clock runs


class Overdue(NamedTuple):
    phase: str  # first_byte | idle
    message: str


def overdue(exchange: Exchange, timeouts: UpstreamTimeouts, now: float) -> Overdue | None:
    """The timeout this exchange has run into by ``now``, if any."""
    if exchange.done:
        return None
    if exchange.headers is None:
        if exchange.sent is not None and now - exchange.sent >= timeouts.first_byte:
            return Overdue("first_byte", message("first_byte", timeouts.first_byte))
        return None
    last = max(exchange.headers, exchange.activity or 0.0)
    if now - last >= timeouts.idle:
        return Overdue("idle", message("idle", timeouts.idle))
    return None


def connect_overdue(started: float | None, timeouts: UpstreamTimeouts, now: float) -> bool:
    """A TCP connect that began at ``started`` (None: not begun, still queued) and has not finished by now."""
    return started is not None and now - started >= timeouts.connect


def message(phase: str, seconds: float) -> str:
    if phase == "connect":
        return f"the gateway could not connect to the upstream within {seconds:g} s"
    if phase == "first_byte":
        return f"the upstream sent no reply within {seconds:g} s"
    return f"the upstream sent nothing for {seconds:g} s in the middle of its reply"


def marked(text: str) -> str:
    return MARKER + text


def unmarked(text: str) -> str | None:
    """The message of a marked timeout error, or None when ``text`` is not one."""
    return text[len(MARKER):] if text.startswith(MARKER) else None
