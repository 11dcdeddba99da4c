"""Finds and masks personal data in plain text with Presidio; also the entry points of masking workers."""

from __future__ import annotations

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
from presidio_analyzer.recognizer_registry import RecognizerRegistryProvider  # noqa: E402
from presidio_anonymizer import AnonymizerEngine  # noqa: E402
from presidio_anonymizer.entities import OperatorConfig  # noqa: E402
from presidio_anonymizer.operators import OperatorType  # noqa: E402

from auditgate.masking.config import MaskingSettings  # noqa: E402
from auditgate.masking.normalize import Normalized, normalize  # noqa: E402

# Text around a trigger that a recognizer sees: wide enough for any entity the patterns describe.
TRIGGER_RADIUS = 96
_DIGIT_RUN_TRIGGER = re.compile(r"\\d\{(\d+)\}")  # a trigger that is a run of n digits, written \d{n}


@dataclass(frozen=True)
class Span:
    entity_type: str
    start: int
    end: int
    score: float


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


class _DirectPatterns:
    """What ``PatternRecognizer.analyze`` returns, without its per-call extras.

    Presidio's own loop looks the compiled pattern up, times it with ``datetime.now()``, logs, and
    builds an explanation object and a metadata dict for every match; on the small windows around
    triggers that costs as much as the matching. Here the patterns are compiled once (the same
    ``regex`` module and flags) and the recognizer's own ``validate_result`` / ``invalidate_result``
    decide the scores, as in Presidio. One difference, on purpose: a pattern that runs into the regex
    timeout raises (the masking fails closed) where Presidio logs it and skips the pattern.
    """

    def __init__(self, recognizer: PatternRecognizer, score_threshold: float = 0.0) -> None:
        flags = recognizer.global_regex_flags
        # A pattern scoring below the threshold can only matter if validation may raise its score: where
        # the recognizer has no validation, its findings would all be dropped, so it is not run at all.
        validates = type(recognizer).validate_result is not PatternRecognizer.validate_result
        self.patterns = [(regex.compile(p.regex, flags=flags), p.score) for p in recognizer.patterns
                         if validates or p.score >= score_threshold]
        self.entity_type = recognizer.supported_entities[0]
        self.validate = recognizer.validate_result
        self.invalidate = recognizer.invalidate_result

    @staticmethod
    def serves(recognizer: EntityRecognizer) -> bool:
        """True for a pattern recognizer that keeps Presidio's pattern loop (subclasses that replace
        ``analyze`` or the loop, like the IBAN recognizer, run their own)."""
        cls = type(recognizer)
        return (isinstance(recognizer, PatternRecognizer) and bool(recognizer.patterns)
                and cls.analyze is PatternRecognizer.analyze
                and cls._PatternRecognizer__analyze_patterns is PatternRecognizer._PatternRecognizer__analyze_patterns)

    def analyze(self, text: str) -> list[RecognizerResult]:
        results = []
        lowest, highest = EntityRecognizer.MIN_SCORE, EntityRecognizer.MAX_SCORE
        for pattern, score in self.patterns:
            for match in pattern.finditer(text, timeout=REGEX_TIMEOUT_SECONDS):
                start, end = match.span()
                if start == end:
                    continue
                value = text[start:end]
                valid = self.validate(value)
                found = score if valid is None else (highest if valid else lowest)
                if self.invalidate(value):
                    found = lowest
                if found > lowest:
                    results.append(RecognizerResult(self.entity_type, start, end, found))
        return EntityRecognizer.remove_duplicates(results)


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
        self._allowed = frozenset(settings.allow_list)
        # Without an NLP model each recognizer is called directly (see _analyze); the engine's per-call
        # set-up (recognizer lookup, empty NLP artifacts, result bookkeeping) would cost about as
        # much as the recognizers themselves on the small windows around triggers.
        self._direct = not settings.nlp_model
        self._recognizers: dict[str, tuple[EntityRecognizer, ...]] = {}
        self._direct_patterns: dict[int, _DirectPatterns] = {}
        if self._direct:
            self._no_nlp = self.analyzer.nlp_engine.process_text("", settings.language)
            for entity in self.supported:
                found = self.analyzer.registry.get_recognizers(language=settings.language, entities=[entity])
                for recognizer in found:
                    if not recognizer.is_loaded:
                        recognizer.load()
                        recognizer.is_loaded = True
                self._recognizers[entity] = tuple(found)
            self._direct_patterns = {
                id(recognizer): _DirectPatterns(recognizer, settings.score_threshold)
                for found in self._recognizers.values() for recognizer in found if _DirectPatterns.serves(recognizer)
            }

    def entities(self, direction: str) -> tuple[str, ...]:
        wanted = self.settings.direction(direction).entities
        return tuple(e for e in wanted if e in self.supported)

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
                if trigger.search(text):
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
        results: list[RecognizerResult] = []
        if untriggered:
            results += self._analyze(text, 0, len(text), untriggered)
        for start, end, wanted in self._trigger_windows(text, [e for e in entities if e in self.triggers]):
            results += self._analyze(text, start, end, sorted(wanted))
        results = EntityRecognizer.remove_duplicates(results)
        return sorted((Span(r.entity_type, r.start, r.end, r.score) for r in results), key=lambda s: (s.start, s.end))

    def _trigger_windows(self, text: str, entities: list[str]) -> list[tuple[int, int, set[str]]]:
        wanted = set(entities)
        spans = []
        for pattern, sharing in self._trigger_scans.items():
            names = wanted.intersection(sharing)
            if names:
                spans += [(max(0, m.start() - TRIGGER_RADIUS), min(len(text), m.end() + TRIGGER_RADIUS), names)
                          for m in pattern.finditer(text)]
        if self._digit_triggers:
            spans += self._digit_trigger_spans(text, wanted)
        spans.sort(key=lambda s: s[0])
        windows: list[list] = []
        for start, end, names in spans:
            if windows and start <= windows[-1][1]:
                windows[-1][1] = max(windows[-1][1], end)
                windows[-1][2] |= names
            else:
                windows.append([start, end, set(names)])
        # Widen each window to whitespace so no candidate is cut in half at its edge (bounded).
        limit = 2 * TRIGGER_RADIUS
        for window in windows:
            lo = max(0, window[0] - limit)
            window[0] = max(text.rfind(" ", lo, window[0]), text.rfind("\n", lo, window[0]), lo - 1) + 1 if window[0] else 0
            hi = min(len(text), window[1] + limit)
            ends = [i for i in (text.find(" ", window[1], hi), text.find("\n", window[1], hi)) if i >= 0]
            window[1] = min(ends) if ends else hi
        return [(s, e, w) for s, e, w in windows]

    def _digit_trigger_spans(self, text: str, wanted: set[str]) -> list[tuple[int, int, set[str]]]:
        """The spans around the matches of the \\d{n} triggers, from one scan for runs of digits.

        In a run of L digits starting at s, \\d{n} matches at s, s+n, ... (L // n matches): their spans
        around them overlap one another, so the windows merged from them (see _trigger_windows) are the
        windows merged from the one span [s - radius, s + n * (L // n) + radius] given here, with the same
        entities. The windows, and the text analysed, are the same as with a scan per trigger
        (tests/test_masking_engine.py compares both ways)."""
        triggers = [(n, names) for n, sharing in self._digit_triggers.items() if (names := wanted.intersection(sharing))]
        if not triggers:
            return []
        spans, size = [], len(text)
        for run in self._digit_runs.finditer(text):
            start, length = run.start(), run.end() - run.start()
            low = max(0, start - TRIGGER_RADIUS)
            spans += [(low, min(size, start + n * (length // n) + TRIGGER_RADIUS), names)
                      for n, names in triggers if length >= n]
        return spans

    def _analyze(self, text: str, start: int, end: int, entities: list[str]) -> list[RecognizerResult]:
        if self._direct:
            found = self._run_recognizers(text[start:end], entities)
        else:
            found = self.analyzer.analyze(
                text[start:end],
                language=self.settings.language,
                entities=entities,
                score_threshold=self.settings.score_threshold,
                allow_list=list(self.settings.allow_list) or None,
            )
        for result in found:
            result.start += start
            result.end += start
        return found

    def _run_recognizers(self, text: str, entities: list[str]) -> list[RecognizerResult]:
        """What AnalyzerEngine.analyze returns for pattern recognizers without NLP: each recognizer's
        findings of the wanted entities, at or above the score threshold, not on the allow-list
        (exact match), duplicates removed."""
        results: list[RecognizerResult] = []
        ran: set[int] = set()
        for entity in entities:
            for recognizer in self._recognizers.get(entity, ()):
                if id(recognizer) not in ran:
                    ran.add(id(recognizer))
                    results += self._run_recognizer(recognizer, text, entities)
        threshold, allowed = self.settings.score_threshold, self._allowed
        kept = [r for r in results if r.entity_type in entities and r.score >= threshold
                and text[r.start:r.end] not in allowed]
        return EntityRecognizer.remove_duplicates(kept)

    def _run_recognizer(self, recognizer: EntityRecognizer, text: str, entities: list[str]) -> list[RecognizerResult]:
        direct = self._direct_patterns.get(id(recognizer))
        if direct is not None:
            return direct.analyze(text)
        return recognizer.analyze(text=text, entities=entities, nlp_artifacts=self._no_nlp)

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
