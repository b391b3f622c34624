"""CLIP text tokenizer producing OpenAI CLIP's token ids.

``load()`` returns a :class:`CLIPTextTokenizer`; calling it on a string or a
list of strings gives an ``int32`` array of shape ``[N, context_length]``::

    tok = load()                       # bundled OpenAI CLIP vocabulary (or an HF directory / hub id)
    ids = tok(["a photo of a bird"])   # [1, 77]
    ids = trim_padding(ids)            # drop padding columns no row needs (exact for CLIP's text tower)

Each row is ``<start>``, the BPE tokens, ``<end>``, then padding with 0. Texts
longer than the context are truncated and the end token is kept as the last
token, as in OpenAI's ``clip.tokenize(..., truncate=True)``. Cleaning and word
splitting follow OpenAI's ``clip/simple_tokenizer.py`` exactly (in Python); only
the BPE runs in ``transformers.CLIPTokenizer``'s Rust backend. Why HF's own
normalizer is not used: docs/methods/clip.md.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
from tokenizers import Tokenizer, pre_tokenizers

__all__ = ["CLIPTextTokenizer", "DEFAULT_CONTEXT_LENGTH", "clean_text", "load", "split_words"]

DEFAULT_CONTEXT_LENGTH = 77
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
REQUIRED_FILES = ("vocab.json", "merges.txt")

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
PAD_ID = 0

# OpenAI's word pattern; the text is already lower-cased, but IGNORECASE still
# matters for characters such as the long s ("'ſ" matches "'s").
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# A Hugging Face hub repository id: "namespace/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def clean_text(text: str) -> str:
    """Normalizes ``text`` exactly as OpenAI CLIP does before BPE.

    ``ftfy.fix_text``, HTML unescaping twice, whitespace runs collapsed to one
    space, stripping, then lower-casing.
    """
    # Printable ASCII without "&" is returned unchanged by ftfy; skip it there.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def split_words(text: str) -> list[str]:
    """Cleans ``text`` and splits it into the words that BPE is applied to."""
    return _WORD_PATTERN.findall(clean_text(text))


class CLIPTextTokenizer:
    """Callable CLIP tokenizer: ``tok(texts) -> np.ndarray[int32, (N, context_length)]``.

    Args:
      hf_tokenizer: a loaded ``transformers.CLIPTokenizer``; its vocabulary and
        merges are used for BPE.
      context_length: default number of tokens per row.
    """

    def __init__(self, hf_tokenizer, context_length: int = DEFAULT_CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.hf_tokenizer = hf_tokenizer
        self._context_length = int(context_length)
        self._start_id = hf_tokenizer.convert_tokens_to_ids(START_TOKEN)
        self._end_id = hf_tokenizer.convert_tokens_to_ids(END_TOKEN)
        # A private copy of the Rust tokenizer that takes words already split in
        # Python and joined by single spaces (words never contain whitespace),
        # splits at the spaces, byte-encodes each word and applies BPE to it.
        backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(" ", behavior="removed"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.post_processor = None
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (49408 for OpenAI CLIP)."""
        return len(self.hf_tokenizer)

    @property
    def start_id(self) -> int:
        """Id of the start token ``<|startoftext|>``."""
        return self._start_id

    @property
    def end_id(self) -> int:
        """Id of the end token ``<|endoftext|>``."""
        return self._end_id

    @property
    def pad_id(self) -> int:
        """Id used for padding (0, as in OpenAI CLIP)."""
        return PAD_ID

    @property
    def context_length(self) -> int:
        """Default number of tokens per row."""
        return self._context_length

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """BPE ids of each text, without start/end tokens, truncation or padding."""
        joined = [" ".join(split_words(t)) for t in texts]
        encodings = self._backend.encode_batch_fast(joined, add_special_tokens=False)
        return [enc.ids for enc in encodings]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """Tokenizes ``texts`` into an ``int32`` array ``[N, context_length]``.

        A single string gives one row. Each row is start token, BPE tokens, end
        token, padded with ``pad_id``; a text too long for the context keeps its
        first ``context_length - 2`` BPE tokens and ends with the end token.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self._context_length if context_length is None else int(context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2, got {length}")
        out = np.full((len(texts), length), PAD_ID, dtype=np.int32)
        out[:, 0] = self._start_id
        for row, ids in zip(out, self.encode(texts)):
            ids = ids[: length - 2]
            row[1 : len(ids) + 1] = ids
            row[len(ids) + 1] = self._end_id
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, "
            f"context_length={self.context_length}, source={self.hf_tokenizer.name_or_path!r})"
        )


def _resolve(name_or_path: str | os.PathLike | None) -> str:
    """Maps ``name_or_path`` to a directory with vocab files or a hub repository id."""
    # "openai" and OpenAI's model names ("ViT-B/32", ...) all use the bundled CLIP vocabulary.
    if name_or_path is None or str(name_or_path) == "openai" or str(name_or_path).startswith("ViT-"):
        return str(BUNDLED_DIR)
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"tokenizer directory {str(path)!r} lacks {', '.join(missing)} "
                f"(it needs {' and '.join(REQUIRED_FILES)})"
            )
        return str(path)
    if path.exists():
        raise ValueError(
            f"{str(name_or_path)!r} is a file; pass a directory containing "
            f"{' and '.join(REQUIRED_FILES)}, a hub repository id, or None"
        )
    if not _HUB_ID.match(str(name_or_path)):
        raise FileNotFoundError(
            f"tokenizer directory {str(name_or_path)!r} does not exist (and is not a "
            f"hub repository id like 'openai/clip-vit-base-patch32')"
        )
    return str(name_or_path)


def load(
    name_or_path: str | os.PathLike | None = None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> CLIPTextTokenizer:
    """Loads a CLIP tokenizer.

    Args:
      name_or_path: ``None`` or ``"openai"`` for the bundled OpenAI CLIP
        vocabulary; a local directory containing ``vocab.json`` and
        ``merges.txt``; or a Hugging Face hub repository id such as
        ``"openai/clip-vit-base-patch32"`` (needs network access or a cached
        copy).
      context_length: default number of tokens per row.

    Raises:
      FileNotFoundError: a local directory lacks the vocabulary files, or a
        path that is not a hub repository id does not exist.
      ValueError: ``name_or_path`` is a file.
    """
    from transformers import CLIPTokenizer

    source = _resolve(name_or_path)
    return CLIPTextTokenizer(CLIPTokenizer.from_pretrained(source), context_length)


def trim_padding(ids: np.ndarray, multiple: int = 8, pad_id: int = PAD_ID) -> np.ndarray:
    """Drops the padding columns that no row needs, keeping a multiple of ``multiple`` columns.

    Exact for CLIP's causal text tower: a position never attends to later ones, so the columns
    after every row's end token do not change the pooled embedding. Rounding the width up to a
    multiple bounds the number of distinct shapes a jitted function is compiled for.
    """
    ids = np.asarray(ids)
    used = np.flatnonzero((ids != pad_id).any(axis=0))
    width = int(used[-1]) + 1 if used.size else 1
    width = min(ids.shape[1], -(-width // multiple) * multiple)
    return ids[:, :width]
