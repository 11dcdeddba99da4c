"""Finds and masks personal data in plain text with Presidio; also the entry points of masking workers."""

from __future__ import annotations

import functools
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Presidio's email recognizer calls tldextract, which would download the public suffix list on first
# use: point it at a local cache and no URL before anything imports it (its bundled snapshot is used).
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
os.environ.setdefault("TLDEXTRACT_CACHE", os.path.join(tempfile.gettempdir(), "auditgate-tldextract"))

import logging  # noqa: E402

try:  # the parse tree of a trigger (see _literal_anchors); without it, triggers are scanned the usual way
    import re._constants as _sre_constants  # noqa: E402
    import re._parser as _sre_parse  # noqa: E402
except ImportError:  # pragma: no cover - a Python that moved its regular expression parser
    _sre_constants = _sre_parse = None

# Presidio logs a debug line for every pattern it tries; under mitmproxy every log record is
# dispatched to every loaded addon, which would cost more than the analysis itself.
for _name in ("presidio-analyzer", "presidio-anonymizer"):
    logging.getLogger(_name).setLevel(logging.WARNING)

import regex  # noqa: E402
from presidio_analyzer import (  # noqa: E402
    AnalyzerEngine,
    EntityRecognizer,
    PatternRecognizer,
    RecognizerResult,
)
from presidio_analyzer.analyzer_engine import REGEX_TIMEOUT_SECONDS  # noqa: E402
from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer  # noqa: E402
from presidio_analyzer.predefined_recognizers import (  # noqa: E402
    CreditCardRecognizer,
    IbanRecognizer,
)
from presidio_analyzer.recognizer_registry import RecognizerRegistryProvider  # noqa: E402
from presidio_anonymizer import AnonymizerEngine  # noqa: E402
from presidio_anonymizer.entities import OperatorConfig  # noqa: E402
from presidio_anonymizer.operators import OperatorType  # noqa: E402

from auditgate.masking.config import MaskingSettings  # noqa: E402
from auditgate.masking.normalize import Normalized, normalize  # noqa: E402

# Text around a trigger that a recognizer sees: wide enough for any entity the patterns describe.
TRIGGER_RADIUS = 96
_DIGITS_AS_ZERO = bytes(ord("0") if chr(b) in "0123456789" else ord(" ") for b in range(256))
_DIGIT_RUN_TRIGGER = re.compile(r"\\d\{(\d+)\}")  # a trigger that is a run of n digits, written \d{n}


@dataclass(frozen=True)
class Span:
    entity_type: str
    start: int
    end: int
    score: float


# A finding inside the engine: (entity type, start, end, score), what a RecognizerResult holds that masking
# reads. Plain tuples: a RecognizerResult costs a constructor call, a metadata dict and a string-built hash.
Found = tuple[str, int, int, float]
_MIN_SCORE, _MAX_SCORE = EntityRecognizer.MIN_SCORE, EntityRecognizer.MAX_SCORE


_DOUBLED_DIGIT_SUM = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # the digits of 2 * d, summed, for d in 0..9


def luhn_valid(value: str, replacement_pairs: tuple[tuple[str, str], ...]) -> bool:
    """``CreditCardRecognizer.validate_result``: the value sanitized with its replacement pairs, then
    the Luhn checksum, each digit read with int() as Presidio reads it (a non-digit raises as there).
    tests/test_masking_cost_engine.py compares both on random values."""
    for search, replacement in replacement_pairs:
        value = value.replace(search, replacement)
    digits = [int(c) for c in value]
    doubled = _DOUBLED_DIGIT_SUM
    return (sum(digits[-1::-2]) + sum([doubled[d] for d in digits[-2::-2]])) % 10 == 0


def _by_type_start_longest(found: Found) -> tuple:
    return found[0], found[1], found[1] - found[2], -found[3]


def _by_score_start_longest(found: Found) -> tuple:
    return -found[3], found[1], found[1] - found[2]


def remove_duplicates(results: list[Found]) -> list[Found]:
    """``EntityRecognizer.remove_duplicates`` on Found tuples: the same findings in the same order.

    Zero scores go; so does a finding inside another of its entity type that scores as high or higher.
    tests/test_masking_cost_engine.py compares both on random findings."""
    if len(results) < 2:
        return [r for r in results if r[3] != 0]
    ordered = sorted(set(results), key=_by_type_start_longest)
    kept: list[Found] = []
    active: list[Found] = []  # kept findings of this entity type that may still contain the next one
    entity = None
    for result in ordered:
        if result[0] != entity:
            entity, active = result[0], []
        if result[3] == 0:
            continue
        _, start, end, score = result
        active = [f for f in active if f[2] >= start]
        for f in active:
            if start >= f[1] and end <= f[2] and score <= f[3]:
                break
        else:
            kept.append(result)
            active.append(result)
    kept.sort(key=_by_score_start_longest)
    return kept


def _literal_anchors(pattern: re.Pattern) -> tuple[tuple[str, int], ...] | None:
    """(literal, offset) pairs such that every match of pattern, at s, holds one of the literals at s + offset;
    None when the pattern's structure does not show one for each of its alternatives.

    Read from the pattern's parse tree: for each top-level alternative, the longest run of plain
    characters whose distance from the start of a match is fixed (only fixed-width items before it).
    Case-insensitive patterns are not read (a literal would stand for its other cases too).
    """
    if _sre_parse is None or not isinstance(pattern.pattern, str) or pattern.flags & (re.IGNORECASE | re.VERBOSE):
        return None
    try:
        parsed = _sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:  # a construct this parser reads otherwise: scan the usual way
        return None
    items = list(parsed)
    alternatives = items[0][1][1] if len(items) == 1 and items[0][0] is _sre_constants.BRANCH else [parsed]
    anchors = []
    for alternative in alternatives:
        best, run, run_at, offset = "", "", 0, 0
        for op, av in alternative:
            if op is _sre_constants.LITERAL:
                if not run:
                    run_at = offset
                run += chr(av)
                offset += 1
                if len(run) > len(best):
                    best, best_at = run, run_at
                continue
            run = ""
            if op in (_sre_constants.GROUPREF, _sre_constants.GROUPREF_EXISTS):
                break
            low, high = _sre_parse.SubPattern(alternative.state, [(op, av)]).getwidth()
            if low != high:
                break
            offset += low
        if not best:
            return None
        anchors.append((best, best_at))
    return tuple(dict.fromkeys(anchors))


class _TriggerScan:
    """The matches of one trigger, as ``pattern.finditer`` gives them, found faster where the pattern allows.

    A regular expression without a literal start makes Python's re try it at every character (tens of
    nanoseconds each, on every text leaf). Where every match holds one of a few literals at a fixed
    distance from its start (``\\d\\.\\d|:...:``: a "." one character in, or a ":" at the start), the
    literals are found with str.find and the pattern is tried only where a match could start: the
    leftmost such start at or after the end of the previous match is where finditer's search would
    stop, so the matches are the same (tests/test_masking_cost_engine.py compares both ways).
    """

    __slots__ = ("pattern", "anchors")

    def __init__(self, pattern: re.Pattern) -> None:
        self.pattern = pattern
        anchors = _literal_anchors(pattern)
        self.anchors = anchors if anchors and pattern.match("") is None else None  # an empty match: scan

    def _starts(self, text: str) -> list[int] | None:
        """Every position a match could start at, in order; None when there are so many that scanning
        is cheaper."""
        starts: set[int] = set()
        budget = len(text) // 16 + 8
        for literal, offset in self.anchors:
            at = text.find(literal)
            while at >= 0:
                if at >= offset:
                    starts.add(at - offset)
                if len(starts) > budget:
                    return None
                at = text.find(literal, at + 1)
        return sorted(starts)

    def spans(self, text: str) -> list[tuple[int, int]]:
        starts = self._starts(text) if self.anchors else None
        if starts is None:
            return [m.span() for m in self.pattern.finditer(text)]
        spans, after, match = [], 0, self.pattern.match
        for start in starts:
            if start >= after and (m := match(text, start)) is not None:
                spans.append(m.span())
                after = m.end()
        return spans

    def search(self, text: str) -> bool:
        starts = self._starts(text) if self.anchors else None
        if starts is None:
            return self.pattern.search(text) is not None
        match = self.pattern.match
        return any(match(text, start) is not None for start in starts)


class ModelNotInstalled(RuntimeError):
    """masking.yaml names an NLP model that is not installed."""


class _NoContextEnhancer(ContextAwareEnhancer):
    """Keeps recognizer scores as they are.

    Presidio's default enhancer raises scores when context words stand near a finding, using the NLP
    engine's tokens and lemmas. Without an NLP model there are none, and the default enhancer would
    only deep-copy every result for nothing (half the cost of an analysis).
    """

    def __init__(self) -> None:
        super().__init__(context_similarity_factor=0, min_score_with_context_similarity=0, context_prefix_count=0,
                         context_suffix_count=0)

    def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
        return raw_results


# Patterns whose every match holds this character once and no space or line break, and looks at most one
# character past its ends (\\b, a one-character lookbehind): they need only run over the runs of
# non-space text around each occurrence of the character (plus one character each side) to find every
# match they find in the whole text. Keyed by the exact pattern (an edited pattern runs over the whole
# window again). tests/test_masking_cost_engine.py compares both ways on random texts.
_CONFINED_AROUND = {
    # Presidio's EmailRecognizer: local part and domain are \w and punctuation, one [@] between them.
    r"\b((([!#$%&'*+\-/=?^_`{|}~\w])|([!#$%&'*+\-/=?^_`{|}~\w][!#$%&'*+\-/=?^_`{|}~\.\w]{0,}[!#$%&'*+\-/=?^_`{|}~\w]))"
    r"[@]\w+(?:-+\w+)*(?:\.\w+(?:-+\w+)*)+)\b": "@",
    # The shipped recognizers file's email after a URL or form separator.
    r"""(?<=[/?=&:;,(<\['"])[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9\-]{1,63}\.)+[A-Za-z]{2,24}\b""": "@",
}
# Patterns whose every match holds a digit (\\d) and starts at most `before` characters before its first
# digit and ends at most `after` characters after its last one, and that read at most one character past
# that (\\b, a one-character lookaround; the card pattern's inner lookahead reads digits, then one more):
# they need only run from `before` + 1 characters before a window's first digit to `after` + 1 after its
# last one. Keyed by the exact pattern, as above: (before, after).
# tests/test_masking_cost_engine.py compares both ways on random texts.
_BETWEEN_DIGITS = {
    # Presidio's CreditCardRecognizer: digits and separators, from a digit to a digit.
    r"\b(?!1\d{12}(?!\d))((4\d{3})|(5[0-5]\d{2})|(6\d{3})|(1\d{3})|(3\d{3}))[- ]?(\d{3,4})[- ]?(\d{3,4})[- ]?"
    r"(\d{3,5})\b": (0, 0),
    # Presidio's UsSsnRecognizer: from a digit to a digit.
    r"\b([0-9]{5})-([0-9]{4})\b": (0, 0),
    r"\b([0-9]{3})-([0-9]{6})\b": (0, 0),
    r"\b(([0-9]{3})-([0-9]{2})-([0-9]{4}))\b": (0, 0),
    r"\b[0-9]{9}\b": (0, 0),
    r"\b([0-9]{3})[- .]([0-9]{2})[- .]([0-9]{4})\b": (0, 0),
    # The shipped phone patterns: a "+" or "(" before the first digit, a ")" after the last one.
    r"(?<![\w+])\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,5}(?![\w])": (1, 1),
    r"(?<![\w\-.])(?:\(\d{3}\)\s?|\d{3}[\-.\s])\d{3}[\-.\s]\d{4}(?![\w\-])": (1, 0),
}
_FIRST_DIGIT = regex.compile(r"\d")  # the regex module's \d, as the patterns read it (Unicode decimal digits)
_LAST_DIGIT = regex.compile(r"(?r)\d")
_PRESIDIO_IBAN = (r"(?<![A-Z0-9])([A-Z]{2}[0-9]{2}(?:[ -]?[A-Z0-9]{4}){2,6})"
                  r"((?:[ -]?[A-Z0-9]{4})?)((?:[ -]?[A-Z0-9]{1,3})?)(?![A-Z0-9])")
# ASCII text as bytes: each letter "a", each digit "0", anything else " ".
_LETTERS_AND_DIGITS = bytes(
    ord("a") if chr(b).isascii() and chr(b).isalpha() else ord("0") if chr(b) in "0123456789" else ord(" ")
    for b in range(256))
# Flags that keep the reading above true (no verbose mode, no version 1 set syntax).
_PLAIN_FLAGS = regex.I | regex.M | regex.S | regex.U


def _digits_from_to(text: str) -> tuple[int, int] | None:
    """Where the first digit of text stands and where its last digit ends; None without a digit."""
    if text.isascii():
        shape = text.encode("ascii").translate(_DIGITS_AS_ZERO)
        first = shape.find(b"0")
        return None if first < 0 else (first, shape.rfind(b"0") + 1)
    first = _FIRST_DIGIT.search(text)
    return None if first is None else (first.start(), _LAST_DIGIT.search(text).end())


def _runs_around(text: str, char: str) -> list[tuple[int, int]]:
    """(start, end) ranges of text, in order and apart, that hold every run of non-space text containing
    char, each with the character before and after it (what \\b or a one-character lookbehind reads)."""
    ranges: list[tuple[int, int]] = []
    size = len(text)
    at = text.find(char)
    while at >= 0:
        start = max(text.rfind(" ", 0, at), text.rfind("\n", 0, at))  # the character before the run, or -1
        ends = [i for i in (text.find(" ", at), text.find("\n", at)) if i >= 0]
        end = min(ends) if ends else size  # the character after the run, or the end
        low, high = max(0, start), min(size, end + 1)
        if ranges and low <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], high)
        else:
            ranges.append((low, high))
        at = text.find(char, end)
    return ranges


class _DirectPatterns:
    """What ``PatternRecognizer.analyze`` returns, without its per-call extras.

    Presidio's own loop looks the compiled pattern up, times it with ``datetime.now()``, logs, and
    builds an explanation object and a metadata dict for every match; on the small windows around
    triggers that costs as much as the matching. Here the patterns are compiled once (the same
    ``regex`` module and flags) and the recognizer's own ``validate_result`` / ``invalidate_result``
    decide the scores, as in Presidio. One difference, on purpose: a pattern that runs into the regex
    timeout raises (the masking fails closed) where Presidio logs it and skips the pattern. A pattern
    known to match only non-space text around one character (see _CONFINED_AROUND) runs only over
    that text; findings are (entity type, start, end, score) tuples, not RecognizerResults.
    """

    def __init__(self, recognizer: PatternRecognizer, score_threshold: float = 0.0) -> None:
        flags = recognizer.global_regex_flags
        # A pattern scoring below the threshold can only matter if validation may raise its score: where
        # the recognizer has no validation, its findings would all be dropped, so it is not run at all.
        validates = type(recognizer).validate_result is not PatternRecognizer.validate_result
        plain = not flags & ~_PLAIN_FLAGS
        # The text a pattern needs: None, the whole window; a character, the runs around it (_CONFINED_AROUND);
        # (before, after), the stretch from the first digit to the last (_BETWEEN_DIGITS).
        self.patterns = [(regex.compile(p.regex, flags=flags), p.score,
                          (_CONFINED_AROUND.get(p.regex) or _BETWEEN_DIGITS.get(p.regex)) if plain else None)
                         for p in recognizer.patterns if validates or p.score >= score_threshold]
        self.entity_type = recognizer.supported_entities[0]
        self.validate = recognizer.validate_result
        if type(recognizer).validate_result is CreditCardRecognizer.validate_result:
            self.validate = functools.partial(luhn_valid, replacement_pairs=tuple(recognizer.replacement_pairs))
        self.invalidate = recognizer.invalidate_result

    @staticmethod
    def serves(recognizer: EntityRecognizer) -> bool:
        """True for a pattern recognizer that keeps Presidio's pattern loop (subclasses that replace
        ``analyze`` or the loop, like the IBAN recognizer, run their own)."""
        cls = type(recognizer)
        return (isinstance(recognizer, PatternRecognizer) and bool(recognizer.patterns)
                and cls.analyze is PatternRecognizer.analyze
                and cls._PatternRecognizer__analyze_patterns is PatternRecognizer._PatternRecognizer__analyze_patterns)

    def analyze(self, text: str) -> list[Found]:
        results: list[Found] = []
        size = len(text)
        whole = ((0, size),)
        digits = False  # not looked for yet
        for pattern, score, around in self.patterns:
            if around is None:
                ranges = whole
            elif type(around) is str:
                ranges = _runs_around(text, around)
            else:
                if digits is False:
                    digits = _digits_from_to(text)
                if digits is None:
                    continue  # no digit: nothing this pattern could match
                ranges = ((max(0, digits[0] - around[0] - 1), min(size, digits[1] + around[1] + 1)),)
            for low, high in ranges:
                results += self._matches(pattern, score, text, low, high)
        return remove_duplicates(results)

    def _matches(self, pattern, score: float, text: str, low: int, high: int) -> list[Found]:
        results = []
        lowest, highest = _MIN_SCORE, _MAX_SCORE
        validate, invalidate, entity_type = self.validate, self.invalidate, self.entity_type
        for match in pattern.finditer(text, low, high, timeout=REGEX_TIMEOUT_SECONDS):
            start, end = match.span()
            if start == end:
                continue
            value = text[start:end]
            valid = validate(value)
            found = score if valid is None else (highest if valid else lowest)
            if invalidate(value):
                found = lowest
            if found > lowest:
                results.append((entity_type, start, end, found))
        return results


class _DirectIban:
    """What ``IbanRecognizer.analyze`` returns, its pattern compiled once.

    Presidio's IBAN loop passes the pattern's source to ``regex.finditer`` on every call (a cache
    lookup that costs more than the match on a small window) and builds an explanation per match.
    The loop is the same: for each match, the longest of its group ends that validates (or scores
    above the minimum) is the finding, and the recognizer's own ``validate_result`` decides. As
    with _DirectPatterns, a pattern that runs into the regex timeout raises (fails closed)."""

    def __init__(self, recognizer: IbanRecognizer) -> None:
        flags = recognizer.global_regex_flags
        self.patterns = [(regex.compile(p.regex, flags=flags), p.score) for p in recognizer.patterns]
        self.entity_type = recognizer.supported_entities[0]
        self.validate = recognizer.validate_result
        # Every match of Presidio's IBAN pattern starts with two letters and two digits: on ASCII text
        # without that shape (most windows around a run of digits), there is nothing to run.
        self.needs_letters_then_digits = not flags & ~_PLAIN_FLAGS and all(
            p.regex == _PRESIDIO_IBAN for p in recognizer.patterns)

    @staticmethod
    def serves(recognizer: EntityRecognizer) -> bool:
        """Presidio's IBAN recognizer itself (a subclass may change its loop)."""
        return type(recognizer) is IbanRecognizer and bool(recognizer.patterns)

    def analyze(self, text: str) -> list[Found]:
        if (self.needs_letters_then_digits and text.isascii()
                and b"aa00" not in text.encode("ascii").translate(_LETTERS_AND_DIGITS)):
            return []
        results = []
        lowest, highest = _MIN_SCORE, _MAX_SCORE
        for pattern, score in self.patterns:
            for match in pattern.finditer(text, timeout=REGEX_TIMEOUT_SECONDS):
                start, whole_end = match.span()
                for group in range(len(match.groups()), 0, -1):
                    end = match.span(group)[1]
                    end = end if end > 0 else whole_end
                    if start >= end:
                        continue
                    valid = self.validate(text[start:end])
                    found = score if valid is None else (highest if valid else lowest)
                    if found > lowest:
                        results.append((self.entity_type, start, end, found))
                        break
        return results


def _nlp_engine(settings: MaskingSettings):
    if settings.nlp_model:
        import spacy.util
        from presidio_analyzer.nlp_engine import NlpEngineProvider

        # Presidio downloads a spaCy model that is not installed: never at run time, here.
        if not spacy.util.is_package(settings.nlp_model):
            raise ModelNotInstalled(
                f"spaCy model package {settings.nlp_model!r} is not installed (models are never downloaded at "
                f"run time: install it into the gateway's environment, or set nlp_model: null)"
            )
        return NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy",
            "models": [{"lang_code": settings.language, "model_name": settings.nlp_model}],
        }).create_engine()
    from presidio_analyzer.nlp_engine.no_op_nlp_engine import NoOpNlpEngine

    engine = NoOpNlpEngine(models=[{"lang_code": settings.language, "model_name": "no_op"}])
    engine.load()
    return engine


def merged_windows(text: str, spans: list) -> list[tuple[int, int, set[str]]]:
    """(start, end, entity names) spans around trigger matches → the windows to analyse: overlapping spans
    merged (their names joined), each widened to whitespace so no candidate is cut in half at its edge
    (by at most 2 * TRIGGER_RADIUS)."""
    spans.sort(key=lambda s: s[0])
    windows: list[list] = []
    for start, end, names in spans:
        if windows and start <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], end)
            windows[-1][2] |= names
        else:
            windows.append([start, end, set(names)])
    limit = 2 * TRIGGER_RADIUS
    for window in windows:
        lo = max(0, window[0] - limit)
        window[0] = max(text.rfind(" ", lo, window[0]), text.rfind("\n", lo, window[0]), lo - 1) + 1 if window[0] else 0
        hi = min(len(text), window[1] + limit)
        ends = [i for i in (text.find(" ", window[1], hi), text.find("\n", window[1], hi)) if i >= 0]
        window[1] = min(ends) if ends else hi
    return [(s, e, w) for s, e, w in windows]


class PiiMasker:
    """Masks PII in text: Presidio's analyzer, run only around trigger matches, then its anonymizer."""

    def __init__(self, settings: MaskingSettings) -> None:
        self.settings = settings
        nlp = _nlp_engine(settings)
        registry = RecognizerRegistryProvider(conf_file=settings.recognizers_file).create_recognizer_registry()
        if settings.nlp_model:
            from presidio_analyzer.predefined_recognizers import SpacyRecognizer

            registry.add_recognizer(SpacyRecognizer(supported_language=settings.language))
        self.analyzer = AnalyzerEngine(
            registry=registry, nlp_engine=nlp, supported_languages=[settings.language],
            context_aware_enhancer=None if settings.nlp_model else _NoContextEnhancer(),
        )
        self.anonymizer = AnonymizerEngine()
        self.triggers = {entity: re.compile(pattern) for entity, pattern in settings.triggers.items()}
        # One scan per distinct trigger, however many entities share it.
        self._trigger_scans: dict[re.Pattern, tuple[str, ...]] = {}
        for entity, pattern in self.triggers.items():
            self._trigger_scans[pattern] = (*self._trigger_scans.get(pattern, ()), entity)
        # Triggers that are a run of n digits (\d{3} for phone numbers and cards, \d{2} for IBANs) share one
        # scan for runs of digits (see _digit_trigger_spans); the others are scanned one by one.
        self._digit_triggers: dict[int, tuple[str, ...]] = {}
        for pattern, sharing in list(self._trigger_scans.items()):
            digits = _DIGIT_RUN_TRIGGER.fullmatch(pattern.pattern)
            if digits and pattern.flags == re.UNICODE and int(digits.group(1)) >= 1:
                self._digit_triggers[int(digits.group(1))] = sharing
                del self._trigger_scans[pattern]
        shortest = min(self._digit_triggers, default=1)
        # \d\d+ rather than \d{2,}: the same matches, found in half the time by Python's re.
        self._digit_runs = re.compile(r"\d" * (shortest - 1) + r"\d+")
        # On ASCII text \d is [0-9]: the runs are found in the text as bytes with each digit "0" and every
        # other character " ", where the search starts with a literal (a quarter of the time).
        self._ascii_digit_runs = re.compile(rb"0" * (shortest - 1) + rb"0+")
        self._scanners = {pattern: _TriggerScan(pattern) for pattern in self.triggers.values()}
        self.operators = {
            entity: OperatorConfig(spec["type"], {k: v for k, v in spec.items() if k != "type"})
            for entity, spec in settings.operators.items()
        }
        factory = self.anonymizer.operators_factory
        self._operator_classes = {  # checked here, so a bad operator name fails at load, not per reply
            entity: factory.create_operator_class(config.operator_name, OperatorType.Anonymize)
            for entity, config in self.operators.items()
        }
        self.supported = set(self.analyzer.get_supported_entities(settings.language))
        self._entities: dict[str, tuple[str, ...]] = {}
        self._allowed = frozenset(settings.allow_list)
        # Without an NLP model each recognizer is called directly (see _analyze); the engine's per-call
        # set-up (recognizer lookup, empty NLP artifacts, result bookkeeping) would cost about as
        # much as the recognizers themselves on the small windows around triggers.
        self._direct = not settings.nlp_model
        self._recognizers: dict[str, tuple[EntityRecognizer, ...]] = {}
        self._direct_patterns: dict[int, _DirectPatterns | _DirectIban] = {}
        self._recognizer_plans: dict[tuple[str, ...], tuple[EntityRecognizer, ...]] = {}
        if self._direct:
            self._no_nlp = self.analyzer.nlp_engine.process_text("", settings.language)
            for entity in self.supported:
                found = self.analyzer.registry.get_recognizers(language=settings.language, entities=[entity])
                for recognizer in found:
                    if not recognizer.is_loaded:
                        recognizer.load()
                        recognizer.is_loaded = True
                self._recognizers[entity] = tuple(found)
            for found in self._recognizers.values():
                for recognizer in found:
                    if _DirectPatterns.serves(recognizer):
                        self._direct_patterns[id(recognizer)] = _DirectPatterns(recognizer, settings.score_threshold)
                    elif _DirectIban.serves(recognizer):
                        self._direct_patterns[id(recognizer)] = _DirectIban(recognizer)

    def entities(self, direction: str) -> tuple[str, ...]:
        found = self._entities.get(direction)
        if found is None:  # settings and supported entities are fixed for this engine's life
            wanted = self.settings.direction(direction).entities
            found = self._entities[direction] = tuple(e for e in wanted if e in self.supported)
        return found

    def may_contain(self, text: str, entities: Iterable[str]) -> bool:
        """False only when no entity can be present: every one has a trigger and none occurs (in the
        text as the recognizers read it, see normalize.py)."""
        return self._may_contain(normalize(text).text, entities)

    def _may_contain(self, text: str, entities: Iterable[str]) -> bool:
        searched: set[re.Pattern] = set()  # entities sharing a trigger: one search
        for entity in entities:
            trigger = self.triggers.get(entity)
            if trigger is None:
                return True
            if trigger not in searched:
                if self._scanners[trigger].search(text):
                    return True
                searched.add(trigger)
        return False

    def find(self, text: str, entities: Iterable[str]) -> list[Span]:
        """The findings in text, as spans of text itself. The recognizers (and triggers) read the text
        normalized once (no-break spaces, full-width digits, escapes, zero-width characters...: see
        normalize.py); each finding is mapped back to the characters of text it was read from."""
        return self._find(normalize(text), tuple(entities))

    def _find(self, normalized: Normalized, entities: tuple[str, ...]) -> list[Span]:
        spans = self._find_in(normalized.text, entities)
        if not normalized.changed:
            return spans
        mapped = []
        for span in spans:
            start, end = normalized.original_span(span.start, span.end)
            mapped.append(Span(span.entity_type, start, end, span.score))
        return sorted(mapped, key=lambda s: (s.start, s.end))

    def _find_in(self, text: str, entities: tuple[str, ...]) -> list[Span]:
        untriggered = [e for e in entities if e not in self.triggers]
        results: list[Found] = []
        if untriggered:
            results += self._analyze(text, 0, len(text), untriggered)
        for start, end, wanted in self._trigger_windows(text, [e for e in entities if e in self.triggers]):
            results += self._analyze(text, start, end, sorted(wanted))
        if not results:
            return []
        results = remove_duplicates(results)
        return sorted((Span(*r) for r in results), key=lambda s: (s.start, s.end))

    def _trigger_windows(self, text: str, entities: list[str]) -> list[tuple[int, int, set[str]]]:
        wanted = set(entities)
        spans = []
        for pattern, sharing in self._trigger_scans.items():
            names = wanted.intersection(sharing)
            if names:
                spans += [(max(0, start - TRIGGER_RADIUS), min(len(text), end + TRIGGER_RADIUS), names)
                          for start, end in self._scanners[pattern].spans(text)]
        if self._digit_triggers:
            spans += self._digit_trigger_spans(text, wanted)
        return merged_windows(text, spans)

    def _digit_trigger_spans(self, text: str, wanted: set[str]) -> list[list]:
        """The spans around the matches of the \\d{n} triggers, from one scan for runs of digits.

        In a run of L digits starting at s, \\d{n} matches at s, s+n, ... (L // n matches): their spans
        around them overlap one another, so the windows merged from them (see _trigger_windows) are the
        windows merged from the one span [s - radius, s + n * (L // n) + radius] given here, with the same
        entities. The windows, and the text analysed, are the same as with a scan per trigger
        (tests/test_masking_engine.py compares both ways). Spans that overlap or touch (the next starts at
        or before the end of the last) are given as one, their entities joined: _trigger_windows would merge
        them into the same window, and the runs come in order, so the spans stay sorted by start."""
        triggers = [(n, names) for n, sharing in self._digit_triggers.items() if (names := wanted.intersection(sharing))]
        if not triggers:
            return []
        spans: list[list] = []
        size = len(text)
        if text.isascii():
            runs = self._ascii_digit_runs.finditer(text.encode("ascii").translate(_DIGITS_AS_ZERO))
        else:
            runs = self._digit_runs.finditer(text)
        last = None
        for run in runs:
            start, end = run.span()
            length = end - start
            low = max(0, start - TRIGGER_RADIUS)
            for n, names in triggers:
                if length >= n:
                    high = min(size, start + n * (length // n) + TRIGGER_RADIUS)
                    if last is not None and low <= last[1]:
                        if high > last[1]:
                            last[1] = high
                        if not names <= last[2]:
                            last[2] = last[2] | names
                    else:
                        last = [low, high, names]
                        spans.append(last)
        return spans

    def _analyze(self, text: str, start: int, end: int, entities: list[str]) -> list[Found]:
        if self._direct:
            found = self._run_recognizers(text[start:end], entities)
        else:
            found = [(r.entity_type, r.start, r.end, r.score) for r in self.analyzer.analyze(
                text[start:end],
                language=self.settings.language,
                entities=entities,
                score_threshold=self.settings.score_threshold,
                allow_list=list(self.settings.allow_list) or None,
            )]
        if start:
            found = [(entity, s + start, e + start, score) for entity, s, e, score in found]
        return found

    def _run_recognizers(self, text: str, entities: list[str]) -> list[Found]:
        """What AnalyzerEngine.analyze returns for pattern recognizers without NLP: each recognizer's
        findings of the wanted entities, at or above the score threshold, not on the allow-list
        (exact match), duplicates removed."""
        key = tuple(entities)
        recognizers = self._recognizer_plans.get(key)
        if recognizers is None:  # each recognizer once, in the order of the entities it serves
            found = {id(r): r for entity in entities for r in self._recognizers.get(entity, ())}
            recognizers = self._recognizer_plans[key] = tuple(found.values())
        results: list[Found] = []
        for recognizer in recognizers:
            results += self._run_recognizer(recognizer, text, entities)
        if not results:
            return results
        threshold, allowed = self.settings.score_threshold, self._allowed
        kept = [r for r in results if r[0] in entities and r[3] >= threshold
                and not (allowed and text[r[1]:r[2]] in allowed)]
        return remove_duplicates(kept)

    def _run_recognizer(self, recognizer: EntityRecognizer, text: str, entities: list[str]) -> list[Found]:
        direct = self._direct_patterns.get(id(recognizer))
        if direct is not None:
            return direct.analyze(text)
        return [(r.entity_type, r.start, r.end, r.score)
                for r in recognizer.analyze(text=text, entities=entities, nlp_artifacts=self._no_nlp)]

    def apply(self, text: str, spans: list[Span]) -> str:
        """Rewrite the given spans of text with their entities' operators."""
        if not spans:
            return text
        if self._apart(text, spans):
            return self._apply_apart(text, spans)
        # Overlapping spans, or neighbours Presidio would merge: its anonymizer resolves them.
        results = [RecognizerResult(s.entity_type, s.start, s.end, s.score) for s in spans]
        return self.anonymizer.anonymize(text=text, analyzer_results=results, operators=self.operators).text

    @staticmethod
    def _apart(text: str, spans: list[Span]) -> bool:
        """True when Presidio's anonymizer would rewrite each span on its own: sorted, apart, and no two
        of one entity type separated by spaces alone (those it merges into one)."""
        for before, after in zip(spans, spans[1:]):
            if before.end >= after.start:
                return False
            if before.entity_type == after.entity_type and not text[before.end:after.start].strip(" "):
                return False
        return True

    def _apply_apart(self, text: str, spans: list[Span]) -> str:
        """AnonymizerEngine.anonymize for spans that are apart: each span's operator, as Presidio calls
        it (its parameters copied, the entity type added, validated, applied), without the engine's
        conflict resolution and result bookkeeping."""
        pieces, at = [], 0
        for span in spans:
            entity = span.entity_type if span.entity_type in self._operator_classes else "DEFAULT"
            operator = self._operator_classes.get(entity)
            if operator is None:  # no DEFAULT configured: Presidio's default operator
                return self.anonymizer.anonymize(
                    text=text, analyzer_results=[RecognizerResult(s.entity_type, s.start, s.end, s.score) for s in spans],
                    operators=self.operators).text
            params = self.operators[entity].params.copy()
            params["entity_type"] = span.entity_type
            operator.validate(params=params)
            pieces += (text[at:span.start], operator.operate(params=params, text=text[span.start:span.end]))
            at = span.end
        pieces.append(text[at:])
        return "".join(pieces)

    def mask(self, text: str, direction: str) -> tuple[str, list[str]]:
        """The masked text and the entity type of every finding (values are never returned)."""
        entities = self.entities(direction)
        if not text:
            return text, []
        normalized = normalize(text)  # once: the triggers and the recognizers read the same text
        if not self._may_contain(normalized.text, entities):
            return text, []
        spans = self._find(normalized, entities)
        return self.apply(text, spans), [s.entity_type for s in spans]


_shared: dict[tuple, PiiMasker] = {}
_building = threading.Lock()  # rules reloads may build off the event loop, in threads: still one engine


def shared_masker(settings: MaskingSettings) -> PiiMasker:
    """One engine per masking configuration in this process, for every addon that masks or looks for PII.

    The masking addon (streams, small bodies), the policy's `pii` conditions and the approval
    previews share it: one Presidio analyzer and one spaCy model in memory, not three. Built again
    when the settings or the recognizers file change.
    """
    recognizers = Path(settings.recognizers_file)
    try:
        stat = recognizers.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        stamp = None
    key = (repr(settings), stamp)
    masker = _shared.get(key)
    if masker is None:
        with _building:
            masker = _shared.get(key)
            if masker is None:
                masker = PiiMasker(settings)
                _shared.clear()  # an older configuration's engine is no longer anyone's
                _shared[key] = masker
    return masker
