"""A lean upstream for the throughput benchmarks: every POST gets the same precomputed Responses API reply.

The reply is the one `python -m tests.fake_openai --reply-bytes N --pii` gives to bench_gateway.BODY (built once
with fake_openai's own functions), sent with content-length over keep-alive connections by an asyncio Protocol:
tens of microseconds of CPU per request, where fake_openai's ThreadingHTTPServer spends a millisecond or more
(a thread per connection, http.server's header parsing, json per request), taken from the cores the targets need.
It ignores the request body (the reply is the same whatever was asked) and keeps no log of requests.

    python -m bench.lean_upstream [--reply-bytes 1400]   # prints 'PORT <n>' once listening on 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_gateway import BODY  # noqa: E402
from tests.fake_openai import FakeOpenAI, pii_reply  # noqa: E402


def reply_bytes(text_bytes: int) -> bytes:
    """The whole HTTP response: fake_openai's masked-benchmark reply (three personal data values) to BODY."""
    payload = json.dumps(FakeOpenAI(reply_text=pii_reply(text_bytes)).responses_json(BODY)).encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
            + payload)


class _Connection(asyncio.Protocol):
    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:  # one reply per complete request in the buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                eol = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:eol if eol > 0 else None])
            elif b"\r\ntransfer-encoding:" in head:  # not what the proxies send; refused rather than misread
                self.transport.write(b"HTTP/1.1 411 Length Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()
                return
            if len(buffer) < end + 4 + length:
                return
            del buffer[:end + 4 + length]
            self.transport.write(self.reply)
            if b"\r\nconnection: close" in head:
                self.transport.close()
                return


async def serve(reply: bytes) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Connection(reply), "127.0.0.1", 0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reply-bytes", type=int, default=1400, help="reply text length (1400: a ~2 KB JSON reply)")
    args = parser.parse_args()
    try:
        asyncio.run(serve(reply_bytes(args.reply_bytes)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
