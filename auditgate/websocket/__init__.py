"""Governing WebSocket sessions (the Responses API's WebSocket mode, the Realtime API), message by message.

Plain logic, no mitmproxy (except ``session_control``, the one module that speaks to mitmproxy's proxy
internals to inject messages and close a session with a code):

- ``events``: which path is a governed WebSocket endpoint; reading a message as an event; which client
  events carry prompts; the API's own ``error`` event the gateway answers with;
- ``facts``: what policy matches a client event on (the same ``MatchInput`` as an HTTP request);
- ``masking``: masking server events with the SSE streams' bounded hold-back per response and item, so
  a value split across deltas is caught, and the held tail goes out as a last delta before the event
  that ends its stream (the deltas add up to the final text);
- ``session``: which concern governed which message, the gateway's own messages, and what a server
  message stands for (none, itself, or a held tail and itself: websocket_gate sends them in order);
- ``audio``: audio payloads as recorded (their size and SHA-256 by default);
- ``records``: ``messages_sha256``, the digest over a session's recorded messages (the verifier's too).
"""
