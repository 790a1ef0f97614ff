"""The teacher's target without its repeats (``objective.repeat_penalty``): at each completion position, every token
that would repeat an n-gram already in the completion has its teacher logit lowered by ``penalty`` before the
softmax, so the student is pulled toward ``softmax(z_T - penalty * repeats)`` instead of ``softmax(z_T)``.

Why: inside a student's loop a small teacher continues the loop itself (``bench/loop_onset.py``: its next token gets
0.85-0.90), so a per-token signal from it endorses the loop. A penalty on the n-grams the completion has written is
what a decoding-time ``no_repeat_ngram_size`` does to a sampler, moved onto the distribution the student learns.
Only the completion counts (an answer may quote its prompt), and the n-gram is the one ``evaluate.loops`` counts.

Pure tensor functions: ``repeat_targets`` finds the (position, token) pairs once per batch, ``as_rows`` numbers them
as the rows of the positions a loss keeps, ``penalize`` lowers them in a block of logits.
"""

from __future__ import annotations

import torch


def repeat_targets(ids_BC: torch.Tensor, mask_BC: torch.Tensor, ngram_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [K], tokens [K])``: flat indices into ``[B * C]`` and the tokens that, written at that position,
    would complete an n-gram of ``ngram_size`` tokens that the completion already holds before it. Position ``t``
    is scored after ``y_<t``: token ``v`` repeats when ``y[t-n+1:t] + [v]`` equals ``y[j:j+n]`` for some
    ``j + n <= t``. Each pair once; masked (padding) positions give none."""
    B, C = ids_BC.shape
    n = ngram_size
    empty = torch.zeros(0, dtype=torch.long, device=ids_BC.device)
    if C < n:
        return empty, empty
    # grams[b, i] = y[i : i + n - 1], the n-1 tokens that make a context; valid where all are completion tokens
    grams = ids_BC.unfold(1, n - 1, 1)  # [B, C - n + 2, n - 1]
    real = mask_BC.bool().unfold(1, n - 1, 1).all(-1)
    # position t (t >= n - 1) has context grams[:, t - n + 1]; an earlier n-gram j has context grams[:, j] and next
    # token y[j + n - 1], written before t when j + n - 1 < t
    context = grams[:, : C - n + 1]  # [B, T] contexts of positions t = n-1 .. C-1
    earlier = grams[:, : C - n + 1]  # [B, J] contexts of n-grams j = 0 .. C-n, next token y[j + n - 1]
    same = (context.unsqueeze(2) == earlier.unsqueeze(1)).all(-1)  # [B, T, J]
    t = torch.arange(n - 1, C, device=ids_BC.device)
    j = torch.arange(0, C - n + 1, device=ids_BC.device)
    before = (j.unsqueeze(0) + n - 1) < t.unsqueeze(1)  # [T, J]
    here = mask_BC.bool()[:, n - 1 :]  # [B, T]: position t is a completion token (for j: y[j + n - 1] is)
    contexts = real[:, : C - n + 1]
    hits = (same & before & contexts.unsqueeze(2) & here.unsqueeze(2)  # position t, and its context
            & contexts.unsqueeze(1) & here.unsqueeze(1))  # the earlier n-gram, all of it
    b, ti, ji = hits.nonzero(as_tuple=True)
    positions = b * C + t[ti]
    tokens = ids_BC[b, ji + n - 1]
    if positions.numel() == 0:
        return empty, empty
    V = int(ids_BC.max()) + 1
    pairs = torch.unique(positions * V + tokens)
    return pairs // V, pairs % V


def as_rows(positions: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs at ``keep`` positions (``[B, C]`` bool), their flat positions turned into rows of ``x[keep]``."""
    kept = keep.reshape(-1)
    row_of = torch.full((kept.numel(),), -1, dtype=torch.long, device=keep.device)
    row_of[kept] = torch.arange(int(kept.sum()), device=keep.device)
    rows = row_of[positions]
    return rows[rows >= 0], tokens[rows >= 0]


def penalize(logits_NV: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits_NV`` with ``penalty`` subtracted at each ``(rows[k], tokens[k])`` (pairs unique), in place."""
    if rows.numel():
        logits_NV[rows, tokens] -= penalty
    return logits_NV


def in_block(rows: torch.Tensor, tokens: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs whose row lies in ``[start, end)``, their rows counted from ``start``."""
    chosen = (rows >= start) & (rows < end)
    return rows[chosen] - start, tokens[chosen]
