"""CODER (Yi, Ren, Zhan and Ye, "Leveraging Cross-Modal Neighbor Representation for Improved CLIP
Classification", CVPR 2024): an image represented by its cosine similarities to many class-knowledge
texts, used as a zero-shot classifier, to re-rank uncertain images (CODER*), and as Tip-Adapter's
features in the few-shot setting.

    from jaxgist.heads import coder

    k = coder.load_knowledge(path, class_names=names)     # or coder.knowledge_from_class_names(names)
    emb = coder.encode_knowledge(clip_model, k, tokenize)  # KnowledgeEmbeddings
    logits = emb.zero_shot_logits(x); out = emb.rerank(x, threshold=0.2)
    head = coder.coder_tip_adapter(train_views, train_y, val_x, val_y, text_weights, emb.text_emb)

Modules: ``knowledge`` (the file format), ``generate`` (knowledge from class names), ``encode`` (texts,
segments, embeddings), ``scores`` (representation, zero-shot, re-ranking, threshold), ``fewshot``
(CODER + Tip-Adapter). The method and its fidelity to the paper: docs/methods/coder.md.
"""

from jaxgist.heads.coder.encode import (
    ANALOGOUS,
    ATTRIBUTE,
    KIND_NAMES,
    NAME,
    SYNONYM,
    KnowledgeEmbeddings,
    KnowledgeTexts,
    PairTable,
    TextSegments,
    embed_knowledge,
    encode_knowledge,
    encode_knowledge_texts,
    knowledge_texts,
    pair_table,
)
from jaxgist.heads.coder.fewshot import CoderTipAdapter, coder_tip_adapter
from jaxgist.heads.coder.generate import DEFAULT_GENERIC_ATTRIBUTES, DEFAULT_PAIR_TEMPLATE, knowledge_from_class_names
from jaxgist.heads.coder.knowledge import (
    DEFAULT_TEMPLATES,
    FORMAT_VERSION,
    ClassKnowledge,
    Knowledge,
    KnowledgeError,
    knowledge_to_json,
    load_knowledge,
    parse_knowledge,
    write_knowledge,
)
from jaxgist.heads.coder.scores import (
    DEFAULT_THRESHOLDS,
    Reranked,
    ThresholdChoice,
    choose_threshold,
    class_scores,
    coder_features,
    represent,
    rerank,
    zero_shot_logits,
)

__all__ = [
    "NAME", "SYNONYM", "ATTRIBUTE", "ANALOGOUS", "KIND_NAMES", "DEFAULT_TEMPLATES", "DEFAULT_THRESHOLDS",
    "DEFAULT_GENERIC_ATTRIBUTES", "DEFAULT_PAIR_TEMPLATE", "FORMAT_VERSION",
    "KnowledgeError", "ClassKnowledge", "Knowledge", "KnowledgeTexts", "TextSegments", "PairTable",
    "KnowledgeEmbeddings", "Reranked", "ThresholdChoice",
    "parse_knowledge", "load_knowledge", "knowledge_to_json", "write_knowledge", "knowledge_texts",
    "knowledge_from_class_names", "encode_knowledge", "encode_knowledge_texts", "embed_knowledge",
    "pair_table", "represent", "class_scores", "zero_shot_logits", "coder_features", "rerank",
    "choose_threshold", "CoderTipAdapter", "coder_tip_adapter",
]
