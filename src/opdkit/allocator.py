"""Where a CPU run's memory comes from: glibc's heap kept rather than trimmed, and a range of its own for the tensors
that training steps make (``allocator: auto``).

glibc's heap mixes the steps' tensors with the interpreter's and the libraries' small blocks, some of which
outlive a step, and the next step's large tensors go above them: on the SmolLM2 pair of ``bench/vs_trl.py`` the
peak was 0.15-0.2 GB higher than with the tensor heap, by another amount in each identical run. The tensor heap
(``native/tensor_heap.cpp``) gives tensors made after the models and the optimizer's state a range of their own,
best fit within it, and keeps it: the step's peak is then the same in every run (``docs/performance.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

import torch

from .native import torch_library

_in_use = False


def keep_freed_memory() -> None:
    """Let glibc's allocator keep and reuse the memory a step frees instead of handing it back to the system.

    By default every block over 32 MiB (a ``[V, d]`` gradient, a ``[rows, V]`` loss block) is a fresh ``mmap``
    whose pages the kernel faults in and zeroes at first touch, and freed heap is trimmed back: on the SmolLM2
    pair that made the student's forward and backward take 0.4 to 1.3 s from step to step, against a steady
    0.4 s with the memory kept (``docs/performance.md``). The peak is the same either way: it is set by the
    largest step. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, largest = -1, -3, ctypes.c_int(2**31 - 1)
    mallopt(m_mmap_threshold, largest)
    mallopt(m_trim_threshold, largest)


def use_tensor_heap(allocator: str, device: torch.device) -> bool:
    """With ``allocator: auto`` on a CPU, make every CPU tensor allocated from now on come from the tensor heap (until
    a run asks for ``system``; tensors keep the memory they were made in). Call it once the run's lasting tensors
    exist (weights, optimizer state), so that the range holds what steps make and free. False, with torch's own
    allocator in use, for ``allocator: system``, on another device, or where no C++ compiler builds the heap."""
    global _in_use
    wanted = allocator == "auto" and device.type == "cpu"
    library = torch_library("tensor_heap") if wanted or _in_use else None
    if wanted and library is not None:
        library.tensor_heap_install.argtypes = [ctypes.c_uint64]
        # address space only, touched as used: as much as the machine's memory, which no step can exceed
        _in_use = bool(library.tensor_heap_install(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
    elif _in_use:
        library.tensor_heap_uninstall()
        _in_use = False
    return _in_use


@dataclass(frozen=True)
class HeapUsage:
    """Bytes of the tensor heap: in tensors now, in gaps between them, and the most it has ever touched."""

    in_tensors: int
    in_gaps: int
    peak: int


def tensor_heap_usage() -> HeapUsage | None:
    """The tensor heap's usage, or None where it is not in use."""
    if not _in_use:
        return None
    values = [ctypes.c_uint64() for _ in range(3)]
    torch_library("tensor_heap").tensor_heap_usage(*(ctypes.byref(v) for v in values))
    return HeapUsage(*(v.value for v in values))
