"""CODER's few-shot classifier: Tip-Adapter (``jaxgist.heads.tip_adapter``) whose cache keys and queries
live in CODER feature space, alpha and beta searched on validation.

    from jaxgist.heads import coder

    head = coder.coder_tip_adapter(train_views, train_y, val_x, val_y, text_weights, emb.text_emb)
    logits = head.predict_logits(test_x)   # 100 x.W^T + alpha exp(-beta (1 - f(x).F^T)) V   [n, C]
    head.predict(test_x), head.summary(), head.alpha, head.beta, head.grid_search

``f = coder_features`` (normalize, represent, normalize); ``F`` the cache images' CODER features. How
the two feature spaces share Tip-Adapter's one formula: ``_tip_inputs`` and docs/methods/coder.md.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxgist.core.arrays import l2_normalize
from jaxgist.heads import tip_adapter
from jaxgist.heads.coder.encode import _matrix
from jaxgist.heads.coder.scores import coder_features

__all__ = ["CoderTipAdapter", "coder_tip_adapter"]


@dataclasses.dataclass(frozen=True)
class CoderTipAdapter(tip_adapter.TipAdapter):
    """Tip-Adapter whose cache lives in CODER feature space (CODER's few-shot classifier).

    ``logits(x) = 100 * x @ text_weights.T + alpha * exp(-beta * (1 - f(x) @ keys.T)) @ values`` with
    ``x`` the L2-normalized image embedding, ``f = coder_features`` (normalize, represent, normalize) with
    the knowledge texts ``coder_text_emb`` [N, D], and ``keys`` [M, N] the CODER features of the
    (view-averaged, normalized) cache images. ``hparams``: ``alpha`` and ``beta``, chosen on validation
    (``grid_search``), the cache size and the number of knowledge texts; ``extras``: the zero-shot
    validation top-1. The other fields and ``summary`` are ``TipAdapter``'s.
    """

    coder_text_emb: np.ndarray

    def predict_logits(self, x) -> np.ndarray:
        """[n, C] float32 logits of image embeddings ``x`` [n, D]."""
        z, weights, keys = _tip_inputs(x, self.text_weights, self.coder_text_emb, self.keys)
        return tip_adapter.tip_logits(z, weights, keys, self.values, self.alpha, self.beta)


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
    x_hat = l2_normalize(x)
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
    weights = _matrix(text_weights, "text_weights")
    clip_keys, values = tip_adapter.build_cache(train_x, train_y, weights.shape[0])
    keys = coder_features(clip_keys, coder_text_emb)
    z, stacked_w, stacked_k = _tip_inputs(val_x, weights, coder_text_emb, keys)
    found = tip_adapter.search(z, val_y, stacked_w, stacked_k, values, alphas=alphas, betas=betas)
    # z's first D columns are the normalized embeddings / sqrt(2): the zero-shot argmax is unchanged.
    zero_shot = float(np.mean(np.argmax(z[:, :weights.shape[1]] @ weights.T, axis=1) == np.asarray(val_y)))
    coder_text_emb = _matrix(coder_text_emb, "coder_text_emb")
    return CoderTipAdapter(
        method="coder_tip_adapter", text_weights=weights, coder_text_emb=coder_text_emb, keys=keys, values=values,
        hparams={"alpha": found.alpha, "beta": found.beta, "cache_size": int(keys.shape[0]),
                 "num_knowledge_texts": int(coder_text_emb.shape[0])},
        val_accuracy=found.val_accuracy, grid_search=found, extras={"zero_shot_val_top1": zero_shot})
