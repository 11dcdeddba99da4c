"""Test-only addon (``mitmdump -s``, after the bundle): the gateway sees a mitmproxy without one of the internals
through which it governs WebSocket sessions, as a mitmproxy upgrade that renamed it would look."""

from auditgate.websocket import session_control

session_control.missing_internals = lambda: ["WebsocketLayer.relay_messages (gone in this test)"]

addons: list = []
