"""Batched decoding over the model's KV cache: the sampled token and its sampler log-prob per step.

``decode`` replaces ``generate(output_scores=True)``: that kept every step's ``[B, V]`` processed scores,
stacked them into ``[B, C, V]`` and upcast them to float32 only to read one log-prob per position. Here
each step keeps ``[B]`` token ids and ``[B]`` log-probs, and a step is one forward of the new tokens.

On a CPU, a projection of a few rows through a matrix (every linear layer at decode time) was up to three
times faster here as ``W @ x.T`` than as ``x @ W.T`` (the LM head, ``[4, 576] x [576, 49152]``: 6 ms against
19 ms on an AMD EPYC, 2 threads), so decoding of at most ``ROW_MAJOR_ROWS`` rows uses that form (``row_major``),
except in bf16 on a processor whose bf16 units are AVX512-BF16 dot products, where ``x @ W.T`` is the faster one.
In float32 that form runs through opdkit's ``rows_matmul`` kernel (``products.few_rows``), which reads each weight
once for every row: 15.6 ms per token of the SmolLM2 student at 4 rows against 30 ms (AMD EPYC Zen 3, 2 threads).
Under a bf16 autocast on a processor whose bf16 units are AVX512-BF16 alone, the new tokens are computed in
float32 on the bf16-rounded weights by the decode-layer kernel instead (``float32_steps``): 10.3 ms per token
against 16.9-18.7 in bf16 products (AMD EPYC Zen 4, 2 threads).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from .llama_step import LlamaStep, unsupported
from .models import bf16_units
from .products import FEW_ROWS, is_float32_arithmetic, project


def compute_dtype(model: PreTrainedModel) -> torch.dtype:
    """What the products compute in: the autocast dtype where autocast is on, else float32 for a model of bf16
    weights in float32 arithmetic (``products.float32_arithmetic``), else the weights' dtype."""
    device = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.float32 if is_float32_arithmetic(model) else next(model.parameters()).dtype


def one_position(index: int) -> torch.Tensor:
    """``logits_to_keep`` for the logits of position ``index`` alone. An index tensor, not ``logits_to_keep=1``:
    that slices the hidden states ``[:, -1:]``, a view that ``matmul`` cannot fold into a matrix without gradient,
    so the LM head ran as a ``bmm`` over a ``[B, d, V]`` copy of its weight (a quarter of a SmolLM2 teacher's
    scoring time); an index copies ``[B, 1, d]`` instead."""
    return torch.tensor([index])


def choose(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
           rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token [B], log mu(token) [B])`` from ``logits [B, V]``: the argmax, or a draw from the
    distribution after temperature and nucleus (top-p) truncation, whose log-prob is returned (0 at temperature 0).
    Temperature 0 is greedy (the argmax, whatever ``top_p``), as OpenAI-compatible servers read it: the one way to
    ask for greedy decoding here and through every teacher, so a config's 0 passes as it is.

    Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (at least one), as
    ``transformers``' ``TopPLogitsWarper`` does. ``rows = (offset, total)``: these are rows ``offset`` onward of a
    batch of ``total`` shared among processes; the uniforms of all ``total`` rows are drawn and this share's kept,
    so that each row draws what it would in one process holding the whole batch."""
    if temperature == 0:
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    scores = logits.float() / temperature
    if top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    logprobs = scores.log_softmax(-1)
    # inverse-CDF draw: one uniform per row (torch.multinomial draws one exponential per vocabulary entry). The
    # exponential in float64: in float32 a peaked distribution's tail comes out as denormals (a fifth of a
    # [4, 49152] step of a real model), which made that one operator 30x slower
    cdf = logprobs.double().exp().cumsum(-1)
    offset, total = rows or (0, logits.shape[0])
    uniform = torch.rand(total, 1, device=logits.device, dtype=torch.float64)[offset : offset + logits.shape[0]]
    uniform = uniform * cdf[:, -1:]
    token = torch.searchsorted(cdf, uniform, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return token, logprobs.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def _row_major(linear: torch.nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return project(x.reshape(-1, x.shape[-1]), linear.weight, linear.bias, row_major=True).reshape(*x.shape[:-1], -1)

    return forward


ROW_MAJOR_ROWS = FEW_ROWS  # at most this many rows per step: W @ x.T (``row_major``; measured for 1, 4 and 16 rows)


def row_major(rows: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a decode step of ``rows`` rows computing in ``dtype`` takes its products as ``W @ x.T``: on a CPU,
    for at most ``ROW_MAJOR_ROWS`` rows (float32 on an AMD EPYC Zen 3, bf16 on an Intel Xeon with AMX), but not in
    bf16 where the bf16 units are AVX512-BF16 alone: on an AMD EPYC Zen 4 a whole decode of the SmolLM2 student was
    1.03-1.19x faster as ``x @ W.T``, at 1, 4, 8 and 16 rows (``bench/step_parts.py``, ``docs/performance.md``).
    A fixed rule of the machine, not a timing, so that a seed gives the same bits in every run there."""
    if device.type != "cpu" or rows > ROW_MAJOR_ROWS:
        return False
    return not (dtype == torch.bfloat16 and bf16_units() == "AVX512-BF16")


def float32_steps(rows: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a decode of ``rows`` rows under a bf16 autocast takes each new token in float32 arithmetic on the
    weights rounded to bf16, a layer per call of ``native/decode_layer.c`` (``LlamaStep``; the prompt's prefill
    stays in bf16 products): on a CPU whose bf16 units are AVX512-BF16 alone, for at most ``ROW_MAJOR_ROWS`` rows.
    There torch's bf16 products of a few rows read weights at 7-15 GB/s and float32 ones at 25-31 (AMD EPYC Zen 4);
    the kernel reads each bf16 weight once per group of rows and widens it as it goes. The steps' arithmetic is
    float32 on the same rounded weights, closer to float32 than the autocast's bf16 products. A fixed rule of the
    machine, not a timing."""
    return (device.type == "cpu" and rows <= ROW_MAJOR_ROWS and dtype == torch.bfloat16
            and bf16_units() == "AVX512-BF16")


def columns(prompt_mask: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [B, L], key_mask [B, L])`` of every column a decode can reach, ``L = P + max_new_tokens``: the
    left-padded prompt's (positions following its mask, as ``Rollouts.completion_logits`` assigns them), then one
    per new token."""
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    new = positions[:, -1:] + torch.arange(1, max_new_tokens + 1, device=positions.device)
    ones = prompt_mask.new_ones(prompt_mask.shape[0], max_new_tokens)
    return torch.cat([positions, new], 1), torch.cat([prompt_mask, ones], 1)


@contextlib.contextmanager
def _fast_projections(model: PreTrainedModel, row_major: bool):
    """With ``row_major`` (the form ``row_major(rows, device, dtype)`` picks), decode with ``W @ x.T`` in every
    ``nn.Linear``; restored after. A fixed rule, not a timing, so that the same seed gives the same bits in every run
    (a resumed run included). Decoders that share a model (server threads) take turns; a plain forward of the same
    model from another thread meanwhile computes its products in this form too (equal up to float rounding). Layers
    in float32 arithmetic (``products.float32_arithmetic``) take this form for few rows by themselves."""
    lock = model.__dict__.setdefault("_opd_decode_lock", threading.Lock())
    with lock:
        swapped = ([m for m in model.modules() if type(m) is torch.nn.Linear and not is_float32_arithmetic(m)]
                   if row_major else [])
        for linear in swapped:
            linear.forward = _row_major(linear)
        try:
            yield
        finally:
            for linear in swapped:
                del linear.forward


# Several processes decode their shares of a batch for the same number of steps: under FSDP each forward of the
# student is a collective that all processes join, and each step draws the uniforms of the whole batch (``choose``),
# so that every generator stays where one process holding the batch would leave it. ``lockstep`` (set for the run by
# ``train``) answers whether every process's rows have ended. A context variable, so that a server's worker
# threads in the same process decode on their own.
LOCKSTEP: contextvars.ContextVar[Callable[[bool], bool] | None] = contextvars.ContextVar("lockstep", default=None)


@contextlib.contextmanager
def lockstep(all_true: Callable[[bool], bool]):
    token = LOCKSTEP.set(all_true)
    try:
        yield
    finally:
        LOCKSTEP.reset(token)


@torch.no_grad()
def decode(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
           eos_id: int, pad_id: int, temperature: float = 1.0, top_p: float = 1.0,
           rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(completion_ids [B, C], sampler_logprobs [B, C])`` continuing left-padded prompts, ``C <= max_new_tokens``.

    Rows that have emitted ``eos_id`` get ``pad_id`` after it (log-prob 0); decoding stops when every row has
    ended (in lockstep: every process's). Position ids follow the attention mask, as
    ``Rollouts.completion_logits`` assigns them. ``rows``: this batch's place in one shared among processes
    (``choose``)."""
    all_ended = LOCKSTEP.get() or (lambda ended: ended)
    batch, width = prompt_ids.shape
    positions, key_mask = columns(prompt_mask, max_new_tokens)
    ended = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs = [], []
    was_training = model.training
    model.eval()  # no dropout while sampling
    dtype = compute_dtype(model)
    transposed = row_major(batch, prompt_ids.device, dtype)
    steps = None if unsupported(model) else LlamaStep(model, positions, dtype, transposed,
                                                      float32_steps(batch, prompt_ids.device, dtype))
    with _fast_projections(model, transposed and steps is None):
        if steps is not None:
            logits = steps.prefill(prompt_ids, key_mask)
        else:
            out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions[:, :width],
                        use_cache=True, logits_to_keep=one_position(width - 1))
            logits = out.logits[:, -1]
        for step in range(max_new_tokens):
            token, logprob = choose(logits, temperature, top_p, rows)
            token = token.masked_fill(ended, pad_id)
            tokens.append(token)
            logprobs.append(logprob.masked_fill(ended, 0.0))
            ended = ended | (token == eos_id)
            if all_ended(bool(ended.all())) or step == max_new_tokens - 1:
                break
            column = width + step
            if steps is not None:
                logits = steps.step(token, column, key_mask)
            else:
                out = model(input_ids=token.unsqueeze(1), attention_mask=key_mask[:, : column + 1],
                            position_ids=positions[:, column : column + 1], past_key_values=out.past_key_values,
                            use_cache=True)
                logits = out.logits[:, -1]
    model.train(was_training)
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)
