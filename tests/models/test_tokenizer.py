"""Tests for jaxgist.models.clip.tokenizer (OpenAI CLIP token ids)."""

import json
import shutil

import numpy as np
import pytest

from jaxgist.models.clip import tokenizer

START, END, PAD = 49406, 49407, 0


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load()


@pytest.fixture(scope="module")
def reference(shared_data):
    path = shared_data / "clip_tokenizer" / "reference_ids.json"
    if not path.is_file():
        pytest.skip(f"reference ids not found at {path}")
    return json.loads(path.read_text())


def test_reference_ids_identical(tok, reference):
    cases = reference["cases"]
    texts = [c["text"] for c in cases]
    expected = np.array([c["ids"] for c in cases], dtype=np.int32)
    got = tok(texts, context_length=reference["context_length"])
    assert got.shape == expected.shape
    bad = np.nonzero((got != expected).any(axis=1))[0]
    examples = "\n".join(
        f"  {texts[i]!r}\n"
        f"    expected {np.trim_zeros(expected[i], 'b').tolist()}\n"
        f"    got      {np.trim_zeros(got[i], 'b').tolist()}"
        for i in bad[:5]
    )
    assert len(bad) == 0, f"{len(bad)} of {len(cases)} reference cases differ, e.g.:\n{examples}"


def test_reference_special_ids(tok, reference):
    assert tok.context_length == reference["context_length"]
    assert tok.start_id == reference["start_id"]
    assert tok.end_id == reference["end_id"]
    assert tok.pad_id == reference["pad_id"]


def test_bundled_default_loads(tok):
    assert tok.vocab_size == 49408
    assert (tok.start_id, tok.end_id, tok.pad_id, tok.context_length) == (START, END, PAD, 77)
    row = tok("a photo of a bird")[0]
    assert row[:7].tolist() == [START, 320, 1125, 539, 320, 3329, END]
    openai = tokenizer.load("openai")
    np.testing.assert_array_equal(openai("a photo of a bird"), tok("a photo of a bird"))
    by_model_name = tokenizer.load("ViT-L/14@336px")
    np.testing.assert_array_equal(by_model_name("a photo of a bird"), tok("a photo of a bird"))


def test_shape_and_dtype(tok):
    ids = tok(["a bird", "two birds on a branch", ""])
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    single = tok("a bird")
    assert single.shape == (1, 77) and single.dtype == np.int32
    np.testing.assert_array_equal(single[0], ids[0])
    assert tok([]).shape == (0, 77)
    assert tok(["a bird"], context_length=16).shape == (1, 16)
    assert tokenizer.load(context_length=32)("a bird").shape == (1, 32)
    assert tok([""])[0, :3].tolist() == [START, END, PAD]


def test_padding_is_zero(tok):
    ids = tok(["a small brown bird", "gull"])
    for row in ids:
        end = int(np.nonzero(row == END)[0][0])
        assert row[0] == START
        assert (row[end + 1 :] == PAD).all()
        assert (row[1:end] != END).all()


def test_truncation_keeps_end_token_last(tok):
    text = "a very long description of a bird with many feathers " * 40
    full = tok(text, context_length=1000)[0]
    n_bpe = int(np.nonzero(full == END)[0][0]) - 1
    assert n_bpe > 75
    for length in (77, 10, 2):
        row = tok(text, context_length=length)[0]
        assert row.shape == (length,)
        assert row[0] == START and row[-1] == END
        assert (row != PAD).all()
        np.testing.assert_array_equal(row[1:-1], full[1 : length - 1])


def test_batch_matches_single(tok):
    texts = ["Café crème brûlée", "tab\tand\nnewline", "x" * 300, "  spaced  out  "]
    batch = tok(texts)
    for text, row in zip(texts, batch):
        np.testing.assert_array_equal(tok(text)[0], row)


# Inputs on which Hugging Face's own CLIP normalizer/pre-tokenizer differs from
# OpenAI's; the expected ids are those of OpenAI's reference tokenizer.
@pytest.mark.parametrize(
    "text, expected",
    [
        ("naïve “quoted” text", [1097, 35689, 563, 257, 27706, 257, 4160]),  # ftfy uncurls quotes
        ("\ufb01ne \uff26\uff35\uff2c\uff2c", [3797, 1476]),  # ligature, full-width
        ("&amp;amp;amp; &lt;b&gt;", [261, 283, 321, 285]),  # HTML entities
        ("a\x1cb", [3937]),  # control character removed by ftfy
        ("x'\u017f", [343, 6, 129, 379]),  # "'ſ" matches "'s" case-insensitively
        ("\u1ffc\u0301", [139, 492]),  # no NFC after lower-casing
        (".<|endoftext|>", [13, 27, 347, 40786, 4160, 91, 285]),  # glued to punctuation
        ("a <|endoftext|> b", [320, END, 321]),  # special token as its own word
        (  # final sigma: Python lower-cases the last "Σ" to "ς"
            "ΟΔΥΣΣΕΥΣ",
            [138, 123, 138, 112, 139, 227, 139, 225, 139, 225, 138, 113, 139, 227, 139, 480],
        ),
    ],
)
def test_openai_text_cleaning(tok, text, expected):
    row = tok(text)[0]
    n = len(expected) + 2
    assert row[:n].tolist() == [START, *expected, END]
    assert (row[n:] == PAD).all()


def test_local_directory_loads(tmp_path, tok):
    for name in tokenizer.REQUIRED_FILES:
        shutil.copy(tokenizer.BUNDLED_DIR / name, tmp_path / name)
    local = tokenizer.load(tmp_path)
    texts = ["a red-winged blackbird", "Café"]
    np.testing.assert_array_equal(local(texts), tok(texts))
    assert tokenizer.load(str(tmp_path)).vocab_size == tok.vocab_size


def test_directory_without_vocab_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        tokenizer.load(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "vocab.json" in msg and "merges.txt" in msg

    shutil.copy(tokenizer.BUNDLED_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"lacks merges\.txt") as err:
        tokenizer.load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_bad_paths(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer.load("./not-here")
    a_file = tmp_path / "vocab.json"
    a_file.write_text("{}")
    with pytest.raises(ValueError, match="is a file"):
        tokenizer.load(a_file)


def test_invalid_context_length(tok):
    with pytest.raises(ValueError):
        tok("a bird", context_length=1)


def test_trim_padding_keeps_every_token():
    ids = np.zeros((3, 77), np.int32)
    ids[0, :5] = [START, 1, 2, 3, END]
    ids[1, :11] = [START] + list(range(1, 10)) + [END]
    trimmed = tokenizer.trim_padding(ids, multiple=8)
    assert trimmed.shape == (3, 16)
    np.testing.assert_array_equal(trimmed, ids[:, :16])
    assert tokenizer.trim_padding(ids, multiple=100).shape == (3, 77)  # never wider than the input
    assert tokenizer.trim_padding(np.zeros((2, 77), np.int32)).shape == (2, 8)
