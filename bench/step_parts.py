"""Three parts of a step measured against what they replaced, on the SmolLM2 student, in one process.

    .venv/bin/python bench/step_parts.py [--threads 2] [--batch 4] [--tokens 32] [--precision auto] [--weights fp32]

- decoding, in the precision a run would use (``auto``: bf16 autocast where the processor has bf16 units): ms per
  new token of ``opdkit.decode.decode`` (one token and its log-prob per step, few-row products in the form
  ``decode.row_major`` picks, the student's layers through ``opdkit.llama_step``, in float32 arithmetic a layer per
  call of ``native/decode_layer.c``, and so too under a bf16 autocast where ``decode.float32_steps`` says so:
  float32 arithmetic on the weights rounded to bf16); of the same with each layer through ``llama_step``'s torch
  operators (before that kernel; where ``float32_steps`` applies, in the autocast's bf16 products, before it); of
  the same with every few-row product as ``W @ x.T`` whatever the dtype, in the autocast's dtype (the rule before
  ``row_major`` took the processor's bf16 units into account); of the same loop over ``transformers``' forward
  (what ``decode`` does for a model ``llama_step`` does not support); and of ``transformers``'
  ``generate(output_scores=True)`` followed by the ``[B, C, V]`` float32 log-softmax that the rollout used to read
  one log-prob per position from; alternated, medians of 3. ``--weights bf16``: the student's weights in bf16,
  computing in float32 on them where the precision is float32 (``student.dtype: bf16``);
- the trained student's attention (``opdkit.attention``): ms of a forward and backward of the student's decoder
  layers over ``--batch`` rows of 71 positions (the vs_trl work's 284; the first row left-padded by 5), with
  transformers' SDPA attention in bf16 (before) and with ``opdkit_sdpa``'s float32 attention, bf16 weights
  (``student.dtype: bf16``) and float32 weights under a bf16 autocast; alternated, medians of 5. Where
  ``attention.applies`` is false on this machine a run does not take it, and the bench says so;
- the optimizer: seconds and extra peak memory of one AdamW step over the student's parameters, torch's ``fused``
  against ``foreach`` and the per-parameter loop on float32 weights, and opdkit's on bf16 ones
  (``student.dtype: bf16``) and with 8-bit moments on either (``optim.moments: 8bit``), each in a fresh process
  (peak RSS is per process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def student():
    from opdkit.models import load_model
    from opdkit.scenarios import resolve_builtin

    return load_model(str(resolve_builtin("builtin:smollm2/student")))


def decoding(args) -> dict:
    import contextlib
    from unittest import mock

    import torch
    from transformers import GenerationConfig

    import opdkit.decode
    from opdkit.decode import decode
    from opdkit.llama_step import LlamaStep
    from opdkit.models import autocast, resolve_precision
    from opdkit.products import float32_arithmetic

    model = student()
    if args.weights == "bf16":
        model.to(torch.bfloat16)
        if resolve_precision(args.precision, torch.device("cpu")) == torch.float32:
            float32_arithmetic(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, 40), generator=g)
    mask = torch.ones_like(ids)
    config = GenerationConfig(max_new_tokens=args.tokens, do_sample=True, top_k=0, return_dict_in_generate=True,
                              output_scores=True, pad_token_id=0, eos_token_id=None)

    def ours(*patches):
        """``decode`` with each ``(object, attribute, value)`` of ``patches`` in place (an earlier rule or path)."""

        def run():
            with contextlib.ExitStack() as stack:
                for target, name, value in patches:
                    stack.enter_context(mock.patch.object(target, name, value))
                decode(model, ids, mask, args.tokens, eos_id=-1, pad_id=0)
        return run

    no_float32_steps = (opdkit.decode, "float32_steps", lambda rows, device, dtype: False)
    # the rule before bench/step_profile.py: W @ x.T for any few-row CPU step, in the autocast's dtype
    always_row_major = (opdkit.decode, "row_major",
                        lambda rows, device, dtype: device.type == "cpu" and rows <= opdkit.decode.ROW_MAJOR_ROWS)

    def generate():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        scores.gather(-1, out.sequences[:, ids.shape[1]:].unsqueeze(-1))

    precision = resolve_precision(args.precision, torch.device("cpu"))
    before = ({"ours, bf16 products": ours(no_float32_steps)}  # what the layers in torch operators are here
              if opdkit.decode.float32_steps(args.batch, torch.device("cpu"), precision)
              else {"ours, layers in torch operators": ours((LlamaStep, "_native", lambda self, *args: None))})
    variants = {"ours": ours(), **before,
                "ours, W @ x.T at any dtype": ours(always_row_major, no_float32_steps),
                "ours over transformers' forward": ours((opdkit.decode, "unsupported",
                                                         lambda model: "measured without llama_step")),
                "generate": generate}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad(), autocast(torch.device("cpu"), precision):
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(3):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) / args.tokens * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def training_attention(args) -> dict:
    import torch

    from opdkit.attention import IMPLEMENTATION

    ids = torch.randint(0, 49152, (args.batch, 71), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    times: dict[str, list[float]] = {}
    for weights in ("bf16 weights", "float32 weights, bf16 autocast"):
        model = student().to(torch.bfloat16) if weights == "bf16 weights" else student()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights != "bf16 weights")

        def run(implementation: str) -> float:
            model.set_attn_implementation(implementation)
            start = time.perf_counter()
            with autocast:
                hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            hidden.float().square().mean().backward()
            return (time.perf_counter() - start) * 1000

        for implementation in ("sdpa", IMPLEMENTATION):
            run(implementation)  # warm-up
        for _ in range(5):
            for implementation, name in (("sdpa", "bf16 SDPA (before)"), (IMPLEMENTATION, "float32 attention")):
                times.setdefault(f"{weights}, {name}", []).append(run(implementation))
    return {name: statistics.median(t) for name, t in times.items()}


def optimizer_step(mode: str) -> dict:
    import torch

    from opdkit.optimizer import AdamW

    model = student().to(torch.bfloat16 if mode in ("opdkit-bf16", "opdkit-bf16-8bit") else torch.float32)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    if mode.startswith("opdkit"):
        optimizer = AdamW(params, lr=1e-5, moments="8bit" if mode.endswith("8bit") else "auto")
    else:
        kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[mode]
        optimizer = torch.optim.AdamW(params, lr=1e-5, **kwargs)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(6):  # the first step allocates the state
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    state_mib = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": statistics.median(times[1:]), "extra_peak_mib": peak - base - state_mib,
            "parameters_m": sum(p.numel() for p in params) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="for decoding")
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="the student's, for decoding")
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    from opdkit.models import machine_description

    torch.set_num_threads(args.threads)
    if args.optimizer:
        print(json.dumps(optimizer_step(args.optimizer)))
        return
    from opdkit.models import resolve_precision

    print(machine_description(resolve_precision(args.precision, torch.device("cpu"))))
    ms = decoding(args)
    print(f"decoding, batch {args.batch}, {args.tokens} new tokens, {args.weights} weights, ms per token "
          "(ratio to ours):")
    for name, value in ms.items():
        print(f"  {name:34s} {value:6.1f}  ({value / ms['ours']:.2f}x)")
    from opdkit.attention import applies

    print(f"the trained student's decoder layers, forward and backward, {args.batch} x 71 positions, ms"
          + ("" if applies(student(), torch.device("cpu")) else " (a run here does not take opdkit_sdpa)") + ":")
    for name, value in training_attention(args).items():
        print(f"  {name:58s} {value:7.1f}")
    for mode in ("fused", "foreach", "loop", "opdkit-bf16", "opdkit-fp32-8bit", "opdkit-bf16-8bit"):
        out = subprocess.run([sys.executable, __file__, "--optimizer", mode, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"AdamW {mode:16s} over {r['parameters_m']:.0f}M parameters: {r['seconds']:.3f} s per step, "
              f"{r['extra_peak_mib']:.0f} MiB peak above its state")


if __name__ == "__main__":
    main()
