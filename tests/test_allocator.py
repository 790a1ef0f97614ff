"""``allocator: auto``: the tensor heap (``native/tensor_heap.cpp``) places tensors by best fit in a range of their
own, merges what is freed, and changes no result."""

import json
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from opdkit.config import load_config
from opdkit.native import torch_library
from opdkit.train import optimizer_and_schedule, setup, train_step

pytestmark = pytest.mark.skipif(torch_library("tensor_heap") is None, reason="no C++ compiler builds the tensor heap")

# each check in a fresh process: the heap, once in use, serves every later tensor of the process
PLACEMENT = textwrap.dedent("""
    import torch
    from opdkit.allocator import tensor_heap_usage, use_tensor_heap
    assert tensor_heap_usage() is None
    assert use_tensor_heap("auto", torch.device("cpu"))
    MiB = 2**20
    def usage():
        u = tensor_heap_usage()
        return u.in_tensors // MiB, u.in_gaps // MiB, u.peak // MiB
    a = torch.empty(4 * MiB, dtype=torch.uint8)
    b = torch.empty(1 * MiB, dtype=torch.uint8)
    c = torch.empty(2 * MiB, dtype=torch.uint8)
    assert usage() == (7, 0, 7)
    del a                                    # a gap of 4 MiB below b
    assert usage() == (3, 4, 7)
    d = torch.empty(1 * MiB, dtype=torch.uint8)   # best fit: the gap, not the top
    assert usage() == (4, 3, 7)
    e = torch.empty(5 * MiB, dtype=torch.uint8)   # no gap holds it: the top grows
    assert usage() == (9, 3, 12)
    del b, d                                 # merged with the 3 MiB gap around them: one gap of 5 MiB
    assert usage() == (7, 5, 12)
    f = torch.empty(5 * MiB, dtype=torch.uint8)   # fits the merged gap exactly
    assert usage() == (12, 0, 12)
    del e                                    # the top block: the top comes down, no gap
    assert usage() == (7, 0, 12)
    del c, f
    assert usage() == (0, 0, 12)
    # many tensors of random sizes freed in random order: each keeps its own contents, and all of it merges back
    import random
    rng = random.Random(0)
    live = {}
    for i in range(3000):
        if live and rng.random() < 0.45:
            key = rng.choice(list(live))
            tensor, value = live.pop(key)
            assert bool((tensor == value).all()), "a tensor's memory was handed out twice"
        else:
            n = rng.choice([1, 7, 64, 1000, 4096, 50_000, 300_000])
            live[i] = (torch.full((n,), i % 251, dtype=torch.uint8), i % 251)
    for tensor, value in live.values():
        assert bool((tensor == value).all())
    live.clear()
    assert usage()[:2] == (0, 0)
    # the profiler still sees the heap's tensors
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        x = torch.ones(MiB // 4)
        del x
    assert max(e.cpu_memory_usage for e in p.events()) >= MiB
    print("ok")
""")


def test_best_fit_merging_and_contents():
    done = subprocess.run([sys.executable, "-c", PLACEMENT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_system_or_another_device_keeps_or_restores_torch_allocator():
    script = textwrap.dedent("""
        import torch
        from opdkit.allocator import tensor_heap_usage, use_tensor_heap
        assert not use_tensor_heap("system", torch.device("cpu"))
        assert not use_tensor_heap("auto", torch.device("meta"))
        assert tensor_heap_usage() is None
        from opdkit.console import allocator_line
        assert allocator_line("system") == "torch's own allocator (allocator: system)"
        assert use_tensor_heap("auto", torch.device("cpu"))
        assert "heap of their own" in allocator_line("auto")  # what the run's banner says
        kept = torch.ones(1000)
        assert tensor_heap_usage().in_tensors == 4000 + 32  # rounded to 64 bytes
        assert not use_tensor_heap("system", torch.device("cpu"))  # a later run in the same process
        other = torch.ones(1000)
        del kept  # made in the range, returned to it
        assert use_tensor_heap("auto", torch.device("cpu"))
        assert tensor_heap_usage().in_tensors == 0
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def two_steps(config: dict) -> list[dict]:
    run = setup(load_config(base=config))
    optimizer, scheduler = optimizer_and_schedule(run)
    rng = random.Random(0)
    return [train_step(run, optimizer, scheduler, rng) for _ in range(2)]


def test_training_is_the_same_with_either_allocator(tiny_config, tmp_path):
    """Run in a fresh process each, the system allocator first: the heap, once in use, stays for the process."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        from test_allocator import two_steps
        from opdkit.allocator import tensor_heap_usage
        records = two_steps(json.loads(sys.argv[1]))
        print(json.dumps([records[-1]["loss"], records[-1]["grad_norm"], tensor_heap_usage() is not None]))
    """)
    results = {}
    for allocator in ("system", "auto"):
        config = {**tiny_config, "allocator": allocator, "output_dir": str(tmp_path / allocator)}
        done = subprocess.run([sys.executable, "-c", script, json.dumps(config)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[allocator] = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["system"][2] is False and results["auto"][2] is True
    assert results["system"][:2] == results["auto"][:2]  # the same bits
