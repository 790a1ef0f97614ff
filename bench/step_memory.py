"""Where one training step's memory goes, on `bench/vs_trl.py`'s SmolLM2 work, in one process.

    .venv/bin/python bench/step_memory.py [--dtype bf16|fp32] [--moments auto|8bit] [--allocator auto|system]

Sets up `opd train`'s run for vs_trl's config, takes one step (which allocates the optimizer's state), then takes
a second stage by stage under ``torch.profiler``'s memory timeline and prints: the tensors the run holds (student,
teacher, AdamW state), the peak of live tensors above that state in each stage (rollout, teacher, the student's
forward with the loss, backward), the process's resident memory (all of it, and its anonymous part) after imports and
after the first step, and with ``allocator: auto`` the most the tensor heap has held. What resident memory holds
beyond imports, state and a stage's peak is memory the allocator keeps between blocks still in use.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def resident() -> str:
    status = Path("/proc/self/status").read_text()
    field = lambda name: int(status.split(name + ":")[1].split()[0]) / 2**20  # noqa: E731  (kB -> GB)
    return f"resident {field('VmRSS'):.3f} GB (anonymous {field('RssAnon'):.3f}, peak {field('VmHWM'):.3f})"


def mib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="both models' weights")
    parser.add_argument("--moments", choices=["auto", "8bit"], default="auto", help="AdamW's (optim.moments)")
    parser.add_argument("--allocator", choices=["auto", "system"], default="auto", help="for the steps' tensors")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import numpy as np
    import torch
    import yaml
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    import vs_trl
    from opdkit import train
    from opdkit.allocator import tensor_heap_usage
    from opdkit.config import load_config
    from opdkit.teachers import teacher_request

    print("imported: " + resident())
    work = Path(tempfile.mkdtemp())
    config = vs_trl.ours_config("smollm2", work, 0, args.threads, 2, 32, args.dtype, args.moments, args.allocator)
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    run = train.setup(load_config(work / "config.yaml"))
    optimizer, scheduler = train.optimizer_and_schedule(run)
    rng = random.Random(0)
    train.train_step(run, optimizer, scheduler, rng)
    print("after one step: " + resident())
    if heap := tensor_heap_usage():
        print(f"tensor heap: at most {heap.peak / 2**20:.1f} MiB held (blocks in use and gaps between them)")
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    print(f"tensors held: student {mib(run.student.parameters()):.0f} MiB, teacher "
          f"{mib(run.teacher.model.parameters()):.0f} MiB, AdamW state {mib(state):.0f} MiB")

    def stage(label, work):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True, record_shapes=True) as p:
            out = work()
        _, sizes = MemoryProfileTimeline(p._memory_profile())._coalesce_timeline(torch.device("cpu"))
        live = np.array(sizes).sum(1)
        print(f"  {label:<22} live tensors peak {(live.max() - live[0]) / 2**20:6.1f} MiB above the stage's start")
        return out

    print("the second step, stage by stage:")
    batch = stage("rollout", lambda: train.collect(run, rng, 1))
    support, top_k, entropy = teacher_request(run.config, run.method)
    signal = stage("teacher", lambda: run.teacher.score(batch, support, top_k, entropy=entropy))

    def forward_and_loss():
        logits, hidden = train.student_forward(run, batch, run.trained)
        return run.method.token_loss(logits, batch, signal, hidden=hidden).loss.sum()

    loss = stage("forward and loss", forward_and_loss)
    stage("backward", loss.backward)  # resident memory is not read after these: the profiler holds its own


if __name__ == "__main__":
    main()
