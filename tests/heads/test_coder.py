"""CODER: knowledge files, the representation and its zero-shot scores against direct numpy loops,
re-ranking (only under the threshold, no labels), generators on the synthetic birds, encoding."""

import inspect
import json
import re

import numpy as np
import pytest

from jaxgist.heads import coder
from jaxgist.heads.coder import ANALOGOUS, ATTRIBUTE, NAME, SYNONYM, KnowledgeError, TextSegments


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------
# Direct numpy implementations (loops per class and per image), float64.
# ---------------------------------------------------------------------------------------------------


def _np_cos(x, t):
    return _unit(np.asarray(x, np.float64)) @ _unit(np.asarray(t, np.float64)).T


def _np_zero_shot(x, t, class_ids, kinds, num_classes):
    cos = _np_cos(x, t)
    out = np.zeros((len(x), num_classes))
    for c in range(num_classes):
        names = np.flatnonzero((class_ids == c) & (kinds <= SYNONYM))
        others = np.flatnonzero((class_ids == c) & (kinds > SYNONYM))
        for b in range(len(x)):
            elements = list(cos[b, others]) + [cos[b, names].max()]
            out[b, c] = 100 * np.mean(elements)
    return out


def _np_rerank(x, logits, pair_emb, src, dst, threshold, top_k=5):
    """CODER*'s loop: per image under the threshold, per top class, mean over the other top classes of
    (mean cos to "c vs c'" texts - mean cos to "c' vs c" texts), 0 when a direction has no texts."""
    x = _unit(np.asarray(x, np.float64))
    pair_emb = _unit(np.asarray(pair_emb, np.float64))
    logits = np.asarray(logits, np.float64)
    preds, selected, all_scores = [], [], []
    for b in range(len(x)):
        p = np.exp(logits[b] - logits[b].max())
        p /= p.sum()
        top = list(np.argsort(-logits[b], kind="stable")[:top_k])
        gap = p[top[0]] - p[top[1]]
        scores = []
        for c in top:
            terms = []
            for o in top:
                if o == c:
                    continue
                mine = np.flatnonzero((src == c) & (dst == o))
                theirs = np.flatnonzero((src == o) & (dst == c))
                if len(mine) and len(theirs):
                    terms.append(np.mean(pair_emb[mine] @ x[b]) - np.mean(pair_emb[theirs] @ x[b]))
                else:
                    terms.append(0.0)
            scores.append(sum(terms) / len(terms))
        all_scores.append(scores)
        ranked = sorted(zip(scores, top), key=lambda s: s[0], reverse=True)  # stable: ties keep rank order
        selected.append(gap < threshold)
        preds.append(ranked[0][1] if gap < threshold else top[0])
    return np.asarray(preds), np.asarray(selected), np.asarray(all_scores)


def _random_problem(seed=0, num_classes=7, dim=24, n=40):
    """Random ragged knowledge embeddings: class c has 1 name, c % 3 synonyms, (2c) % 5 attributes and
    c % 2 analogous texts (class 0: its name only); pair texts for a random subset of ordered pairs,
    1 to 3 each."""
    rng = np.random.default_rng(seed)
    ids, kinds = [], []
    for c in range(num_classes):
        for kind, count in ((NAME, 1), (SYNONYM, c % 3), (ATTRIBUTE, (2 * c) % 5), (ANALOGOUS, c % 2)):
            ids += [c] * count
            kinds += [kind] * count
    seg = TextSegments(np.asarray(ids), np.asarray(kinds), num_classes)
    t = rng.normal(size=(len(ids), dim)).astype(np.float32)
    x = rng.normal(size=(n, dim)).astype(np.float32) * 3.0  # not unit: normalized inside
    src, dst = [], []
    for i in range(num_classes):
        for j in range(num_classes):
            if i != j and rng.random() < 0.7:
                k = int(rng.integers(1, 4))
                src += [i] * k
                dst += [j] * k
    pair_emb = rng.normal(size=(len(src), dim)).astype(np.float32)
    return x, t, seg, pair_emb, np.asarray(src), np.asarray(dst)


# ---------------------------------------------------------------------------------------------------
# Formulas against numpy.
# ---------------------------------------------------------------------------------------------------


def test_represent_and_features_match_numpy():
    x, t, seg, *_ = _random_problem()
    cos = coder.represent(x, t)
    np.testing.assert_allclose(cos, _np_cos(x, t), atol=1e-5)
    feats = coder.coder_features(x, t, seg)
    np.testing.assert_allclose(feats, _unit(_np_cos(x, t)), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_zero_shot_matches_numpy(monkeypatch):
    x, t, seg, *_ = _random_problem()
    ref = _np_zero_shot(x, t, seg.class_ids, seg.kinds, seg.num_classes)
    logits = coder.zero_shot_logits(x, t, seg)
    assert logits.shape == (len(x), seg.num_classes) and logits.dtype == np.float32
    np.testing.assert_allclose(logits / 100, ref / 100, atol=1e-5)
    np.testing.assert_allclose(coder.class_scores(coder.represent(x, t), seg) / 100, ref / 100, atol=1e-5)
    # Class 0 has only its name: its score is 100 * that cosine.
    np.testing.assert_allclose(logits[:, 0] / 100, _np_cos(x, t)[:, 0], atol=1e-5)
    # Chunked (padded last chunk) gives the same numbers.
    monkeypatch.setattr(coder.scores, "_CHUNK", 16)
    np.testing.assert_allclose(coder.zero_shot_logits(x, t, seg), logits, atol=1e-4)


def test_rerank_matches_numpy(monkeypatch):
    x, t, seg, pair_emb, src, dst = _random_problem(seed=1)
    logits = coder.zero_shot_logits(x, t, seg)
    table = coder.pair_table(pair_emb, src, dst, seg.num_classes)
    for threshold in (0.0, 0.3, 2.0):
        out = coder.rerank(x, logits, table, threshold=threshold)
        preds, selected, scores = _np_rerank(x, logits, pair_emb, src, dst, threshold)
        np.testing.assert_array_equal(out.reranked, selected)
        np.testing.assert_array_equal(out.predictions, preds)
        np.testing.assert_allclose(out.scores, scores, atol=1e-5)
        np.testing.assert_array_equal(out.candidates, np.argsort(-logits, axis=1, kind="stable")[:, :5])
        # The returned logits rank the classes as re-ranked; untouched rows are unchanged.
        np.testing.assert_array_equal(np.argmax(out.logits, axis=1), out.predictions)
        np.testing.assert_array_equal(out.logits[~out.reranked], logits[~out.reranked])
        np.testing.assert_array_equal(np.sort(out.logits, axis=1), np.sort(logits, axis=1))
    assert out.reranked.all() and out.changed.any()  # threshold 2: every image is re-scored
    monkeypatch.setattr(coder.scores, "_CHUNK", 16)
    chunked = coder.rerank(x, logits, table, threshold=2.0)
    np.testing.assert_array_equal(chunked.predictions, out.predictions)


def test_rerank_changes_only_images_under_threshold_and_takes_no_labels():
    params = inspect.signature(coder.rerank).parameters
    assert not {"y", "labels", "label", "val_y", "test_y"} & set(params)
    x, t, seg, pair_emb, src, dst = _random_problem(seed=2, n=60)
    logits = coder.zero_shot_logits(x, t, seg)
    table = coder.pair_table(pair_emb, src, dst, seg.num_classes)
    plain = np.argmax(logits, axis=1)
    threshold = float(np.median(coder.rerank(x, logits, table, threshold=0.0).gap))
    out = coder.rerank(x, logits, table, threshold=threshold)
    assert 0 < out.reranked.sum() < len(x)
    np.testing.assert_array_equal(out.reranked, out.gap < threshold)
    np.testing.assert_array_equal(out.predictions[~out.reranked], plain[~out.reranked])
    np.testing.assert_array_equal(out.changed, out.predictions != plain)
    assert not (out.changed & ~out.reranked).any()
    assert np.isin(out.predictions, out.candidates).all()  # a re-ranked top-1 is one of the top 5
    never = coder.rerank(x, logits, table, threshold=0.0)
    np.testing.assert_array_equal(never.predictions, plain)
    assert not never.changed.any()


# ---------------------------------------------------------------------------------------------------
# A constructed problem where texts and images align.
# ---------------------------------------------------------------------------------------------------


def _aligned(seed=0, num_classes=6, dim=64, per_class=12):
    """Class means mu_c; every knowledge text of class c is mu_c plus noise; images of class c are mu_c
    plus noise; a pair text "c differs from c'" points along mu_c - mu_c' (plus noise)."""
    rng = np.random.default_rng(seed)
    mu = _unit(rng.normal(size=(num_classes, dim)))
    names = [f"class {c}" for c in range(num_classes)]
    classes = [{"name": names[c], "synonyms": [f"syn {c}"] * (c % 2),
                "attributes": [f"attr {c} {k}" for k in range(c % 4)],
                "analogous": [names[(c + 1) % num_classes]] * (c % 3 == 0)} for c in range(num_classes)]
    pairs = {f"{i},{j}": [f"{i} is not {j}", f"{i} differs from {j}"]
             for i in range(num_classes) for j in range(num_classes) if i != j}
    knowledge = coder.parse_knowledge({"classes": classes, "pairs": pairs})
    texts = coder.knowledge_texts(knowledge)
    text_emb = _unit(mu[texts.segments.class_ids] + 0.25 * rng.normal(size=(len(texts.texts), dim)))
    pair_emb = _unit(mu[texts.pair_src] - mu[texts.pair_dst] + 0.25 * rng.normal(size=(len(texts.pair_texts), dim)))
    emb = coder.embed_knowledge(texts, text_emb, pair_emb)
    y = np.repeat(np.arange(num_classes), per_class)
    x = mu[y] + 0.08 * rng.normal(size=(len(y), dim))
    return emb, x.astype(np.float32), y, rng


def test_zero_shot_recovers_labels_on_aligned_problem():
    emb, x, y, _ = _aligned()
    logits = emb.zero_shot_logits(x)
    assert np.mean(np.argmax(logits, axis=1) == y) == 1.0
    feats = emb.features(x)
    assert feats.shape == (len(x), len(emb.texts))


def test_rerank_repairs_uncertain_images_on_aligned_problem():
    """Logits that are noise plus a small margin for the label: many top-1s are wrong and the gaps are
    small; the one-to-one texts put the label (when it is in the top 5) first."""
    emb, x, y, rng = _aligned(seed=1, num_classes=8)
    logits = rng.normal(size=(len(y), emb.num_classes)) * 0.5
    logits[np.arange(len(y)), y] += 0.4
    logits = logits.astype(np.float32)
    before = np.mean(np.argmax(logits, axis=1) == y)
    out = emb.rerank(x, logits, threshold=2.0)
    in_top5 = (out.candidates == y[:, None]).any(axis=1)
    np.testing.assert_array_equal(out.predictions[in_top5], y[in_top5])
    assert np.mean(out.predictions == y) > before + 0.1
    # The threshold is chosen on validation: here re-ranking everything wins.
    half = len(y) // 2
    choice = coder.choose_threshold(x[:half], logits[:half], y[:half], emb.pairs)
    assert choice.threshold > 0 and choice.val_accuracy > choice.zero_shot_val_accuracy
    assert choice.val_curve[0] == choice.zero_shot_val_accuracy  # threshold 0: never re-ranks


# ---------------------------------------------------------------------------------------------------
# Knowledge files.
# ---------------------------------------------------------------------------------------------------


def _valid_dict():
    return {"classes": [{"name": "Common Finch", "synonyms": ["finch"], "attributes": ["a red crest"],
                         "analogous": ["Red Finch"]},
                        {"name": "Red Finch"},
                        {"name": "Blue Jay", "attributes": ["blue wings", "a black beak"]}],
            "pairs": {"0,1": ["a Common Finch has no red body"], "1,0": ["a Red Finch is red", "red body"]}}


def test_knowledge_round_trip_and_texts(tmp_path):
    knowledge = coder.parse_knowledge(_valid_dict())
    path = coder.write_knowledge(tmp_path / "sub" / "k.json", knowledge)
    again = coder.load_knowledge(path, class_names=["Common Finch", "Red Finch", "Blue Jay"])
    assert again == knowledge
    assert json.load(open(path))["pairs"]["1,0"] == ["a Red Finch is red", "red body"]
    texts = coder.knowledge_texts(knowledge)
    assert texts.texts == ("a photo of a Common Finch.", "a photo of a finch.",
                           "a photo of a Common Finch, which has a red crest.",
                           "a photo of a Common Finch, similar to a Red Finch.", "a photo of a Red Finch.",
                           "a photo of a Blue Jay.", "a photo of a Blue Jay, which has blue wings.",
                           "a photo of a Blue Jay, which has a black beak.")
    np.testing.assert_array_equal(texts.segments.class_ids, [0, 0, 0, 0, 1, 2, 2, 2])
    np.testing.assert_array_equal(texts.segments.kinds, [NAME, SYNONYM, ATTRIBUTE, ANALOGOUS, NAME, NAME,
                                                         ATTRIBUTE, ATTRIBUTE])
    assert texts.pair_texts == ("a Common Finch has no red body", "a Red Finch is red", "red body")
    np.testing.assert_array_equal(texts.pair_src, [0, 1, 1])
    np.testing.assert_array_equal(texts.pair_dst, [1, 0, 0])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["pairs"].update({"0,7": ["x"]}), r"'0,7'.*class 7 does not exist"),
    (lambda d: d["pairs"].update({"Red Finch,0": ["x"]}), r"'Red Finch,0' is not of the form"),
    (lambda d: d["pairs"].update({"2,2": ["x"]}), r"'2,2' pairs class 2 \('Blue Jay'\) with itself"),
    (lambda d: d["pairs"].update({"2,0": []}), r"pairs\['2,0'\].*empty"),
    (lambda d: d["classes"][1].pop("name"), r"classes\[1\] has no 'name'"),
    (lambda d: d["classes"][2].update(name="Red Finch"), r"classes\[2\] \('Red Finch'\) repeats the name"),
    (lambda d: d["classes"][2].update(colour="blue"), r"classes\[2\] \('Blue Jay'\) has unknown key.*colour"),
    (lambda d: d["classes"][0].update(synonyms="finch"), r"classes\[0\] \('Common Finch'\)\.synonyms must be a list"),
    (lambda d: d["classes"][2]["attributes"].append(""), r"classes\[2\] \('Blue Jay'\)\.attributes\[2\]"),
    (lambda d: d.update(templates={"attribute": "a {name} with {colour}"}), r"templates\.attribute.*colour"),
    (lambda d: d.update(templates={"name": "a bird"}), r"templates\.name must contain \{name\}"),
    (lambda d: d.update(extra=1), r"unknown top-level key.*extra"),
    (lambda d: d.pop("classes"), r"no 'classes'"),
])
def test_knowledge_errors_name_the_key(tmp_path, mutate, message):
    data = _valid_dict()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KnowledgeError, match=message) as info:
        coder.load_knowledge(path)
    assert str(path) in str(info.value)


def test_load_checks_the_dataset_classes(tmp_path):
    path = coder.write_knowledge(tmp_path / "k.json", coder.parse_knowledge(_valid_dict()))
    with pytest.raises(KnowledgeError, match=r"class 2: dataset 'Blue Tit' vs file 'Blue Jay'"):
        coder.load_knowledge(path, class_names=["Common Finch", "Red Finch", "Blue Tit"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(KnowledgeError, match="not valid JSON"):
        coder.load_knowledge(tmp_path / "broken.json")


# ---------------------------------------------------------------------------------------------------
# Generators on the synthetic birds.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    from jaxgist.data import synthetic

    return synthetic.write_dataset(tmp_path_factory.mktemp("birds") / "d", num_classes=8, train_per_class=2,
                                   val_per_class=1, test_per_class=1, image_size=32, shots=(1,))


def _articles(text):
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _expected_synthetic_knowledge(attributes_path):
    """The knowledge the GIST job used for the synthetic birds before the dataset wrote its own file
    (``knowledge_from_synthetic(attributes_path)``, pairs within a genus), rebuilt from attributes.json."""
    classes_attrs = json.load(open(attributes_path))["classes"]
    names = list(classes_attrs)
    attrs = [classes_attrs[n] for n in names]
    phrases = []
    for a in attrs:
        b, p = a["body_colour"], a["pattern_colour"]
        body = {"plain": f"a plain {b} body", "striped": f"a {b} body with {p} stripes",
                "spotted": f"a {b} body with {p} spots", "checkered": f"a {b} and {p} checkered body"}[a["pattern"]]
        parts = {"shape": f"a {a['body_shape']} body shape", "body": body, "head": f"a {a['head_colour']} head",
                 "wings": f"{a['wing_colour']} wings", "crest": f"a {a['crest']} crest" if a["crest"] else "no crest",
                 "beak": f"a {a['beak_colour']} beak", "tail": f"a {a['tail']} {a['wing_colour']} tail"}
        phrases.append({k: _articles(v) for k, v in parts.items()})
    part_of = {"crest": "crest", "wing": "wings", "pattern": "body", "beak": "beak", "tail": "tail", "head": "head"}
    genus = [a["genus"] for a in attrs]
    classes = []
    for i, name in enumerate(names):
        dist = [d for d in attrs[i]["distinguishing"] if d in part_of]
        key = (" and ".join(phrases[i][part_of[d]] for d in dist) if dist
               else f"{phrases[i]['body']} and {phrases[i]['wings']}")
        classes.append({"name": name, "synonyms": [_articles(f"{genus[i].lower()} with {key}")],
                        "attributes": list(phrases[i].values()),
                        "analogous": [names[j] for j in range(len(names)) if j != i and genus[j] == genus[i]]})
    pairs = {}
    for i in range(len(names)):
        for j in range(len(names)):
            if i == j or genus[i] != genus[j]:
                continue
            texts = []
            for part, mine in phrases[i].items():
                if mine != phrases[j][part]:
                    texts.append(_articles(f"a {names[i]} has {mine}, while a {names[j]} has {phrases[j][part]}."))
                    texts.append(_articles(f"a {names[i]} differs from a {names[j]} in having {mine}."))
            if texts:
                pairs[f"{i},{j}"] = texts
    templates = {"name": "a photo of a {name}, a type of bird.",
                 "attribute": "a photo of a {name}, a type of bird, which has {attribute}.",
                 "analogous": "a photo of a {name}, a bird similar to the {analogous}."}
    return coder.parse_knowledge({"templates": templates, "classes": classes, "pairs": pairs})


def test_synthetic_dataset_writes_its_knowledge(birds, tmp_path):
    knowledge = coder.load_knowledge(birds.coder_knowledge, class_names=birds.class_names)
    assert knowledge == _expected_synthetic_knowledge(birds.attributes)
    assert json.load(open(birds.coder_knowledge)) == coder.knowledge_to_json(knowledge)
    path = coder.write_knowledge(tmp_path / "birds.json", knowledge)
    assert coder.load_knowledge(path, class_names=birds.class_names) == knowledge
    attrs = json.load(open(birds.attributes))["classes"]
    genus = [attrs[n]["genus"] for n in birds.class_names]
    assert len(set(genus)) == 2  # 4 species per genus
    for i, k in enumerate(knowledge.classes):
        assert k.name == birds.class_names[i] and len(k.attributes) == 7 and len(k.synonyms) == 1
        assert sorted(k.analogous) == sorted(n for n, g in zip(birds.class_names, genus) if g == genus[i]
                                             and n != k.name)
        assert f"a {attrs[k.name]['beak_colour']} beak".replace("a o", "an o") in k.attributes
    same_genus = {(i, j) for i in range(8) for j in range(8) if i != j and genus[i] == genus[j]}
    assert set(knowledge.pairs) == same_genus
    for (i, j), texts in knowledge.pairs.items():
        a, b = knowledge.classes[i], knowledge.classes[j]
        differing = [p for p in a.attributes if p not in b.attributes]
        assert differing and len(texts) == 2 * len(differing)
        assert all(a.name in t and b.name in t for t in texts)
        assert any(differing[0] in t for t in texts)


def test_knowledge_from_class_names(birds, tmp_path):
    knowledge = coder.knowledge_from_class_names(birds.class_names)
    path = coder.write_knowledge(tmp_path / "names.json", knowledge)
    assert coder.load_knowledge(path, class_names=birds.class_names) == knowledge
    assert len(knowledge.pairs) == 8 * 7
    first, second = birds.class_names[:2]
    assert knowledge.pairs[(0, 1)] == (f"a {first} is not a {second}.".replace("a O", "an O"),)
    words = lambda name: set(re.findall(r"[a-z]+", name.lower()))  # noqa: E731
    for k in knowledge.classes:  # analogous classes share a word (the genus, "billed", ...) with the class
        assert k.analogous and all(words(k.name) & words(a) for a in k.analogous)
        genus = k.name.split()[-1]
        assert {a for a in k.analogous if a.endswith(genus)} == {n for n in birds.class_names[:8]
                                                                 if n.endswith(genus) and n != k.name}
        assert k.attributes == coder.DEFAULT_GENERIC_ATTRIBUTES
    with_synonym = coder.knowledge_from_class_names(["Black_footed_Albatross", "Laysan Albatross", "Crow"],
                                                    pairs="analogous")
    assert with_synonym.classes[0].synonyms == ("Black footed Albatross",)
    assert with_synonym.classes[2].analogous == ()
    assert set(with_synonym.pairs) == {(0, 1), (1, 0)}


# ---------------------------------------------------------------------------------------------------
# Encoding with a CLIP model.
# ---------------------------------------------------------------------------------------------------


def test_encode_knowledge_with_tiny_clip():
    from jaxgist.evaluation import embeddings
    from jaxgist.models import clip
    from jaxgist.models.clip import tokenizer

    tiny = dict(vision=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
                text=dict(width=32, layers=1, heads=2, mlp_dim=64), embed_dim=16)
    model = clip.create(tiny, seed=0)
    tok = tokenizer.load()
    knowledge = coder.knowledge_from_class_names(["Red Finch", "Blue Finch", "Crow"])
    emb = coder.encode_knowledge(model, knowledge, tok)
    texts = coder.knowledge_texts(knowledge)
    assert emb.texts == texts.texts and emb.class_names == knowledge.class_names
    direct = embeddings.encode_texts(model, tok(list(texts.texts)))
    np.testing.assert_allclose(emb.text_emb, direct, atol=1e-5)
    np.testing.assert_array_equal(emb.segments.class_ids, texts.segments.class_ids)
    pair = embeddings.encode_texts(model, tok(list(texts.pair_texts)))
    np.testing.assert_allclose(emb.pairs.centroids[emb.pairs.lookup[0, 1]], pair[0], atol=1e-5)
    assert emb.pairs.lookup[0, 0] == -1 and (emb.pairs.lookup[~np.eye(3, dtype=bool)] >= 0).all()
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    assert emb.zero_shot_logits(x).shape == (5, 3)
    assert emb.rerank(x, threshold=2.0).predictions.shape == (5,)


# ---------------------------------------------------------------------------------------------------
# Few-shot: Tip-Adapter on CODER features.
# ---------------------------------------------------------------------------------------------------


def test_coder_tip_adapter_matches_numpy():
    pytest.importorskip("jaxgist.heads.tip_adapter")
    emb, x, y, rng = _aligned(seed=3, num_classes=5, per_class=6)
    text_weights = _unit(rng.normal(size=(5, x.shape[1])) + 0.3 * _unit(emb.text_emb[:5]))  # weak zero-shot
    views = np.stack([x + 0.05 * rng.normal(size=x.shape) for _ in range(2)]).astype(np.float32)
    val = np.arange(len(y)) % 3 == 0
    train_x, train_y, val_x, val_y = views[:, ~val], y[~val], x[val], y[val]
    alphas, betas = (0.5, 2.0, 8.0), (1.0, 5.0)
    model = coder.coder_tip_adapter(train_x, train_y, val_x, val_y, text_weights, emb.text_emb,
                                    alphas=alphas, betas=betas)

    def reference(q, alpha, beta):  # CODER's few-shot formula, in numpy
        keys = _unit(_np_cos(_unit(train_x.astype(np.float64).mean(axis=0)), emb.text_emb))
        f = _unit(_np_cos(q, emb.text_emb))
        cache = np.exp(-beta * (1 - f @ keys.T)) @ np.eye(5)[train_y]
        return 100 * _unit(q.astype(np.float64)) @ text_weights.T + alpha * cache

    np.testing.assert_allclose(model.keys, _unit(_np_cos(_unit(train_x.mean(axis=0)), emb.text_emb)), atol=1e-5)
    acc = np.array([[np.mean(np.argmax(reference(val_x, a, b), axis=1) == val_y) for a in alphas] for b in betas])
    assert model.val_accuracy == acc.max()
    np.testing.assert_allclose(model.grid_search.accuracies, acc)
    test_x = x[~val][:7]
    np.testing.assert_allclose(model.predict_logits(test_x) / 100, reference(test_x, model.alpha, model.beta) / 100,
                               atol=1e-5)
    assert model.summary()["val_top1"] == model.val_accuracy
