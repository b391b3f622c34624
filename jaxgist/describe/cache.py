"""Answers of chat endpoints on disk, so that a rerun (or a run after a kill) asks nothing twice.

    h = cache_key(model, messages, temperature=0.0, max_tokens=512, seed=None)  # sha256 hex
    cache = AnswerCache("workdir/answers.jsonl")   # loads the file (a local path) if it exists
    cache.get(h)                                   # the answer text, or None
    cache.put(h, text, {"key": "class 3 / description 7"})   # appends one line, flushed and fsynced

One JSON object per line: ``{"hash": ..., "text": ..., "meta": {...}}``. Each put is one ``write`` of
a whole line followed by ``fsync``, so a run killed at any moment loses at most the line being
written. On load, a truncated last line (a kill mid-write) is cut off the file and counted in
``truncated`` (with a warning); a malformed line elsewhere is an error naming the file and line.
Only validated answers should be put (the client does so). Thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Sequence

from absl import logging

KEY_VERSION = 1  # bump when the key's content changes, so that old entries are never matched wrongly


def cache_key(model: str, messages: Sequence[dict], *, temperature: float, max_tokens: int,
              seed: int | None) -> str:
    """sha256 (hex) of a canonical JSON of everything that determines a deterministic answer."""
    canonical = json.dumps(
        {"v": KEY_VERSION, "model": model, "messages": list(messages), "temperature": float(temperature),
         "max_tokens": int(max_tokens), "seed": seed},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class AnswerCache:
    """A JSON-lines file of answers keyed by :func:`cache_key` hashes, read once and appended to."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.truncated = 0  # truncated last lines dropped on load (0 or 1)
        self._answers: dict[str, str] = {}
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._load()

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data.split(b"\n")  # the last element is b"" when the file ends with a newline
        good_end = 0  # byte offset just past the last complete, parsable line
        for number, raw in enumerate(lines, start=1):
            last = number == len(lines)
            if last and raw == b"":
                break
            if not last and not raw.strip():  # a blank line: harmless
                good_end += len(raw) + 1
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
                answer_hash, text = entry["hash"], entry["text"]
                if not isinstance(answer_hash, str) or not isinstance(text, str):
                    raise TypeError("hash and text must be strings")
            except (ValueError, KeyError, TypeError) as e:
                if last:  # no newline after it: a kill mid-write
                    self.truncated += 1
                    logging.warning("answer cache %s: ignoring the truncated last line %d (%d bytes; a run killed "
                                    "while writing it)", self.path, number, len(raw))
                    break
                raise ValueError(f"{self.path}:{number}: malformed answer cache line ({e}): {raw[:120]!r}; "
                                 "delete that line (or the file, losing its answers)") from None
            self._answers[answer_hash] = text
            good_end += len(raw) + (0 if last else 1)
        if good_end < len(data) or (data and not data.endswith(b"\n")):
            with open(self.path, "r+b") as f:  # cut a truncated tail, end with a newline: appends stay whole
                f.truncate(good_end)
                if good_end and not data[:good_end].endswith(b"\n"):
                    f.seek(good_end)
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())

    def __len__(self) -> int:
        with self._lock:
            return len(self._answers)

    def __contains__(self, answer_hash: str) -> bool:
        with self._lock:
            return answer_hash in self._answers

    def get(self, answer_hash: str) -> str | None:
        """The stored answer text for ``answer_hash``, or None."""
        with self._lock:
            return self._answers.get(answer_hash)

    def put(self, answer_hash: str, text: str, meta: dict[str, Any] | None = None) -> None:
        """Store one answer: one line appended in a single write, then flushed and fsynced."""
        line = json.dumps({"hash": answer_hash, "text": text, "meta": meta or {}}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._fd is None:
                directory = os.path.dirname(os.path.abspath(self.path))
                os.makedirs(directory, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            data = line.encode("utf-8")
            written = 0
            while written < len(data):  # one write() in practice; a short write is finished, never dropped
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
            self._answers[answer_hash] = text

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "AnswerCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
