"""Small C kernels that fuse what eager torch runs as many passes over memory, built with the system's C compiler at
first use for this processor and cached in ``native/`` of opdkit's cache (``$OPDKIT_CACHE``, default
``~/.cache/opdkit``). Where no compiler is found, or the build fails, ``kernel`` returns None and the caller runs
its eager torch equivalent (the same arithmetic, slower).

- ``adamw_bf16`` (``opdkit.optimizer``): an AdamW step on bf16 weights with stochastic rounding. Plain C called
  through ``ctypes``, which lets go of the GIL, so the optimizer splits a tensor over threads. ``adamw_8bit``: the
  same step on float32 or bf16 weights whose moments are 8-bit codes (``optim.moments: 8bit``). Both share
  ``rounding.h``.
- ``products.c`` (``opdkit.products``): ``rows_matmul`` and ``bf16_rows_matmul``, a projection of a few float32 rows
  through float32 or bf16 weights, each weight read once for all of them (the decode step's products), and
  ``bf16_to_float``. Their threads are OpenMP's, the runtime torch itself loaded; a compiler without OpenMP builds
  them single-threaded.
- ``decode_layer.c`` (``opdkit.llama_step``): a whole Llama-family decoder layer for one new token per row, its
  products by the same loops as ``products.c`` (``columns.h``).
- ``tensor_heap.cpp`` (``opdkit.memory``): torch's CPU allocator for a run's tensors, best fit over an address
  range of their own. C++ against torch's own headers and ``libc10`` (``torch_library``), built by the system's C++
  compiler; the cache key names torch's version.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
# this processor's vector units: 17x faster than the portable build for adamw_bf16 on an AMD EPYC Zen 4, with the
# same bits (each operation is IEEE-rounded either way); the cache key names the processor, a compiler without the
# flag gets the portable build
NATIVE = ["-march=native"]
ARGUMENTS = {  # each kernel's C signature, for ctypes
    "adamw_bf16": [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float] * 7 + [ctypes.c_uint32],
    "adamw_8bit": [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_float] * 7 + [ctypes.c_uint32],
    "rows_matmul": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4,
    "bf16_rows_matmul": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4,
    "bf16_to_float": [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2,
    "decode_layer": [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2,
    "decode_layer_scratch": [ctypes.c_void_p, ctypes.c_int64],
}
RESULTS = {"decode_layer_scratch": ctypes.c_int64}  # else void
SOURCES = {"rows_matmul": "products", "bf16_rows_matmul": "products", "bf16_to_float": "products",
           "decode_layer_scratch": "decode_layer"}  # else <name>.c
OPENMP = {"products": ["-fopenmp"], "decode_layer": ["-fopenmp"]}  # built without the flag where it fails


def cache_dir() -> Path:
    from ..scenarios import cache_root

    return cache_root() / "native"


@cache
def kernel(name: str):
    """The compiled C function ``name`` (its source: ``native/<SOURCES[name] or name>.c``), or None without a
    working compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source_name = SOURCES.get(name, name)
    openmp = OPENMP.get(source_name, [])
    tries = [FLAGS + NATIVE + openmp, FLAGS + openmp] + ([FLAGS + NATIVE, FLAGS] if openmp else [])
    library = _built(compiler, Path(__file__).with_name(f"{source_name}.c"), tries, ["-lm"], processor())
    if library is None:
        return None
    function = getattr(ctypes.CDLL(str(library)), name)
    function.argtypes, function.restype = ARGUMENTS[name], RESULTS.get(name)
    return function


@cache
def torch_library(name: str) -> ctypes.CDLL | None:
    """``native/<name>.cpp`` built against the torch this process imported (its headers, ``libc10``, its C++ ABI)
    and loaded, or None without a working C++ compiler."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return None
    lib = library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O2", "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             *(f"-I{path}" for path in include_paths())]
    libraries = [f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"]
    library = _built(compiler, Path(__file__).with_name(f"{name}.cpp"), [flags], libraries, torch.__version__)
    return None if library is None else ctypes.CDLL(str(library))


def _built(compiler: str, source: Path, tries: list[list[str]], libraries: list[str], key: str) -> Path | None:
    """The shared library built from ``source`` by the first set of flags in ``tries`` that compiles, linked with
    ``libraries``, cached under a name hashing the source, the headers beside it, the compiler, the flags and ``key``
    (what else the build depends on); None if none compiles."""
    headers = b"".join(header.read_bytes() for header in sorted(source.parent.glob("*.h")))  # columns.h, rounding.h
    digest = hashlib.sha256(source.read_bytes() + headers + "\n".join([compiler, *tries[0], *libraries, key]).encode())
    library = cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if not library.is_file():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # built aside, then renamed: atomic
            built = Path(scratch) / library.name
            if not any(_compile(compiler, flags, source, built, libraries) for flags in tries):
                return None
            built.replace(library)
    return library


def _compile(compiler: str, flags: list[str], source: Path, output: Path, libraries: list[str]) -> bool:
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", str(output), *libraries], capture_output=True)
    except OSError:  # CC names no program
        return False
    return done.returncode == 0


def processor() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags (Linux), else what Python knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        lines = cpuinfo.read_text().splitlines()
        return "\n".join(next((line for line in lines if line.startswith(key)), "") for key in ("model name", "flags"))
    return f"{platform.machine()} {platform.processor()}"
