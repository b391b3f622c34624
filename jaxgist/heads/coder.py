"""CODER: an image represented by its cosine similarities to many class-knowledge texts.

CODER (Yi, Ren, Zhan and Ye, "Leveraging Cross-Modal Neighbor Representation for Improved CLIP
Classification", CVPR 2024) describes an image by its cosine similarity to every text of a knowledge
base: per class its name and synonyms, its attributes, classes it looks like, and, for class pairs,
texts saying how one class differs from the other. This module holds the knowledge file format, text
encoding, and the three uses of the representation: a zero-shot classifier, the one-to-one
re-ranking of uncertain images (CODER*), and features for Tip-Adapter. Numpy in, numpy out; JAX
(jitted, vectorized over images) inside.

Knowledge file (JSON, one per dataset; ``load_knowledge`` / ``write_knowledge``)
-------------------------------------------------------------------------------

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
class or key. ``knowledge_from_class_names`` builds a minimal file from class names alone (so CODER
runs on any dataset) and ``knowledge_from_synthetic`` a full one for the synthetic bird dataset.

Representation and scores
-------------------------

All texts of all classes are one flat matrix ``text_emb`` [N, D] (unit rows, class by class) with
``TextSegments``: the class of each text (non-decreasing ids) and its kind (``NAME``, ``SYNONYM``,
``ATTRIBUTE``, ``ANALOGOUS``). Per class sums and maxima are segment reductions over those ids.

- ``represent(x, text_emb)``: [n, N], the cosine of each (L2-normalized) image to each text.
- ``zero_shot_logits(x, text_emb, segments)``: [n, C]. With ``A_c`` the cosines to class c's
  attribute and analogous texts and ``m_c`` the largest cosine to its name and synonym texts,
  ``score_c = 100 * (sum(A_c) + m_c) / (|A_c| + 1)``: the mean of the set ``A_c`` with ``m_c`` added
  to it as one more element (a class without attributes or analogous texts scores ``100 * m_c``).
- ``rerank(x, logits, table, threshold)`` (CODER*): an image is re-scored when the top-1 minus
  top-2 probability of ``softmax(logits)`` (the logits as given, e.g. the 100x scores above) is below
  ``threshold``. Its ``top_k`` (5) best classes c_1..c_k each get
  ``s_i = 1/(k-1) * sum_{j != i} (mean cos(x, texts(c_i -> c_j)) - mean cos(x, texts(c_j -> c_i)))``,
  where ``texts(a -> b)`` are the pair texts "a differs from b" (key "a,b"); a term is 0 when either
  direction has no texts. The k classes are re-ordered by ``s`` (descending, ties keep the original
  order) and the new first one is the prediction. Labels never enter (the reference's script also
  required the label to be among the top 5 before re-ranking an image, which reads the test labels;
  that condition is left out); the threshold is chosen on validation with ``choose_threshold``. The mean cosine to a pair's texts is computed as the cosine
  to the mean of its unit text embeddings (``PairTable``), which is the same number.
- ``coder_features(x, text_emb)``: normalize, represent, normalize: the [n, N] features that
  Tip-Adapter's cache keys and queries are built from in CODER's few-shot setting.
  ``coder_tip_adapter`` composes them with ``jaxgist.heads.tip_adapter`` (its cache, its vectorized
  alpha/beta search on validation): ``100 * x @ W.T + alpha * exp(-beta * (1 - f(x) @ F.T)) @ V``
  with CLIP's class embeddings ``W`` on the image embedding ``x`` and the cache affinity in CODER
  space (``f`` = ``coder_features``, ``F`` the cache images' CODER features). Tip-Adapter's formula
  takes one feature vector, so the two spaces are stacked: ``z = [x, f(x)] / sqrt(2)`` against
  ``[sqrt(2) W, 0]`` and ``[0, sqrt(2) F]``, which gives exactly these two terms. (The reference code
  also min-max normalizes each row of affinities; that is not done here.)

``encode_knowledge(model, knowledge)`` encodes every text with a CLIP model and returns the
``KnowledgeEmbeddings`` (text matrix, segments, pair table) that all of the above accept.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
import string
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgist.core import files

__all__ = [
    "NAME", "SYNONYM", "ATTRIBUTE", "ANALOGOUS", "KIND_NAMES", "DEFAULT_TEMPLATES", "DEFAULT_THRESHOLDS",
    "KnowledgeError", "ClassKnowledge", "Knowledge", "KnowledgeTexts", "TextSegments", "PairTable",
    "KnowledgeEmbeddings", "Reranked", "ThresholdChoice",
    "parse_knowledge", "load_knowledge", "knowledge_to_json", "write_knowledge", "knowledge_texts",
    "knowledge_from_class_names", "knowledge_from_synthetic", "encode_knowledge", "embed_knowledge",
    "pair_table", "represent", "class_scores", "zero_shot_logits", "coder_features", "rerank",
    "choose_threshold", "CoderTipAdapter", "coder_tip_adapter",
]

FORMAT_VERSION = 1

# Kinds of general (per-class) texts.
NAME, SYNONYM, ATTRIBUTE, ANALOGOUS = 0, 1, 2, 3
KIND_NAMES = ("name", "synonym", "attribute", "analogous")

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

# Candidate re-ranking thresholds (on the top-1 minus top-2 softmax probability) for
# ``choose_threshold``; 0 never re-ranks (plain zero-shot), values above 1 re-rank every image.
DEFAULT_THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.01)

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 matmuls (no TF32 / bf16 passes on GPUs and TPUs)
_CHUNK = 2048  # images per jitted call when there are more (the last chunk is padded: one compile)


class KnowledgeError(ValueError):
    """A knowledge file (or dict) that does not follow the format; the message names the key."""


# ---------------------------------------------------------------------------------------------------
# Knowledge: the format, loading and writing.
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# From knowledge to texts.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextSegments:
    """Which class each row of the flat text matrix belongs to, and what kind of text it is.

    ``class_ids`` [N] int32, non-decreasing in [0, num_classes) (texts are stored class by class);
    ``kinds`` [N] int8 (NAME, SYNONYM, ATTRIBUTE, ANALOGOUS). Every class has at least one NAME or
    SYNONYM text (its name).
    """

    class_ids: np.ndarray
    kinds: np.ndarray
    num_classes: int

    def __post_init__(self):
        ids = np.asarray(self.class_ids)
        kinds = np.asarray(self.kinds)
        if ids.ndim != 1 or kinds.shape != ids.shape:
            raise ValueError(f"class_ids and kinds must be 1-d of one length, got {ids.shape} and {kinds.shape}")
        if not np.issubdtype(ids.dtype, np.integer) or not np.issubdtype(kinds.dtype, np.integer):
            raise ValueError("class_ids and kinds must be integer arrays")
        c = int(self.num_classes)
        if c < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if ids.size and (ids.min() < 0 or ids.max() >= c):
            raise ValueError(f"class_ids must lie in [0, {c}); found [{ids.min()}, {ids.max()}]")
        if ids.size > 1 and (np.diff(ids) < 0).any():
            raise ValueError("class_ids must be non-decreasing (texts stored class by class)")
        if kinds.size and (kinds.min() < NAME or kinds.max() > ANALOGOUS):
            raise ValueError(f"kinds must be NAME..ANALOGOUS (0..3); found [{kinds.min()}, {kinds.max()}]")
        named = np.zeros(c, bool)
        named[ids[kinds <= SYNONYM]] = True
        if not named.all():
            raise ValueError(f"class(es) {np.flatnonzero(~named).tolist()} have no name or synonym text")
        object.__setattr__(self, "class_ids", ids.astype(np.int32))
        object.__setattr__(self, "kinds", kinds.astype(np.int8))
        object.__setattr__(self, "num_classes", c)

    def __len__(self) -> int:
        return int(self.class_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class KnowledgeTexts:
    """Every text of a knowledge base, ready to encode.

    ``texts`` [N] class by class (per class: name, synonyms, attributes, analogous; see the module
    docstring) with their ``segments``; ``pair_texts`` [P] with ``pair_src``/``pair_dst`` [P] (the
    text says how class pair_src differs from class pair_dst), pairs in sorted (i, j) order.
    """

    class_names: tuple[str, ...]
    texts: tuple[str, ...]
    segments: TextSegments
    pair_texts: tuple[str, ...]
    pair_src: np.ndarray
    pair_dst: np.ndarray


def knowledge_texts(knowledge: Knowledge) -> KnowledgeTexts:
    """The texts of ``knowledge`` (templates applied) and their segment structure."""
    t = knowledge.templates
    texts, ids, kinds = [], [], []
    for c, k in enumerate(knowledge.classes):
        items = ([(NAME, t["name"].format(name=k.name))]
                 + [(SYNONYM, t["name"].format(name=s)) for s in k.synonyms]
                 + [(ATTRIBUTE, t["attribute"].format(name=k.name, attribute=a)) for a in k.attributes]
                 + [(ANALOGOUS, t["analogous"].format(name=k.name, analogous=a)) for a in k.analogous])
        for kind, text in items:
            texts.append(text)
            ids.append(c)
            kinds.append(kind)
    pair_texts, src, dst = [], [], []
    for (i, j), pts in sorted(knowledge.pairs.items()):
        pair_texts.extend(pts)
        src.extend([i] * len(pts))
        dst.extend([j] * len(pts))
    segments = TextSegments(np.asarray(ids, np.int32), np.asarray(kinds, np.int8), knowledge.num_classes)
    return KnowledgeTexts(class_names=knowledge.class_names, texts=tuple(texts), segments=segments,
                          pair_texts=tuple(pair_texts), pair_src=np.asarray(src, np.int32),
                          pair_dst=np.asarray(dst, np.int32))


# ---------------------------------------------------------------------------------------------------
# Generators.
# ---------------------------------------------------------------------------------------------------


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


SYNTHETIC_TEMPLATES = {
    "name": "a photo of a {name}, a type of bird.",
    "attribute": "a photo of a {name}, a type of bird, which has {attribute}.",
    "analogous": "a photo of a {name}, a bird similar to the {analogous}.",
}
# The keys attributes.json gives each synthetic class (jaxgist.data.synthetic.write_dataset).
_SYNTHETIC_KEYS = ("genus", "distinguishing", "body_shape", "body_colour", "pattern", "pattern_colour",
                   "head_colour", "wing_colour", "crest", "beak_colour", "tail")
# Which phrase (below) describes the attribute a species departs from its genus in.
_DISTINGUISHING_PHRASE = {"crest": "crest", "wing": "wings", "pattern": "body", "beak": "beak", "tail": "tail",
                          "head": "head"}


def _bird_phrases(a: Mapping[str, Any]) -> dict[str, str]:
    """One phrase per visible part of a synthetic bird, from its attributes.json entry."""
    b, p = a["body_colour"], a["pattern_colour"]
    body = {"plain": f"a plain {b} body", "striped": f"a {b} body with {p} stripes",
            "spotted": f"a {b} body with {p} spots",
            "checkered": f"a {b} and {p} checkered body"}.get(a["pattern"], f"a {a['pattern']} {b} body")
    phrases = {
        "shape": f"a {a['body_shape']} body shape",
        "body": body,
        "head": f"a {a['head_colour']} head",
        "wings": f"{a['wing_colour']} wings",
        "crest": f"a {a['crest']} crest" if a["crest"] else "no crest",
        "beak": f"a {a['beak_colour']} beak",
        "tail": f"a {a['tail']} {a['wing_colour']} tail",
    }
    return {k: _articles(v) for k, v in phrases.items()}


def knowledge_from_synthetic(attributes_path: str | os.PathLike, *, pairs: str = "genus",
                             class_names: Sequence[str] | None = None) -> Knowledge:
    """A full knowledge base for a synthetic bird dataset from its ``attributes.json``.

    Classes in the file's order (the label order ``write_dataset`` uses; ``class_names`` checks it).
    Per class: attributes are the phrases of its drawn attributes (shape, body and pattern, head,
    wings, crest, beak, tail); its synonym names the genus and what sets the species apart ("finch with
    a yellow crest"; for a genus's common species, its body and wings); analogous classes are the
    other species of its genus in the dataset. Pair texts (i, j), two per attribute phrase in which
    the species differ ("a X has <i's phrase>, while a Y has <j's phrase>." and "a X differs from a Y
    in having <i's phrase>."), for every ordered pair of one genus (``pairs="genus"``), of any genera
    (``"all"``), or none (``"none"``).
    """
    path = os.fspath(attributes_path)
    if pairs not in ("genus", "all", "none"):
        raise ValueError(f"pairs must be 'genus', 'all' or 'none', got {pairs!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise KnowledgeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("classes"), Mapping) or not data["classes"]:
        raise KnowledgeError(f"{path}: expected an object with a non-empty 'classes' object (name -> attributes)")
    names = list(data["classes"])
    if class_names is not None and list(class_names) != names:
        raise KnowledgeError(f"{path}: its classes {names[:5]}... are not the dataset's {list(class_names)[:5]}...")
    attrs = []
    for name in names:
        a = data["classes"][name]
        missing = [k for k in _SYNTHETIC_KEYS if not isinstance(a, Mapping) or k not in a]
        if missing:
            raise KnowledgeError(f"{path}: classes[{name!r}] lacks attribute(s) {missing}")
        attrs.append(a)
    phrases = [_bird_phrases(a) for a in attrs]
    genus = [str(a["genus"]) for a in attrs]
    classes = []
    for i, name in enumerate(names):
        dist = [d for d in attrs[i]["distinguishing"] if d in _DISTINGUISHING_PHRASE]
        key = (" and ".join(phrases[i][_DISTINGUISHING_PHRASE[d]] for d in dist) if dist
               else f"{phrases[i]['body']} and {phrases[i]['wings']}")
        classes.append({"name": name, "synonyms": [_articles(f"{genus[i].lower()} with {key}")],
                        "attributes": list(phrases[i].values()),
                        "analogous": [names[j] for j in range(len(names)) if j != i and genus[j] == genus[i]]})
    pair_texts = {}
    if pairs != "none":
        for i, j in itertools.permutations(range(len(names)), 2):
            if pairs == "genus" and genus[i] != genus[j]:
                continue
            texts = []
            for part, mine in phrases[i].items():
                theirs = phrases[j][part]
                if mine != theirs:
                    texts.append(_articles(f"a {names[i]} has {mine}, while a {names[j]} has {theirs}."))
                    texts.append(_articles(f"a {names[i]} differs from a {names[j]} in having {mine}."))
            if texts:
                pair_texts[f"{i},{j}"] = texts
    return parse_knowledge({"templates": SYNTHETIC_TEMPLATES, "classes": classes, "pairs": pair_texts},
                           source=path)


# ---------------------------------------------------------------------------------------------------
# Embeddings of the knowledge texts.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairTable:
    """The one-to-one texts, reduced for re-ranking: ``centroids`` [Q, D] is the mean of the unit
    embeddings of the texts of each ordered pair that has texts, and ``lookup`` [C, C] int32 the row of
    pair (i, j) in ``centroids``, -1 where the pair has none (always on the diagonal). The mean cosine
    of an image to a pair's texts is its dot product with the centroid."""

    centroids: np.ndarray
    lookup: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.lookup.shape[0])


def pair_table(pair_emb, pair_src, pair_dst, num_classes: int) -> PairTable:
    """Builds the ``PairTable`` of pair text embeddings ``pair_emb`` [P, D] (normalized here) whose
    text p says how class ``pair_src[p]`` differs from class ``pair_dst[p]``."""
    emb = _matrix(pair_emb, "pair_emb", allow_empty=True)
    src, dst = np.asarray(pair_src), np.asarray(pair_dst)
    if src.shape != (emb.shape[0],) or dst.shape != (emb.shape[0],):
        raise ValueError(f"pair_src and pair_dst must be [{emb.shape[0]}] (one per pair text), got "
                         f"{src.shape} and {dst.shape}")
    c = int(num_classes)
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= c):
        raise ValueError(f"pair class indices must lie in [0, {c})")
    if (src == dst).any():
        raise ValueError(f"pair texts {np.flatnonzero(src == dst)[:5].tolist()} pair a class with itself")
    lookup = np.full((c, c), -1, np.int32)
    keys = src.astype(np.int64) * c + dst
    uniq, inverse = np.unique(keys, return_inverse=True)
    if not uniq.size:  # no pair texts: one zero row so that gathers stay in bounds
        return PairTable(np.zeros((1, emb.shape[1]), np.float32), lookup)
    lookup.reshape(-1)[uniq] = np.arange(uniq.size, dtype=np.int32)
    centroids = _segment_mean(jnp.asarray(emb), jnp.asarray(inverse.reshape(-1).astype(np.int32)),
                              num_segments=int(uniq.size))
    return PairTable(np.asarray(centroids), lookup)


@functools.partial(jax.jit, static_argnames=("num_segments",))
def _segment_mean(emb, seg, *, num_segments):
    emb = _normalize(emb)
    total = jax.ops.segment_sum(emb, seg, num_segments=num_segments)
    count = jax.ops.segment_sum(jnp.ones_like(seg, jnp.float32), seg, num_segments=num_segments)
    return total / count[:, None]


@dataclasses.dataclass(frozen=True)
class KnowledgeEmbeddings:
    """Encoded knowledge: ``text_emb`` [N, D] (unit rows, class by class) with its ``segments``, the
    ``pairs`` table of the one-to-one texts, the ``class_names``, and the ``texts`` encoded (for
    reference). Its methods are the module functions with these arrays filled in."""

    class_names: tuple[str, ...]
    texts: tuple[str, ...]
    text_emb: np.ndarray
    segments: TextSegments
    pairs: PairTable

    @property
    def num_classes(self) -> int:
        return self.segments.num_classes

    def represent(self, image_x) -> np.ndarray:
        return represent(image_x, self.text_emb)

    def features(self, image_x) -> np.ndarray:
        return coder_features(image_x, self.text_emb, self.segments)

    def zero_shot_logits(self, image_x) -> np.ndarray:
        return zero_shot_logits(image_x, self.text_emb, self.segments)

    def rerank(self, image_x, logits=None, threshold: float = 0.2, top_k: int = 5) -> "Reranked":
        """CODER*: ``logits`` default to ``zero_shot_logits(image_x)``."""
        logits = self.zero_shot_logits(image_x) if logits is None else logits
        return rerank(image_x, logits, self.pairs, threshold, top_k=top_k)


def embed_knowledge(texts: KnowledgeTexts, text_emb, pair_emb) -> KnowledgeEmbeddings:
    """``KnowledgeEmbeddings`` from already computed embeddings of ``texts.texts`` [N, D] and
    ``texts.pair_texts`` [P, D] (e.g. by another encoder); rows are L2-normalized here."""
    text_emb = _matrix(text_emb, "text_emb")
    if text_emb.shape[0] != len(texts.texts):
        raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {len(texts.texts)} texts")
    pair_emb = _matrix(pair_emb, "pair_emb", allow_empty=True).reshape(-1, text_emb.shape[1])
    if pair_emb.shape[0] != len(texts.pair_texts):
        raise ValueError(f"pair_emb has {pair_emb.shape[0]} rows for {len(texts.pair_texts)} pair texts")
    text_emb = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    return KnowledgeEmbeddings(class_names=texts.class_names, texts=texts.texts, text_emb=text_emb.astype(np.float32),
                               segments=texts.segments,
                               pairs=pair_table(pair_emb, texts.pair_src, texts.pair_dst, texts.segments.num_classes))


def encode_knowledge(model, knowledge: Knowledge, tokenize=None, batch_size: int = 256) -> KnowledgeEmbeddings:
    """Encodes every text of ``knowledge`` with a CLIP ``model`` (``jaxgist.evaluation.embeddings.encode_texts``)
    and ``tokenize`` (default ``jaxgist.models.clip.tokenizer.load()``). Repeated strings are encoded once."""
    from jaxgist.evaluation import embeddings
    from jaxgist.models.clip import tokenizer

    texts = knowledge_texts(knowledge)
    tokenize = tokenize if tokenize is not None else tokenizer.load()
    everything = list(texts.texts) + list(texts.pair_texts)
    unique = list(dict.fromkeys(everything))
    row = {t: k for k, t in enumerate(unique)}
    emb = embeddings.encode_texts(model, tokenize(unique), batch_size=batch_size)
    emb = emb[np.asarray([row[t] for t in everything], np.int64)]
    n = len(texts.texts)
    return embed_knowledge(texts, emb[:n], emb[n:])


# ---------------------------------------------------------------------------------------------------
# The representation, zero-shot scores and features.
# ---------------------------------------------------------------------------------------------------


def _matrix(x, name: str, allow_empty: bool = False) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [rows, dim], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if x.shape[0] and (np.linalg.norm(x, axis=1) == 0).any():
        raise ValueError(f"{name} has all-zero rows {np.flatnonzero(np.linalg.norm(x, axis=1) == 0)[:5].tolist()}: "
                         f"their cosine is undefined")
    return x


def _images_and_texts(image_x, text_emb) -> tuple[np.ndarray, np.ndarray]:
    x, t = _matrix(image_x, "image_x"), _matrix(text_emb, "text_emb")
    if x.shape[1] != t.shape[1]:
        raise ValueError(f"image_x has dimension {x.shape[1]} but text_emb has {t.shape[1]}")
    return x, t


def _check_segments(segments: TextSegments, num_texts: int) -> TextSegments:
    if not isinstance(segments, TextSegments):
        raise TypeError(f"segments must be a TextSegments, got {type(segments).__name__}")
    if len(segments) != num_texts:
        raise ValueError(f"segments describe {len(segments)} texts but text_emb has {num_texts} rows")
    return segments


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _chunked(fn, rows: Sequence[np.ndarray], shared: Sequence[Any] = (), chunk: int | None = None):
    """``fn(*rows, *shared)`` over row chunks of at most ``chunk`` (default ``_CHUNK``; padded by
    repeating the last row, so one shape compiles), outputs concatenated along rows. ``fn`` returns an
    array or a tuple of arrays."""
    chunk = _CHUNK if chunk is None else chunk
    n = rows[0].shape[0]
    if n <= chunk:
        out = fn(*rows, *shared)
        return jax.tree.map(np.asarray, out)
    pieces = []
    for start in range(0, n, chunk):
        part = [r[start:start + chunk] for r in rows]
        valid = part[0].shape[0]
        if valid < chunk:
            part = [np.concatenate([p, np.repeat(p[-1:], chunk - valid, axis=0)]) for p in part]
        out = jax.tree.map(lambda a: np.asarray(a)[:valid], fn(*part, *shared))
        pieces.append(out)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)


@jax.jit
def _represent(x, t):
    return jnp.matmul(_normalize(x), _normalize(t).T, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _class_scores(cos, class_ids, is_name, *, num_classes):
    """[B, N] cosines -> [B, C] CODER zero-shot scores (module docstring)."""
    per_text = cos.T  # [N, B]: segment ops reduce the leading axis
    other = jnp.where(is_name[:, None], 0.0, per_text)
    total = jax.ops.segment_sum(other, class_ids, num_segments=num_classes, indices_are_sorted=True)
    count = jax.ops.segment_sum((~is_name).astype(jnp.float32), class_ids, num_segments=num_classes,
                                indices_are_sorted=True)
    name_max = jax.ops.segment_max(jnp.where(is_name[:, None], per_text, -jnp.inf), class_ids,
                                   num_segments=num_classes, indices_are_sorted=True)
    return (100.0 * (total + name_max) / (count[:, None] + 1.0)).T


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _zero_shot(x, t, class_ids, is_name, *, num_classes):
    return _class_scores(_represent(x, t), class_ids, is_name, num_classes=num_classes)


@jax.jit
def _features(x, t):
    return _normalize(_represent(x, t))


def represent(image_x, text_emb) -> np.ndarray:
    """[n, N] float32: the cosine of each image (rows of ``image_x`` [n, D]) to each knowledge text
    (rows of ``text_emb`` [N, D]); both are L2-normalized here."""
    x, t = _images_and_texts(image_x, text_emb)
    return _chunked(_represent, [x], [jnp.asarray(t)])


def class_scores(representation, segments: TextSegments) -> np.ndarray:
    """[n, C] CODER zero-shot scores from a representation [n, N] (``represent``'s cosines):
    ``100 * (sum of the attribute/analogous cosines + max of the name/synonym cosines) / (count + 1)``
    per class."""
    cos = np.asarray(representation, np.float32)
    if cos.ndim != 2:
        raise ValueError(f"representation must be [n, num_texts], got shape {cos.shape}")
    seg = _check_segments(segments, cos.shape[1])
    fn = functools.partial(_class_scores, num_classes=seg.num_classes)
    return _chunked(fn, [cos], [jnp.asarray(seg.class_ids), jnp.asarray(seg.kinds <= SYNONYM)])


def zero_shot_logits(image_x, text_emb, segments: TextSegments) -> np.ndarray:
    """[n, C] CODER zero-shot logits of images ``image_x`` [n, D]: for class c,
    ``100 * mean({cos to c's attribute and analogous texts} + {max cos over c's name and synonym
    texts})``, the max counting as one element of the mean (module docstring)."""
    x, t = _images_and_texts(image_x, text_emb)
    seg = _check_segments(segments, t.shape[0])
    fn = functools.partial(_zero_shot, num_classes=seg.num_classes)
    return _chunked(fn, [x], [jnp.asarray(t), jnp.asarray(seg.class_ids), jnp.asarray(seg.kinds <= SYNONYM)])


def coder_features(image_x, text_emb, segments: TextSegments | None = None) -> np.ndarray:
    """[n, N] CODER features for Tip-Adapter: the images L2-normalized, represented by their cosines
    to the N knowledge texts, and those rows L2-normalized again (CODER's cache keys and queries).
    ``segments``, when given, only checks that it describes the N texts."""
    x, t = _images_and_texts(image_x, text_emb)
    if segments is not None:
        _check_segments(segments, t.shape[0])
    return _chunked(_features, [x], [jnp.asarray(t)])


# ---------------------------------------------------------------------------------------------------
# Re-ranking with the one-to-one texts (CODER*).
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Reranked:
    """The result of ``rerank``.

    ``predictions`` [n]: the re-ranked top-1 class. ``logits`` [n, C]: the input logits with, on
    re-scored images, the top-k values reassigned to the top-k classes in their new order (so top-k
    metrics see the new ranking; a class outside the top k keeps its logit; where the original top-k
    values tie, ``predictions`` is authoritative). ``reranked`` [n] bool: the image was under the
    threshold and re-scored; ``changed`` [n] bool: its top-1 changed. ``gap`` [n]: top-1 minus top-2
    softmax probability. ``candidates`` [n, k]: the original top-k classes, best first, and ``scores``
    [n, k] their one-to-one scores (computed for every image, used only under the threshold).
    """

    predictions: np.ndarray
    logits: np.ndarray
    reranked: np.ndarray
    changed: np.ndarray
    gap: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray
    threshold: float
    top_k: int

    def summary(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold), "top_k": int(self.top_k),
                "reranked_fraction": float(np.mean(self.reranked)), "changed_fraction": float(np.mean(self.changed))}


@functools.partial(jax.jit, static_argnames=("top_k",))
def _rerank(x, logits, threshold, centroids, lookup, *, top_k):
    x = _normalize(x)
    top_vals, top_idx = jax.lax.top_k(logits, top_k)  # ties: the lower class index first (= argmax)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p = jnp.take_along_axis(probs, top_idx[:, :2], axis=1)
    gap = top_p[:, 0] - top_p[:, 1]
    rows = lookup[top_idx[:, :, None], top_idx[:, None, :]]  # [B, k, k]: pair (c_i, c_j), -1: no texts
    mean_cos = jnp.einsum("bd,bijd->bij", x, centroids[jnp.maximum(rows, 0)], precision=_HIGHEST)
    rows_t, mean_cos_t = jnp.swapaxes(rows, 1, 2), jnp.swapaxes(mean_cos, 1, 2)
    terms = jnp.where((rows >= 0) & (rows_t >= 0), mean_cos - mean_cos_t, 0.0)  # diagonal: rows == -1
    scores = jnp.sum(terms, axis=2) / (top_k - 1)
    order = jnp.argsort(-scores, axis=1, stable=True)  # ties keep the original rank order
    new_idx = jnp.take_along_axis(top_idx, order, axis=1)
    selected = gap < threshold
    b = jnp.arange(logits.shape[0])[:, None]
    new_logits = jnp.where(selected[:, None], logits.at[b, new_idx].set(top_vals), logits)
    predictions = jnp.where(selected, new_idx[:, 0], top_idx[:, 0])
    return predictions, new_logits, selected, predictions != top_idx[:, 0], gap, top_idx, scores


def _check_rerank_inputs(image_x, logits, table: PairTable, top_k: int):
    x = _matrix(image_x, "image_x")
    logits = np.asarray(logits, np.float32)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"logits must be [{x.shape[0]}, num_classes] (one row per image), got {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    if not isinstance(table, PairTable):
        raise TypeError(f"table must be a PairTable (see pair_table), got {type(table).__name__}")
    c = logits.shape[1]
    if table.num_classes != c:
        raise ValueError(f"the pair table has {table.num_classes} classes but logits have {c}")
    if table.centroids.shape[1] != x.shape[1]:
        raise ValueError(f"image_x has dimension {x.shape[1]} but the pair texts have {table.centroids.shape[1]}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 2:
        raise ValueError(f"top_k must be an integer >= 2, got {top_k!r}")
    if c < 2:
        raise ValueError("re-ranking needs at least 2 classes")
    return x, logits, min(int(top_k), c)


def rerank(image_x, logits, table: PairTable, threshold: float = 0.2, top_k: int = 5) -> Reranked:
    """CODER*'s re-ranking of uncertain images with the one-to-one texts (module docstring).

    ``image_x`` [n, D] image embeddings; ``logits`` [n, C] (e.g. ``zero_shot_logits``); ``table`` the
    ``PairTable`` of the pair texts. Images whose top-1 minus top-2 probability under
    ``softmax(logits)`` is below ``threshold`` have their ``top_k`` classes (at most C) re-ordered by
    their one-to-one scores; the others keep their logits. Labels are never used (choose the threshold
    on validation with ``choose_threshold``; the default 0.2 is the reference's value for CUB). One
    jitted, vectorized computation per chunk of images.
    """
    x, logits, k = _check_rerank_inputs(image_x, logits, table, top_k)
    if not np.isfinite(threshold):
        threshold = np.inf if threshold > 0 else -np.inf
    fn = functools.partial(_rerank, top_k=k)
    out = _chunked(fn, [x, logits], [jnp.float32(threshold), jnp.asarray(table.centroids), jnp.asarray(table.lookup)])
    predictions, new_logits, selected, changed, gap, candidates, scores = out
    return Reranked(predictions=predictions.astype(np.int64), logits=new_logits, reranked=selected.astype(bool),
                    changed=changed.astype(bool), gap=gap, candidates=candidates.astype(np.int64), scores=scores,
                    threshold=float(threshold), top_k=k)


@dataclasses.dataclass(frozen=True)
class ThresholdChoice:
    """The re-ranking threshold chosen on validation: ``grid`` (ascending), ``val_curve`` (top-1 of
    each), the chosen ``threshold`` and its ``val_accuracy`` (``zero_shot_val_accuracy``: threshold 0)."""

    threshold: float
    val_accuracy: float
    zero_shot_val_accuracy: float
    grid: np.ndarray
    val_curve: np.ndarray
    top_k: int

    def summary(self) -> dict[str, Any]:
        return {"threshold": float(self.threshold), "val_top1": float(self.val_accuracy),
                "val_top1_without_rerank": float(self.zero_shot_val_accuracy), "top_k": int(self.top_k)}


def choose_threshold(val_x, val_logits, val_y, table: PairTable, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                     top_k: int = 5) -> ThresholdChoice:
    """The re-ranking threshold of best validation top-1 among ``thresholds`` (ties: the smaller one,
    which re-ranks fewer images). One re-ranking of every validation image serves the whole grid."""
    x, logits, k = _check_rerank_inputs(val_x, val_logits, table, top_k)
    y = np.asarray(val_y)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"val_y must be [{x.shape[0]}] integer class indices, got shape {y.shape}, dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
        raise ValueError(f"val_y must lie in [0, {logits.shape[1]})")
    grid = np.sort(np.asarray(thresholds, np.float64).reshape(-1))
    if grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"thresholds must be a non-empty list of finite numbers, got {list(thresholds)}")
    everything = rerank(x, logits, table, threshold=np.inf, top_k=k)
    plain = everything.candidates[:, 0]
    counts = np.asarray([np.count_nonzero(np.where(everything.gap < t, everything.predictions, plain) == y)
                         for t in grid])
    best = int(np.argmax(counts))  # first maximum: the smallest threshold
    curve = counts / len(y)
    return ThresholdChoice(threshold=float(grid[best]), val_accuracy=float(curve[best]),
                           zero_shot_val_accuracy=float(np.mean(plain == y)), grid=grid, val_curve=curve, top_k=k)


# ---------------------------------------------------------------------------------------------------
# Few-shot: Tip-Adapter on CODER features.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoderTipAdapter:
    """Tip-Adapter whose cache lives in CODER feature space (CODER's few-shot classifier).

    ``logits(x) = 100 * x @ text_weights.T + alpha * exp(-beta * (1 - f(x) @ keys.T)) @ values`` with
    ``x`` the L2-normalized image embedding, ``f = coder_features`` (normalize, represent, normalize) and
    ``keys`` [M, N] the CODER features of the (view-averaged, normalized) cache images. ``alpha`` and
    ``beta`` were chosen on validation (``grid_search``: ``jaxgist.heads.tip_adapter.GridSearch``).
    """

    text_weights: np.ndarray
    coder_text_emb: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    alpha: float
    beta: float
    val_accuracy: float
    grid_search: Any
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def predict_logits(self, x) -> np.ndarray:
        """[n, C] float32 logits of image embeddings ``x`` [n, D]."""
        from jaxgist.heads import tip_adapter

        z, weights, keys = _tip_inputs(x, self.text_weights, self.coder_text_emb, self.keys)
        return tip_adapter.tip_logits(z, weights, keys, self.values, self.alpha, self.beta)

    def predict(self, x) -> np.ndarray:
        return np.argmax(self.predict_logits(x), axis=1)

    def summary(self) -> dict[str, Any]:
        out = {"method": "coder_tip_adapter", "val_top1": float(self.val_accuracy), "alpha": float(self.alpha),
               "beta": float(self.beta), "cache_size": int(self.keys.shape[0]),
               "num_knowledge_texts": int(self.coder_text_emb.shape[0])}
        out.update({k: float(v) for k, v in self.extras.items()})
        return out


def _tip_inputs(x, text_weights, coder_text_emb, coder_keys):
    """Stacks CLIP space and CODER space so that ``jaxgist.heads.tip_adapter``'s single-feature formula
    computes CODER's: ``z = [x_hat, f(x)] / sqrt(2)`` (a unit vector), ``W' = [sqrt(2) W, 0]`` and
    ``K' = [0, sqrt(2) F]``, so ``z @ W'.T = x_hat @ W.T`` and ``z @ K'.T = f(x) @ F.T`` exactly."""
    x = _matrix(x, "x")
    weights = _matrix(text_weights, "text_weights")
    keys = _matrix(coder_keys, "keys")
    if x.shape[1] != weights.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but text_weights have {weights.shape[1]}")
    f = coder_features(x, coder_text_emb)
    if keys.shape[1] != f.shape[1]:
        raise ValueError(f"keys have dimension {keys.shape[1]} but there are {f.shape[1]} knowledge texts")
    root2 = np.float32(np.sqrt(2.0))
    x_hat = x / np.linalg.norm(x, axis=1, keepdims=True)
    z = np.concatenate([x_hat, f], axis=1) / root2
    stacked_w = np.concatenate([weights * root2, np.zeros((weights.shape[0], f.shape[1]), np.float32)], axis=1)
    stacked_k = np.concatenate([np.zeros((keys.shape[0], x.shape[1]), np.float32), keys * root2], axis=1)
    return z, stacked_w, stacked_k


def coder_tip_adapter(train_x, train_y, val_x, val_y, text_weights, coder_text_emb, *,
                      alphas: Sequence[float] | None = None, betas: Sequence[float] | None = None) -> CoderTipAdapter:
    """CODER's few-shot classifier: Tip-Adapter (``jaxgist.heads.tip_adapter``) with cache keys and queries in
    CODER feature space, (alpha, beta) searched on validation.

    ``train_x`` [V, N, D] (augmented views) or [N, D] and ``train_y`` [N]: the few-shot images, cached
    as ``tip_adapter.build_cache`` does (views averaged, normalized), then turned into CODER features;
    ``val_x`` [n, D], ``val_y`` [n]; ``text_weights`` [C, D]: CLIP's class embeddings for the zero-shot
    term (``zero_shot.class_embeddings``); ``coder_text_emb`` [T, D]: the knowledge texts
    (``KnowledgeEmbeddings.text_emb``). ``alphas``/``betas``: the grids (Tip-Adapter's defaults).
    """
    from jaxgist.heads import tip_adapter

    weights = _matrix(text_weights, "text_weights")
    clip_keys, values = tip_adapter.build_cache(train_x, train_y, weights.shape[0])
    keys = coder_features(clip_keys, coder_text_emb)
    z, stacked_w, stacked_k = _tip_inputs(val_x, weights, coder_text_emb, keys)
    found = tip_adapter.search(z, val_y, stacked_w, stacked_k, values, alphas=alphas, betas=betas)
    # z's first D columns are the normalized embeddings / sqrt(2): the zero-shot argmax is unchanged.
    zero_shot = float(np.mean(np.argmax(z[:, :weights.shape[1]] @ weights.T, axis=1) == np.asarray(val_y)))
    return CoderTipAdapter(text_weights=weights, coder_text_emb=_matrix(coder_text_emb, "coder_text_emb"), keys=keys,
                           values=values, alpha=found.alpha, beta=found.beta, val_accuracy=found.val_accuracy,
                           grid_search=found, extras={"zero_shot_val_top1": zero_shot})
