"""Normalization before analysis: the corpus of spellings in tests/data/pii_spellings.yaml, whole and
streamed, and the normalizer's map back to the text as sent (no mitmproxy, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from auditgate.masking import normalize as normalize_module
from auditgate.masking.config import load_masking_settings
from auditgate.masking.engine import PiiMasker
from auditgate.masking.normalize import fold_char, normalize
from auditgate.masking.stream import TextStreamMasker
from tests.fake_openai import pii_reply
from tests.masking_fixtures import PII_SENTENCE, shipped_rules

CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "pii_spellings.yaml").read_text(encoding="utf-8"))
SPELLINGS = CORPUS["spellings"]
ORDINARY = CORPUS["ordinary"]


@pytest.fixture(scope="module")
def masker() -> PiiMasker:
    return PiiMasker(load_masking_settings(shipped_rules()))


def test_the_corpus_covers_the_spellings_the_issue_lists():
    names = " ".join(case["name"] for case in SPELLINGS)
    for needed in ("card with no-break spaces", "narrow no-break", "thin spaces", "card with dots", "ssn with no-break",
                   "email percent-encoded", "full-width at", "full-width digits", "zero-width space", "backslash-u",
                   "soft hyphen", "mixed separators", "phone with no-break", "%2E"):
        assert needed in names or any(needed in case["text"] for case in SPELLINGS), needed
    assert len(SPELLINGS) >= 50 and len(ORDINARY) >= 10


@pytest.mark.parametrize("case", SPELLINGS, ids=[case["name"] for case in SPELLINGS])
def test_every_spelling_is_masked_and_the_rest_kept_as_sent(masker, case):
    assert masker.mask(case["text"], "response") == (case["masked"], case["entities"])
    # find() reports the characters of the text as sent: they are what the masked text replaced.
    spans = masker.find(case["text"], masker.entities("response"))
    assert [s.entity_type for s in spans] == case["entities"]
    assert masker.apply(case["text"], spans) == case["masked"]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_left_alone(masker, text):
    assert masker.mask(text, "response") == (text, [])


@pytest.mark.parametrize("case", SPELLINGS, ids=[case["name"] for case in SPELLINGS])
def test_every_spelling_is_masked_when_streamed_at_every_split_point(masker, case):
    entities = masker.entities("response")
    text = case["text"]
    splits = [[text[:cut], text[cut:]] for cut in range(1, len(text))] + [list(text)]
    for pieces in splits:
        stream = TextStreamMasker(lambda t: masker.find(t, entities), masker.apply, 64)
        out = "".join(stream.feed(p) for p in pieces) + stream.finish()
        assert out == case["masked"], pieces


# ---- the normalizer ---------------------------------------------------------------------------------
def test_plain_ascii_prose_is_not_rewritten_and_skips_the_character_stage(monkeypatch):
    def no_character_stage(text):
        raise AssertionError("the character stage ran on plain ASCII text")

    monkeypatch.setattr(normalize_module, "_stage_one_pieces", no_character_stage)
    for text in (pii_reply(1400), PII_SENTENCE, *[t for t in ORDINARY if t.isascii() and not set("%&\\") & set(t)]):
        normalized = normalize(text)
        assert normalized.text is text and not normalized.changed


def test_triggers_read_the_normalized_text(masker):
    # None of these holds the "@" the email trigger looks for, or three ASCII digits in a row.
    assert masker.may_contain("alice%40example.com", ["EMAIL_ADDRESS"])
    assert masker.may_contain("alice\uff20example.com", ["EMAIL_ADDRESS"])
    assert masker.may_contain("\uff14\uff11\uff11\uff11", ["CREDIT_CARD"])
    assert not masker.may_contain("alice at example dot com", ["EMAIL_ADDRESS"])


@pytest.mark.parametrize("ch, folded", [
    ("\u00a0", " "), ("\u202f", " "), ("\u2009", " "), ("\u3000", " "), ("\uff20", "@"), ("\uff11", "1"),
    ("\u0661", "1"), ("\u200b", ""), ("\u200c", ""), ("\u200d", ""), ("\u2060", ""), ("\ufeff", ""), ("\u00ad", ""),
    ("\ufe0f", ""), ("\u2011", "-"), ("\u2013", "-"), ("\u2212", "-"), ("\u00b7", "."), ("\u00e9", "\u00e9"), ("a", "a"),
])
def test_fold_char(ch, folded):
    assert fold_char(ch) == folded


_PIECES = ["a", "Z", "7", "42", " ", ".", "-", "@", "%", "%40", "%2E", "%C3%A9", "%E2%80%8B", "%ZZ", "%C3", "\\u0040",
           "\\u00a0", "\\ud800", "\\x2e", "&#64;", "&#x2E;", "&commat;", "&nosuch;", "&", "\u00a0", "\u202f", "\u200b",
           "\ufeff", "\u00ad", "\uff20", "\uff14", "\u0664", "\u00e9", "e\u0301", "\ufb01", "\u2474", "\U0001F469\u200d",
           "4111", "1111", "_", "/", "  ", " - ", "\t", "\n"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=30))
def test_the_map_back_covers_the_original_in_order(pieces):
    text = "".join(pieces)
    normalized = normalize(text)
    last = (0, 0)
    for i in range(len(normalized.text)):
        start, end = normalized.original_span(i, i + 1)
        assert 0 <= start < end <= len(text)
        assert start >= last[1] or (start, end) == last, (i, text)  # in order; a piece may give several characters
        last = (start, end)
        # The original characters read as (at least) this normalized character.
        assert normalized.text[i] in normalize(text[start:end]).text, (i, text)
    if normalized.text:
        assert normalized.original_span(0, len(normalized.text))[1] <= len(text)
    if not normalized.changed:
        assert normalized.text == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=30))
def test_normalizing_is_idempotent_on_characters(pieces):
    # Folding a folded text changes nothing more (escapes aside: "%2540" is "%40" once decoded).
    text = "".join(p for p in pieces if "%" not in p and "\\" not in p and "&" not in p)
    once = normalize(text).text
    assert normalize(once).text == once
