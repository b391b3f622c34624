"""Few-shot and zero-shot heads on cached CLIP embeddings: Tip-Adapter(-F), CODER (zero-shot,
re-ranked, few-shot), and FLIP's k-NN, nearest-centroid and hybrid (image + caption) heads.

Every head reads the same cached arrays (written by the GIST ``embed`` stage): image embeddings of
train / val / test, augmented views of the training images (Tip-Adapter's cache keys), the class
text embeddings from prompt templates, and the embeddings of a CODER knowledge file. Every
hyperparameter (alpha, beta, epoch, threshold, k) is chosen on validation; test is only scored.

``HEADS`` lists the names accepted in ``config.gist.heads``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from jaxgist.core.arrays import l2_normalize
from jaxgist.evaluation import accuracy
from jaxgist.heads import coder, flip, tip_adapter

HEADS = ("tip_adapter", "tip_adapter_f", "coder", "coder_rerank", "coder_tip_adapter", "knn", "centroid", "hybrid")


def knowledge_for(class_names, *, path: str = "") -> coder.Knowledge:
    """The CODER knowledge of a dataset: its knowledge file if given (checked against ``class_names``),
    else a minimal one generated from the class names."""
    if path:
        return coder.load_knowledge(path, class_names=class_names)
    return coder.knowledge_from_class_names(class_names, pairs="analogous")


def knowledge_arrays(model, knowledge: coder.Knowledge, tokenize) -> dict[str, np.ndarray]:
    """Unit embeddings of the knowledge texts and of the one-to-one pair texts under ``model``: the
    arrays cached by the embed stage (``load_knowledge_embeddings`` rebuilds the CODER object)."""
    text_emb, pair_emb = coder.encode_knowledge_texts(model, coder.knowledge_texts(knowledge), tokenize)
    return {"coder_text_emb": text_emb, "coder_pair_emb": pair_emb}


def load_knowledge_embeddings(knowledge: coder.Knowledge, cached: dict[str, np.ndarray]) -> coder.KnowledgeEmbeddings:
    return coder.embed_knowledge(coder.knowledge_texts(knowledge), cached["coder_text_emb"], cached["coder_pair_emb"])


def run(heads, splits: dict[str, dict[str, np.ndarray]], text_weights: np.ndarray,
        knowledge: coder.KnowledgeEmbeddings | None, *, bootstrap: int = 1000, seed: int = 0,
        predictions: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Fits each head in ``heads`` on train (+ val for selection) and scores test.

    ``splits``: {"train", "val", "test"} (and optionally "trainviews" [V, N, D]) of {"x", "y"};
    ``text_weights`` [C, D] unit class embeddings; ``knowledge``: encoded CODER knowledge (needed by the
    coder heads). Returns {head: metrics} with test top-1/top-3 (+ bootstrap), val top-1 and the
    chosen hyperparameters. ``predictions``, when given, receives each head's top-1 test class
    (``{head: int32 [N]}``, rows as ``splits["test"]``).
    """
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; heads are {HEADS}")
    tr, va, te = splits["train"], splits["val"], splits["test"]
    xtr, xva, xte = l2_normalize(tr["x"]), l2_normalize(va["x"]), l2_normalize(te["x"])
    views = l2_normalize(splits["trainviews"]["x"]) if "trainviews" in splits else xtr
    num_classes = text_weights.shape[0]
    fits: dict[str, Callable[[], tuple[np.ndarray, dict[str, Any]]]] = {}

    def fitted(model) -> tuple[np.ndarray, dict[str, Any]]:
        return model.predict_logits(xte), {k: v for k, v in model.summary().items() if k != "method"}

    fits["tip_adapter"] = lambda: fitted(tip_adapter.tip_adapter(views, tr["y"], xva, va["y"], text_weights))
    fits["tip_adapter_f"] = lambda: fitted(tip_adapter.tip_adapter_f(views, tr["y"], xva, va["y"], text_weights,
                                                                     seed=seed))
    fits["knn"] = lambda: fitted(flip.knn_classifier(xtr, tr["y"], xva, va["y"], num_classes))
    fits["centroid"] = lambda: fitted(flip.centroid_classifier(xtr, tr["y"], xva, va["y"], num_classes))

    def hybrid():
        if not all("caption_x" in d for d in (tr, va, te)):
            raise ValueError("the hybrid head needs each split's caption embeddings (caption_x)")
        head = flip.hybrid_head(tr["x"], tr["caption_x"], tr["y"], va["x"], va["caption_x"], va["y"], num_classes,
                                seed=seed)
        return head.predict_logits(te["x"], te["caption_x"]), {k: v for k, v in head.summary().items()
                                                                if k != "method"}

    fits["hybrid"] = hybrid

    def need_knowledge():
        if knowledge is None:
            raise ValueError("the coder heads need CODER knowledge embeddings")
        return knowledge

    def coder_zero_shot():
        return need_knowledge().zero_shot_logits(xte), {}

    def coder_rerank():
        k = need_knowledge()
        choice = coder.choose_threshold(xva, k.zero_shot_logits(xva), va["y"], k.pairs)
        reranked = k.rerank(xte, threshold=choice.threshold, top_k=choice.top_k)
        logits = reranked.logits.copy()
        # top-1 is the re-ranked prediction (ties in the reordered logits must not undo it)
        logits[np.arange(len(logits)), reranked.predictions] = logits.max(axis=1) + 1.0
        return logits, choice.summary()

    def coder_tip():
        k = need_knowledge()
        model = coder.coder_tip_adapter(views, tr["y"], xva, va["y"], text_weights, k.text_emb)
        return fitted(model)

    fits["coder"] = coder_zero_shot
    fits["coder_rerank"] = coder_rerank
    fits["coder_tip_adapter"] = coder_tip
    out = {}
    for head in heads:
        t0 = time.perf_counter()
        logits, chosen = fits[head]()
        metrics = accuracy.accuracy_summary(logits, te["y"], resamples=bootstrap, seed=seed)
        metrics.update(chosen)
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        out[head] = metrics
        if predictions is not None:
            predictions[head] = np.asarray(logits).argmax(axis=1).astype(np.int32)
    return out
