"""The engine's fast paths give exactly what the general ones give (no mitmproxy, no network).

Each faster way of masking has its general counterpart here, compared on random texts: tuples and our
remove_duplicates against Presidio's RecognizerResult and its remove_duplicates; trigger scans anchored
on literals against finditer; patterns run only around their "@" against the whole window; the IBAN
pre-check and loop against Presidio's IbanRecognizer; and the whole engine against one that runs
Presidio's AnalyzerEngine over windows found with plain finditer scans.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

from auditgate.masking.config import load_masking_settings
from auditgate.masking.engine import (
    _BETWEEN_DIGITS,
    PiiMasker,
    _digits_from_to,
    _DirectIban,
    _DirectPatterns,
    _literal_anchors,
    _runs_around,
    _TriggerScan,
    luhn_valid,
    remove_duplicates,
)
from tests.masking_fixtures import PII_VALUES, shipped_rules


@pytest.fixture(scope="module")
def masker() -> PiiMasker:
    return PiiMasker(load_masking_settings(shipped_rules()))


class _Finditer:
    """A trigger scan the general way."""

    def __init__(self, pattern: re.Pattern) -> None:
        self.pattern = pattern

    def spans(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self.pattern.finditer(text)]

    def search(self, text: str) -> bool:
        return self.pattern.search(text) is not None


@pytest.fixture(scope="module")
def general() -> PiiMasker:
    """The engine the general way: Presidio's AnalyzerEngine on each window (RecognizerResult, its own
    pattern loops, IBAN loop and remove_duplicates), every trigger scanned with finditer."""
    engine = PiiMasker(load_masking_settings(shipped_rules()))
    engine._direct = False
    engine._trigger_scans = {}
    for entity, pattern in engine.triggers.items():
        engine._trigger_scans[pattern] = (*engine._trigger_scans.get(pattern, ()), entity)
    engine._digit_triggers = {}
    engine._scanners = {pattern: _Finditer(pattern) for pattern in engine.triggers.values()}
    return engine


def _spelling_texts() -> list[str]:
    corpus = yaml.safe_load((Path(__file__).parent / "data" / "pii_spellings.yaml").read_text(encoding="utf-8"))
    return [case["text"] for part in corpus.values() if isinstance(part, list) for case in part
            if isinstance(case, dict) and isinstance(case.get("text"), str)]


SPELLINGS = _spelling_texts()
PIECES = [
    *PII_VALUES.values(), "jane@example.org", "a.b-c+d@mail.example.co.uk", "x@y", "@", "@@", "a@b.c", "é@ß.de",
    "https://x.test/?m=jane@example.org", "mailto:bob@example.com", "(ann@example.net)", "'q@example.io'",
    "\"r@example.io\"", "[s@example.io]", "<t@example.io>", "u@example.io;v@example.io", "ſ@example.org",
    "DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "de89370400440532013000", "DE89", "AB12",
    "4111 1111 1111 1111", "4111-1111-1111-1111", "536-22-1234", "536 22 1234", "+1 415-555-0100",
    "(415) 555-0100", "415.555.0100", "10.0.0.1", "::1", "fe80::1", "1.2", "3:4", ":ab:", "sk-", "AKIA",
    "ghp_", "xoxb-", "AIza", "agt_", "12", "123", "2026", "٣٤٥", "１２３", "K", "\u00a0", " ", "  ", "\n", "\t",
    ", ", ".", "-", "/", ":", "=", "&", "'", "\"", "card", "call me", "The quarterly report shows steady growth. ",
]
texts = st.one_of(
    st.lists(st.sampled_from(PIECES), max_size=20).map("".join),
    st.tuples(st.sampled_from(SPELLINGS), st.lists(st.sampled_from(PIECES), max_size=6).map("".join),
              st.sampled_from(SPELLINGS)).map(" ".join),
    st.text(alphabet=st.sampled_from(list("ab1@.:- \n_/sk")), max_size=60),
)


# ---- remove_duplicates ---------------------------------------------------------------------------------
found = st.tuples(st.sampled_from(["CREDIT_CARD", "EMAIL_ADDRESS", "US_SSN"]), st.integers(0, 20), st.integers(0, 8),
                  st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.6, 0.9, 1.0])).map(lambda f: (f[0], f[1], f[1] + f[2], f[3]))


@settings(max_examples=1000, deadline=None)
@given(st.lists(found, max_size=12))
def test_remove_duplicates_equals_presidios(results):
    theirs = EntityRecognizer.remove_duplicates([RecognizerResult(*r) for r in results])
    assert remove_duplicates(results) == [(r.entity_type, r.start, r.end, r.score) for r in theirs]


# ---- trigger scans ---------------------------------------------------------------------------------------
EXTRA_TRIGGERS = [
    r"\d\.\d|:[0-9A-Fa-f]{0,4}:", r"sk-|AKIA|ASIA|gh[pousr]_|xox[abprs]-|AIza|agt_", "@", r"(?<=a)\b1", r"\bsk",
    r"a\d{2}b|:", r"[ab]{2}1|\.", r"1+\.", r"(?m)^ab", r"(?m)b$", r"a(?=b)", r"(?<![\w+])\+\d", r"ab|a", "k-?",
    r"(a)\1", r"@\S+", r"\d{3}",
]


def test_the_shipped_triggers_are_anchored(masker):
    # Those that are not a run of digits (the digit triggers share one scan of their own).
    scans = [masker._scanners[p] for p in masker._trigger_scans]
    assert scans and all(scan.anchors for scan in scans)
    assert _literal_anchors(re.compile(r"\d\.\d|:[0-9A-Fa-f]{0,4}:")) == ((".", 1), (":", 0))
    assert _literal_anchors(re.compile(r"\d{3}")) is None
    assert _literal_anchors(re.compile("ab", re.IGNORECASE)) is None


@settings(max_examples=400, deadline=None)
@given(texts, st.sampled_from(EXTRA_TRIGGERS))
def test_trigger_scans_find_what_finditer_finds(text, trigger):
    pattern = re.compile(trigger)
    scan = _TriggerScan(pattern)
    assert scan.spans(text) == [m.span() for m in pattern.finditer(text)]
    assert scan.search(text) == (pattern.search(text) is not None)


def test_a_literal_on_every_character_falls_back_to_finditer():
    pattern = re.compile(r"\d\.\d")
    text = "1." * 500 + "1"
    assert _TriggerScan(pattern)._starts(text) is None
    assert _TriggerScan(pattern).spans(text) == [m.span() for m in pattern.finditer(text)]


# ---- recognizers: confined patterns and the IBAN pre-check ------------------------------------------------
def test_the_shipped_email_patterns_run_around_their_at_sign_and_the_iban_check_applies(masker):
    confined = [p for d in masker._direct_patterns.values() if isinstance(d, _DirectPatterns)
                for p in d.patterns if isinstance(p[2], str)]
    assert len(confined) == 2  # Presidio's email pattern and the shipped one after a URL or form separator
    ibans = [d for d in masker._direct_patterns.values() if isinstance(d, _DirectIban)]
    assert ibans and all(d.needs_letters_then_digits for d in ibans)


@settings(max_examples=600, deadline=None)
@given(texts)
def test_direct_recognizers_equal_presidios(masker, text):
    threshold = masker.settings.score_threshold
    for recognizers in masker._recognizers.values():
        for recognizer in recognizers:
            direct = masker._direct_patterns.get(id(recognizer))
            if direct is None:
                continue
            ours = {r for r in direct.analyze(text) if r[3] >= threshold}
            theirs = {(r.entity_type, r.start, r.end, r.score) for r in recognizer.analyze(
                text=text, entities=recognizer.supported_entities, nlp_artifacts=masker._no_nlp)
                if r.score >= threshold}
            assert ours == theirs, recognizer.name


@settings(max_examples=600, deadline=None)
@given(texts)
def test_confined_patterns_find_what_they_find_in_the_whole_window(masker, text):
    for direct in masker._direct_patterns.values():
        if not isinstance(direct, _DirectPatterns):
            continue
        for pattern, score, around in direct.patterns:
            if isinstance(around, str):
                whole = direct._matches(pattern, score, text, 0, len(text))
                confined = [f for low, high in _runs_around(text, around)
                            for f in direct._matches(pattern, score, text, low, high)]
                assert confined == whole


def test_the_shipped_card_ssn_and_phone_patterns_run_between_their_digits(masker):
    between = {d.entity_type: [p[2] for p in d.patterns] for d in masker._direct_patterns.values()
               if isinstance(d, _DirectPatterns) and any(isinstance(p[2], tuple) for p in d.patterns)}
    assert between == {"CREDIT_CARD": [(0, 0)], "US_SSN": [(0, 0)], "PHONE_NUMBER": [(1, 1), (1, 0)]}
    assert all(isinstance(d.validate, functools.partial) for d in masker._direct_patterns.values()
               if isinstance(d, _DirectPatterns) and d.entity_type == "CREDIT_CARD")


DIGIT_PIECES = ["0", "1", "4", "9", "٣", "１", "²", " ", "  ", "-", ".", "(", ")", "+", "\n", "\u00a0", "\u2007", "a", "x",
                "_", "4111 1111 1111 1111", "1234567890123", "1000000000000", "+1 415-555-0100", "(415) 555-0100",
                "415.555.0100", "536-22-1234", "536 22 1234", "123456789", "12345-6789", "123-456789", "+44 (20) 7946 0958",
                "+44 (20) 7946 (0958)", ")a", "9)x", "x(", "a+", "-1", "1-", "1."]
digit_texts = st.one_of(texts, st.lists(st.sampled_from(DIGIT_PIECES), max_size=16).map("".join),
                        st.text(alphabet=st.sampled_from(list("0123456789 -.()+_a\n٣１")), max_size=50))


def _between_digit_patterns(masker) -> list[tuple[_DirectPatterns, object, float, tuple[int, int]]]:
    """Every pattern of the recognizers that has a (before, after) reading, those scoring below the
    threshold included (a lower threshold would run them)."""
    found = []
    for recognizers in masker._recognizers.values():
        for recognizer in recognizers:
            if _DirectPatterns.serves(recognizer):
                direct = _DirectPatterns(recognizer, 0.0)
                found += [(direct, *p) for p in direct.patterns if isinstance(p[2], tuple)]
    return found


def test_every_between_digits_pattern_is_one_of_the_shipped_or_presidios(masker):
    assert {p.pattern for _, p, _, _ in _between_digit_patterns(masker)} == set(_BETWEEN_DIGITS)


@settings(max_examples=1500, deadline=None)
@given(digit_texts)
def test_between_digits_patterns_find_what_they_find_in_the_whole_window(masker, text):
    digits = _digits_from_to(text)
    for direct, pattern, score, (before, after) in _between_digit_patterns(masker):
        whole = [m.span() for m in pattern.finditer(text)]
        if digits is None:
            assert whole == []
            continue
        low, high = max(0, digits[0] - before - 1), min(len(text), digits[1] + after + 1)
        assert [m.span() for m in pattern.finditer(text, low, high)] == whole, pattern.pattern
        assert direct._matches(pattern, score, text, low, high) == direct._matches(pattern, score, text, 0, len(text))


@settings(max_examples=800, deadline=None)
@given(digit_texts)
def test_digits_from_to_finds_the_first_and_last_digit(text):
    import regex

    spans = [m.span() for m in regex.finditer(r"\d", text)]
    assert _digits_from_to(text) == ((spans[0][0], spans[-1][1]) if spans else None)


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.text(alphabet=st.sampled_from(list("0123456789 -٣１²x.")), max_size=24),
                 st.sampled_from(["4111 1111 1111 1111", "4111-1111-1111-1112", "", " ", "79927398713"])))
def test_luhn_equals_presidios(value):
    recognizer = CreditCardRecognizer()

    def outcome(check):
        try:
            return check(value)
        except Exception as e:  # the same exception, where Presidio's raises
            return type(e)

    assert outcome(lambda v: luhn_valid(v, tuple(recognizer.replacement_pairs))) == outcome(recognizer.validate_result)


# ---- the whole engine ------------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(texts)
def test_masking_equals_the_general_engine(masker, general, text):
    assert masker.mask(text, "response") == general.mask(text, "response")
    entities = masker.entities("response")
    assert masker.find(text, entities) == general.find(text, entities)


def test_the_spellings_corpus_masks_as_the_general_engine(masker, general):
    assert len(SPELLINGS) > 50
    for text in SPELLINGS:
        for variant in (text, f"{text} {text}", f"see {PII_VALUES['EMAIL_ADDRESS']} and {text}"):
            assert masker.mask(variant, "response") == general.mask(variant, "response"), variant
