"""CODER's knowledge file: the format, its dataclasses, parsing (with errors that name the key),
loading, writing.

    from jaxgist.heads import coder

    k = coder.load_knowledge("cub_knowledge.json", class_names=dataset_class_names)   # validated
    k.classes[0].attributes, k.pairs[(0, 1)], k.templates["name"], k.class_names
    k = coder.parse_knowledge({"classes": [{"name": "Common Finch"}, ...]})        # a dict, validated
    coder.write_knowledge(path, k); coder.knowledge_to_json(k)                     # the file, its JSON object
    coder.KnowledgeError        # a ValueError naming the offending class or key

The format (JSON, one file per dataset):

    {
      "version": 1,                                        optional; 1 is the only version
      "templates": {                                       optional; each key optional
        "name": "a photo of a {name}.",                    name and each synonym ({name})
        "attribute": "a photo of a {name}, which has {attribute}.",
        "analogous": "a photo of a {name}, similar to a {analogous}."
      },
      "classes": [                                         one entry per class, in label order
        {"name": "Common Finch",                           required, non-empty, unique
         "synonyms": ["finch with a round body"],          optional lists of non-empty strings
         "attributes": ["a plain yellow body", "a red crest"],
         "analogous": ["Red-crested Finch"]},              free text: need not be a class of the file
        ...
      ],
      "pairs": {                                           optional; key "i,j": 0-based class indices
        "0,1": ["a Common Finch has a red crest, while a Crestless Finch has no crest."],
        "1,0": ["..."]                                     texts saying how class i differs from class j
      }
    }

The texts of class ``c`` are, in this order: the name template applied to its name, then to each
synonym (``{name}`` is the synonym), the attribute template applied to each attribute, and the
analogous template applied to each analogous class (``{name}`` is always the class's own name). Pair
texts are used verbatim. Anything else (an unknown key, a missing or empty name, a duplicate name, a
pair key that is malformed, names a class that does not exist or names one class twice, an empty
list of pair texts, a template with an unknown field) is a ``KnowledgeError`` naming the offending
class or key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string
from typing import Any, Mapping, Sequence

from jaxgist.core import files

__all__ = ["FORMAT_VERSION", "DEFAULT_TEMPLATES", "KnowledgeError", "ClassKnowledge", "Knowledge", "parse_knowledge",
           "load_knowledge", "knowledge_to_json", "write_knowledge"]

FORMAT_VERSION = 1

DEFAULT_TEMPLATES = {
    "name": "a photo of a {name}.",
    "attribute": "a photo of a {name}, which has {attribute}.",
    "analogous": "a photo of a {name}, similar to a {analogous}.",
}
# The fields each template may use; the second element is the one it must use.
_TEMPLATE_FIELDS = {"name": ({"name"}, "name"), "attribute": ({"name", "attribute"}, "attribute"),
                    "analogous": ({"name", "analogous"}, "analogous")}
_CLASS_KEYS = ("name", "synonyms", "attributes", "analogous")
_TOP_KEYS = ("version", "templates", "classes", "pairs")


class KnowledgeError(ValueError):
    """A knowledge file (or dict) that does not follow the format; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ClassKnowledge:
    """What is known of one class: its name, synonyms, attribute phrases, and analogous classes."""

    name: str
    synonyms: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    analogous: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Knowledge:
    """A parsed knowledge file: ``classes`` in label order, ``pairs`` mapping (i, j) to the texts
    saying how class i differs from class j, and the three ``templates``. Build one with
    ``parse_knowledge`` (which validates), ``load_knowledge`` or a generator."""

    classes: tuple[ClassKnowledge, ...]
    pairs: dict[tuple[int, int], tuple[str, ...]]
    templates: dict[str, str]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Knowledge) and self.classes == other.classes and self.pairs == other.pairs
                and self.templates == other.templates)


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


def _string_list(value, what: str, source: str | None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise KnowledgeError(f"{_where(source)}{what} must be a list of strings, got {type(value).__name__}")
    for k, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise KnowledgeError(f"{_where(source)}{what}[{k}] must be a non-empty string, got {item!r}")
    return tuple(value)


def _check_template(key: str, template, source: str | None) -> str:
    allowed, required = _TEMPLATE_FIELDS[key]
    if not isinstance(template, str):
        raise KnowledgeError(f"{_where(source)}templates.{key} must be a string, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise KnowledgeError(f"{_where(source)}templates.{key} is not a valid format string ({e}): "
                             f"{template!r}") from None
    bad = sorted({f for f in fields if f not in allowed})
    if bad:
        raise KnowledgeError(f"{_where(source)}templates.{key} uses unknown field(s) {bad}; it may use "
                             f"{sorted('{' + a + '}' for a in allowed)}: {template!r}")
    if required not in fields:
        raise KnowledgeError(f"{_where(source)}templates.{key} must contain {{{required}}}: {template!r}")
    return template


def _parse_pair_key(key: str, num_classes: int, names: Sequence[str], source: str | None) -> tuple[int, int]:
    parts = key.split(",") if isinstance(key, str) else []
    if len(parts) != 2 or not all(re.fullmatch(r"\s*\d+\s*", p) for p in parts):
        raise KnowledgeError(f"{_where(source)}pairs key {key!r} is not of the form \"i,j\" (two 0-based "
                             f"class indices)")
    i, j = (int(p) for p in parts)
    for c in (i, j):
        if c >= num_classes:
            raise KnowledgeError(f"{_where(source)}pairs key {key!r}: class {c} does not exist (the file "
                                 f"has {num_classes} classes, 0..{num_classes - 1})")
    if i == j:
        raise KnowledgeError(f"{_where(source)}pairs key {key!r} pairs class {i} ({names[i]!r}) with itself")
    return i, j


def parse_knowledge(data: Mapping[str, Any], source: str | None = None) -> Knowledge:
    """Validates a knowledge dict (the JSON format of the module docstring) into a ``Knowledge``.

    ``source`` (a path, say) prefixes every error message. Raises ``KnowledgeError`` naming the
    offending class or key.
    """
    if not isinstance(data, Mapping):
        raise KnowledgeError(f"{_where(source)}a knowledge file must hold a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise KnowledgeError(f"{_where(source)}unknown top-level key(s) {unknown}; expected {list(_TOP_KEYS)}")
    if "version" in data and data["version"] != FORMAT_VERSION:
        raise KnowledgeError(f"{_where(source)}version {data['version']!r} is not supported (only {FORMAT_VERSION})")

    raw_templates = data.get("templates", {})
    if not isinstance(raw_templates, Mapping):
        raise KnowledgeError(f"{_where(source)}templates must be an object, got {type(raw_templates).__name__}")
    unknown = [k for k in raw_templates if k not in _TEMPLATE_FIELDS]
    if unknown:
        raise KnowledgeError(f"{_where(source)}unknown template key(s) {unknown}; expected {list(_TEMPLATE_FIELDS)}")
    templates = {k: _check_template(k, raw_templates.get(k, DEFAULT_TEMPLATES[k]), source) for k in _TEMPLATE_FIELDS}

    if "classes" not in data:
        raise KnowledgeError(f"{_where(source)}no 'classes' key: a knowledge file lists its classes")
    raw_classes = data["classes"]
    if not isinstance(raw_classes, list) or not raw_classes:
        raise KnowledgeError(f"{_where(source)}'classes' must be a non-empty list of class objects")
    classes, seen = [], {}
    for idx, entry in enumerate(raw_classes):
        where = f"classes[{idx}]"
        if not isinstance(entry, Mapping):
            raise KnowledgeError(f"{_where(source)}{where} must be an object, got {type(entry).__name__}")
        if "name" not in entry:
            raise KnowledgeError(f"{_where(source)}{where} has no 'name' (keys: {sorted(entry)})")
        name = entry["name"]
        if not isinstance(name, str) or not name.strip():
            raise KnowledgeError(f"{_where(source)}{where}.name must be a non-empty string, got {name!r}")
        where = f"classes[{idx}] ({name!r})"
        unknown = [k for k in entry if k not in _CLASS_KEYS]
        if unknown:
            raise KnowledgeError(f"{_where(source)}{where} has unknown key(s) {unknown}; expected "
                                 f"{list(_CLASS_KEYS)}")
        if name in seen:
            raise KnowledgeError(f"{_where(source)}{where} repeats the name of classes[{seen[name]}]")
        seen[name] = idx
        lists = {k: _string_list(entry.get(k, []), f"{where}.{k}", source) for k in _CLASS_KEYS[1:]}
        classes.append(ClassKnowledge(name=name, **lists))

    raw_pairs = data.get("pairs", {})
    if not isinstance(raw_pairs, Mapping):
        raise KnowledgeError(f"{_where(source)}'pairs' must be an object mapping \"i,j\" to a list of texts")
    names = [c.name for c in classes]
    pairs: dict[tuple[int, int], tuple[str, ...]] = {}
    for key, texts in raw_pairs.items():
        i, j = _parse_pair_key(key, len(classes), names, source)
        if (i, j) in pairs:
            raise KnowledgeError(f"{_where(source)}pairs key {key!r} repeats the pair ({i}, {j})")
        where = f"pairs[{key!r}] ({names[i]!r} vs {names[j]!r})"
        texts = _string_list(texts, where, source)
        if not texts:
            raise KnowledgeError(f"{_where(source)}{where} is an empty list: leave the key out instead")
        pairs[(i, j)] = texts
    return Knowledge(classes=tuple(classes), pairs=dict(sorted(pairs.items())), templates=templates)


def load_knowledge(path: str | os.PathLike, class_names: Sequence[str] | None = None) -> Knowledge:
    """Reads and validates a knowledge file. With ``class_names``, its classes must be exactly these,
    in this order (the dataset's labels); a mismatch is a ``KnowledgeError`` listing the differences."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise KnowledgeError(f"{path}: not valid JSON ({e})") from None
    knowledge = parse_knowledge(data, source=path)
    if class_names is not None:
        _check_class_names(knowledge, class_names, path)
    return knowledge


def _check_class_names(knowledge: Knowledge, class_names: Sequence[str], source: str | None) -> None:
    expected, got = list(class_names), list(knowledge.class_names)
    if expected == got:
        return
    if len(expected) != len(got):
        raise KnowledgeError(f"{_where(source)}the file has {len(got)} classes but the dataset has {len(expected)}")
    diff = [(i, e, g) for i, (e, g) in enumerate(zip(expected, got)) if e != g]
    shown = ", ".join(f"class {i}: dataset {e!r} vs file {g!r}" for i, e, g in diff[:5])
    raise KnowledgeError(f"{_where(source)}{len(diff)} class name(s) differ from the dataset's ({shown}"
                         f"{', ...' if len(diff) > 5 else ''})")


def knowledge_to_json(knowledge: Knowledge) -> dict[str, Any]:
    """The JSON-ready dict of ``knowledge`` (every key written out, pairs sorted)."""
    return {
        "version": FORMAT_VERSION,
        "templates": dict(knowledge.templates),
        "classes": [{"name": c.name, "synonyms": list(c.synonyms), "attributes": list(c.attributes),
                     "analogous": list(c.analogous)} for c in knowledge.classes],
        "pairs": {f"{i},{j}": list(texts) for (i, j), texts in sorted(knowledge.pairs.items())},
    }


def write_knowledge(path: str | os.PathLike, knowledge: Knowledge) -> str:
    """Writes ``knowledge`` as JSON (validated first: what is written loads). The file is written to a
    temporary sibling and renamed into place, so a reader never sees half a file. Returns the path."""
    data = knowledge_to_json(knowledge)
    parse_knowledge(data, source="write_knowledge")  # e.g. a hand-built Knowledge with a bad pair
    return files.write_json_atomic(path, data, newline=True, indent=1, ensure_ascii=False)
