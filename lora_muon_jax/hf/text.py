"""Text to token ids for a checkpoint, and training windows of them.

The checkpoint's own tokenizer (``tokenizer.json``, via the ``tokenizers``
package) when its directory has one; otherwise UTF-8 bytes (token id = byte
value), which needs a vocabulary of at least 256 entries.
"""

from __future__ import annotations

import pathlib
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte value (0…255)."""

    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read by the ``tokenizers`` package."""

    def __init__(self, file: pathlib.Path):
        try:
            import tokenizers
        except ImportError as err:  # pragma: no cover - the hf extra installs it
            raise ImportError(f"{file}: reading it needs `pip install tokenizers`") from err
        self._tok = tokenizers.Tokenizer.from_file(str(file))
        self.name = str(file)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(model_dir: str | pathlib.Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer, or bytes when it has none (then ``vocab_size >= 256``)."""
    file = pathlib.Path(model_dir) / "tokenizer.json"
    if file.is_file():
        return HFTokenizer(file)
    if vocab_size < 256:
        raise ValueError(
            f"{model_dir}: no tokenizer.json, and byte-level text needs a vocabulary of at "
            f"least 256 entries; this model has vocab_size={vocab_size}"
        )
    return ByteTokenizer()


def split_ids(ids: np.ndarray, held_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Train ids and the last ``held_out`` fraction as held-out ids."""
    if not 0 < held_out < 1:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    cut = int(len(ids) * (1 - held_out))
    return ids[:cut], ids[cut:]


def windows(ids: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``batch`` random windows of ``length + 1`` consecutive ids: (batch, length + 1)."""
    if len(ids) <= length + 1:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one window of {length + 1}: give more "
            "text or a smaller --seq-len"
        )
    starts = rng.integers(0, len(ids) - length - 1, size=batch)
    return np.stack([ids[s : s + length + 1] for s in starts])


def eval_windows(ids: np.ndarray, length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced, fixed windows (the same every evaluation)."""
    count = max(1, min(count, (len(ids) - 1) // (length + 1)))
    starts = np.linspace(0, len(ids) - length - 2, count).astype(int)
    return np.stack([ids[s : s + length + 1] for s in starts])
