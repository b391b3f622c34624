"""heads.run: every head on the same cached embeddings, selection on validation, test only scored."""

import numpy as np
import pytest

from jaxgist.evaluation import accuracy as evaluation
from jaxgist.heads import coder
from jaxgist.heads import registry as heads
from jaxgist.heads import tip_adapter


def aligned_problem(num_classes=6, dim=32, shots=4, seed=0):
    """Image embeddings near their class's text embedding (noisy), so every head should do well."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(num_classes, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def split(n_per_class, views=None):
        y = np.repeat(np.arange(num_classes), n_per_class)
        shape = (len(y), dim) if views is None else (views, len(y), dim)
        return {"x": (text[y] + 0.15 * rng.normal(size=shape)).astype(np.float32), "y": y.astype(np.int32)}

    splits = {"train": split(shots), "val": split(4), "test": split(10)}
    for d in splits.values():  # each image's description embeds near its class too (the hybrid head's input)
        d["caption_x"] = (text[d["y"]] + 0.3 * rng.normal(size=d["x"].shape)).astype(np.float32)
    splits["trainviews"] = {"x": np.stack([splits["train"]["x"] + 0.05 * rng.normal(size=splits["train"]["x"].shape)
                                           for _ in range(3)]).astype(np.float32), "y": splits["train"]["y"]}
    names = [f"class {i}" for i in range(num_classes)]
    knowledge = coder.knowledge_from_class_names(names, pairs="all")
    texts = coder.knowledge_texts(knowledge)
    class_of = np.asarray(texts.segments.class_ids)
    text_emb = text[class_of] + 0.1 * rng.normal(size=(len(texts.texts), dim))
    pair_emb = rng.normal(size=(len(texts.pair_texts), dim))
    return splits, text.astype(np.float32), coder.embed_knowledge(texts, text_emb, pair_emb)


def test_every_head_runs_and_reports_test_and_validation():
    splits, text, knowledge = aligned_problem()
    out = heads.run(heads.HEADS, splits, text, knowledge, bootstrap=50)
    assert set(out) == set(heads.HEADS)
    for name, m in out.items():
        assert m["test_count"] == 60, name
        assert m["test_top1"] >= 0.8, (name, m["test_top1"])  # the problem is easy by construction
        assert m["test_top1"] <= m["test_top3"] <= 1.0


def test_tip_adapter_head_equals_the_direct_call():
    splits, text, knowledge = aligned_problem(seed=1)
    out = heads.run(("tip_adapter",), splits, text, None, bootstrap=0)["tip_adapter"]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    direct = tip_adapter.tip_adapter(unit(splits["trainviews"]["x"]), splits["train"]["y"], unit(splits["val"]["x"]),
                                     splits["val"]["y"], text)
    logits = direct.predict_logits(unit(splits["test"]["x"]))
    assert out["test_top1"] == evaluation.topk_accuracy(logits, splits["test"]["y"], 1)
    assert out["alpha"] == direct.alpha and out["beta"] == direct.beta


def test_unknown_head_and_missing_knowledge_are_errors():
    splits, text, _ = aligned_problem()
    with pytest.raises(ValueError, match=r"unknown head\(s\) \['svm'\]"):
        heads.run(("svm",), splits, text, None)
    with pytest.raises(ValueError, match="need CODER knowledge"):
        heads.run(("coder",), splits, text, None)
    del splits["val"]["caption_x"]
    with pytest.raises(ValueError, match=r"hybrid head needs each split's caption embeddings"):
        heads.run(("hybrid",), splits, text, None)
