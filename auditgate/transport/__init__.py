"""The gateway's side of the wire: body size limits (inflating with a cap) and upstream timeouts.

- ``inflate``: content-encodings (gzip, deflate, br, zstd) decoded in bounded pieces, refused past a limit;
- ``limits``: the body limits' settings, what a refusal says, the byte cap of a streamed reply;
- ``timeouts``: when an exchange with the upstream has waited too long (connect, first byte, idle);
- ``upstream_control``: the only module that reaches into mitmproxy's proxy internals, to end a flow
  whose upstream timed out with an answer of the gateway's own.
"""
