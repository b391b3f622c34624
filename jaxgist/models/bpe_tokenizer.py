"""GPT-2's and RoBERTa's byte-level BPE tokenizers (the ``tokenizers`` library), from an HF directory or
hub name. No vocabulary ships with jaxgist: ``load("gpt2")`` / ``load("roberta-base")`` download the
hub's files once; a local directory needs ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json``).

    tok = bpe_tokenizer.load("gpt2")                       # or an HF directory; kind from its config files
    ids = tok.encode(["a dog on a sofa."])                 # lists of ids (RoBERTa: <s> ... </s>)
    texts = tok.decode(tokens)                             # [N, T] ids -> strings, special tokens skipped
    ids, mask = tok.pad(["a dog on a sofa."], max_length=22)   # np.int32 [N, 22] each

Built as transformers' ``GPT2Tokenizer`` / ``RobertaTokenizer`` build theirs from ``vocab.json`` and
``merges.txt``: BPE with the byte-level pre-tokenizer and decoder (no prefix space); RoBERTa adds
``<s>`` and ``</s>`` around each text, GPT-2 adds nothing. A ``tokenizer.json``, when present, is used
as it is (as transformers does). Decoding removes the space before punctuation and contractions
(transformers 4's ``clean_up_tokenization_spaces``, on unless ``tokenizer_config.json`` turns it off:
what CgT-GAN's captions went through; transformers 5 no longer does it for BPE tokenizers), unless
``clean_up_spaces=False``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

KINDS = ("gpt2", "roberta")
# special tokens of each kind (transformers' defaults), by role
SPECIAL = {
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
    "roberta": {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>", "mask": "<mask>"},
}
_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "config.json")


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class BPETokenizer:
    """A GPT-2 or RoBERTa byte-level BPE tokenizer (``kind``) around a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer, kind: str, *, clean_up_spaces: bool = True, source: str = "tokenizer"):
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}")
        self.tokenizer = tokenizer
        self.kind = kind
        self.clean_up_spaces = clean_up_spaces
        ids = {role: tokenizer.token_to_id(token) for role, token in SPECIAL[kind].items()}
        absent = sorted({SPECIAL[kind][role] for role, i in ids.items() if i is None})
        if absent:
            raise ValueError(f"{source}: the vocabulary has no {', '.join(absent)} ({kind}'s special tokens)")
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        self.pad_id = ids.get("pad")  # GPT-2 has none
        stop = tokenizer.encode(".", add_special_tokens=False).ids
        self.stop_id = stop[0] if len(stop) == 1 else None  # "." (GPT-2: 13; RoBERTa: 4)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: str | Sequence[str], *, add_special_tokens: bool = True):
        """Token ids of one text (a list) or of several (a list of lists)."""
        if isinstance(texts, str):
            return self.tokenizer.encode(texts, add_special_tokens=add_special_tokens).ids
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids, *, skip_special_tokens: bool = True):
        """Text of one sequence of ids (a string) or of several ([N, T] array or lists: a list of strings),
        special tokens (GPT-2's <|endoftext|> padding, RoBERTa's <s>, </s>, <pad>) skipped."""
        if hasattr(ids, "shape"):  # an array: [T] or [N, T]
            one = np.ndim(ids) == 1
            rows = np.asarray(ids).reshape(-1, np.shape(ids)[-1]).tolist()
        else:  # a list of ids, or of lists of ids (ragged)
            ids = list(ids)
            one = not ids or np.ndim(ids[0]) == 0
            rows = [[int(i) for i in row] for row in ([ids] if one else ids)]
        texts = self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            texts = [clean_up_tokenization(t) for t in texts]
        return texts[0] if one else texts

    def pad(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), np.int32 [N, max_length]: each text's ids (with the special tokens), padded with
        the pad id (RoBERTa's <pad>; GPT-2, which has none: 0) and masked (1 for tokens). A longer text is
        cut to ``max_length`` tokens; RoBERTa's then ends with "." and </s> (the end token kept last, as
        CgT-GAN's discriminator input does)."""
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2")
        pad = self.pad_id if self.pad_id is not None else 0
        ids = np.full((len(texts), max_length), pad, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, seq in enumerate(self.encode(list(texts))):
            if len(seq) > max_length:
                if self.kind == "roberta":
                    seq = seq[:max_length - 2] + [self.stop_id if self.stop_id is not None else seq[max_length - 2],
                                                  seq[-1]]
                else:
                    seq = seq[:max_length]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        return ids, mask


def _kind_of(directory: pathlib.Path) -> str | None:
    for name, key in (("tokenizer_config.json", "tokenizer_class"), ("config.json", "model_type")):
        path = directory / name
        if path.is_file():
            try:
                value = str(json.loads(path.read_text()).get(key) or "").lower()
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON ({e})") from e
            if value.startswith(("gpt2", "roberta")):
                return "gpt2" if value.startswith("gpt2") else "roberta"
    return None


def _tokenizer_config(directory: pathlib.Path) -> dict:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e


def from_files(vocab_file, merges_file, kind: str, *, clean_up_spaces: bool = True) -> BPETokenizer:
    """A tokenizer from ``vocab.json`` and ``merges.txt``, built as transformers' GPT2Tokenizer /
    RobertaTokenizer build theirs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    vocab = json.loads(pathlib.Path(vocab_file).read_text(encoding="utf-8"))
    merges = []
    for line in pathlib.Path(merges_file).read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        merges.append(tuple(line.split(" ")))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = list(dict.fromkeys(SPECIAL[kind].values()))
    absent = [t for t in special if t not in vocab]
    if absent:
        raise ValueError(f"{vocab_file}: the vocabulary has no {', '.join(absent)} ({kind}'s special tokens)")
    tokenizer.add_special_tokens([AddedToken(t, lstrip=t == "<mask>", normalized=False, special=True)
                                  for t in special])
    if kind == "roberta":
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]),
                                                                trim_offsets=True, add_prefix_space=False)
    return BPETokenizer(tokenizer, kind, clean_up_spaces=clean_up_spaces, source=str(vocab_file))


def _download(name: str) -> pathlib.Path:
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(name, allow_patterns=list(_FILES)))
    except Exception as e:  # no network, no such repo, an auth wall
        raise FileNotFoundError(f"downloading the tokenizer {name!r} from the HF hub failed: "
                                f"{type(e).__name__}: {e}") from e


def load(name_or_path: str | os.PathLike, kind: str | None = None, *,
         clean_up_spaces: bool | None = None) -> BPETokenizer:
    """A GPT-2 or RoBERTa tokenizer from an HF directory (``tokenizer.json``, or ``vocab.json`` and
    ``merges.txt``) or an HF hub name ("gpt2", "roberta-base": downloaded once). ``kind`` ("gpt2" or
    "roberta"): read from the directory's ``tokenizer_config.json`` / ``config.json`` when not given.
    ``clean_up_spaces``: None: ``tokenizer_config.json``'s ``clean_up_tokenization_spaces``, else on.
    FileNotFoundError names the files a directory lacks."""
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        directory = path
    elif path.exists():
        raise FileNotFoundError(f"{path}: a file; a tokenizer is a directory (vocab.json and merges.txt, or "
                                "tokenizer.json)")
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name_or_path)) and not str(name_or_path).startswith((".", "~")):
        directory = _download(str(name_or_path))
    else:
        raise FileNotFoundError(f"{name_or_path}: no such directory, and not an HF hub name")
    kind = kind or _kind_of(directory)
    if kind is None:
        raise ValueError(f"{directory}: neither tokenizer_config.json nor config.json says GPT-2 or RoBERTa; pass "
                         "kind='gpt2' or kind='roberta'")
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    clean = clean_up_spaces
    if clean is None:
        clean = bool(_tokenizer_config(directory).get("clean_up_tokenization_spaces", True))
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_file(str(directory / "tokenizer.json")), kind, clean_up_spaces=clean,
                            source=str(directory / "tokenizer.json"))
    absent = [f for f in ("vocab.json", "merges.txt") if not (directory / f).is_file()]
    if absent:
        raise FileNotFoundError(f"{directory}: not a {kind} tokenizer directory: missing {' and '.join(absent)} "
                                "(or a tokenizer.json)")
    return from_files(directory / "vocab.json", directory / "merges.txt", kind, clean_up_spaces=clean)


def train(texts: Sequence[str], directory: str | os.PathLike, kind: str, *, vocab_size: int = 1000) -> BPETokenizer:
    """Trains a small byte-level BPE of ``kind`` on ``texts`` and saves it as an HF directory
    (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``): a stand-in vocabulary for offline demos
    and tests, where GPT-2's and RoBERTa's own cannot be downloaded. Returns it loaded."""
    from tokenizers import ByteLevelBPETokenizer

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no texts to train a tokenizer on")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    # RoBERTa's special ids as in its vocabulary: <s> 0, <pad> 1, </s> 2, <unk> 3
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if kind == "roberta" else ["<|endoftext|>"]
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=special,
                            show_progress=False)
    bpe.save_model(str(directory))
    config = {"tokenizer_class": "GPT2Tokenizer" if kind == "gpt2" else "RobertaTokenizer",
              "clean_up_tokenization_spaces": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return load(directory, kind)
