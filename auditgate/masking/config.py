"""masking.yaml: which entities are masked in which direction, how, and with which recognizers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from auditgate.core.config import ConfigError, RulesFile, check_keys

MASKING_FILE = "masking.yaml"
OPERATOR_TYPES = {"replace", "mask", "hash", "redact"}
TRACE_ACTIONS = {"mask", "refuse", "pass"}
_TOP_KEYS = {
    "recognizers_file", "language", "score_threshold", "nlp_model", "timeout_seconds", "workers", "traces",
    "triggers", "response", "request", "operators", "allow_list", "stream_holdback_chars", "inline_max_bytes",
    "stream_event_max_bytes", "stream_max_bytes", "queue_max_jobs",
}
# A pending stream event past this is refused: response.completed repeats a whole reply, so it must
# hold the longest reply a model writes (about half a megabyte of text) with room to spare.
DEFAULT_STREAM_EVENT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_STREAM_MAX_BYTES = 64 * 1024 * 1024  # a streamed reply, inflated
DEFAULT_QUEUE_MAX_JOBS = 128  # bodies waiting for a masking worker
_DIRECTION_KEYS = {"enabled", "entities"}


@dataclass(frozen=True)
class DirectionSettings:
    enabled: bool
    entities: tuple[str, ...]


@dataclass(frozen=True)
class MaskingSettings:
    """Everything a masking engine needs; plain data, so it can be sent to worker processes."""

    recognizers_file: str
    language: str = "en"
    score_threshold: float = 0.45
    nlp_model: str | None = None
    timeout_seconds: float = 5.0
    workers: int = 0
    traces: str = "mask"
    triggers: dict[str, str] = field(default_factory=dict)
    response: DirectionSettings = DirectionSettings(True, ())
    request: DirectionSettings = DirectionSettings(False, ())
    operators: dict[str, dict] = field(default_factory=lambda: {"DEFAULT": {"type": "replace"}})
    allow_list: tuple[str, ...] = ()
    stream_holdback_chars: int = 64
    inline_max_bytes: int = 4096
    stream_event_max_bytes: int = DEFAULT_STREAM_EVENT_MAX_BYTES
    stream_max_bytes: int = DEFAULT_STREAM_MAX_BYTES
    queue_max_jobs: int = DEFAULT_QUEUE_MAX_JOBS

    def direction(self, name: str) -> DirectionSettings:
        return self.response if name == "response" else self.request


def _direction(path: Path, name: str, value: object, default_enabled: bool) -> DirectionSettings:
    if value is None:
        return DirectionSettings(default_enabled, ())
    if not isinstance(value, dict):
        raise ConfigError(path, f"'{name}' must be a mapping", at=(name,))
    check_keys(path, name, value, _DIRECTION_KEYS)
    enabled = value.get("enabled", default_enabled)
    entities = value.get("entities") or []
    if not isinstance(enabled, bool):
        raise ConfigError(path, f"{name}.enabled must be true or false", at=(name, "enabled"))
    if not isinstance(entities, list) or not all(isinstance(e, str) and e for e in entities):
        raise ConfigError(path, f"{name}.entities must be a list of entity names", at=(name, "entities"))
    return DirectionSettings(enabled, tuple(entities))


def load_masking_settings(rules_dir: Path) -> MaskingSettings | None:
    """The masking settings, or None when masking.yaml does not exist (masking off)."""
    path = rules_dir / MASKING_FILE
    if not path.exists():
        return None
    file = RulesFile.read(path, _TOP_KEYS)
    with file.locating():
        return _settings(rules_dir, path, file.data)


def _settings(rules_dir: Path, path: Path, data: dict) -> MaskingSettings:
    recognizers = data.get("recognizers_file", "masking-recognizers.yaml")
    recognizers_path = (rules_dir / recognizers).resolve()
    if not recognizers_path.is_file():
        raise ConfigError(path, f"recognizers_file {recognizers_path} does not exist", at=("recognizers_file",))
    threshold = data.get("score_threshold", 0.45)
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ConfigError(path, "score_threshold must be a number from 0 to 1", at=("score_threshold",))
    timeout = data.get("timeout_seconds", 5)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(path, "timeout_seconds must be a positive number", at=("timeout_seconds",))
    workers = data.get("workers", 0)
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(path, "workers must be 0 (one per core) or a positive whole number", at=("workers",))
    traces = data.get("traces", "mask")
    if traces not in TRACE_ACTIONS:
        raise ConfigError(path, f"traces must be one of {', '.join(sorted(TRACE_ACTIONS))}", at=("traces",))
    holdback = data.get("stream_holdback_chars", 64)
    if not isinstance(holdback, int) or not 8 <= holdback <= 4096:
        raise ConfigError(path, "stream_holdback_chars must be a whole number from 8 to 4096", at=("stream_holdback_chars",))
    inline_max = data.get("inline_max_bytes", 4096)
    if not isinstance(inline_max, int) or inline_max < 0:
        raise ConfigError(path, "inline_max_bytes must be a whole number (0: every body goes to the workers)", at=("inline_max_bytes",))
    event_max = data.get("stream_event_max_bytes", DEFAULT_STREAM_EVENT_MAX_BYTES)
    if not isinstance(event_max, int) or isinstance(event_max, bool) or event_max < 1024:
        raise ConfigError(path, "stream_event_max_bytes must be a whole number of at least 1024", at=("stream_event_max_bytes",))
    stream_max = data.get("stream_max_bytes", DEFAULT_STREAM_MAX_BYTES)
    if not isinstance(stream_max, int) or isinstance(stream_max, bool) or stream_max < event_max:
        raise ConfigError(path, "stream_max_bytes must be a whole number, at least stream_event_max_bytes",
                          at=("stream_max_bytes",))
    queue_max = data.get("queue_max_jobs", DEFAULT_QUEUE_MAX_JOBS)
    if not isinstance(queue_max, int) or isinstance(queue_max, bool) or queue_max < 1:
        raise ConfigError(path, "queue_max_jobs must be a positive whole number", at=("queue_max_jobs",))
    nlp_model = data.get("nlp_model")
    if nlp_model is not None and (not isinstance(nlp_model, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", nlp_model)):
        raise ConfigError(path, "nlp_model must be the name of an installed spaCy model package, or null", at=("nlp_model",))
    triggers = data.get("triggers") or {}
    if not isinstance(triggers, dict):
        raise ConfigError(path, "triggers must map entity names to regular expressions", at=("triggers",))
    for entity, pattern in triggers.items():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(path, f"triggers.{entity}: invalid regular expression: {e}", at=("triggers", entity)) from None
    operators = data.get("operators") or {"DEFAULT": {"type": "replace"}}
    if not isinstance(operators, dict):
        raise ConfigError(path, "operators must map entity names (or DEFAULT) to operator settings", at=("operators",))
    for entity, operator in operators.items():
        if not isinstance(operator, dict) or operator.get("type") not in OPERATOR_TYPES:
            raise ConfigError(path, f"operators.{entity}: 'type' must be one of {', '.join(sorted(OPERATOR_TYPES))}", at=("operators", entity))
    operators.setdefault("DEFAULT", {"type": "replace"})
    allow_list = data.get("allow_list") or []
    if not isinstance(allow_list, list) or not all(isinstance(v, str) for v in allow_list):
        raise ConfigError(path, "allow_list must be a list of strings", at=("allow_list",))
    return MaskingSettings(
        recognizers_file=str(recognizers_path),
        language=data.get("language", "en"),
        score_threshold=float(threshold),
        nlp_model=nlp_model,
        timeout_seconds=float(timeout),
        workers=workers,
        traces=traces,
        triggers=dict(triggers),
        response=_direction(path, "response", data.get("response"), True),
        request=_direction(path, "request", data.get("request"), False),
        operators=operators,
        allow_list=tuple(allow_list),
        stream_holdback_chars=holdback,
        inline_max_bytes=inline_max,
        stream_event_max_bytes=event_max,
        stream_max_bytes=stream_max,
        queue_max_jobs=queue_max,
    )
