"""One new token per row through a Llama-family decoder, over a KV cache allocated once for the whole decode.

``transformers``' forward of one token spends much of a small model's decode step outside its matrix products:
module calls, keyword plumbing, a causal mask built again from the whole attention mask, the cache grown by
concatenation. On the SmolLM2 student (10 layers, 4 rows, 2 cores, bf16 on a Xeon with AMX) a step took 16.5 ms
of which 7.5 ms were matrix products; a whole decode is 1.06-1.2x faster this way (``docs/performance.md``).
``LlamaStep`` does the same arithmetic in about 25 operators per layer, the prompt's prefill included: the weights
cast once per decode (not once by autocast for the prefill and again for the steps), rotary tables computed once
for every position the decode can reach (by the model's own rotary module, so every rope type it knows is
honoured), keys and values written in place.

In float32 arithmetic on a CPU (float32 weights, or bf16 ones in ``products.float32_arithmetic``) a new token goes
through each layer in one call of ``native/decode_layer.c`` instead: the same arithmetic, summed in another order,
its products by the few-row loops of ``products.c``. Those 25 operators and 7 product calls a layer were a third of
a step: a whole decode of the SmolLM2 student, 4 rows, 2 cores of an AMD EPYC Zen 3, takes 12.4 ms per new token
against 16.4 with bf16 weights and 15.8 against 19.8 with float32 ones (``bench/step_parts.py``). Under a bf16
autocast on AVX512-BF16 alone (``decode.float32_steps``) the new tokens take that kernel too, in float32 on the
weights rounded to bf16, after a prefill in bf16 products: 10.3 ms per token against 16.9-18.7 (AMD EPYC Zen 4).

It applies to Llama, Mistral, Qwen2 and Qwen3 models made of plain ``nn.Linear`` projections with full
attention (``unsupported`` names anything else, and ``decode.decode`` then keeps ``transformers``' forward):
LoRA-wrapped or FSDP-sharded students, sliding windows, other activations. ``tests/test_fast_paths.py``
checks the log-probs of what it samples against the model's own forward for each of the four families, with
biases, left padding and grouped-query attention, in float32 and under bf16 autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .native import kernel
from .products import project

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(model: PreTrainedModel) -> str | None:
    """Why ``LlamaStep`` cannot run this model (None when it can)."""
    config = model.config
    if config.model_type not in FAMILIES:
        return f"model type {config.model_type!r} (supported: {', '.join(FAMILIES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "a sliding window"
    decoder = model.get_decoder()
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(p) is not torch.nn.Linear for p in projections):
            return "projections that are not plain nn.Linear (a LoRA adapter, a quantized layer)"
    if any(type(p.data) is not torch.Tensor for p in model.parameters()):
        return "parameters that are not plain tensors (sharded)"
    return None


class LlamaStep:
    """``prefill(ids [B, P], key_mask)`` then ``step(tokens [B], column, key_mask)``, each returning the logits
    ``[B, V]`` of the last position: the prompt through columns ``0:P`` of the cache, then one token per row at
    ``column``. ``positions [B, L]`` are every column's position (rotary tables are computed for them once),
    ``key_mask [B, L]`` says which columns hold tokens (left padding is 0).

    ``dtype``: what the products compute in (bf16 under a bf16 autocast, else the weights' dtype), the weights
    cast once; the residual stream, the norms and the rotary embedding stay float32, as ``transformers`` keeps
    them under autocast. ``row_major``: every product as ``W @ x.T`` (``project``), as ``decode`` computes the
    model's own projections for a CPU batch of few rows. ``float32_steps`` (``decode.float32_steps``): the prompt
    in ``dtype`` (bf16), but each new token in float32 arithmetic on those bf16 weights through the decode-layer
    kernel, over a float32 KV cache (where the kernel does not build, new tokens too in ``dtype``, reading that
    cache cast)."""

    def __init__(self, model: PreTrainedModel, positions: torch.Tensor, dtype: torch.dtype, row_major: bool,
                 float32_steps: bool = False):
        decoder, config = model.get_decoder(), model.config
        self.dtype, self.row_major = dtype, row_major
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = decoder.layers[0].self_attn.scaling
        self.embed = decoder.embed_tokens
        def kept(t: torch.Tensor) -> torch.Tensor:
            """``t`` in ``dtype`` (a no-op where it is already); the bf16 weights of a model in float32 arithmetic
            stay bf16, ``project`` widens them as it reads them."""
            return t.detach() if t.dtype == torch.bfloat16 and dtype == torch.float32 else t.detach().to(dtype)

        cast = lambda linear: (kept(linear.weight), None if linear.bias is None else kept(linear.bias))  # noqa: E731
        norm = lambda n: (n.weight.detach().float(), n.variance_epsilon)  # noqa: E731
        self.final_norm, self.head = norm(decoder.norm), cast(model.get_output_embeddings())
        self.layers = []
        for layer in decoder.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((norm(layer.input_layernorm), cast(a.q_proj), cast(a.k_proj), cast(a.v_proj),
                                getattr(a, "q_norm", None) and norm(a.q_norm),
                                getattr(a, "k_norm", None) and norm(a.k_norm), cast(a.o_proj),
                                norm(layer.post_attention_layernorm), cast(m.gate_proj), cast(m.up_proj),
                                cast(m.down_proj)))
        batch, length = positions.shape
        cos, sin = decoder.rotary_emb(torch.zeros(1, device=positions.device), positions)  # any rope type it knows
        self.cos, self.sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, L, hd] float32
        shape, cache = (batch, self.kv_heads, length, self.head_dim), torch.float32 if float32_steps else dtype
        self.keys = [torch.zeros(shape, dtype=cache, device=positions.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=cache, device=positions.device) for _ in self.layers]
        native = (row_major and dtype == torch.float32) or float32_steps
        self.native = self._native(batch, length, config) if native else None

    def _native(self, batch: int, length: int, config) -> tuple | None:
        """The arguments of ``native/decode_layer.c``, one call per layer for a new token (the weights, biases,
        norms, rotary tables and cache as addresses, held here), or None where the kernel does not build."""
        layer_kernel, scratch_size = kernel("decode_layer"), kernel("decode_layer_scratch")
        if layer_kernel is None or scratch_size is None:
            return None
        projections = [layer[i] for layer in self.layers for i in (1, 2, 3, 6, 8, 9, 10)]
        dtypes = {w.dtype for w, _ in projections}
        if len(dtypes) != 1 or dtypes - {torch.float32, torch.bfloat16} or not all(w.is_contiguous()
                                                                                  for w, _ in projections):
            return None
        address = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        self.cos, self.sin = self.cos.contiguous(), self.sin.contiguous()  # [B, 1, L, hd]: rows, columns, dims
        dims = torch.tensor([batch, config.hidden_size, self.heads, self.kv_heads, self.head_dim,
                             config.intermediate_size, length, dtypes == {torch.bfloat16}], dtype=torch.int64)
        threads = torch.get_num_threads()  # every step's: the scratch holds a row of attention scores per thread
        scratch = torch.empty(scratch_size(dims.data_ptr(), threads), dtype=torch.float32)
        held, calls = [dims, scratch], []  # what the addresses point into, kept alive with this step
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            norm_in, q_proj, k_proj, v_proj, q_norm, k_norm, o_proj, norm_post, gate, up, down = layer
            linear = (q_proj, k_proj, v_proj, o_proj, gate, up, down)
            biases = [None if b is None else b.float().contiguous() for _, b in linear]
            pointers = torch.tensor([address(norm_in[0]), *(address(w) for w, _ in linear),
                                     *(address(b) for b in biases), address(norm_post[0]),
                                     address(q_norm and q_norm[0]), address(k_norm and k_norm[0]),
                                     address(self.cos), address(self.sin), address(keys), address(values),
                                     address(scratch)], dtype=torch.int64)
            constants = torch.tensor([norm_in[1], norm_post[1], q_norm[1] if q_norm else 0.0,
                                      k_norm[1] if k_norm else 0.0, self.scaling], dtype=torch.float32)
            held += [biases, pointers, constants]
            calls.append((pointers.data_ptr(), constants.data_ptr()))
        return layer_kernel, dims, calls, threads, held

    def prefill(self, ids: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, 0, key_mask)

    def step(self, tokens: torch.Tensor, column: int, key_mask: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            return self._forward(tokens.unsqueeze(1), column, key_mask)
        layer_kernel, dims, calls, threads, _ = self.native
        with torch.autocast(tokens.device.type, enabled=False):
            x = self.embed(tokens).float().contiguous()  # [B, d], the residual stream, updated in place
            mask = key_mask.to(torch.int64).contiguous()
            for pointers, constants in calls:
                layer_kernel(x.data_ptr(), pointers, dims.data_ptr(), constants, mask.data_ptr(), column, threads)
            return project(self._norm(x, self.final_norm), *self.head, row_major=True)  # float32 few rows

    def _linear(self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        return project(x, *weights, self.row_major)

    @staticmethod
    def _norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
        """RMSNorm in float32, as the models' ``*RMSNorm.forward`` computes it."""
        return F.rms_norm(x.float(), x.shape[-1:], *norm)

    def _rotate(self, x: torch.Tensor, columns: slice) -> torch.Tensor:
        """``x [B, h, T, hd]`` rotated at ``columns``, in float32 (``apply_rotary_pos_emb``)."""
        x, half = x.float(), x.shape[-1] // 2
        return x * self.cos[:, :, columns] + torch.cat((-x[..., half:], x[..., :half]), -1) * self.sin[:, :, columns]

    def _forward(self, ids: torch.Tensor, start: int, key_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(ids.device.type, enabled=False):  # the dtypes are chosen here, operator by operator
            batch, width = ids.shape
            end, columns, hd, dtype = start + width, slice(start, start + width), self.head_dim, self.dtype
            # query t sees the keys of columns <= start + t that hold tokens, and always its own (a padding
            # query attends to itself instead of to nothing); the queries of one key head's `groups` heads are
            # laid side by side, so keys are never repeated
            if width == 1:  # a new token: every column before it that holds one, and its own
                visible = key_mask[:, None, None, :end].bool()
            else:
                causal = torch.ones(width, end, dtype=torch.bool, device=ids.device).tril(start)
                own = causal & ~causal.tril(start - 1)
                visible = (causal & key_mask[:, None, :end].bool() | own).unsqueeze(1).repeat(1, 1, self.groups, 1)
            x = self.embed(ids).float().reshape(batch * width, -1)  # the residual stream
            for layer, keys, values in zip(self.layers, self.keys, self.values):
                norm_in, q_proj, k_proj, v_proj, q_norm, k_norm, o_proj, norm_post, gate, up, down = layer
                h = self._norm(x, norm_in).to(dtype)
                q = self._linear(h, q_proj).reshape(batch, width, self.heads, hd).transpose(1, 2)
                k = self._linear(h, k_proj).reshape(batch, width, self.kv_heads, hd).transpose(1, 2)
                if q_norm is not None:
                    q, k = self._norm(q, q_norm), self._norm(k, k_norm)
                keys[:, :, columns] = self._rotate(k, columns)
                values[:, :, columns] = self._linear(h, v_proj).reshape(batch, width, self.kv_heads, hd).transpose(1, 2)
                q = self._rotate(q, columns).to(dtype).reshape(batch, self.kv_heads, self.groups * width, hd)
                seen_keys, seen_values = keys[:, :, :end].to(dtype), values[:, :, :end].to(dtype)  # float32_steps: cast
                attended = F.scaled_dot_product_attention(q, seen_keys, seen_values, attn_mask=visible,
                                                          scale=self.scaling)  # [B, kv heads, groups * T, hd]
                attended = attended.reshape(batch, self.heads, width, hd).transpose(1, 2).reshape(batch * width, -1)
                x += self._linear(attended, o_proj)
                h = self._norm(x, norm_post).to(dtype)
                x += self._linear(F.silu(self._linear(h, gate)) * self._linear(h, up), down)
            last = x.reshape(batch, width, -1)[:, -1]
            return self._linear(self._norm(last, self.final_norm).to(dtype), self.head)
