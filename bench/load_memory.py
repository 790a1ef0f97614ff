"""Resident memory while a model loads: ``from_pretrained`` (its safetensors mapped) against ``models.from_folder``
(read with ``pread`` where the stored dtype is converted, mapped as ``from_pretrained`` where it is not), each in a
fresh process: the peak of resident memory as the kernel counts it (VmHWM, restarted before loading where the kernel
lets it; else the sampled peak), its anonymous and file-backed parts where sampling every half millisecond saw the
highest resident memory.

    .venv/bin/python bench/load_memory.py                                   # the SmolLM2 teacher, in bf16
    .venv/bin/python bench/load_memory.py --model builtin:smollm2/teacher --dtype fp32

Prints, per way of loading, the peak of resident memory above where it stood before loading (and its anonymous and
file-backed parts at that peak), where it settles once loaded, and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, sys, threading, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from opdkit.models import from_folder, resolve_model_path
torch.set_num_threads(int(sys.argv[4]))
def status():
    text = Path("/proc/self/status").read_text()
    return {k: int(text.split(k + ":")[1].split()[0]) / 2**20 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}  # GB
folder, dtype = Path(resolve_model_path(sys.argv[1])), {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]]
try:  # the kernel's peak of resident memory (VmHWM) restarts from here
    Path("/proc/self/clear_refs").write_text("5")
    exact = True
except OSError:  # a kernel that does not let it: the sampled peak alone
    exact = False
before, peak, done = status(), {"VmRSS": 0.0}, threading.Event()
def watch():
    while not done.is_set():
        now = status()
        if now["VmRSS"] > peak["VmRSS"]:
            peak.update(now)
        time.sleep(0.0005)
watcher = threading.Thread(target=watch)
watcher.start()
start = time.perf_counter()
if sys.argv[2] == "pread":
    model = from_folder(folder, dtype)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
seconds = time.perf_counter() - start
done.set()
watcher.join()
if exact:  # at least every sampled VmRSS since the restart, where sampling can miss a short peak; its parts stay
    peak["VmRSS"] = status()["VmHWM"]  # the sampled peak's
print(json.dumps({"before": before, "peak": peak, "after": status(), "seconds": seconds}))
"""


def measure(model: str, how: str, dtype: str, threads: int) -> dict:
    """One load in a fresh process (``how``: ``mmap`` for ``from_pretrained``, ``pread`` for ``from_folder``):
    resident memory before, at the peak and after, in GB (total, anonymous, file-backed), and its seconds."""
    out = subprocess.run([sys.executable, "-c", CHILD, model, how, dtype, str(threads)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2/teacher")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.model} in {args.dtype}: resident memory above the start of loading, GB")
    for how, name in (("mmap", "from_pretrained"), ("pread", "models.from_folder")):
        r = measure(args.model, how, args.dtype, args.threads)
        above = {k: r["peak"][k] - r["before"][k] for k in ("VmRSS", "RssAnon", "RssFile")}
        print(f"  {name:28s} peak +{above['VmRSS']:.3f} (anonymous +{above['RssAnon']:.3f}, file +{above['RssFile']:.3f})"
              f", settled +{r['after']['VmRSS'] - r['before']['VmRSS']:.3f}, {r['seconds']:.2f} s")


if __name__ == "__main__":
    main()
