"""policy.yaml: ordered rules, first match wins, and what each action means (no mitmproxy).

    default: allow                      # allow | block | log: what happens when no rule matches
    unreadable_content: refuse          # refuse | allow: inline content policy cannot read (PDF, binary
                                        # files, files by URL); refused 415 gateway_content_unreadable
    rules:
      - id: block-private-keys          # required, unique; recorded with every flow it decides
        description: ...                # optional, for people
        match:                          # every condition given must hold (a list holds when any entry does)
          callers: [alice, "ci-*"]      # caller names (globs)
          groups: [contractors]         # caller groups
          hosts: [api.openai.com]       # upstream host or host:port (globs)
          methods: [POST]
          paths: ["/v1/responses"]      # request paths (globs)
          endpoints: [responses, chat]  # responses | chat | embeddings | models | traces | other | realtime
          models: ["gpt-4o*"]           # the request's "model" (globs)
          text:                         # over the prompt text (instructions, input, messages, tool outputs,
                                        # object keys, inline text files), as sent and normalized
            keywords: ["ignore previous instructions"]   # whole words/phrases; spaces match any whitespace
            regex: ['-----BEGIN [A-Z ]*PRIVATE KEY-----']
            ignore_case: true           # default true
          tools: ["*shell*", "exec*"]   # tool names the request offers or calls (globs, case-insensitive)
          pii: [CREDIT_CARD, US_SSN]    # entity types the masking engine detects in the prompt text
          body_size: {min: 1000000}     # request body bytes (min and/or max)
        action: block                   # allow | block | require_approval | log
        message: ...                    # block: shown to the caller; log: in the record
        approvers: [security]           # require_approval: groups that may approve (required)
        timeout_seconds: 300            # require_approval: how long the request is held at most
        reuse_seconds: 0                # require_approval: identical requests within this window pass
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from auditgate.core.config import ConfigError, RulesFile
from auditgate.core.prompt_text import PromptTexts, as_prompt_texts

POLICY_FILE = "policy.yaml"
ACTIONS = ("allow", "block", "require_approval", "log")
DEFAULT_ACTIONS = ("allow", "block", "log")
ENDPOINT_KINDS = ("responses", "chat", "embeddings", "models", "traces", "other", "realtime")
# Below the openai SDK's default read timeout (600 s), so the caller hears "timed out" from us, not
# from its own client (which would then retry).
DEFAULT_APPROVAL_TIMEOUT = 300.0
MAX_APPROVAL_TIMEOUT = 24 * 3600.0

_TOP_KEYS = {"default", "rules", "unreadable_content"}
UNREADABLE_SETTINGS = ("refuse", "allow")
# The refusal of content policy cannot read: not a rule's block (403), a request the gateway cannot inspect.
UNREADABLE_RULE = "unreadable-content"
UNREADABLE_REFUSAL = (415, "gateway_content_unreadable")
_RULE_KEYS = {"id", "description", "match", "action", "message", "approvers", "timeout_seconds", "reuse_seconds"}
_MATCH_KEYS = {"callers", "groups", "hosts", "methods", "paths", "endpoints", "models", "text", "tools", "pii",
               "body_size"}
_TEXT_KEYS = {"keywords", "regex", "ignore_case"}
_SIZE_KEYS = {"min", "max"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


# ---- what a rule is matched against ----------------------------------------------------------------
@dataclass
class MatchInput:
    """What the rules look at. The costly facts (prompt text, tools, PII) are computed on first use only."""

    caller: str | None = None
    groups: tuple[str, ...] = ()
    host: str = ""
    port: int = 0
    method: str = ""
    path: str = ""
    endpoint: str = "other"
    body_size: int = 0
    model_fn: Callable[[], str | None] = lambda: None
    texts_fn: Callable[[], list[str]] = list  # a PromptTexts (core.prompt_text) or a plain list
    tools_fn: Callable[[], list[str]] = list
    pii_fn: Callable[[], set[str]] = set
    _cache: dict = field(default_factory=dict, repr=False)

    def _get(self, name: str, fn: Callable):
        if name not in self._cache:
            self._cache[name] = fn()
        return self._cache[name]

    @property
    def model(self) -> str | None:
        return self._get("model", self.model_fn)

    @property
    def texts(self) -> PromptTexts:
        return self._get("texts", lambda: as_prompt_texts(self.texts_fn()))

    @property
    def text(self) -> str:
        return self.texts.joined

    @property
    def folded_text(self) -> str:
        return self._get("folded_text", lambda: self.text.lower())

    @property
    def normalized_text(self) -> str:
        """The text normalized (the same object as ``text`` when that changes nothing)."""
        return self.texts.normalized

    @property
    def folded_normalized_text(self) -> str:
        def fold() -> str:
            normalized = self.normalized_text
            return self.folded_text if normalized is self.text else normalized.lower()
        return self._get("folded_normalized_text", fold)

    def text_forms(self, folded: bool) -> tuple[str, str]:
        """(text, normalized text), lower-cased when ``folded``: what a text condition searches, worked
        out once per request (every text condition of every rule asks)."""
        forms = self._cache.get(("forms", folded))
        if forms is None:
            forms = self._cache[("forms", folded)] = (
                (self.folded_text, self.folded_normalized_text) if folded else (self.text, self.normalized_text))
        return forms

    @property
    def unreadable(self) -> tuple[str, ...]:
        """What inline content the request carries that policy cannot read (media types, never content)."""
        return self.texts.unreadable

    @property
    def tools(self) -> list[str]:
        return self._get("tools", self.tools_fn)

    @property
    def pii(self) -> set[str]:
        return self._get("pii", self.pii_fn)


# ---- conditions ---------------------------------------------------------------------------------------
def _globs(patterns: tuple[str, ...], value: str | None, fold: bool = False) -> bool:
    if value is None:
        return False
    value = value.lower() if fold else value
    return any(fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class TextCondition:
    patterns: tuple[re.Pattern, ...]
    labels: tuple[str, ...]  # what each pattern is, for the record (the keyword, or "regex #n"): never the text
    ignore_case: bool = True
    # Keywords are searched as plain literals first (fast), their leading word boundary checked after.
    keyword_starts: tuple[bool, ...] = ()

    # Per pattern, literals one of which must occur for it to match (None: unknown): a substring test
    # rules most patterns out far faster than the regex engine can.
    required: tuple[tuple[str, ...] | None, ...] = ()

    def __post_init__(self) -> None:
        plan = tuple(zip(self.patterns, self.labels, self.keyword_starts, self.required))
        # The distinct literals of every pattern that has some, searched once: when none occurs (the
        # common case), only the patterns without literals can match, and they are tried in order.
        needles = tuple(dict.fromkeys(n for *_, required in plan if required is not None for n in required))
        unneedled = tuple(step for step in plan if step[3] is None)
        object.__setattr__(self, "_plan", plan)
        object.__setattr__(self, "_needles", needles)
        object.__setattr__(self, "_unneedled", unneedled)

    def first_match(self, facts: MatchInput) -> str | None:
        """The first pattern found in the text as sent, or else in its normalized form (zero-width
        characters, look-alike letters and escapes folded), which is usually the same string: one pass."""
        text, normalized = facts.text_forms(self.ignore_case)
        found = self._first_in(text)
        if found is None and normalized is not text:
            found = self._first_in(normalized)
        return found

    def _first_in(self, text: str) -> str | None:
        plan = self._unneedled
        for needle in self._needles:
            if needle in text:
                plan = self._plan
                break
        for pattern, label, bounded, needles in plan:
            if needles is not None:
                for needle in needles:
                    if needle in text:
                        break
                else:
                    continue
            if bounded:
                if any(m.start() == 0 or not _is_word(text[m.start() - 1]) for m in pattern.finditer(text)):
                    return label
            elif pattern.search(text):
                return label
        return None


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


@dataclass(frozen=True)
class Match:
    callers: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    hosts: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    text: TextCondition | None = None
    tools: tuple[str, ...] | None = None
    pii: tuple[str, ...] | None = None
    body_min: int | None = None
    body_max: int | None = None

    def __post_init__(self) -> None:
        # A rule with a text condition alone (most rules): evaluate goes straight to it.
        others = (self.callers, self.groups, self.hosts, self.methods, self.paths, self.endpoints, self.models,
                  self.tools, self.pii, self.body_min, self.body_max)
        object.__setattr__(self, "_text_only", self.text is not None and all(o is None for o in others))

    def evaluate(self, facts: MatchInput) -> dict | None:
        """None when the request does not match; else what matched (safe to record). Cheap checks first."""
        if self._text_only:
            label = self.text.first_match(facts)
            return None if label is None else {"text": label}
        matched: dict[str, Any] = {}
        if self.callers is not None:
            if not _globs(self.callers, facts.caller):
                return None
            matched["caller"] = facts.caller
        if self.groups is not None:
            hit = sorted(set(self.groups).intersection(facts.groups))
            if not hit:
                return None
            matched["groups"] = hit
        if self.hosts is not None:
            host = facts.host.lower()
            if not (_globs(self.hosts, host) or _globs(self.hosts, f"{host}:{facts.port}")):
                return None
            matched["host"] = host
        if self.methods is not None:
            if facts.method.upper() not in self.methods:
                return None
            matched["method"] = facts.method.upper()
        if self.paths is not None:
            if not _globs(self.paths, facts.path):
                return None
            matched["path"] = facts.path
        if self.endpoints is not None:
            if facts.endpoint not in self.endpoints:
                return None
            matched["endpoint"] = facts.endpoint
        if self.body_min is not None or self.body_max is not None:
            if (self.body_min is not None and facts.body_size < self.body_min) or (
                self.body_max is not None and facts.body_size > self.body_max
            ):
                return None
            matched["body_size"] = facts.body_size
        if self.models is not None:
            if not _globs(self.models, facts.model):
                return None
            matched["model"] = facts.model
        if self.tools is not None:
            hit = sorted({t for t in facts.tools if _globs(self.tools, t, fold=True)})
            if not hit:
                return None
            matched["tools"] = hit
        if self.text is not None:
            label = self.text.first_match(facts)
            if label is None:
                return None
            matched["text"] = label
        if self.pii is not None:
            hit = sorted(set(self.pii).intersection(facts.pii))
            if not hit:
                return None
            matched["pii"] = hit
        return matched


@dataclass(frozen=True)
class Rule:
    id: str
    action: str
    match: Match
    message: str = ""
    description: str = ""
    approvers: tuple[str, ...] = ()
    timeout_seconds: float = DEFAULT_APPROVAL_TIMEOUT
    reuse_seconds: float = 0.0
    line: int | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome for one request; as_metadata() is what the flow's POLICY metadata (core.flow_contract) holds."""

    action: str
    rule: str | None  # None: no rule matched, the default action applies
    matched: dict = field(default_factory=dict)
    message: str = ""
    approvers: tuple[str, ...] = ()
    timeout_seconds: float = DEFAULT_APPROVAL_TIMEOUT
    reuse_seconds: float = 0.0
    policy: str = ""  # digest of the policy file that decided
    # (status, code) of a block that is not a rule's (403 gateway_blocked): content policy cannot read.
    refusal: tuple[int, str] | None = None
    # Content passed unread because policy.yaml allows it (unreadable_content: allow): recorded as such.
    unread: tuple[str, ...] = ()

    def as_metadata(self) -> dict:
        out: dict[str, Any] = {"rule": self.rule or "default", "action": self.action, "policy": self.policy}
        if self.unread:
            out["unread"] = list(self.unread)
        if self.matched:
            out["matched"] = self.matched
        if self.message:
            out["message"] = self.message
        if self.action == "require_approval":
            out.update(approvers=list(self.approvers), timeout_s=self.timeout_seconds, reuse_s=self.reuse_seconds)
        return out


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    default: str = "allow"
    digest: str = ""
    path: str = ""
    unreadable_content: str = "refuse"

    def decide(self, facts: MatchInput) -> Decision:
        unreadable = facts.unreadable
        if self.unreadable_content == "refuse" and unreadable:
            # No rule can have read it: refused before any rule, whatever the rules would allow.
            kinds = sorted(set(unreadable))
            return Decision("block", UNREADABLE_RULE, {"unreadable": kinds},
                            f"the request carries content the gateway cannot read ({', '.join(kinds)}), so no "
                            "policy rule could inspect it; send it as text, or ask the operator to allow it "
                            "(policy.yaml: unreadable_content: allow)", policy=self.digest,
                            refusal=UNREADABLE_REFUSAL)
        unread = tuple(sorted(set(unreadable))) if unreadable else ()
        for rule in self.rules:
            matched = rule.match.evaluate(facts)
            if matched is not None:
                return Decision(rule.action, rule.id, matched, rule.message, rule.approvers, rule.timeout_seconds,
                                rule.reuse_seconds, self.digest, unread=unread)
        return Decision(self.default, None, policy=self.digest, unread=unread)

    @property
    def uses_pii(self) -> bool:
        return any(r.match.pii for r in self.rules)

    @property
    def uses_approval(self) -> bool:
        return any(r.action == "require_approval" for r in self.rules)


# ---- loading, with the line of every problem -------------------------------------------------------------
def load_policy(path: Path) -> Policy:
    """Read and validate a policy file; ConfigError names the file, the line and the reason."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, "file not found") from None
    except OSError as e:
        raise ConfigError(path, f"cannot read: {e.strerror}") from None
    return parse_policy(raw.decode("utf-8", "replace"), path)


def parse_policy(text: str, path: Path | str = POLICY_FILE) -> Policy:
    file = RulesFile.parse(text, path, shape="a mapping with 'rules' (and optionally 'default')")
    data, lines = file.data, file.lines

    def fail(at: tuple, reason: str) -> ConfigError:
        return file.error(reason, *at)

    _unknown_keys(data, _TOP_KEYS, (), "top level", fail)
    default = data.get("default", "allow")
    if default not in DEFAULT_ACTIONS:
        raise fail(("default",), f"default: unknown action {default!r} (one of: {', '.join(DEFAULT_ACTIONS)})")
    entries = data.get("rules") or []
    if not isinstance(entries, list):
        raise fail(("rules",), "'rules' must be a list of rules")
    rules: list[Rule] = []
    ids: set[str] = set()
    for i, entry in enumerate(entries):
        rule = _rule(entry, ("rules", i), fail, lines)
        if rule.id in ids:
            raise fail(("rules", i, "id"), f"rules[{i}]: duplicate rule id {rule.id!r}")
        ids.add(rule.id)
        rules.append(rule)
    unreadable = data.get("unreadable_content", "refuse")
    if unreadable not in UNREADABLE_SETTINGS:
        raise fail(("unreadable_content",), f"unreadable_content: must be one of {', '.join(UNREADABLE_SETTINGS)} "
                                            f"(got {unreadable!r})")
    digest = "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
    return Policy(tuple(rules), default, digest, str(path), unreadable)


def _unknown_keys(entry: dict, allowed: set[str], at: tuple, where: str, fail) -> None:
    unknown = sorted(set(map(str, entry)) - allowed)
    if unknown:
        raise fail(at + (unknown[0],), f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _rule(entry: Any, at: tuple, fail, lines) -> Rule:
    where = f"rules[{at[1]}]"
    if not isinstance(entry, dict):
        raise fail(at, f"{where}: a rule must be a mapping with 'id', 'match' and 'action'")
    _unknown_keys(entry, _RULE_KEYS, at, where, fail)
    rule_id = entry.get("id")
    if not isinstance(rule_id, str) or not _ID.match(rule_id):
        raise fail(at + ("id",), f"{where}: 'id' is required and must match {_ID.pattern}")
    where = f"rule {rule_id!r}"
    action = entry.get("action")
    if action not in ACTIONS:
        raise fail(at + ("action",), f"{where}: unknown action {action!r} (one of: {', '.join(ACTIONS)})")
    for key in ("message", "description"):
        if not isinstance(entry.get(key, ""), str):
            raise fail(at + (key,), f"{where}: '{key}' must be text")
    approvers: tuple[str, ...] = ()
    timeout, reuse = DEFAULT_APPROVAL_TIMEOUT, 0.0
    if action == "require_approval":
        approvers = _names(entry.get("approvers"), at + ("approvers",), f"{where}: 'approvers'", fail, required=True,
                           what="approver group names (required for require_approval)")
        timeout = _number(entry.get("timeout_seconds", DEFAULT_APPROVAL_TIMEOUT), at + ("timeout_seconds",),
                          f"{where}: 'timeout_seconds'", fail, 0.1, MAX_APPROVAL_TIMEOUT)
        reuse = _number(entry.get("reuse_seconds", 0), at + ("reuse_seconds",), f"{where}: 'reuse_seconds'", fail,
                        0, MAX_APPROVAL_TIMEOUT)
    else:
        for key in ("approvers", "timeout_seconds", "reuse_seconds"):
            if key in entry:
                raise fail(at + (key,), f"{where}: '{key}' only applies to action require_approval")
    match_value = entry.get("match", {})
    if match_value is None:
        match_value = {}
    if not isinstance(match_value, dict):
        raise fail(at + ("match",), f"{where}: 'match' must be a mapping of conditions")
    match = _match(match_value, at + ("match",), where, fail)
    return Rule(rule_id, action, match, entry.get("message", ""), entry.get("description", ""), approvers, timeout,
                reuse, lines.get(at))


def _names(value: Any, at: tuple, where: str, fail, required: bool = False, what: str = "names") -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise fail(at, f"{where} must be a non-empty list of {what}")
    return tuple(value)


def _number(value: Any, at: tuple, where: str, fail, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise fail(at, f"{where} must be a number from {low:g} to {high:g}")
    return float(value)


def keyword_pattern(keyword: str) -> tuple[str, bool]:
    """A keyword or phrase as a regex (any whitespace between its words, a word boundary at its end), and
    whether a word boundary must also be checked before each match (left to the caller, so the regex
    starts with a literal, which the regex engine finds fast)."""
    body = r"\s+".join(re.escape(word) for word in keyword.split())
    end = r"\b" if re.search(r"\w$", keyword.strip()) else ""
    return body + end, bool(re.match(r"\w", keyword.strip()))


def _match(entry: dict, at: tuple, where: str, fail) -> Match:
    _unknown_keys(entry, _MATCH_KEYS, at, f"{where}: match", fail)
    kwargs: dict[str, Any] = {}
    for key in ("callers", "groups", "hosts", "paths", "models"):
        if key in entry:
            kwargs[key] = _names(entry[key], at + (key,), f"{where}: match.{key}", fail)
    if "hosts" in kwargs:
        kwargs["hosts"] = tuple(h.lower() for h in kwargs["hosts"])
    if "tools" in entry:
        kwargs["tools"] = tuple(t.lower() for t in _names(entry["tools"], at + ("tools",), f"{where}: match.tools", fail))
    if "methods" in entry:
        kwargs["methods"] = tuple(m.upper() for m in _names(entry["methods"], at + ("methods",),
                                                            f"{where}: match.methods", fail))
    if "endpoints" in entry:
        endpoints = _names(entry["endpoints"], at + ("endpoints",), f"{where}: match.endpoints", fail)
        for i, kind in enumerate(endpoints):
            if kind not in ENDPOINT_KINDS:
                raise fail(at + ("endpoints", i), f"{where}: match.endpoints: unknown endpoint {kind!r} "
                                                  f"(one of: {', '.join(ENDPOINT_KINDS)})")
        kwargs["endpoints"] = endpoints
    if "pii" in entry:
        kwargs["pii"] = _names(entry["pii"], at + ("pii",), f"{where}: match.pii", fail, what="entity types")
    if "body_size" in entry:
        size = entry["body_size"]
        if not isinstance(size, dict) or not size:
            raise fail(at + ("body_size",), f"{where}: match.body_size must be a mapping with min and/or max bytes")
        _unknown_keys(size, _SIZE_KEYS, at + ("body_size",), f"{where}: match.body_size", fail)
        for key in ("min", "max"):
            if key in size:
                value = size[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise fail(at + ("body_size", key), f"{where}: match.body_size.{key} must be a whole number of bytes")
                kwargs[f"body_{key}"] = value
    if "text" in entry:
        kwargs["text"] = _text(entry["text"], at + ("text",), where, fail)
    return Match(**kwargs)


def _text(entry: Any, at: tuple, where: str, fail) -> TextCondition:
    if not isinstance(entry, dict):
        raise fail(at, f"{where}: match.text must be a mapping with 'keywords' and/or 'regex'")
    _unknown_keys(entry, _TEXT_KEYS, at, f"{where}: match.text", fail)
    ignore_case = entry.get("ignore_case", True)
    if not isinstance(ignore_case, bool):
        raise fail(at + ("ignore_case",), f"{where}: match.text.ignore_case must be true or false")
    patterns: list[re.Pattern] = []
    labels: list[str] = []
    starts: list[bool] = []
    keywords = _names(entry.get("keywords"), at + ("keywords",), f"{where}: match.text.keywords", fail,
                      what="keywords or phrases")
    for keyword in keywords:
        pattern, bounded = keyword_pattern(keyword.lower() if ignore_case else keyword)
        patterns.append(re.compile(pattern))
        labels.append(f"keyword {keyword!r}")
        starts.append(bounded)
    regexes = _names(entry.get("regex"), at + ("regex",), f"{where}: match.text.regex", fail,
                     what="regular expressions")
    for i, expression in enumerate(regexes):
        # ignore_case matches against the lower-cased text (many times faster than re.IGNORECASE, which
        # disables the regex engine's literal-prefix search): an upper-case letter could never match.
        if ignore_case and _has_upper_literal(expression):
            raise fail(at + ("regex", i), f"{where}: match.text.regex[{i}]: with ignore_case: true the text is "
                                          "lower-cased first, so write the regex in lower case (or set ignore_case: false)")
        try:
            patterns.append(re.compile(expression))
        except re.error as e:
            raise fail(at + ("regex", i), f"{where}: match.text.regex[{i}]: invalid regular expression: {e}") from None
        labels.append(f"regex #{i + 1}")
        starts.append(False)
    if not patterns:
        raise fail(at, f"{where}: match.text needs 'keywords' or 'regex'")
    return TextCondition(tuple(patterns), tuple(labels), ignore_case, tuple(starts),
                         tuple(required_literals(p.pattern) for p in patterns))


def required_literals(expression: str) -> tuple[str, ...] | None:
    """Literals one of which every match of the regex contains (the longest such set found at its top
    level: a run of plain characters, or a group of plain alternatives), or None when there is none."""
    try:
        from re import _constants as sre
        from re import _parser as sre_parse

        parsed = sre_parse.parse(expression)
    except Exception:  # a private module of the standard library: without it, no shortcut
        return None
    if parsed.state.flags & (sre.SRE_FLAG_IGNORECASE | sre.SRE_FLAG_VERBOSE):
        return None

    def plain(items) -> str | None:
        chars = []
        for op, av in items:
            if op is not sre.LITERAL:
                return None
            chars.append(chr(av))
        return "".join(chars)

    candidates: list[tuple[str, ...]] = []
    run: list[str] = []
    for op, av in list(parsed) + [(None, None)]:
        if op is sre.LITERAL:
            run.append(chr(av))
            continue
        if run:
            candidates.append(("".join(run),))
            run = []
        if op is sre.BRANCH:  # (?:a|b) is flattened into the sequence
            options = [plain(branch) for branch in av[1]]
            if all(options):
                candidates.append(tuple(options))
        elif op is sre.SUBPATTERN and not av[1] & sre.SRE_FLAG_IGNORECASE:
            inner = list(av[3])
            if len(inner) == 1 and inner[0][0] is sre.BRANCH:
                options = [plain(branch) for branch in inner[0][1][1]]
                if all(options):
                    candidates.append(tuple(options))
            elif (text := plain(inner)) is not None and text:
                candidates.append((text,))
    candidates = [c for c in candidates if min(map(len, c)) >= 3]
    return max(candidates, key=lambda c: min(map(len, c))) if candidates else None


def _has_upper_literal(expression: str) -> bool:
    """An upper-case letter that is not part of an escape such as \\S, \\W or \\D."""
    escaped = False
    for char in expression.replace("(?P<", "(?<").replace("(?P=", "(?="):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char.isupper():
            return True
    return False
