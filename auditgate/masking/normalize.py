"""Folds the many spellings of one value into the one the recognizers know, keeping a map back to the text as sent.

A card number written with no-break spaces or dots, an email with ``%40`` or a full-width ``＠`` or a
zero-width space inside it, an SSN in Arabic-Indic digits: the recognizers' patterns know none of
these. The analysis runs on the folded text; each finding is mapped back to the exact characters of
the original it came from, so the masked output rewrites those and keeps everything else as sent.

Two stages, each a list of rewritten pieces (unchanged stretches are not recorded):

1. characters and escapes: percent-escapes (UTF-8), ``\\uXXXX`` / ``\\UXXXXXXXX`` / ``\\xXX``, HTML
   character references, then per character NFKC, digits of any script to ASCII, format characters
   (zero-width, soft hyphen, BOM, bidi marks) and variation selectors dropped, every space separator
   to " ", every dash to "-", middle dots and bullets to ".";
2. separators inside digit runs shaped like a card number (13-19 digits), an SSN (3-2-4) or a North
   American phone number (3-3-4): dots, slashes, underscores, tabs and repeated spaces or dashes
   become the single space or dash the recognizers expect.

Plain ASCII prose (the common case) is recognised by a few substring checks and returned as it is.
"""

from __future__ import annotations

import html.entities
import re
import unicodedata
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

# ---- stage 1: characters and escapes ----------------------------------------------------------------
_ESCAPES = re.compile(
    r"(?:%[0-9A-Fa-f]{2})+"
    r"|\\u[0-9A-Fa-f]{4}|\\U[0-9A-Fa-f]{8}|\\x[0-9A-Fa-f]{2}"
    r"|&#[0-9]{1,7};|&#[xX][0-9A-Fa-f]{1,6};|&[A-Za-z][A-Za-z0-9]{1,31};"
    r"|[^\x00-\x7f]+"
)
_HTML_NAMED = html.entities.html5
_DOTS = frozenset("\u00b7\u2022\u2027\u2219\u22c5\u30fb\uff65")  # middle dots and bullets used as separators
_VARIATION_SELECTORS = frozenset([*map(chr, range(0xFE00, 0xFE10)), "\u034f", "\u180b", "\u180c", "\u180d", "\u180e"])


@lru_cache(maxsize=4096)
def fold_char(ch: str) -> str:
    """What one character reads as for the recognizers ("" for an invisible one)."""
    if ch < "\x80":
        return ch
    if ch in _VARIATION_SELECTORS or unicodedata.category(ch) == "Cf":
        return ""
    if ch in _DOTS:
        return "."
    out = []
    for c in unicodedata.normalize("NFKC", ch):
        category = unicodedata.category(c)
        if c < "\x80":
            out.append(c)
        elif category == "Nd":
            out.append(str(unicodedata.decimal(c)))
        elif category == "Zs":
            out.append(" ")
        elif category == "Pd" or c == "\u2212":  # dashes and the minus sign
            out.append("-")
        elif category == "Cf":
            continue
        elif c in _DOTS:
            out.append(".")
        else:
            out.append(c)
    return "".join(out)


def _percent_decoded(run: str) -> list[tuple[int, int, str]]:
    """(start, end, text) within a run of %XX escapes: each escape or UTF-8 sequence of escapes that
    decodes, as its character; an escape that does not decode is kept as written."""
    data = bytes.fromhex(run.replace("%", ""))
    pieces, i = [], 0
    while i < len(data):
        lead = data[i]
        size = 1 if lead < 0x80 else 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
        try:
            ch = data[i:i + size].decode("utf-8") if size and i + size <= len(data) else None
        except UnicodeDecodeError:
            ch = None
        if ch is None:
            pieces.append((3 * i, 3 * i + 3, run[3 * i:3 * i + 3]))
            i += 1
        else:
            pieces.append((3 * i, 3 * (i + size), ch))
            i += size
    return pieces


def _escape_decoded(escape: str) -> str | None:
    """The character one backslash escape or HTML reference stands for, or None to keep it as written."""
    if escape[0] == "\\":
        ch = chr(int(escape[2:], 16)) if int(escape[2:], 16) <= 0x10FFFF else None
        return None if ch is None or 0xD800 <= ord(ch) <= 0xDFFF else ch
    if escape.startswith("&#"):
        number = int(escape[3:-1], 16) if escape[2] in "xX" else int(escape[2:-1])
        return chr(number) if 0 < number <= 0x10FFFF and not 0xD800 <= number <= 0xDFFF else None
    return _HTML_NAMED.get(escape[1:])


# ---- stage 2: separators inside digit runs ----------------------------------------------------------
_SEPARATOR_CHARS = " \t._/-"
_DIGIT_RUN = re.compile(r"(?<![\d.,])\d{2,6}(?:[ \t._/\-]{1,3}\d{2,6}){2,7}(?![\d])")
_SEPARATOR = re.compile(r"[ \t._/\-]+")
# A cheap sign that a text holds a digit run with a separator the recognizers do not read: the text
# as bytes with every digit "0", every one-character separator but space and dash ".", anything else
# "x", searched for a digit, a separator that is not one space or one dash, a digit (a regular
# expression that starts with a literal scans fast).
_SHAPES = bytes(
    ord("0") if chr(b).isdigit() else ord(".") if chr(b) in "\t._/" else b if chr(b) in " -" else ord("x")
    for b in range(256)
)
_ODD_SEPARATOR = re.compile(rb"0(?:\.|[ -][ .-])[ .-]{0,2}0")
_REACH = 80  # the longest digit run _DIGIT_RUN can match, in characters


def _digit_run_pieces(text: str) -> list[tuple[int, int, str]]:
    shapes = text.encode("ascii", "replace").translate(_SHAPES)  # one byte per character
    hints = [m.start() for m in _ODD_SEPARATOR.finditer(shapes)]
    if not hints:
        return []
    pieces: list[tuple[int, int, str]] = []
    searched_to = 0
    for hint in hints:
        if hint < searched_to:
            continue
        lo = max(searched_to, hint - _REACH)
        # Start at the beginning of the run the hint is in, not in its middle.
        while lo > searched_to and text[lo - 1] in "0123456789" + _SEPARATOR_CHARS and hint - lo < 4 * _REACH:
            lo -= 1
        hi = min(len(text), hint + _REACH)
        for run in _DIGIT_RUN.finditer(text, lo, hi):
            pieces += _run_pieces(text, run.start(), run.end())
            hi = max(hi, run.end())
        searched_to = hi
    return pieces


def _run_pieces(text: str, start: int, end: int) -> list[tuple[int, int, str]]:
    seps = list(_SEPARATOR.finditer(text, start, end))
    bounds = [start, *(p for s in seps for p in s.span()), end]
    groups = tuple(bounds[i + 1] - bounds[i] for i in range(0, len(bounds), 2))
    digits = sum(groups)
    if 13 <= digits <= 19:
        joiner = " "
    elif groups in ((3, 2, 4), (3, 3, 4)):
        joiner = "-"
    else:
        return []
    return [(s.start(), s.end(), joiner) for s in seps if s.group() not in (" ", "-")]


# ---- the folded text and its map back ---------------------------------------------------------------
@dataclass(frozen=True)
class _Stage:
    """Rewritten pieces of one stage, in order: (start in the stage's output, end in its output,
    start in its input, end in its input). Characters between pieces are unchanged."""

    out_starts: list[int]
    pieces: list[tuple[int, int, int, int]]

    def char_span(self, at: int) -> tuple[int, int]:
        """The input characters an output character came from."""
        i = bisect_right(self.out_starts, at) - 1
        if i < 0:
            return at, at + 1
        out_start, out_end, in_start, in_end = self.pieces[i]
        if at < out_end:
            return in_start, in_end
        return in_end + at - out_end, in_end + at - out_end + 1  # past the piece: a fixed shift from its end

    def span(self, start: int, end: int) -> tuple[int, int]:
        return self.char_span(start)[0], self.char_span(max(start, end - 1))[1]


def _rewrite(text: str, pieces: list[tuple[int, int, str]]) -> tuple[str, _Stage | None]:
    """text with each (start, end, replacement) applied (sorted, apart), and the stage's map."""
    if not pieces:
        return text, None
    out: list[str] = []
    mapped: list[tuple[int, int, int, int]] = []
    at = length = 0
    for start, end, replacement in pieces:
        out.append(text[at:start])
        length += start - at
        out.append(replacement)
        mapped.append((length, length + len(replacement), start, end))
        length += len(replacement)
        at = end
    out.append(text[at:])
    return "".join(out), _Stage([m[0] for m in mapped], mapped)


@dataclass(frozen=True)
class Normalized:
    """The text the recognizers read, and how to find a finding's characters in the text as sent."""

    original: str
    text: str
    stages: tuple[_Stage, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.stages)

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The characters of the original that text[start:end] was read from (a span that ends inside
        a rewritten piece, like one character of a ``%40``, takes the whole piece)."""
        for stage in reversed(self.stages):
            start, end = stage.span(start, end)
        return start, end


def _stage_one_pieces(text: str) -> list[tuple[int, int, str]]:
    pieces: list[tuple[int, int, str]] = []
    for match in _ESCAPES.finditer(text):
        found, start = match.group(), match.start()
        if found[0] == "%":
            for a, b, ch in _percent_decoded(found):
                folded = fold_char(ch) if len(ch) == 1 else ch
                if folded != found[a:b]:
                    pieces.append((start + a, start + b, folded))
        elif found[0] >= "\x80":  # a run of non-ASCII characters: most (letters, CJK, emoji) read as they are
            folded = list(map(fold_char, found))
            if "".join(folded) != found:
                pieces += [(start + i, start + i + 1, f) for i, (c, f) in enumerate(zip(found, folded)) if f != c]
        else:
            ch = _escape_decoded(found)
            if ch is not None:
                pieces.append((start, match.end(), "".join(fold_char(c) for c in ch)))
    return pieces


def normalize(text: str) -> Normalized:
    """The text folded for analysis, with its map back to the original."""
    stages: list[_Stage] = []
    folded = text
    if not text.isascii() or "%" in text or "\\" in text or "&" in text:
        folded, stage = _rewrite(text, _stage_one_pieces(text))
        if stage is not None:
            stages.append(stage)
    folded_again, stage = _rewrite(folded, _digit_run_pieces(folded))
    if stage is not None:
        stages.append(stage)
    return Normalized(text, folded_again, tuple(stages))
