"""From knowledge to embeddings: the flat list of knowledge texts with their segments (the class and
kind of each text), their encoding with a CLIP, and the ``KnowledgeEmbeddings`` the scores read.

    from jaxgist.heads import coder

    texts = coder.knowledge_texts(k)           # .texts [N] class by class, .segments, .pair_texts [P] ...
    emb = coder.encode_knowledge(clip_model, k, tokenize)               # KnowledgeEmbeddings
    emb = coder.embed_knowledge(texts, text_emb, pair_emb)              # from embeddings computed elsewhere
    emb.text_emb [N, D], emb.segments, emb.pairs (a PairTable: one centroid per ordered class pair)
    emb.zero_shot_logits(x), emb.rerank(x, threshold=0.2), emb.features(x), emb.represent(x)

Kinds of per-class texts: ``NAME``, ``SYNONYM``, ``ATTRIBUTE``, ``ANALOGOUS`` (``KIND_NAMES``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jaxgist.core.arrays import l2_normalize
from jaxgist.heads.coder.knowledge import Knowledge

if TYPE_CHECKING:
    from jaxgist.heads.coder.scores import Reranked

__all__ = ["NAME", "SYNONYM", "ATTRIBUTE", "ANALOGOUS", "KIND_NAMES", "TextSegments", "KnowledgeTexts",
           "knowledge_texts", "PairTable", "pair_table", "KnowledgeEmbeddings", "embed_knowledge",
           "encode_knowledge_texts", "encode_knowledge"]

# Kinds of general (per-class) texts.
NAME, SYNONYM, ATTRIBUTE, ANALOGOUS = 0, 1, 2, 3
KIND_NAMES = ("name", "synonym", "attribute", "analogous")


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

    ``texts`` [N] class by class (per class: name, synonyms, attributes, analogous; the order of
    ``jaxgist.heads.coder.knowledge``'s docstring) with their ``segments``; ``pair_texts`` [P] with ``pair_src``/``pair_dst`` [P] (the
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
    emb = l2_normalize(emb)
    total = jax.ops.segment_sum(emb, seg, num_segments=num_segments)
    count = jax.ops.segment_sum(jnp.ones_like(seg, jnp.float32), seg, num_segments=num_segments)
    return total / count[:, None]


@dataclasses.dataclass(frozen=True)
class KnowledgeEmbeddings:
    """Encoded knowledge: ``text_emb`` [N, D] (unit rows, class by class) with its ``segments``, the
    ``pairs`` table of the one-to-one texts, the ``class_names``, and the ``texts`` encoded (for
    reference). Its methods are the functions of ``jaxgist.heads.coder.scores`` with these arrays filled
    in."""

    class_names: tuple[str, ...]
    texts: tuple[str, ...]
    text_emb: np.ndarray
    segments: TextSegments
    pairs: PairTable

    @property
    def num_classes(self) -> int:
        return self.segments.num_classes

    # scores imports this module: it is imported when a method runs.

    def represent(self, image_x) -> np.ndarray:
        from jaxgist.heads.coder import scores

        return scores.represent(image_x, self.text_emb)

    def features(self, image_x) -> np.ndarray:
        from jaxgist.heads.coder import scores

        return scores.coder_features(image_x, self.text_emb, self.segments)

    def zero_shot_logits(self, image_x) -> np.ndarray:
        from jaxgist.heads.coder import scores

        return scores.zero_shot_logits(image_x, self.text_emb, self.segments)

    def rerank(self, image_x, logits=None, threshold: float = 0.2, top_k: int = 5) -> Reranked:
        """CODER*: ``logits`` default to ``zero_shot_logits(image_x)``."""
        from jaxgist.heads.coder import scores

        logits = self.zero_shot_logits(image_x) if logits is None else logits
        return scores.rerank(image_x, logits, self.pairs, threshold, top_k=top_k)


def embed_knowledge(texts: KnowledgeTexts, text_emb, pair_emb) -> KnowledgeEmbeddings:
    """``KnowledgeEmbeddings`` from already computed embeddings of ``texts.texts`` [N, D] and
    ``texts.pair_texts`` [P, D] (e.g. by another encoder); rows are L2-normalized here."""
    text_emb = _matrix(text_emb, "text_emb")
    if text_emb.shape[0] != len(texts.texts):
        raise ValueError(f"text_emb has {text_emb.shape[0]} rows for {len(texts.texts)} texts")
    pair_emb = _matrix(pair_emb, "pair_emb", allow_empty=True).reshape(-1, text_emb.shape[1])
    if pair_emb.shape[0] != len(texts.pair_texts):
        raise ValueError(f"pair_emb has {pair_emb.shape[0]} rows for {len(texts.pair_texts)} pair texts")
    text_emb = l2_normalize(text_emb)
    return KnowledgeEmbeddings(class_names=texts.class_names, texts=texts.texts, text_emb=text_emb.astype(np.float32),
                               segments=texts.segments,
                               pairs=pair_table(pair_emb, texts.pair_src, texts.pair_dst, texts.segments.num_classes))


def encode_knowledge_texts(model, texts: KnowledgeTexts, tokenize=None,
                           batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings (``text_emb`` [N, E], ``pair_emb`` [P, E]) of ``texts.texts`` and
    ``texts.pair_texts`` under a CLIP ``model`` (``jaxgist.evaluation.embeddings.encode_texts``) and
    ``tokenize`` (default ``jaxgist.models.clip.tokenizer.load()``). Repeated strings are encoded once."""
    from jaxgist.evaluation import embeddings
    from jaxgist.models.clip import tokenizer

    tokenize = tokenize if tokenize is not None else tokenizer.load()
    everything = list(texts.texts) + list(texts.pair_texts)
    unique = list(dict.fromkeys(everything))
    row = {t: k for k, t in enumerate(unique)}
    emb = embeddings.encode_texts(model, tokenize(unique), batch_size=batch_size)
    emb = emb[np.asarray([row[t] for t in everything], np.int64)]
    n = len(texts.texts)
    return emb[:n], emb[n:]


def encode_knowledge(model, knowledge: Knowledge, tokenize=None, batch_size: int = 256) -> KnowledgeEmbeddings:
    """Encodes every text of ``knowledge`` with a CLIP ``model`` (``encode_knowledge_texts``)."""
    texts = knowledge_texts(knowledge)
    return embed_knowledge(texts, *encode_knowledge_texts(model, texts, tokenize, batch_size))


def _matrix(x, name: str, allow_empty: bool = False) -> np.ndarray:
    """``x`` as a finite float32 [rows, dim] array without all-zero rows (their cosine is undefined)."""
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
