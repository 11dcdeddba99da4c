"""Content-encodings decoded in bounded pieces, with a cap on the inflated size.

A compressed body is small on the wire and may be huge once inflated: 1 MB of gzip can hold 1 GB,
and zstd or brotli far more. ``mitmproxy``'s own decoding (``message.content``) inflates the whole
body in one call, in the event loop, with no cap. Here every decoder produces at most ``PIECE``
bytes per step, the running total is checked after each step, and decoding stops as soon as the
total passes the limit: inflating a bomb costs the limit's worth of CPU and a piece's worth of memory.

    inflate(body, content_codings("gzip"), limit)      # the decoded bytes, or BodyTooLarge / BodyUndecodable
    inflater = Inflater(content_codings("br"), limit)  # the same for a body that arrives in chunks
    inflater.feed(chunk) ... inflater.finish()

No mitmproxy import: the functions work on bytes, and the addons call them off the event loop.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import brotli

try:  # Python 3.14 has it in the standard library; the backport before
    from compression import zstd
except ImportError:
    from backports import zstd

PIECE = 64 * 1024  # the most any decoder produces, or is given, in one step
KEEP_FIRST_PASS = 1024 * 1024  # decoded bytes kept while still measuring; past this, measured first, kept after

SUPPORTED = ("gzip", "x-gzip", "deflate", "br", "zstd")
_IDENTITY = ("", "identity")


class BodyUndecodable(ValueError):
    """The body does not decode with its content-encoding (or names one the gateway does not decode)."""


class BodyTooLarge(ValueError):
    """The body inflates past the limit; ``inflated`` is how far decoding got before it stopped."""

    def __init__(self, limit: int, inflated: int) -> None:
        super().__init__(f"the body inflates past {limit} bytes")
        self.limit, self.inflated = limit, inflated


def content_codings(header: str) -> list[str]:
    """The codings of a Content-Encoding header, in the order they were applied; identity left out.

    Raises BodyUndecodable for a coding this module cannot decode (``compress``, ``bzip2``...): a body
    the gateway cannot read must not pass as if it could.
    """
    codings = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in codings if c not in _IDENTITY]
    unknown = [c for c in codings if c not in SUPPORTED]
    if unknown:
        raise BodyUndecodable(f"unsupported content-encoding {', '.join(unknown)!r}")
    return codings


def inflate(data: bytes, codings: list[str], limit: int, keep_first_pass: int = KEEP_FIRST_PASS) -> bytes:
    """The body decoded, if it inflates to at most ``limit`` bytes; BodyTooLarge or BodyUndecodable otherwise.

    A body whose decoded size passes ``keep_first_pass`` is measured first, keeping nothing, and decoded
    again only once it is known to fit: a bomb never holds more than ``keep_first_pass`` bytes.
    """
    if not codings:
        if len(data) > limit:
            raise BodyTooLarge(limit, len(data))
        return data
    kept: list[bytes] | None = []
    total = 0
    for piece in _decoded(data, codings):
        total += len(piece)
        if total > limit:
            raise BodyTooLarge(limit, total)
        if kept is not None:
            if total <= keep_first_pass:
                kept.append(piece)
            else:
                kept = None
    if kept is not None:
        return b"".join(kept)
    return b"".join(_decoded(data, codings))


class Inflater:
    """Decodes a body that arrives in chunks (a stream), with the same cap on the total decoded size."""

    def __init__(self, codings: list[str], limit: int) -> None:
        self.limit = limit
        self.inflated = 0
        self._decoders = [_decoder(c) for c in reversed(codings)]  # the last coding applied is undone first

    def feed(self, chunk: bytes) -> bytes:
        return self._collect(_through(self._decoders, [chunk], finish=False))

    def finish(self) -> bytes:
        """The rest, once the body has ended; BodyUndecodable if it ended in the middle of a coding."""
        return self._collect(_through(self._decoders, [], finish=True))

    def _collect(self, pieces: Iterator[bytes]) -> bytes:
        out = bytearray()
        for piece in _errors_as_undecodable(pieces):
            self.inflated += len(piece)
            if self.inflated > self.limit:
                raise BodyTooLarge(self.limit, self.inflated)
            out += piece
        return bytes(out)


def _decoded(data: bytes, codings: list[str]) -> Iterator[bytes]:
    decoders = [_decoder(c) for c in reversed(codings)]
    return _errors_as_undecodable(_through(decoders, _slices(data), finish=True))


def _through(decoders: list[_Decoder], pieces: Iterable[bytes], finish: bool) -> Iterator[bytes]:
    """The pieces run through each decoder in turn, lazily: no stage holds more than a piece at a time."""
    for decoder in decoders:
        pieces = _stage(decoder, pieces, finish)
    return iter(pieces)


def _stage(decoder: _Decoder, pieces: Iterable[bytes], finish: bool) -> Iterator[bytes]:
    for piece in pieces:
        yield from decoder.feed(piece)
    if finish:
        yield from decoder.finish()


def _slices(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), PIECE):
        yield view[start:start + PIECE].tobytes()


def _errors_as_undecodable(pieces: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from pieces
    except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as e:
        raise BodyUndecodable(f"the body does not decode: {e}") from None


# ---- one decoder per coding: feed() and finish() yield at most PIECE bytes at a time ----------------------------
class _Decoder:
    def feed(self, data: bytes) -> Iterator[bytes]:
        raise NotImplementedError

    def finish(self) -> Iterator[bytes]:
        raise NotImplementedError


def _decoder(coding: str) -> _Decoder:
    if coding in ("gzip", "x-gzip"):
        return _ZlibDecoder(gzip=True)
    if coding == "deflate":
        return _ZlibDecoder(gzip=False)
    if coding == "br":
        return _BrotliDecoder()
    if coding == "zstd":
        return _ZstdDecoder()
    raise BodyUndecodable(f"unsupported content-encoding {coding!r}")


class _ZlibDecoder(_Decoder):
    """gzip (every member of a multi-member body, like Python's gzip module) or deflate (zlib-wrapped or raw)."""

    def __init__(self, gzip: bool) -> None:
        self.gzip = gzip
        self._inflate: zlib._Decompress | None = None
        self._ended = False  # deflate: the one stream ended; gzip: a member ended and no other began yet
        self._head = b""  # deflate: the first bytes, to tell a zlib header from raw deflate

    def _start(self, data: bytes) -> None:
        if self.gzip:
            wbits = 31
        else:
            # "deflate" is meant to be zlib-wrapped; some servers send raw deflate (mitmproxy accepts both).
            cmf, flg = data[0], data[1]
            wbits = 15 if cmf & 0x0F == 8 and (cmf << 8 | flg) % 31 == 0 else -15
        self._inflate = zlib.decompressobj(wbits)
        self._ended = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not self.gzip and self._inflate is None and not self._ended:
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
        while True:
            if self._inflate is None:
                if self.gzip:
                    data = data.lstrip(b"\0")  # zero padding between or after members, as gzip allows
                if not data:
                    return
                if self._ended and not self.gzip:
                    raise BodyUndecodable("data after the end of the deflate stream")
                self._start(data)
            inflate = self._inflate
            out = inflate.decompress(data, PIECE)
            data = inflate.unconsumed_tail
            if out:
                yield out
            if inflate.eof:
                data = inflate.unused_data
                self._inflate, self._ended = None, True
            elif len(out) < PIECE:
                if data:  # input left, yet no full piece out: zlib never does this
                    raise BodyUndecodable("the deflate decoder made no progress")
                return
            # else: a full piece came out, and more may be pending from input already taken in

    def finish(self) -> Iterator[bytes]:
        if self._head:
            raise BodyUndecodable("the deflate stream is cut short")
        if self._inflate is not None:
            raise BodyUndecodable(f"the {'gzip' if self.gzip else 'deflate'} stream is cut short")
        return iter(())


class _BrotliDecoder(_Decoder):
    def __init__(self) -> None:
        self._brotli = brotli.Decompressor()
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self._fed = True
        decoder = self._brotli
        for start in range(0, len(data), PIECE):
            out = decoder.process(data[start:start + PIECE], output_buffer_limit=PIECE)
            if out:
                yield out
            yield from self._drain()

    def _drain(self) -> Iterator[bytes]:
        """Output still pending from input already taken in (brotli takes no new input until it is out)."""
        decoder = self._brotli
        while not decoder.is_finished():
            out = decoder.process(b"", output_buffer_limit=PIECE)
            if not out:
                if not decoder.can_accept_more_data():
                    raise BodyUndecodable("the brotli decoder made no progress")
                return
            yield out

    def finish(self) -> Iterator[bytes]:
        if not self._fed:
            return
        yield from self._drain()
        if not self._brotli.is_finished():
            raise BodyUndecodable("the brotli stream is cut short")


class _ZstdDecoder(_Decoder):
    """zstd, every frame of a multi-frame body."""

    def __init__(self) -> None:
        self._zstd: zstd.ZstdDecompressor | None = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            if self._zstd is None:
                self._zstd = zstd.ZstdDecompressor()
            decoder = self._zstd
            out = decoder.decompress(data, PIECE)
            data = b""
            if out:
                yield out
            while not decoder.eof and not decoder.needs_input:
                out = decoder.decompress(b"", PIECE)
                if out:
                    yield out
            if decoder.eof:
                data = decoder.unused_data
                self._zstd = None

    def finish(self) -> Iterator[bytes]:
        if self._zstd is not None:
            raise BodyUndecodable("the zstd stream is cut short")
        return iter(())
