"""Knowledge generators: CODER knowledge built from what a dataset already has, so that CODER runs
on any dataset without a hand-written knowledge file.

    from jaxgist.heads import coder

    k = coder.knowledge_from_class_names(class_names)                      # every ordered pair a text
    k = coder.knowledge_from_class_names(class_names, pairs="analogous")   # pairs sharing a word only
    coder.write_knowledge("knowledge.json", k)                             # a file to edit by hand

Datasets that know more write their own knowledge file (the synthetic birds write
``coder_knowledge.json`` from their drawn attributes: ``jaxgist.data.synthetic.coder_knowledge``).
"""

from __future__ import annotations

import itertools
import re
from typing import Mapping, Sequence

from jaxgist.heads.coder.knowledge import Knowledge, parse_knowledge

__all__ = ["DEFAULT_GENERIC_ATTRIBUTES", "DEFAULT_PAIR_TEMPLATE", "knowledge_from_class_names"]


def _articles(text: str) -> str:
    """"a" -> "an" before a word starting with a vowel letter ("a orange beak" -> "an orange beak")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


_STOPWORDS = frozenset({"a", "an", "the", "of", "and", "or", "with", "in", "on", "for", "to", "at", "by", "de"})

DEFAULT_GENERIC_ATTRIBUTES = ("its typical shape", "its typical colours", "its distinctive features")
DEFAULT_PAIR_TEMPLATE = "a {name} is not a {other}."


def _words(name: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", name.lower()) if w not in _STOPWORDS and len(w) > 1}


def knowledge_from_class_names(class_names: Sequence[str], *, pairs: str = "all", max_analogous: int = 5,
                               attributes: Sequence[str] = DEFAULT_GENERIC_ATTRIBUTES,
                               pair_template: str = DEFAULT_PAIR_TEMPLATE,
                               templates: Mapping[str, str] | None = None) -> Knowledge:
    """A minimal knowledge base from class names alone, so that CODER runs on any dataset.

    Per class: its name; as synonym, the name with ``_`` and ``-`` read as spaces (when that differs);
    as attributes, the attribute-free ``attributes`` phrases ("a photo of a {name}, which has its
    typical shape."); as analogous classes, up to ``max_analogous`` other classes sharing a word with
    it (most shared words first, then label order; words of one letter and a few stop words don't
    count). Pair texts, one per ordered pair, from ``pair_template`` ("a {name} is not a {other}.",
    with "a"/"an" fixed): for every pair (``pairs="all"``, C(C-1) texts), only for pairs sharing a word
    (``"analogous"``), or none (``"none"``). ``templates`` overrides the file's templates.
    """
    names = [str(n) for n in class_names]
    if len(names) < 1:
        raise ValueError("knowledge_from_class_names needs at least one class name")
    if pairs not in ("all", "analogous", "none"):
        raise ValueError(f"pairs must be 'all', 'analogous' or 'none', got {pairs!r}")
    if "{name}" not in pair_template or "{other}" not in pair_template:
        raise ValueError(f"pair_template must contain {{name}} and {{other}}: {pair_template!r}")
    words = [_words(n) for n in names]
    classes, similar = [], []
    for i, name in enumerate(names):
        spaced = re.sub(r"\s+", " ", name.replace("_", " ").replace("-", " ")).strip()
        shared = [(-len(words[i] & words[j]), j) for j in range(len(names)) if j != i and words[i] & words[j]]
        analogous = [j for _, j in sorted(shared)]
        similar.append(set(analogous))
        classes.append({"name": name, "synonyms": [spaced] if spaced and spaced != name else [],
                        "attributes": list(attributes),
                        "analogous": [names[j] for j in analogous[:max(0, int(max_analogous))]]})
    pair_texts = {}
    if pairs != "none":
        for i, j in itertools.permutations(range(len(names)), 2):
            if pairs == "all" or j in similar[i]:
                pair_texts[f"{i},{j}"] = [_articles(pair_template.format(name=names[i], other=names[j]))]
    data = {"classes": classes, "pairs": pair_texts}
    if templates is not None:
        data["templates"] = dict(templates)
    return parse_knowledge(data, source="knowledge_from_class_names")
