"""GPT-2's and RoBERTa's byte-level BPE tokenizers against transformers' GPT2Tokenizer and RobertaTokenizer,
on a small BPE trained here (no vocabulary file ships), and the errors of incomplete directories."""

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from jaxgist.models import bpe_tokenizer  # noqa: E402

CORPUS = [
    "a man riding a horse on a beach.", "two dogs playing with a frisbee in the park.",
    "a plate of food with broccoli and rice.", "a red bus driving down a city street.",
    "people standing around a table with laptops.", "a cat sleeping on top of a wooden bench.",
    "the bird is small, with a yellow crown and black wings!", "don't they'll we've it's café naïve",
    "a group of zebras grazing in a field. numbers 123 4567 89", "an airplane flying over snowy mountains?",
] * 5
TEXTS = [
    "a man riding a horse.", " two  dogs playing!", "A Cafe naïve bird, with 1234 wings?", "don't stop",
    "an unseen wordxyz qq", "tabs\tand\nnewlines", "emoji 🐦 and ünïcödé", "", "<mask> is special",
    "the bird . is small ,", "<|endoftext|> in text",
]
SPECIAL = {"gpt2": ["<|endoftext|>"], "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}
HF = {"gpt2": "GPT2Tokenizer", "roberta": "RobertaTokenizer"}


@pytest.fixture(scope="module", params=["gpt2", "roberta"])
def trained(request, tmp_path_factory):
    """(kind, a directory with vocab.json and merges.txt of a BPE trained on CORPUS)."""
    kind = request.param
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=SPECIAL[kind],
                            show_progress=False)
    directory = tmp_path_factory.mktemp(kind)
    bpe.save_model(str(directory))
    return kind, directory


def test_encode_decode_match_transformers(trained):
    kind, directory = trained
    ours = bpe_tokenizer.load(directory, kind=kind)
    ref = getattr(transformers, HF[kind]).from_pretrained(directory)
    assert ours.vocab_size == len(ref)
    ids = ours.encode(TEXTS)
    assert ids == [ref.encode(t) for t in TEXTS]
    if kind == "roberta":
        assert all(seq[0] == ours.bos_id == 0 and seq[-1] == ours.eos_id == 2 for seq in ids) and ours.pad_id == 1
        assert ours.encode(TEXTS[8])[1] == ref.mask_token_id  # "<mask>" is the special token
    else:
        assert ids[0] == ref.encode(TEXTS[0]) and ours.pad_id is None
    assert ours.encode(TEXTS, add_special_tokens=False) == [ref.encode(t, add_special_tokens=False) for t in TEXTS]
    assert ours.stop_id == ref.convert_tokens_to_ids(".")
    # decoding as transformers 4 did (what the reference's captions went through): decode, then clean up
    # the spaces before punctuation; transformers 5 skips that step for BPE tokenizers
    assert ours.decode(ids) == [ref.clean_up_tokenization(ref.decode(seq, skip_special_tokens=True)) for seq in ids]
    assert ours.decode(np.asarray(ids[0])) == ref.clean_up_tokenization(ref.decode(ids[0], skip_special_tokens=True))
    plain = bpe_tokenizer.load(directory, kind=kind, clean_up_spaces=False)
    assert plain.decode(ids) == [ref.decode(seq, skip_special_tokens=True) for seq in ids]
    assert plain.decode(ids[2], skip_special_tokens=False) == ref.decode(ids[2], skip_special_tokens=False)


def test_padding_truncation_and_tokenizer_json(trained, tmp_path):
    kind, directory = trained
    ours = bpe_tokenizer.load(directory, kind=kind)
    texts = ["a man riding a horse on a beach with two dogs playing in the park.", "a cat."]
    ids, mask = ours.pad(texts, max_length=8)
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, 8)
    full = ours.encode(texts)
    n = len(full[1])
    assert mask[0].all() and mask[1].tolist() == [1] * n + [0] * (8 - n)
    pad = 1 if kind == "roberta" else 0
    assert ids[1].tolist() == full[1] + [pad] * (8 - n)
    if kind == "roberta":  # cut: the first 6 ids, then "." and </s>, as the reference's discriminator input
        assert ids[0].tolist() == full[0][:6] + [ours.stop_id, ours.eos_id]
    else:
        assert ids[0].tolist() == full[0][:8]
    # a directory with tokenizer.json only (and the kind in tokenizer_config.json), GPT-2: the same ids
    if kind == "gpt2":
        bpe = tokenizers.ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
        bpe.add_special_tokens(SPECIAL[kind])
        bpe.save(str(tmp_path / "tokenizer.json"))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
        again = bpe_tokenizer.load(tmp_path)
        assert again.kind == "gpt2" and again.encode(TEXTS) == ours.encode(TEXTS)


def test_kind_and_clean_up_from_tokenizer_config(trained, tmp_path):
    kind, directory = trained
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": HF[kind], "clean_up_tokenization_spaces": False}))
    ours = bpe_tokenizer.load(tmp_path)
    assert ours.kind == kind and not ours.clean_up_spaces
    ids = ours.encode(TEXTS[9])
    assert ours.decode(ids) == "the bird . is small ,"
    assert bpe_tokenizer.load(directory, kind=kind).decode(ids) == "the bird. is small,"


def test_missing_files_and_names_are_clear_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="missing vocab.json and merges.txt"):
        bpe_tokenizer.load(empty, kind="gpt2")
    (empty / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1}))
    with pytest.raises(FileNotFoundError, match=r"empty: not a gpt2 tokenizer directory: missing merges.txt"):
        bpe_tokenizer.load(empty, kind="gpt2")
    with pytest.raises(ValueError, match="pass kind='gpt2' or kind='roberta'"):
        bpe_tokenizer.load(empty)
    (empty / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="no <s>, </s>, <unk>, <pad>, <mask>"):
        bpe_tokenizer.load(empty, kind="roberta")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not-a-user/not-a-tokenizer"):
        bpe_tokenizer.load("not-a-user/not-a-tokenizer")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        bpe_tokenizer.load(tmp_path / "a" / "b")
