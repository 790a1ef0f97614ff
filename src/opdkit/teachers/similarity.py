"""How alike a student's chunk and a teacher's continuation are, in [0, 1]: the vote of the chunk-level method
(``teacher.similarity`` of a ``chat`` teacher).

- ``char``: difflib's ratio ``2 M / (|a| + |b|)`` over the characters;
- ``token_f1``: F1 of the multisets of whitespace-separated words;
- ``embedding``: cosine of two sentence embeddings (the mean of a sentence-embedding model's last hidden states over
  the tokens, as all-MiniLM-L6-v2 pools), a negative cosine counting 0: alike in meaning where the words differ.

Both texts are compared over the same span (``spans``), and an answer that ends is marked with an end symbol on its
side, so stopping early or running on counts.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path

import torch

from ..config import EMBEDDING_PACKAGE, NO_EMBEDDING_MODEL
from ..errors import OPDError

END = "\u2403"  # marks "the answer ends here" in compared texts


def spans(student: str, student_ended: bool, teacher: str, teacher_ended: bool) -> tuple[str, str] | None:
    """The student's chunk against the teacher's text cut to its length, or both cut to the teacher's length when
    the teacher ran out of tokens without ending; None when that leaves nothing to compare (it scores 0)."""
    s = student + (END if student_ended else "")
    t = teacher + (END if teacher_ended else "")
    if teacher_ended:
        return s, t[: len(s)]
    n = min(len(s), len(t))
    return (s[:n], t[:n]) if n else None


def char(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def token_f1(a: str, b: str) -> float:
    ta, tb = a.replace(END, f" {END} ").split(), b.replace(END, f" {END} ").split()
    common = sum(min(ta.count(w), tb.count(w)) for w in set(ta))
    return 0.0 if common == 0 else 2 * common / (len(ta) + len(tb))


def embedding_folder(path: str | None) -> Path:
    """``teacher.embedding_model``, or the folder of the packaged all-MiniLM-L6-v2 when it is None."""
    if path is None:
        try:
            return importlib.import_module(EMBEDDING_PACKAGE).get_model_path()
        except ImportError:
            raise OPDError(NO_EMBEDDING_MODEL) from None
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise OPDError(f"teacher.embedding_model {path!r} is not a model folder (no config.json there): give the "
                       "folder of a sentence-embedding model saved with save_pretrained")
    return folder


class Embedding:
    """Cosine similarity of mean-pooled sentence embeddings, a batch of pairs at a time."""

    def __init__(self, path: str | None):
        from transformers import AutoModel, AutoTokenizer

        folder = embedding_folder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """``[N, d]`` unit vectors."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)

    def __call__(self, pairs: list[tuple[str, str]]) -> list[float]:
        if not pairs:
            return []
        texts = sorted({text for pair in pairs for text in pair})
        vectors = dict(zip(texts, self.embed(texts)))
        return [max(0.0, float(vectors[a] @ vectors[b])) for a, b in pairs]


PAIRWISE = {"char": char, "token_f1": token_f1}


class Similarity:
    """``teacher.similarity`` over many ``(student chunk, it ends, teacher text, it ends)`` at once."""

    def __init__(self, kind: str, embedding_model: str | None = None):
        self.kind = kind
        self.embedding = Embedding(embedding_model) if kind == "embedding" else None

    def _scores(self, pairs: list[tuple[str, str]]) -> list[float]:
        if self.embedding is not None:
            return self.embedding(pairs)
        return [PAIRWISE[self.kind](a, b) for a, b in pairs]

    def __call__(self, compared: list[tuple[str, bool, str, bool]]) -> list[float]:
        both = [spans(*c) for c in compared]
        scores = iter(self._scores([pair for pair in both if pair is not None and (pair[0] or pair[1])]))
        return [0.0 if pair is None else 1.0 if not (pair[0] or pair[1]) else next(scores) for pair in both]
